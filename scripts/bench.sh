#!/usr/bin/env bash
# The Iris benchmark suite (see BENCHMARKS.md).
#
# Builds release, measures the loopback ceiling with the reference echo server, starts iris-edge
# pinned to the server CPUs and drives it with iris-load pinned to the others through the
# standard scenarios, runs the criterion micro-benchmarks, writes perf/results/*.json, draws the
# charts and regenerates the tables of BENCHMARKS.md from the JSON.
#
# Usage: scripts/bench.sh [options]
#   --quick              shorter runs (3 s measured instead of 10; ~2 min in all)
#   --server-cpus LIST   CPUs for iris-edge (and iris-echo) [default: 0]
#   --load-cpus LIST     CPUs for iris-load [default: 1, or 0 on a one-CPU host]
#   --duration S         measured seconds of each pairs run [default: 10, quick: 3]
#   --idle N             idle connections held (connect run and latency runs) [default: 10000]
#   --pairs P            sender -> receiver pairs of the saturation and latency runs [default: 10]
#   --offline N          messages of the offline drain [default: 100000]
#   --no-build           use the binaries already in target/release
#   --no-micro           skip the criterion micro-benchmarks (keep the last criterion.json)
#   --only LIST          run only these steps (comma-separated: echo,connect,saturation,
#                        goals,latency,many,sparse,offline,logins,micro); the report covers
#                        every JSON
#   --many-pairs P       pairs of the realistic "many" runs (2 connections each) [default: 5000]
#   --many-rates LIST    offered rates of the open-loop "many" runs, msgs/s per server core
#                        (space- or comma-separated) [default: 25000,50000,100000]
#   --note TEXT          a note on machine load, printed in BENCHMARKS.md
#   --out DIR            results directory [default: perf/results, with --protocol v2:
#                        perf/results/v2]
#   --protocol v1|v2     client protocol [default: v1]. v2 starts the edge with --listen-v2 on a
#                        free port and its per-connection send limit lifted (the v1 port has none),
#                        drives the v2 port, labels the runs v2-*, runs the steps
#                        saturation,many,sparse,logins unless --only says otherwise (no offline,
#                        no logins-relogin, no echo: not v2 scenarios) and leaves BENCHMARKS.md
#                        alone (the section "Protocol v2 beside v1" is written from the JSON).
#   --transport tcp|tls|ws|wss
#                        transport of --protocol v2 [default: tcp]. tls and wss generate a
#                        self-signed certificate for localhost (openssl) for the run, load it
#                        into the edge ([v2] tls_cert_file / tls_key_file) and trust it in
#                        iris-load (--ca); the edge listens with --listen-v2-tls / -ws / -wss and
#                        the runs are labelled v2-TRANSPORT-* (v2-* for tcp).
# Steps "many" and "sparse" are the realistic chat traffic of the goal table: 5,000 pairs (10,000
# active connections, each sending now and then) at 25k/50k/100k msgs/s and closed loop with one
# message in flight per pair; 50 pairs at 10,000 msgs/s with the edge's CPU per message, per thread.
# Total time at the defaults: about 9 minutes (plus the build); --quick: about 3.
set -euo pipefail
cd "$(dirname "$0")/.."

ncpu=$(nproc)
SERVER_CPUS=0
if [ "$ncpu" -ge 2 ]; then LOAD_CPUS=1; else LOAD_CPUS=0; fi
QUICK=0
DURATION=""
IDLE=10000
PAIRS=10
OFFLINE=100000
MANY_PAIRS=5000
MANY_RATES="25000 50000 100000"
BUILD=1
MICRO=1
ONLY=""
NOTE=""
OUT=""
PROTOCOL=v1
TRANSPORT=tcp

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --server-cpus) SERVER_CPUS=$2; shift ;;
    --load-cpus) LOAD_CPUS=$2; shift ;;
    --duration) DURATION=$2; shift ;;
    --idle) IDLE=$2; shift ;;
    --pairs) PAIRS=$2; shift ;;
    --offline) OFFLINE=$2; shift ;;
    --many-pairs) MANY_PAIRS=$2; shift ;;
    --many-rates) MANY_RATES=${2//,/ }; shift ;;
    --no-build) BUILD=0 ;;
    --no-micro) MICRO=0 ;;
    --only) ONLY=$2; shift ;;
    --note) NOTE=$2; shift ;;
    --out) OUT=$2; shift ;;
    --protocol) PROTOCOL=$2; shift ;;
    --transport) TRANSPORT=$2; shift ;;
    -h|--help) sed -n '2,43p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

