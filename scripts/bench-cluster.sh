#!/usr/bin/env bash
# Cross-edge benchmarks of the regional cluster (see BENCHMARKS.md, "Cluster").
#
# Starts a local region on loopback from release binaries (tansu with memory storage, Redis,
# one or two iris-core members, two iris-edge nodes) and drives it with iris-load: every pair's
# receiver logs in on edge 1 and its sender on edge 2, so every message crosses the broker: its
# live copy once (edge 2 -> edge 1's inbox -> edge 1, the direct path) and its stored copy twice
# (edge 2 -> deliver topic -> iris-core -> edge 1's inbox, dropped there as a duplicate unless it
# comes first). Then the Kafka producer
# micro-benchmark (frames/s per producer thread). Results: perf/results/cluster/*.json, and per
# rate the CPU of each process (cluster-RATE.cpu.txt: % of one core over the run, from
# /proc/PID/stat) and the per-hop latency histograms of the run (cluster-RATE.hops.txt: the
# iris_edge_hop_seconds / iris_core_hop_seconds buckets of every edge and core summed, minus
# those before the run, as count, mean and the bucket bounds of p50/p99/p99.9).
#
# Usage: scripts/bench-cluster.sh [options]
#   --duration S       measured seconds of each run [default: 10]
#   --pairs P          sender -> receiver pairs [default: 100]
#   --rates LIST       open-loop rates, msgs/s, comma-separated [default: 1000,5000,10000,20000]
#   --cores N          iris-core members [default: 1]
#   --edge-config FILE an iris-edge TOML file for both edges (e.g. [cluster] linger_ms)
#   --protocol P       v1 or v2 [default: v1]: with v2 the edges also serve protocol v2 and
#                      iris-load speaks it (SEND_ACK after the recipient's core fsynced)
#   --no-build         use the binaries already in target/release
#   --bin-dir DIR      use the binaries in DIR (implies --no-build; for A/B runs of two builds)
#   --no-producer      skip the producer micro-benchmark
#   --no-saturation    skip the closed-loop saturation run (e.g. with thousands of pairs)
#   --out DIR          results directory [default: perf/results/cluster]
# Needs tansu (scripts/kafka.sh install) and redis-server (scripts/redis.sh install).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DURATION=10
PAIRS=100
RATES=1000,5000,10000,20000
CORES=1
EDGE_CONFIG=""
BUILD=1
PRODUCER=1
SATURATION=1
OUT=perf/results/cluster
BIN_DIR=""
PROTOCOL=v1
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift ;;
    --pairs) PAIRS=$2; shift ;;
    --rates) RATES=$2; shift ;;
    --cores) CORES=$2; shift ;;
    --edge-config) EDGE_CONFIG=$2; shift ;;
    --protocol) PROTOCOL=$2; shift ;;
    --no-build) BUILD=0 ;;
    --bin-dir) BIN_DIR=$2; BUILD=0; shift ;;
    --no-producer) PRODUCER=0 ;;
    --no-saturation) SATURATION=0 ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

case "$PROTOCOL" in
  v1) V2_ARGS=(); TARGET_KEY=client ;;
  v2) V2_ARGS=(--listen-v2 127.0.0.1:0); TARGET_KEY=v2 ;;
  *) echo "--protocol must be v1 or v2" >&2; exit 2 ;;
esac

