#!/usr/bin/env bash
# A local Iris region (cluster mode) on loopback: one tansu broker, one Redis, two iris-core
# members and two iris-edge nodes.
#
#   scripts/cluster.sh up        start everything, wait for every ready line, print addresses
#   scripts/cluster.sh down      SIGTERM edges then cores (SIGKILL after 10 s), stop broker, Redis
#   scripts/cluster.sh status    what runs; exit 0 only when all six processes run
#
# What `up` starts (in this order; any failure stops what it started and exits 1):
#   broker   scripts/kafka.sh start (memory storage) with KAFKA_DATA=$CLUSTER_DATA/kafka;
#            port KAFKA_PORT (kafka.sh: default 19092, or the next free one)
#   redis    scripts/redis.sh start with REDIS_DATA=$CLUSTER_DATA/redis; port REDIS_PORT
#            (default 16379)
#   core-0   iris-core --member 0 --members 2, data dir $CLUSTER_DATA/core-0, admin
#            127.0.0.1:$CORE0_ADMIN_PORT (default 9100)
#   core-1   the same as member 1, $CLUSTER_DATA/core-1, admin $CORE1_ADMIN_PORT (default 9101)
#   edge-1   iris-edge --bus kafka --node-id 1, client 127.0.0.1:$EDGE1_PORT (default 8085),
#            admin $EDGE1_ADMIN_PORT (default 9085), data dir $CLUSTER_DATA/edge-1
#   edge-2   node 2, client $EDGE2_PORT (default 8086), admin $EDGE2_ADMIN_PORT (default 9086)
# Every process gets --region $CLUSTER_REGION (default local) and --partitions
# $CLUSTER_PARTITIONS (default 16); edges run $EDGE_SHARDS shards each (default 2; each shard
# locks about 1.5 MiB, see README "Host requirements"). LISTEN_HOST (default 127.0.0.1) is the
# edges' client bind address.
#
# Binaries: $CLUSTER_BIN_DIR (default target/release); when iris-edge or iris-core is missing
# there, `cargo build --release -p iris-edge -p iris-core` builds them (CLUSTER_BIN_DIR=
# target/debug uses debug builds and builds those instead).
#
# Files under $CLUSTER_DATA (default ./data/cluster): NAME.pid, NAME.log (standard error: the
# tracing log, RUST_LOG filters it), NAME.out (standard output: the ready line), for NAME in
# core-0 core-1 edge-1 edge-2 (plain text: NO_COLOR=1); kafka/ and redis/ hold the broker's and
# Redis's own files.
# A core's data dir is kept across down/up: a member restarted on it resumes from its committed
# offsets (the broker's memory storage, though, starts empty on every up).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA="${CLUSTER_DATA:-$ROOT/data/cluster}"
case "$DATA" in /*) ;; *) DATA="$ROOT/$DATA" ;; esac
BIN_DIR="${CLUSTER_BIN_DIR:-$ROOT/target/release}"
case "$BIN_DIR" in /*) ;; *) BIN_DIR="$ROOT/$BIN_DIR" ;; esac
REGION="${CLUSTER_REGION:-local}"
PARTITIONS="${CLUSTER_PARTITIONS:-16}"
SHARDS="${EDGE_SHARDS:-2}"
LISTEN_HOST="${LISTEN_HOST:-127.0.0.1}"
EDGE1_PORT="${EDGE1_PORT:-8085}"
EDGE2_PORT="${EDGE2_PORT:-8086}"
EDGE1_ADMIN_PORT="${EDGE1_ADMIN_PORT:-9085}"
EDGE2_ADMIN_PORT="${EDGE2_ADMIN_PORT:-9086}"
CORE0_ADMIN_PORT="${CORE0_ADMIN_PORT:-9100}"
CORE1_ADMIN_PORT="${CORE1_ADMIN_PORT:-9101}"
export KAFKA_DATA="$DATA/kafka"
export REDIS_DATA="$DATA/redis"
export REDIS_PORT="${REDIS_PORT:-16379}"
READY_TIMEOUT="${CLUSTER_READY_TIMEOUT:-60}"
# Stop order: edges first (they drain their clients into the bus), then the cores.
PROCS=(edge-1 edge-2 core-0 core-1)

die() { echo "cluster.sh: $*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pid_of() { [ -f "$DATA/$1.pid" ] && cat "$DATA/$1.pid"; }

alive() {
  local pid
  pid="$(pid_of "$1" 2>/dev/null)" || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

# The ready line of NAME (empty when none yet).
ready_line() {
  case "$1" in
    core-*) grep -m1 '^iris-core ready ' "$DATA/$1.out" 2>/dev/null || true ;;
    edge-*) grep -m1 '^iris-edge listening ' "$DATA/$1.out" 2>/dev/null || true ;;
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
    die "no iris-edge/iris-core in $BIN_DIR after the build (set CLUSTER_BIN_DIR)"
}

# start NAME BINARY ARGS...: runs it in its own session, pid in NAME.pid.
start_proc() {
  local name="$1" bin="$2"
  shift 2
  : >"$DATA/$name.out"
  echo "--- $(date -Is) start: $bin $*" >>"$DATA/$name.log"
  NO_COLOR=1 setsid "$bin" "$@" </dev/null >>"$DATA/$name.out" 2>>"$DATA/$name.log" &
  echo $! >"$DATA/$name.pid"
}

# wait_ready NAME...: until each prints its ready line; dies (after `down`) when one exits or
# the timeout passes.
wait_ready() {
  local deadline=$((SECONDS + READY_TIMEOUT)) name
  for name in "$@"; do
    while [ -z "$(ready_line "$name")" ]; do
      if ! alive "$name"; then
        echo "cluster.sh: $name exited during startup; last lines of $DATA/$name.log:" >&2
        tail -n 20 "$DATA/$name.log" >&2 || true
        cmd_down >&2 || true
        exit 1
      fi
      if [ "$SECONDS" -ge "$deadline" ]; then
        echo "cluster.sh: $name printed no ready line within ${READY_TIMEOUT}s; last lines of $DATA/$name.log:" >&2
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

cmd_up() {
  local name
  for name in "${PROCS[@]}"; do
    alive "$name" && die "$name is already running (pid $(pid_of "$name")): run $0 down first"
  done
  for p in "$EDGE1_PORT" "$EDGE2_PORT" "$EDGE1_ADMIN_PORT" "$EDGE2_ADMIN_PORT" \
    "$CORE0_ADMIN_PORT" "$CORE1_ADMIN_PORT"; do
    port_open "$p" && die "port $p is already in use (see the *_PORT variables in $0)"
  done
  ensure_bins
  mkdir -p "$DATA"
  "$ROOT/scripts/kafka.sh" start
  local kport
  kport="$(cat "$KAFKA_DATA/port")"
  "$ROOT/scripts/redis.sh" start
  local common=(--brokers "127.0.0.1:$kport" --redis "redis://127.0.0.1:$REDIS_PORT/"
    --region "$REGION" --partitions "$PARTITIONS")
  local m
  for m in 0 1; do
    local admin_port="$CORE0_ADMIN_PORT"
    [ "$m" = 1 ] && admin_port="$CORE1_ADMIN_PORT"
    mkdir -p "$DATA/core-$m"
    start_proc "core-$m" "$BIN_DIR/iris-core" "${common[@]}" --data-dir "$DATA/core-$m" \
      --member "$m" --members 2 --admin "127.0.0.1:$admin_port"
  done
  wait_ready core-0 core-1
  local n
  for n in 1 2; do
    local port="$EDGE1_PORT" admin="$EDGE1_ADMIN_PORT"
    if [ "$n" = 2 ]; then port="$EDGE2_PORT" admin="$EDGE2_ADMIN_PORT"; fi
    mkdir -p "$DATA/edge-$n"
    start_proc "edge-$n" "$BIN_DIR/iris-edge" --bus kafka "${common[@]}" --node-id "$n" \
      --listen "$LISTEN_HOST:$port" --admin "127.0.0.1:$admin" --shards "$SHARDS" \
      --data-dir "$DATA/edge-$n"
  done
  wait_ready edge-1 edge-2
  echo "region $REGION up (broker 127.0.0.1:$kport, redis 127.0.0.1:$REDIS_PORT, $PARTITIONS partitions):"
  describe
}

# One line per process: name, pid and the addresses of its ready line.
describe() {
  local name line
  for name in "${PROCS[@]}"; do
    line="$(ready_line "$name")"
    if alive "$name"; then
      case "$name" in
        edge-*) echo "  $name pid $(pid_of "$name") client=$(field "$line" client) admin=$(field "$line" admin) shards=$(field "$line" shards)" ;;
        core-*) echo "  $name pid $(pid_of "$name") member=$(field "$line" member) assigned=$(field "$line" assigned) admin=$(field "$line" admin)" ;;
      esac
    else
      echo "  $name not running"
    fi
  done
}

cmd_down() {
  local name
  for name in "${PROCS[@]}"; do stop_proc "$name"; done
  "$ROOT/scripts/kafka.sh" stop
  "$ROOT/scripts/redis.sh" stop
}

cmd_status() {
  local ok=0 name
  "$ROOT/scripts/kafka.sh" status || ok=1
  "$ROOT/scripts/redis.sh" status || ok=1
  describe
  for name in "${PROCS[@]}"; do alive "$name" || ok=1; done
  return "$ok"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