case "$PROTOCOL" in
  v1) OUT=${OUT:-perf/results}; V=""; ;;
  v2) OUT=${OUT:-perf/results/v2}; V="v2-"; ONLY=${ONLY:-saturation,many,sparse,logins}
      for step in ${ONLY//,/ }; do
        case "$step" in echo|offline|micro|goals|latency)
          echo "--protocol v2: step $step is not run with v2" >&2; exit 2 ;; esac
      done ;;
  *) echo "--protocol must be v1 or v2" >&2; exit 2 ;;
esac
case "$TRANSPORT" in
  tcp) ;;
  tls|ws|wss)
    [ "$PROTOCOL" = v2 ] || { echo "--transport $TRANSPORT needs --protocol v2" >&2; exit 2; }
    V="v2-$TRANSPORT-" ;;
  *) echo "--transport must be tcp, tls, ws or wss" >&2; exit 2 ;;
esac

if [ "$QUICK" = 1 ]; then
  DURATION=${DURATION:-3}; WARMUP=1; SHORT=2; CRIT_ARGS=(--warm-up-time 0.3 --measurement-time 0.7)
else
  DURATION=${DURATION:-10}; WARMUP=2; SHORT=5; CRIT_ARGS=(--warm-up-time 0.5 --measurement-time 2)
fi

want() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
say() { printf '\n=== %s\n' "$*" >&2; }

# Number of CPUs in a list like 0,2-3.
count_cpus() {
  local n=0 part a b
  IFS=, read -ra parts <<< "$1"
  for part in "${parts[@]}"; do
    if [[ $part == *-* ]]; then a=${part%-*}; b=${part#*-}; n=$((n + b - a + 1)); else n=$((n + 1)); fi
  done
  echo "$n"
}
SHARDS=$(count_cpus "$SERVER_CPUS")
FIRST_SERVER_CPU=${SERVER_CPUS%%[,-]*}

if [ "$BUILD" = 1 ]; then
  say "building release binaries"
  cargo build --release -p iris-edge -p iris-perf --bins
fi
EDGE=target/release/iris-edge
LOAD=target/release/iris-load
ECHO=target/release/iris-echo
mkdir -p "$OUT"

TMP=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT

# Waits for the first stdout line of the server just started; prints it.
first_line() {
  local f=$1 i
  for i in $(seq 1 300); do
    if [ -s "$f" ]; then head -n1 "$f"; return 0; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "server exited; its log:" >&2; cat "$TMP/server.err" >&2; exit 1; fi
    sleep 0.1
  done
  echo "server did not start" >&2; exit 1
}

# With --protocol v2: the v2 listener on a free port, and no per-connection send limit (v1
# connections have none by default; the v2 default of 1,000/s would cap the closed-loop runs).
# With --transport tls|wss: a self-signed certificate for localhost, made for this run (not a CA
# certificate: rustls refuses a CA certificate as the server's own).
EDGE_V2=()
LOAD_TRANSPORT=()
if [ "$PROTOCOL" = v2 ]; then
  printf '[v2]\nsend_rate_per_sec = 100000000\nsend_burst = 100000000\n' > "$TMP/v2.toml"
  EDGE_V2=(--config "$TMP/v2.toml" --listen-v2 127.0.0.1:0)
  case "$TRANSPORT" in
    tls|wss)
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=localhost -addext subjectAltName=DNS:localhost \
        -addext basicConstraints=critical,CA:FALSE \
        -keyout "$TMP/edge.key" -out "$TMP/edge.crt" 2> "$TMP/openssl.err" \
        || { cat "$TMP/openssl.err" >&2; exit 1; }
      printf 'tls_cert_file = "%s"\ntls_key_file = "%s"\n' "$TMP/edge.crt" "$TMP/edge.key" \
        >> "$TMP/v2.toml"
      LOAD_TRANSPORT=(--transport "$TRANSPORT" --ca "$TMP/edge.crt" --server-name localhost) ;;
    ws) LOAD_TRANSPORT=(--transport ws) ;;
  esac
  case "$TRANSPORT" in
    tls) EDGE_V2+=(--listen-v2-tls 127.0.0.1:0) ;;
    ws) EDGE_V2+=(--listen-v2-ws 127.0.0.1:0) ;;
    wss) EDGE_V2+=(--listen-v2-wss 127.0.0.1:0) ;;
  esac