say() { printf '\n== %s\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

if [ "$BUILD" = 1 ]; then
  say "building release binaries"
  cargo build --release -p iris-edge -p iris-core -p iris-perf
fi
BIN=${BIN_DIR:-$ROOT/target/release}
mkdir -p "$OUT"
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  KAFKA_DATA=$WORK/kafka scripts/kafka.sh stop >/dev/null 2>&1 || true
  REDIS_DATA=$WORK/redis REDIS_PORT=$REDIS_PORT scripts/redis.sh stop >/dev/null 2>&1 || true
  if [ -n "${KEEP_WORK:-}" ]; then echo "logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

REDIS_PORT=$(free_port)
say "broker and redis"
KAFKA_PORT=0 KAFKA_DATA=$WORK/kafka scripts/kafka.sh start >/dev/null
KAFKA_PORT=$(cat "$WORK/kafka/port")
REDIS_DATA=$WORK/redis REDIS_PORT=$REDIS_PORT scripts/redis.sh start >/dev/null
BROKERS=127.0.0.1:$KAFKA_PORT
REDIS=redis://127.0.0.1:$REDIS_PORT
REGION=bench

# wait_line FILE PATTERN: until FILE has a line matching PATTERN (30 s).
wait_line() {
  for _ in $(seq 300); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1" >&2
  cat "$1" >&2
  exit 1
}

say "iris-core x$CORES"
for ((i = 0; i < CORES; i++)); do
  "$BIN/iris-core" --brokers "$BROKERS" --redis "$REDIS" --region $REGION \
    --data-dir "$WORK/core-$i" --member "$i" --members "$CORES" --admin 127.0.0.1:0 \
    >"$WORK/core-$i.out" 2>"$WORK/core-$i.log" &
  PIDS+=($!)
done
for ((i = 0; i < CORES; i++)); do wait_line "$WORK/core-$i.out" "iris-core ready"; done

say "iris-edge x2"
for n in 1 2; do
  "$BIN/iris-edge" --bus kafka --brokers "$BROKERS" --redis "$REDIS" --region $REGION \
    --node-id $n --listen 127.0.0.1:0 --admin 127.0.0.1:0 --shards 1 --data-dir "$WORK/edge-$n" \
    "${V2_ARGS[@]}" \
    ${EDGE_CONFIG:+--config "$EDGE_CONFIG"} \
    >"$WORK/edge-$n.out" 2>"$WORK/edge-$n.log" &
  PIDS+=($!)
done
for n in 1 2; do wait_line "$WORK/edge-$n.out" "iris-edge listening"; done
E1=$(sed -n "s/.* $TARGET_KEY=\([^ ]*\).*/\1/p" "$WORK/edge-1.out")
E2=$(sed -n "s/.* $TARGET_KEY=\([^ ]*\).*/\1/p" "$WORK/edge-2.out")
echo "edge 1 $E1, edge 2 $E2, broker $BROKERS, redis $REDIS"

# Processes to watch (name pid) and admin endpoints to scrape.
WATCH=()
for ((i = 0; i < CORES; i++)); do WATCH+=("iris-core-$i" "${PIDS[$i]}"); done
WATCH+=("iris-edge-1" "${PIDS[$CORES]}" "iris-edge-2" "${PIDS[$((CORES + 1))]}")
WATCH+=("tansu" "$(cat "$WORK/kafka/tansu.pid" 2>/dev/null || echo 0)")
WATCH+=("redis" "$(cat "$WORK/redis/redis.pid" 2>/dev/null || echo 0)")
ADMINS=()
for ((i = 0; i < CORES; i++)); do ADMINS+=("$(sed -n 's/.*admin=\([^ ]*\).*/\1/p' "$WORK/core-$i.out")"); done
for n in 1 2; do ADMINS+=("$(sed -n 's/.*admin=\([^ ]*\).*/\1/p' "$WORK/edge-$n.out")"); done

# cpu_ticks: "name ticks" (utime + stime) of every watched process.
cpu_ticks() {
  local i
  for ((i = 0; i < ${#WATCH[@]}; i += 2)); do
    echo "${WATCH[$i]} $(awk '{print $14 + $15}' "/proc/${WATCH[$((i + 1))]}/stat" 2>/dev/null || echo 0)"
  done
}
# hop_lines: every hop histogram line of every admin endpoint.
hop_lines() {
  local a
  for a in "${ADMINS[@]}"; do
    [ -n "$a" ] && curl -s "http://$a/metrics" | grep -E '^iris_(edge|core)_hop_seconds_(bucket|sum|count)' || true
  done
}
# hop_report BEFORE AFTER: per series, the run's count, mean and p50/p99/p99.9 bucket bounds.
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
    print('%-22s %-14s count %8d  mean %8.2f ms  p50 <= %-9s p99 <= %-9s p99.9 <= %s' % (
        name, hop, n, 1000 * s.get('sum', 0) / n, q(0.5), q(0.99), q(0.999)))
PY
}

# Pair i: receiver on target 2i (edge 1), sender on target 2i+1 (edge 2).
HZ=$(getconf CLK_TCK)
for rate in ${RATES//,/ }; do
  say "cross-edge open loop at $rate msgs/s, $PAIRS pairs"
  cpu_ticks | sort >"$WORK/cpu.before"
  hop_lines >"$WORK/hops.before"
  t0=$(date +%s.%N)
  "$BIN/iris-load" pairs --protocol "$PROTOCOL" --target "$E1" --target "$E2" --pairs "$PAIRS" --rate "$rate" \
    --size 64 --duration "$DURATION" --warmup 3 --drain-timeout 15 \
    --label "cluster-$rate" --json "$OUT/cluster-$rate.json"
  t1=$(date +%s.%N)
  cpu_ticks | sort >"$WORK/cpu.after"
  hop_lines >"$WORK/hops.after"
  echo "CPU over the run ($(echo "$t1 - $t0" | bc) s, warm-up and drain included), % of one core:"
  join "$WORK/cpu.before" "$WORK/cpu.after" |
    awk -v hz="$HZ" -v secs="$(echo "$t1 - $t0" | bc)" \
      '{printf "  %-12s %6.1f %%\n", $1, 100 * ($3 - $2) / hz / secs}' | tee "$OUT/cluster-$rate.cpu.txt"
  echo "per hop, this run:"
  hop_report "$WORK/hops.before" "$WORK/hops.after" | tee "$OUT/cluster-$rate.hops.txt"
done
if [ "$SATURATION" = 1 ]; then
  say "cross-edge closed loop (saturation), $PAIRS pairs x 64 in flight"
  "$BIN/iris-load" pairs --protocol "$PROTOCOL" --target "$E1" --target "$E2" --pairs "$PAIRS" --max --window 64 \
    --size 64 --duration "$DURATION" --warmup 3 --drain-timeout 15 \
    --label cluster-saturation --json "$OUT/cluster-saturation.json"
fi

for n in 1 2; do
  a=$(sed -n 's/.*admin=\([^ ]*\).*/\1/p' "$WORK/edge-$n.out")
  curl -s "http://$a/metrics" | grep -E '^iris_(bus|sessions)_[a-z_]+ |^iris_edge_(bus|messages)_[a-z_]+ ' >"$OUT/edge-$n.metrics.txt" || true
done

if [ "$PRODUCER" = 1 ]; then
  say "kafka producer frames/s per thread (criterion)"
  IRIS_BENCH_BROKERS=$BROKERS cargo bench -p iris-bus --bench producer 2>&1 | tee "$OUT/producer.txt" |
    grep -E 'thrpt|time:' || true
fi
say "done: results in $OUT"
