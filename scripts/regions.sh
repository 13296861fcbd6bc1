#!/usr/bin/env bash
# Several local Iris regions on loopback, federated through one global broker.
#
#   scripts/regions.sh up [--regions tokyo,frankfurt] [--home-table FILE]
#                          start everything, wait for every ready line, print every address
#   scripts/regions.sh down    SIGTERM edges then cores of every region (SIGKILL after 10 s),
#                              then every region's broker and Redis, then the global broker
#   scripts/regions.sh status  what runs; exit 0 only when every process runs
#
# What `up` starts (any failure stops what it started and exits 1):
#   global      scripts/kafka.sh start --sqlite $REGIONS_DATA/global/kafka/global.db with
#               KAFKA_DATA=$REGIONS_DATA/global/kafka, KAFKA_PORT=0 (next free port from 19093):
#               the global bus (iris.global.route.{region} topics), kept across down/up
#   per region R (in the order of --regions, default tokyo,frankfurt; the order is the region
#   list, append-only: a region's index is its position):
#     broker    scripts/kafka.sh start (memory; REGIONS_BROKER=sqlite keeps a file
#               $REGIONS_DATA/R/kafka/region.db) with KAFKA_DATA=$REGIONS_DATA/R/kafka, KAFKA_PORT=0
#     redis     scripts/redis.sh start with REDIS_DATA=$REGIONS_DATA/R/redis on the first free
#               port from 16380
#     core-0    iris-core --member 0 --members 1, data dir $REGIONS_DATA/R/core-0, admin port 0
#     edge-1    iris-edge --bus kafka --node-id 1, client and admin port 0 (bound addresses are
#     edge-2    printed), data dir $REGIONS_DATA/R/edge-N, $EDGE_SHARDS shards (default 1)
# Every core and edge gets --region R --regions <list> --global-brokers 127.0.0.1:<global>
# --partitions $REGIONS_PARTITIONS (default 16), and --home-table FILE when given.
#
# Binaries: $REGIONS_BIN_DIR (default target/release); built with `cargo build --release -p
# iris-edge -p iris-core` when missing (REGIONS_BIN_DIR=target/debug uses debug builds).
# Files under $REGIONS_DATA (default ./data/regions): `regions` (the list `up` used), `global/`,
# and per region R/NAME.pid, R/NAME.log (stderr), R/NAME.out (stdout: the ready line).
# Region names: 1-64 of [a-z0-9-], not "global".
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA="${REGIONS_DATA:-$ROOT/data/regions}"
case "$DATA" in /*) ;; *) DATA="$ROOT/$DATA" ;; esac
BIN_DIR="${REGIONS_BIN_DIR:-$ROOT/target/release}"
case "$BIN_DIR" in /*) ;; *) BIN_DIR="$ROOT/$BIN_DIR" ;; esac
PARTITIONS="${REGIONS_PARTITIONS:-16}"
SHARDS="${EDGE_SHARDS:-1}"
BROKER="${REGIONS_BROKER:-memory}"
READY_TIMEOUT="${REGIONS_READY_TIMEOUT:-60}"
# Stop order within a region: edges first (they drain their clients into the bus), then the core.
PROCS=(edge-1 edge-2 core-0)

die() { echo "regions.sh: $*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The first port from $1 that nothing listens on and no region of this run has taken.
free_port_from() {
  local p
  for p in $(seq "$1" $(($1 + 500))); do
    if ! port_open "$p" && ! grep -qx "$p" "$DATA/.ports" 2>/dev/null; then
      echo "$p" >>"$DATA/.ports"
      echo "$p"
      return 0
    fi
  done
  die "no free port in $1..$(($1 + 500))"
}

# Process files: R/NAME.
pid_of() { [ -f "$DATA/$1.pid" ] && cat "$DATA/$1.pid"; }

alive() {
  local pid
  pid="$(pid_of "$1" 2>/dev/null)" || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

ready_line() {
  case "$1" in
    */core-*) grep -m1 '^iris-core ready ' "$DATA/$1.out" 2>/dev/null || true ;;
    */edge-*) grep -m1 '^iris-edge listening ' "$DATA/$1.out" 2>/dev/null || true ;;
  esac
}

field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }

ensure_bins() {
  if [ -x "$BIN_DIR/iris-edge" ] && [ -x "$BIN_DIR/iris-core" ]; then return 0; fi
  local profile=(--release)
  [ "$(basename "$BIN_DIR")" = debug ] && profile=()
  echo "building iris-edge and iris-core (cargo build ${profile[*]} -p iris-edge -p iris-core)..."
  (cd "$ROOT" && cargo build "${profile[@]}" -p iris-edge -p iris-core)
  [ -x "$BIN_DIR/iris-edge" ] && [ -x "$BIN_DIR/iris-core" ] ||
    die "no iris-edge/iris-core in $BIN_DIR after the build (set REGIONS_BIN_DIR)"
}