fi

start_edge() {
  rm -rf "$TMP/data"
  taskset -c "$SERVER_CPUS" "$EDGE" "${EDGE_V2[@]}" --listen 127.0.0.1:0 --admin 127.0.0.1:0 \
    --data-dir "$TMP/data" --shards "$SHARDS" > "$TMP/server.out" 2> "$TMP/server.err" &
  SERVER_PID=$!
  local line
  line=$(first_line "$TMP/server.out")
  if [ "$PROTOCOL" = v2 ]; then
    local key=v2
    [ "$TRANSPORT" = tcp ] || key=v2$TRANSPORT
    TARGET=$(sed -n "s/.* $key=\\([^ ]*\\).*/\\1/p" <<< "$line")
  else
    TARGET=$(sed -n 's/.*client=\([^ ]*\).*/\1/p' <<< "$line")
  fi
  [ -n "$TARGET" ] || { echo "no $PROTOCOL $TRANSPORT address in the edge's line: $line" >&2; exit 1; }
  echo "iris-edge pid $SERVER_PID on CPUs $SERVER_CPUS ($SHARDS shards) at $TARGET ($PROTOCOL $TRANSPORT)" >&2
}

stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}

# iris-load SCENARIO LABEL ARGS...: one run, JSON to $OUT/LABEL.json (LABEL prefixed v2- with
# --protocol v2, v2-TRANSPORT- with --transport).
load() {
  local scenario=$1 label=$V$2; shift 2
  say "$label: iris-load $scenario --protocol $PROTOCOL ${LOAD_TRANSPORT[*]} $*"
  "$LOAD" "$scenario" --protocol "$PROTOCOL" "${LOAD_TRANSPORT[@]}" --cpus "$LOAD_CPUS" \
    --label "$label" --json "$OUT/$label.json" "$@"
}

# A figure from a report: figure FILE NAME.
figure() {
  sed -n "s/^ *\"$2\": \([-0-9.e+]*\),\{0,1\}$/\1/p" "$1" | head -n1
}

START=$(date +%s)

if want echo; then
  say "loopback ceiling: iris-echo on CPU $FIRST_SERVER_CPU"
  taskset -c "$FIRST_SERVER_CPU" "$ECHO" --cpu "$FIRST_SERVER_CPU" --listen 127.0.0.1:0 \
    > "$TMP/server.out" 2> "$TMP/server.err" &
  SERVER_PID=$!
  ECHO_ADDR=$(first_line "$TMP/server.out" | awk '{print $3}')
  load echo echo-1 --target "$ECHO_ADDR" --conns 64 --batch 1 --size 64 --duration "$SHORT" --warmup 1 --server-pid "$SERVER_PID"
  load echo echo-8 --target "$ECHO_ADDR" --conns 64 --batch 8 --size 64 --duration "$SHORT" --warmup 1 --server-pid "$SERVER_PID"
  stop_server
