#!/usr/bin/env bash
# Cross-edge benchmarks of the regional cluster (see BENCHMARKS.md, "Cluster").
#
# Starts a local region on loopback from release binaries (tansu with memory storage, Redis,
# one or two iris-core members, two iris-edge nodes) and drives it with iris-load: every pair's
# receiver logs in on edge 1 and its sender on edge 2, so every message crosses the broker twice
# (edge 2 -> deliver topic -> iris-core -> edge 1's inbox -> edge 1). Then the Kafka producer
# micro-benchmark (frames/s per producer thread). Results: perf/results/cluster/*.json.
#
# Usage: scripts/bench-cluster.sh [options]
#   --duration S       measured seconds of each run [default: 10]
#   --pairs P          sender -> receiver pairs [default: 100]
#   --rates LIST       open-loop rates, msgs/s, comma-separated [default: 1000,5000,10000,20000]
#   --cores N          iris-core members [default: 1]
#   --edge-config FILE an iris-edge TOML file for both edges (e.g. [cluster] linger_ms)
#   --no-build         use the binaries already in target/release
#   --no-producer      skip the producer micro-benchmark
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
OUT=perf/results/cluster
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift ;;
    --pairs) PAIRS=$2; shift ;;
    --rates) RATES=$2; shift ;;
    --cores) CORES=$2; shift ;;
    --edge-config) EDGE_CONFIG=$2; shift ;;
    --no-build) BUILD=0 ;;
    --no-producer) PRODUCER=0 ;;
    --out) OUT=$2; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { printf '\n== %s\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

if [ "$BUILD" = 1 ]; then
  say "building release binaries"
  cargo build --release -p iris-edge -p iris-core -p iris-perf
fi
BIN=$ROOT/target/release
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
    --data-dir "$WORK/core-$i" --member "$i" --members "$CORES" \
    >"$WORK/core-$i.out" 2>"$WORK/core-$i.log" &
  PIDS+=($!)
done
for ((i = 0; i < CORES; i++)); do wait_line "$WORK/core-$i.out" "iris-core ready"; done

say "iris-edge x2"
for n in 1 2; do
  "$BIN/iris-edge" --bus kafka --brokers "$BROKERS" --redis "$REDIS" --region $REGION \
    --node-id $n --listen 127.0.0.1:0 --admin 127.0.0.1:0 --shards 1 --data-dir "$WORK/edge-$n" \
    ${EDGE_CONFIG:+--config "$EDGE_CONFIG"} \
    >"$WORK/edge-$n.out" 2>"$WORK/edge-$n.log" &
  PIDS+=($!)
done
for n in 1 2; do wait_line "$WORK/edge-$n.out" "iris-edge listening"; done
E1=$(sed -n 's/.*client=\([^ ]*\).*/\1/p' "$WORK/edge-1.out")
E2=$(sed -n 's/.*client=\([^ ]*\).*/\1/p' "$WORK/edge-2.out")
echo "edge 1 $E1, edge 2 $E2, broker $BROKERS, redis $REDIS"

# Pair i: receiver on target 2i (edge 1), sender on target 2i+1 (edge 2).
for rate in ${RATES//,/ }; do
  say "cross-edge open loop at $rate msgs/s, $PAIRS pairs"
  "$BIN/iris-load" pairs --target "$E1" --target "$E2" --pairs "$PAIRS" --rate "$rate" \
    --size 64 --duration "$DURATION" --warmup 3 --drain-timeout 15 \
    --label "cluster-$rate" --json "$OUT/cluster-$rate.json"
done
say "cross-edge closed loop (saturation), $PAIRS pairs x 64 in flight"
"$BIN/iris-load" pairs --target "$E1" --target "$E2" --pairs "$PAIRS" --max --window 64 \
  --size 64 --duration "$DURATION" --warmup 3 --drain-timeout 15 \
  --label cluster-saturation --json "$OUT/cluster-saturation.json"

for n in 1 2; do
  a=$(sed -n 's/.*admin=\([^ ]*\).*/\1/p' "$WORK/edge-$n.out")
  curl -s "http://$a/metrics" | grep -E '^iris_(bus|sessions)_[a-z_]+ ' >"$OUT/edge-$n.metrics.txt" || true
done

if [ "$PRODUCER" = 1 ]; then
  say "kafka producer frames/s per thread (criterion)"
  IRIS_BENCH_BROKERS=$BROKERS cargo bench -p iris-bus --bench producer 2>&1 | tee "$OUT/producer.txt" |
    grep -E 'thrpt|time:' || true
fi
say "done: results in $OUT"