# start_proc R/NAME BINARY ARGS...: runs it in its own session, pid in R/NAME.pid.
start_proc() {
  local name="$1" bin="$2"
  shift 2
  : >"$DATA/$name.out"
  echo "--- $(date -Is) start: $bin $*" >>"$DATA/$name.log"
  NO_COLOR=1 setsid "$bin" "$@" </dev/null >>"$DATA/$name.out" 2>>"$DATA/$name.log" &
  echo $! >"$DATA/$name.pid"
}

wait_ready() {
  local deadline=$((SECONDS + READY_TIMEOUT)) name
  for name in "$@"; do
    while [ -z "$(ready_line "$name")" ]; do
      if ! alive "$name"; then
        echo "regions.sh: $name exited during startup; last lines of $DATA/$name.log:" >&2
        tail -n 20 "$DATA/$name.log" >&2 || true
        cmd_down >&2 || true
        exit 1
      fi
      if [ "$SECONDS" -ge "$deadline" ]; then
        echo "regions.sh: $name printed no ready line within ${READY_TIMEOUT}s; last lines of $DATA/$name.log:" >&2
        tail -n 20 "$DATA/$name.log" >&2 || true
        cmd_down >&2 || true
        exit 1
      fi
      sleep 0.1
    done
  done
}

stop_proc() {
  local name="$1" pid
  if ! alive "$name"; then
    rm -f "$DATA/$name.pid"
    return 0
  fi
  pid="$(pid_of "$name")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$DATA/$name.pid"
      echo "$name stopped"
      return 0
    fi
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$DATA/$name.pid"
  echo "$name killed after 10 s"
}

# The region list `up` used (one per line), empty when never started.
regions_list() { cat "$DATA/regions" 2>/dev/null || true; }

# kafka.sh / redis.sh for one part: in_kafka DIR ARGS..., in_redis DIR PORT ARGS...
in_kafka() { local d="$1"; shift; KAFKA_DATA="$d" KAFKA_PORT=0 "$ROOT/scripts/kafka.sh" "$@"; }
in_redis() { local d="$1" p="$2"; shift 2; REDIS_DATA="$d" REDIS_PORT="$p" "$ROOT/scripts/redis.sh" "$@"; }

cmd_up() {
  local list="tokyo,frankfurt" home_table=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --regions) [ $# -ge 2 ] || die "--regions needs a list"; list="$2"; shift ;;
      --regions=*) list="${1#--regions=}" ;;
      --home-table) [ $# -ge 2 ] || die "--home-table needs a file"; home_table="$2"; shift ;;
      --home-table=*) home_table="${1#--home-table=}" ;;
      *) die "unknown option for up: $1" ;;
    esac
    shift
  done
  local regions=() r
  IFS=, read -r -a regions <<<"$list"
  [ "${#regions[@]}" -ge 1 ] || die "no region in --regions"
  [ "${#regions[@]}" -le 16 ] || die "at most 16 regions"
  for r in "${regions[@]}"; do
    [[ "$r" =~ ^[a-z0-9-]{1,64}$ ]] && [ "$r" != global ] ||
      die "invalid region name '$r' (1-64 of [a-z0-9-], not global)"
  done
  [ "$(printf '%s\n' "${regions[@]}" | sort | uniq -d)" = "" ] || die "duplicate region in $list"
  if [ -n "$home_table" ]; then
    [ -f "$home_table" ] || die "no home table file $home_table"
    home_table="$(cd "$(dirname "$home_table")" && pwd)/$(basename "$home_table")"
  fi
  local old
  for old in $(regions_list); do
    for r in "${PROCS[@]}"; do
      alive "$old/$r" && die "$old/$r is already running (pid $(pid_of "$old/$r")): run $0 down first"
    done
  done
  ensure_bins
  mkdir -p "$DATA/global"
  : >"$DATA/.ports"
  printf '%s\n' "${regions[@]}" >"$DATA/regions"
  [ -n "$home_table" ] && echo "$home_table" >"$DATA/home-table" || rm -f "$DATA/home-table"

  in_kafka "$DATA/global/kafka" start --sqlite "$DATA/global/kafka/global.db"
  local gport
  gport="$(cat "$DATA/global/kafka/port")"
  local region_flags=(--regions "$list" --global-brokers "127.0.0.1:$gport")
  [ -n "$home_table" ] && region_flags+=(--home-table "$home_table")

  for r in "${regions[@]}"; do
    mkdir -p "$DATA/$r"
    if [ "$BROKER" = sqlite ]; then
      in_kafka "$DATA/$r/kafka" start --sqlite "$DATA/$r/kafka/region.db"
    else
      in_kafka "$DATA/$r/kafka" start
    fi
    local rport
    rport="$(free_port_from 16380)"
    echo "$rport" >"$DATA/$r/redis.port"
    in_redis "$DATA/$r/redis" "$rport" start
    local common=(--brokers "127.0.0.1:$(cat "$DATA/$r/kafka/port")"
      --redis "redis://127.0.0.1:$rport/" --region "$r" --partitions "$PARTITIONS"
      "${region_flags[@]}")
    mkdir -p "$DATA/$r/core-0"
    start_proc "$r/core-0" "$BIN_DIR/iris-core" "${common[@]}" --data-dir "$DATA/$r/core-0" \
      --member 0 --members 1 --admin 127.0.0.1:0
  done
  for r in "${regions[@]}"; do wait_ready "$r/core-0"; done
  for r in "${regions[@]}"; do
    local common=(--brokers "127.0.0.1:$(cat "$DATA/$r/kafka/port")"
      --redis "redis://127.0.0.1:$(cat "$DATA/$r/redis.port")/" --region "$r"
      --partitions "$PARTITIONS" "${region_flags[@]}")
    local n
    for n in 1 2; do
      mkdir -p "$DATA/$r/edge-$n"
      start_proc "$r/edge-$n" "$BIN_DIR/iris-edge" --bus kafka "${common[@]}" --node-id "$n" \
        --listen 127.0.0.1:0 --admin 127.0.0.1:0 --shards "$SHARDS" --data-dir "$DATA/$r/edge-$n"
    done
  done
  for r in "${regions[@]}"; do wait_ready "$r/edge-1" "$r/edge-2"; done
  echo "regions up ($list; $PARTITIONS partitions):"
  describe
}