fi

if want connect || want saturation || want goals || want latency; then
  start_edge
  if want connect; then
    load connect connect --target "$TARGET" --conns "$IDLE" --rate 20000 --hold 8 --settle 3 \
      --server-pid "$SERVER_PID"
  fi
  if want saturation; then
    load pairs saturation --target "$TARGET" --pairs "$PAIRS" --max --window 64 --size 64 \
      --duration "$DURATION" --warmup "$WARMUP" --server-pid "$SERVER_PID"
    if [ "$QUICK" = 0 ]; then
      # The same closed loop over 10x more pairs: how throughput depends on batching.
      load pairs saturation-100pairs --target "$TARGET" --pairs 100 --max --window 64 --size 64 \
        --duration "$DURATION" --warmup "$WARMUP" --server-pid "$SERVER_PID"
    fi
  fi
  if want goals; then
    # The goals of DESIGN.md at their own rates, open loop: 250,000/s per server core, and
    # half of it with the idle connections held.
    load pairs throughput-goal --target "$TARGET" --pairs "$PAIRS" --rate $((250000 * SHARDS)) \
      --size 64 --duration "$DURATION" --warmup "$WARMUP" --drain-timeout 10 \
      --server-pid "$SERVER_PID"
    load pairs latency-goal --target "$TARGET" --pairs "$PAIRS" --rate $((125000 * SHARDS)) \
      --size 64 --idle "$IDLE" --idle-rate 20000 --duration "$DURATION" --warmup "$WARMUP" \
      --drain-timeout 10 --server-pid "$SERVER_PID"
  fi
  if want latency; then
    SAT=$(figure "$OUT/${V}saturation.json" delivered_per_s)
    [ -n "$SAT" ] || { echo "no saturation figure in $OUT/${V}saturation.json" >&2; exit 1; }
    for pct in 25 50 75; do
      RATE=$(awk -v s="$SAT" -v p="$pct" 'BEGIN { r = int(s * p / 100); if (r < 100) r = 100; print r }')
      load pairs "latency-$pct" --target "$TARGET" --pairs "$PAIRS" --rate "$RATE" --size 64 \
        --idle "$IDLE" --idle-rate 20000 --duration "$DURATION" --warmup "$WARMUP" \
        --drain-timeout 10 --server-pid "$SERVER_PID"
    done
  fi
  stop_server
fi

if want many || want sparse; then
  start_edge
  if want many; then
    # Realistic chat traffic: many connections, each sending now and then (a 64-byte message
    # every 0.2 s per sender at 25,000/s over 5,000 pairs), every message acked.
    for rate in $MANY_RATES; do
      load pairs "many-$((rate / 1000))k" --target "$TARGET" --pairs "$MANY_PAIRS" \
        --rate $((rate * SHARDS)) --size 64 --duration "$DURATION" --warmup "$WARMUP" \
        --drain-timeout 10 --idle-rate 20000 --server-pid "$SERVER_PID"
    done
    # The same connections closed loop, one message in flight per pair: the capacity.
    load pairs many-max --target "$TARGET" --pairs "$MANY_PAIRS" --max --window 1 --size 64 \
      --duration "$DURATION" --warmup "$WARMUP" --server-pid "$SERVER_PID"
  fi
  if want sparse; then
    # 10,000 msgs/s over 50 pairs: the edge's CPU per message (per thread in the JSON).
    load pairs sparse-10k --target "$TARGET" --pairs 50 --rate $((10000 * SHARDS)) --size 64 \
      --duration "$DURATION" --warmup "$WARMUP" --drain-timeout 10 --server-pid "$SERVER_PID"
  fi
  stop_server
fi

