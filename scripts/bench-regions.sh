#!/usr/bin/env bash
# Cross-region benchmarks: two local regions federated through one global broker (see
# BENCHMARKS.md, "Regions").
#
# Starts from release binaries: a global tansu (sqlite), optionally behind iris-delay-proxy
# (--delay-ms N: every chunk to and from the global broker is held N ms each way; the broker
# advertises the proxy's address, so every client of the global bus goes through it), and per
# region (REGION_A, REGION_B) a tansu (memory), Redis, one iris-core and one iris-edge, all given
# --regions A,B --global-brokers <global or proxy> --home-table <generated>.
# iris-load pairs: pair i's receiver logs in on region A's edge (target 0) and its sender on
# region B's edge (target 1); the generated home table homes every receiver `{prefix}r{i}` in A
# and every sender `{prefix}s{i}` in B, so every message is accepted in B and crosses the global
# bus to its receiver's home A (B edge -> iris.global.route.A -> A's importer -> A's deliver
# topic -> A's core -> A's edge). Latency is end to end from the intended send time (same host
# clock). Results in --out: regions-RATE.json (iris-load), regions-RATE.cpu.txt (% of one core
# per process), regions-RATE.hops.txt (iris_edge_hop_seconds / iris_core_hop_seconds of every
# edge and core of both regions, this run only), regions-RATE.routing.txt (routed-out/imported
# counters of the run), home-table.txt.
#
# Usage: scripts/bench-regions.sh [options]
#   --duration S       measured seconds of each run [default: 10]
#   --pairs P          sender -> receiver pairs [default: 100]
#   --rates LIST       open-loop rates, msgs/s, comma-separated [default: 1000,5000]
#   --delay-ms N       delay proxy in front of the global broker, ms each way [default: 0 = none]
#   --global-memory    the global tansu on memory storage instead of sqlite (shows what sqlite
#                      costs; a real global bus is durable)
#   --edge-config FILE an iris-edge TOML file for both edges
#   --no-build         use the binaries already in target/release
#   --bin-dir DIR      use the binaries in DIR (implies --no-build)
#   --no-saturation    skip the closed-loop saturation run
#   --out DIR          results directory [default: perf/results/regions]
# Needs tansu (scripts/kafka.sh install) and redis-server (scripts/redis.sh install).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DURATION=10
PAIRS=100
RATES=1000,5000
DELAY_MS=0
GLOBAL_MEMORY=0
EDGE_CONFIG=""
BUILD=1
SATURATION=1
OUT=perf/results/regions
BIN_DIR=""
REGION_A=${REGION_A:-east}
REGION_B=${REGION_B:-west}
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift ;;
    --pairs) PAIRS=$2; shift ;;
    --rates) RATES=$2; shift ;;
    --delay-ms) DELAY_MS=$2; shift ;;
    --global-memory) GLOBAL_MEMORY=1 ;;
    --edge-config) EDGE_CONFIG=$2; shift ;;
    --no-build) BUILD=0 ;;
    --bin-dir) BIN_DIR=$2; BUILD=0; shift ;;
    --no-saturation) SATURATION=0 ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { printf '\n== %s\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
find_tansu() {
  if command -v tansu >/dev/null; then command -v tansu; return 0; fi
  if [ -x "$HOME/.cargo/bin/tansu" ]; then echo "$HOME/.cargo/bin/tansu"; return 0; fi
  echo "tansu not found: run scripts/kafka.sh install" >&2
  exit 1
}

if [ "$BUILD" = 1 ]; then
  say "building release binaries"
  cargo build --release -p iris-edge -p iris-core -p iris-perf
fi
BIN=${BIN_DIR:-$ROOT/target/release}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
if [ "$GLOBAL_MEMORY" = 1 ]; then GLOBAL_STORAGE_URL="memory://tansu/"; else GLOBAL_STORAGE_URL="sqlite://$WORK/global/global.db"; fi
PIDS=()
REGIONS=("$REGION_A" "$REGION_B")
declare -A REDIS_PORT
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  local r
  for r in "${REGIONS[@]}"; do
    KAFKA_DATA=$WORK/$r/kafka scripts/kafka.sh stop >/dev/null 2>&1 || true
    [ -n "${REDIS_PORT[$r]:-}" ] &&
      REDIS_DATA=$WORK/$r/redis REDIS_PORT=${REDIS_PORT[$r]} scripts/redis.sh stop >/dev/null 2>&1 || true
  done
  if [ -n "${KEEP_WORK:-}" ]; then echo "logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# wait_line FILE PATTERN: until FILE has a line matching PATTERN (30 s).
wait_line() {
  for _ in $(seq 300); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1" >&2
  cat "$1" >&2
  tail -n 30 "${1%.out}.log" >&2 2>/dev/null || true
  exit 1
}

# The user names of every run (fixed prefixes, so the home table can be written first).
prefix_of() { echo "bench-$1-"; }
RUN_LABELS=()
for rate in ${RATES//,/ }; do RUN_LABELS+=("$rate"); done
[ "$SATURATION" = 1 ] && RUN_LABELS+=(saturation)
HOME_TABLE=$OUT/home-table.txt
{
  echo "# bench-regions.sh: receivers homed in $REGION_A, senders in $REGION_B"
  for label in "${RUN_LABELS[@]}"; do
    p=$(prefix_of "$label")
    for ((i = 0; i < PAIRS; i++)); do
      echo "${p}r$i $REGION_A"
      echo "${p}s$i $REGION_B"
    done
  done
} >"$HOME_TABLE"
echo "home table: $(grep -vc '^#' "$HOME_TABLE") users in $HOME_TABLE"

if [ "$DELAY_MS" != 0 ]; then say "global broker (sqlite) behind a ${DELAY_MS} ms delay proxy"; else say "global broker (sqlite)"; fi
TANSU=$(find_tansu)
GPORT=$(free_port)
ADVERTISED=$GPORT
if [ "$DELAY_MS" != 0 ]; then
  PROXY_PORT=$(free_port)
  ADVERTISED=$PROXY_PORT
fi
mkdir -p "$WORK/global"
(
  cd /
  exec "$TANSU" broker --cluster-id iris-global \
    --listener-url "tcp://127.0.0.1:$GPORT" \
    --advertised-listener-url "tcp://127.0.0.1:$ADVERTISED" \
    --storage-engine "$GLOBAL_STORAGE_URL"
) </dev/null >"$WORK/global/tansu.log" 2>&1 &
PIDS+=($!)
WATCH=("tansu-global" "$!")
for _ in $(seq 300); do port_open "$GPORT" && break; sleep 0.1; done
port_open "$GPORT" || { cat "$WORK/global/tansu.log" >&2; exit 1; }
GLOBAL=127.0.0.1:$GPORT
if [ "$DELAY_MS" != 0 ]; then
  "$BIN/iris-delay-proxy" --listen "127.0.0.1:$PROXY_PORT" --upstream "$GLOBAL" \
    --delay-ms "$DELAY_MS" >"$WORK/global/proxy.out" 2>"$WORK/global/proxy.log" &
  PIDS+=($!)
  WATCH+=("delay-proxy" "$!")
  wait_line "$WORK/global/proxy.out" "iris-delay-proxy listening"
  GLOBAL=127.0.0.1:$PROXY_PORT
fi
echo "global broker 127.0.0.1:$GPORT, given to every process as $GLOBAL"
REGION_FLAGS=(--regions "$REGION_A,$REGION_B" --global-brokers "$GLOBAL" --home-table "$HOME_TABLE")

ADMINS=()
declare -A EDGE
for r in "${REGIONS[@]}"; do
  say "region $r: broker, redis, iris-core, iris-edge"
  mkdir -p "$WORK/$r"
  KAFKA_PORT=0 KAFKA_DATA=$WORK/$r/kafka scripts/kafka.sh start >/dev/null
  REDIS_PORT[$r]=$(free_port)
  REDIS_DATA=$WORK/$r/redis REDIS_PORT=${REDIS_PORT[$r]} scripts/redis.sh start >/dev/null
  WATCH+=("tansu-$r" "$(cat "$WORK/$r/kafka/tansu.pid" 2>/dev/null || echo 0)")
  WATCH+=("redis-$r" "$(cat "$WORK/$r/redis/redis.pid" 2>/dev/null || echo 0)")
  common=(--brokers "127.0.0.1:$(cat "$WORK/$r/kafka/port")" --redis "redis://127.0.0.1:${REDIS_PORT[$r]}"
    --region "$r" "${REGION_FLAGS[@]}")
  "$BIN/iris-core" "${common[@]}" --data-dir "$WORK/$r/core" --member 0 --members 1 \
    --admin 127.0.0.1:0 >"$WORK/$r/core.out" 2>"$WORK/$r/core.log" &
  PIDS+=($!)
  WATCH+=("iris-core-$r" "$!")
done
for r in "${REGIONS[@]}"; do wait_line "$WORK/$r/core.out" "iris-core ready"; done
for r in "${REGIONS[@]}"; do
  "$BIN/iris-edge" --bus kafka --brokers "127.0.0.1:$(cat "$WORK/$r/kafka/port")" \
    --redis "redis://127.0.0.1:${REDIS_PORT[$r]}" --region "$r" "${REGION_FLAGS[@]}" \
    --node-id 1 --listen 127.0.0.1:0 --admin 127.0.0.1:0 --shards 1 --data-dir "$WORK/$r/edge" \
    ${EDGE_CONFIG:+--config "$EDGE_CONFIG"} \
    >"$WORK/$r/edge.out" 2>"$WORK/$r/edge.log" &
  PIDS+=($!)
  WATCH+=("iris-edge-$r" "$!")
done
for r in "${REGIONS[@]}"; do
  wait_line "$WORK/$r/edge.out" "iris-edge listening"
  EDGE[$r]=$(sed -n 's/.*client=\([^ ]*\).*/\1/p' "$WORK/$r/edge.out")
  ADMINS+=("$(sed -n 's/.*admin=\([^ ]*\).*/\1/p' "$WORK/$r/core.out")")
  ADMINS+=("$(sed -n 's/.*admin=\([^ ]*\).*/\1/p' "$WORK/$r/edge.out")")
  echo "region $r: edge ${EDGE[$r]}, broker 127.0.0.1:$(cat "$WORK/$r/kafka/port"), redis ${REDIS_PORT[$r]}"
done
EA=${EDGE[$REGION_A]}
EB=${EDGE[$REGION_B]}

cpu_ticks() {
  local i
  for ((i = 0; i < ${#WATCH[@]}; i += 2)); do
    echo "${WATCH[$i]} $(awk '{print $14 + $15}' "/proc/${WATCH[$((i + 1))]}/stat" 2>/dev/null || echo 0)"
  done
}
# metric_lines REGEX: matching lines of every admin endpoint, prefixed with the endpoint.
metric_lines() {
  local a
  for a in "${ADMINS[@]}"; do
    [ -n "$a" ] && curl -s "http://$a/metrics" | grep -E "$1" | sed "s|^|$a |" || true
  done
}
hop_lines() { metric_lines '^iris_(edge|core)_hop_seconds_(bucket|sum|count)' | cut -d' ' -f2-; }
# routing_report BEFORE AFTER: the run's increase of every routing counter, per endpoint.
routing_report() {
  join <(sort "$1") <(sort "$2") -a 2 -e 0 -o 0,1.2,2.2 2>/dev/null |
    awk '{d = $3 - $2; if (d != 0) printf "  %s %d\n", $1, d}' || true
}
routing_lines() {
  metric_lines '^iris_(edge_routed_out|core_(imported|import_|routed_out|visitor_dropped|duplicates|hop_seconds_count))' |
    awk '{print $1 "/" $2, $3}'
}
hop_report() {
  python3 - "$1" "$2" <<'PY'
import re, sys, collections
def load(path):
    acc = collections.defaultdict(float)
    for line in open(path):
        key, val = line.rsplit(' ', 1)
        acc[key] += float(val)
    return acc
before, after = load(sys.argv[1]), load(sys.argv[2])
series = collections.defaultdict(dict)
for key, v in after.items():
    d = v - before.get(key, 0.0)
    m = re.match(r'(\w+)_(bucket|sum|count)\{hop="([^"]+)"(?:,le="([^"]+)")?\}', key)
    if not m:
        continue
    name, kind, hop, le = m.groups()
    s = series[(name, hop)]
    if kind == 'bucket':
        s.setdefault('b', []).append((float('inf') if le == '+Inf' else float(le), d))
    else:
        s[kind] = d
for (name, hop), s in sorted(series.items()):
    n = s.get('count', 0)
    if n <= 0:
        continue
    b = sorted(s.get('b', []))
    def q(p):
        for le, c in b:
            if c >= p * n:
                return '+Inf' if le == float('inf') else '%g ms' % (le * 1000)
        return '?'
    print('%-22s %-16s count %8d  mean %8.2f ms  p50 <= %-9s p99 <= %-9s p99.9 <= %s' % (
        name, hop, n, 1000 * s.get('sum', 0) / n, q(0.5), q(0.99), q(0.999)))
PY
}

# Pair i: receiver on target 0 (region A's edge), sender on target 1 (region B's edge).
HZ=$(getconf CLK_TCK)
run() { # run LABEL LOAD-ARGS...
  local label=$1
  shift
  cpu_ticks | sort >"$WORK/cpu.before"
  hop_lines >"$WORK/hops.before"
  routing_lines >"$WORK/routing.before"
  local t0 t1 rc=0
  t0=$(date +%s.%N)
  "$BIN/iris-load" pairs --target "$EA" --target "$EB" --pairs "$PAIRS" --size 64 \
    --duration "$DURATION" --warmup 3 --drain-timeout 15 --user-prefix "$(prefix_of "$label")" \
    --label "regions-$label" --json "$OUT/regions-$label.json" "$@" || rc=$?
  t1=$(date +%s.%N)
  [ "$rc" = 0 ] || echo "iris-load exited $rc (results of the run are still written when it got that far)"
  cpu_ticks | sort >"$WORK/cpu.after"
  hop_lines >"$WORK/hops.after"
  routing_lines >"$WORK/routing.after"
  local secs
  secs=$(echo "$t1 - $t0" | bc)
  echo "CPU over the run ($secs s, warm-up and drain included), % of one core:"
  join "$WORK/cpu.before" "$WORK/cpu.after" |
    awk -v hz="$HZ" -v secs="$secs" \
      '{printf "  %-18s %6.1f %%\n", $1, 100 * ($3 - $2) / hz / secs}' | tee "$OUT/regions-$label.cpu.txt"
  echo "per hop, this run:"
  hop_report "$WORK/hops.before" "$WORK/hops.after" | tee "$OUT/regions-$label.hops.txt"
  echo "routing counters, this run:"
  routing_report "$WORK/routing.before" "$WORK/routing.after" | tee "$OUT/regions-$label.routing.txt"
}
for rate in ${RATES//,/ }; do
  say "cross-region open loop at $rate msgs/s, $PAIRS pairs ($REGION_B -> $REGION_A, delay ${DELAY_MS} ms)"
  run "$rate" --rate "$rate"
done
if [ "$SATURATION" = 1 ]; then
  say "cross-region closed loop (saturation), $PAIRS pairs x 64 in flight"
  run saturation --max --window 64
fi
say "done: results in $OUT"