# Every address: the global broker, then per region its broker, Redis, core and edges.
describe() {
  local r name line
  if [ -f "$DATA/global/kafka/port" ]; then
    echo "global broker 127.0.0.1:$(cat "$DATA/global/kafka/port") (sqlite $DATA/global/kafka/global.db)"
  fi
  [ -f "$DATA/home-table" ] && echo "home table $(cat "$DATA/home-table")"
  for r in $(regions_list); do
    echo "region $r: broker 127.0.0.1:$(cat "$DATA/$r/kafka/port" 2>/dev/null || echo '?')" \
      "redis redis://127.0.0.1:$(cat "$DATA/$r/redis.port" 2>/dev/null || echo '?')/"
    for name in "${PROCS[@]}"; do
      line="$(ready_line "$r/$name")"
      if alive "$r/$name"; then
        case "$name" in
          edge-*) echo "  $name pid $(pid_of "$r/$name") client=$(field "$line" client) admin=$(field "$line" admin) shards=$(field "$line" shards)" ;;
          core-*) echo "  $name pid $(pid_of "$r/$name") member=$(field "$line" member) assigned=$(field "$line" assigned) admin=$(field "$line" admin)" ;;
        esac
      else
        echo "  $name not running"
      fi
    done
  done
}

cmd_down() {
  local r name
  for r in $(regions_list); do
    for name in "${PROCS[@]}"; do stop_proc "$r/$name"; done
  done
  for r in $(regions_list); do
    [ -d "$DATA/$r/kafka" ] && in_kafka "$DATA/$r/kafka" stop
    [ -f "$DATA/$r/redis.port" ] && in_redis "$DATA/$r/redis" "$(cat "$DATA/$r/redis.port")" stop
  done
  [ -d "$DATA/global/kafka" ] && in_kafka "$DATA/global/kafka" stop
  return 0
}

cmd_status() {
  local ok=0 r name
  [ -n "$(regions_list)" ] || { echo "no regions started (no $DATA/regions)"; return 1; }
  echo -n "global: "
  in_kafka "$DATA/global/kafka" status || ok=1
  for r in $(regions_list); do
    echo -n "$r: "
    in_kafka "$DATA/$r/kafka" status || ok=1
    echo -n "$r: "
    in_redis "$DATA/$r/redis" "$(cat "$DATA/$r/redis.port" 2>/dev/null || echo 0)" status || ok=1
    for name in "${PROCS[@]}"; do alive "$r/$name" || ok=1; done
  done
  describe
  return "$ok"
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up [--regions a,b] [--home-table FILE] | down | status" >&2; exit 2 ;;
esac