if want offline; then
  start_edge
  load offline offline --target "$TARGET" --users 100 --messages "$OFFLINE" --senders 8 --size 64 \
    --settle 1 --server-pid "$SERVER_PID"
  stop_server
fi

if want logins; then
  start_edge
  # From 16 loopback source addresses: with one, the load generator's own connect() spends a
  # core searching for a free port among its connections in TIME_WAIT (BENCHMARKS.md,
  # "2026-12-07 (day)").
  load logins logins --target "$TARGET" --conns 64 --users 10000 --duration "$SHORT" --warmup 1 \
    --source-ips 16 --server-pid "$SERVER_PID"
  if [ "$PROTOCOL" = v1 ]; then
    load logins logins-relogin --target "$TARGET" --conns 64 --users 10000 --relogin \
      --duration "$SHORT" --warmup 1 --server-pid "$SERVER_PID"
  fi
  stop_server
  # The same churn against an edge with auth on: every LOGIN (HELLO) carries an HS256 token,
  # signed by iris-load in the warm-up.
  SECRET=bench-secret-of-at-least-32-bytes-long
  AUTH_CONFIG="$TMP/auth.toml"
  { [ "$PROTOCOL" = v2 ] && cat "$TMP/v2.toml"
    printf '[auth]\nenabled = true\nsecret = "%s"\n' "$SECRET"; } > "$AUTH_CONFIG"
  SAVED_EDGE_V2=("${EDGE_V2[@]}")
  if [ "$PROTOCOL" = v2 ]; then
    EDGE_V2=()
    for arg in "${SAVED_EDGE_V2[@]}"; do
      [ "$arg" = "$TMP/v2.toml" ] && arg=$AUTH_CONFIG
      EDGE_V2+=("$arg")
    done
  else
    EDGE_V2=(--config "$AUTH_CONFIG")
  fi
  start_edge
  EDGE_V2=("${SAVED_EDGE_V2[@]}")
  load logins logins-auth --target "$TARGET" --conns 64 --users 10000 --duration "$SHORT" \
    --warmup 1 --source-ips 16 --jwt-secret "$SECRET" --server-pid "$SERVER_PID"
  stop_server
fi

CRIT=()
if [ "$MICRO" = 1 ] && want micro; then
  say "criterion micro-benchmarks"
  cargo bench -p iris-perf --bench codec --bench presence --bench ring --bench store \
    --bench auth --bench ratelimit --bench tls -- "${CRIT_ARGS[@]}"
  CRIT=(--criterion target/criterion)
fi

if [ "$PROTOCOL" = v2 ]; then
  echo "suite (v2) done in $(( $(date +%s) - START )) s; results in $OUT (BENCHMARKS.md untouched)" >&2
  exit 0
fi

LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
cat > "$OUT/meta.json" <<EOF
{
  "date_utc": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "git_commit": "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo '+uncommitted')",
  "server_cpus": "$SERVER_CPUS",
  "load_cpus": "$LOAD_CPUS",
  "server_cores": $SHARDS,
  "note": "$(printf '%s' "$NOTE" | sed 's/\\/\\\\/g; s/"/\\"/g') Load average at the end of the suite: $LOADAVG.",
  "quick": $([ "$QUICK" = 1 ] && echo true || echo false),
  "server_commands": [
    "taskset -c $FIRST_SERVER_CPU $ECHO --cpu $FIRST_SERVER_CPU --listen 127.0.0.1:0",
    "taskset -c $SERVER_CPUS $EDGE --listen 127.0.0.1:0 --admin 127.0.0.1:0 --data-dir \$TMP/data --shards $SHARDS  (a fresh data directory for each of: connect+saturation+goals+latency, offline, logins)"
  ]
}
EOF

say "charts and BENCHMARKS.md"
"$LOAD" report --results "$OUT" --markdown BENCHMARKS.md "${CRIT[@]}"
echo "suite done in $(( $(date +%s) - START )) s; results in $OUT, tables in BENCHMARKS.md" >&2
