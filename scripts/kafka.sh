#!/usr/bin/env bash
# Local Kafka-API broker (tansu) for the Iris cluster mode and its tests.
#
#   scripts/kafka.sh install              `cargo install tansu --features dynostore,libsql`, only
#                                         if no `tansu` is on PATH or in ~/.cargo/bin (a build of
#                                         about 12 minutes on 2 cores)
#   scripts/kafka.sh start [--sqlite FILE]
#                                         start on 127.0.0.1:$KAFKA_PORT (default 19092; when
#                                         KAFKA_PORT is unset and 19092 is taken, or KAFKA_PORT=0,
#                                         the next free port from 19093) and wait until the port
#                                         accepts connections. Storage: memory (lost on stop), or
#                                         the sqlite file FILE (kept: restart tests).
#                                         Prints and records the port in data/kafka/port.
#   scripts/kafka.sh stop                 SIGTERM, SIGKILL after 10 s
#   scripts/kafka.sh status               exit 0 and "running pid P port N" when up
#   scripts/kafka.sh check                a real Kafka API round trip (below); exit 0 when it works
#
# Pid, log and port under ./data/kafka/ (KAFKA_DATA): tansu.pid, tansu.log, port.
#
# The broker runs as (tansu 0.6; `memory://` needs the dynostore feature, `sqlite://` libsql):
#   tansu broker --cluster-id iris \
#     --listener-url tcp://127.0.0.1:N --advertised-listener-url tcp://127.0.0.1:N \
#     --storage-engine memory://tansu/          (or sqlite:///ABSOLUTE/PATH/FILE.db)
# tansu resolves a sqlite URL's path against its working directory, so the script starts it in
# `/` and passes an absolute path. Flags are given explicitly because tansu also reads
# CLUSTER_ID, LISTENER_URL, STORAGE_ENGINE... from the environment.
#
# The check (`scripts/kafka.sh check`) is a real Kafka API round trip with kafka-python 3.x
# (`pip install kafka-python` into a venv under data/kafka/venv, made on first use): an admin
# client creates topic iris.check.T (CreateTopics, then Metadata lists it), a producer sends one
# record with acks=all to partition 0 (Produce) and a consumer assigned to that partition reads it
# back from the beginning (ListOffsets + Fetch); the value must match.
# kcat/kafkacat from Debian 12 (librdkafka 2.0.2) does NOT work with tansu 0.6: it fails to parse
# tansu's ApiVersions v3 response ("Protocol read buffer underflow for ApiVersion v3"), so every
# request fails. The Rust rdkafka crate bundles a newer librdkafka (DESIGN.md measured it).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA="${KAFKA_DATA:-$ROOT/data/kafka}"
PIDFILE="$DATA/tansu.pid"
LOG="$DATA/tansu.log"
PORTFILE="$DATA/port"
DEFAULT_PORT=19092

die() { echo "kafka.sh: $*" >&2; exit 1; }

find_tansu() {
  if command -v tansu >/dev/null; then command -v tansu; return 0; fi
  if [ -x "$HOME/.cargo/bin/tansu" ]; then echo "$HOME/.cargo/bin/tansu"; return 0; fi
  return 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The port of the running (or last started) broker: KAFKA_PORT, else the recorded one.
current_port() {
  if [ -n "${KAFKA_PORT:-}" ] && [ "$KAFKA_PORT" != 0 ]; then echo "$KAFKA_PORT"
  elif [ -f "$PORTFILE" ]; then cat "$PORTFILE"
  else echo "$DEFAULT_PORT"; fi
}

pid_alive() {
  [ -f "$PIDFILE" ] || return 1
  local pid
  pid="$(cat "$PIDFILE")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

cmd_install() {
  local t
  if t="$(find_tansu)"; then
    echo "tansu already installed: $t ($("$t" --version 2>/dev/null || echo 'version unknown'))"
    return 0
  fi
  command -v cargo >/dev/null || die "cargo not found: install Rust first"
  echo "building tansu (about 12 minutes on 2 cores)..."
  cargo install tansu --features dynostore,libsql
  find_tansu >/dev/null || die "tansu not found after cargo install"
}

choose_port() {
  if [ -n "${KAFKA_PORT:-}" ] && [ "$KAFKA_PORT" != 0 ]; then
    port_open "$KAFKA_PORT" && die "port $KAFKA_PORT is already in use"
    echo "$KAFKA_PORT"
    return 0
  fi
  local p
  if [ -z "${KAFKA_PORT:-}" ] && ! port_open "$DEFAULT_PORT"; then echo "$DEFAULT_PORT"; return 0; fi
  for p in $(seq $((DEFAULT_PORT + 1)) $((DEFAULT_PORT + 200))); do
    if ! port_open "$p"; then echo "$p"; return 0; fi
  done
  die "no free port in $((DEFAULT_PORT + 1))..$((DEFAULT_PORT + 200))"
}

cmd_start() {
  local sqlite=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --sqlite) [ $# -ge 2 ] || die "--sqlite needs a file"; sqlite="$2"; shift ;;
      --sqlite=*) sqlite="${1#--sqlite=}" ;;
      *) die "unknown option for start: $1" ;;
    esac
    shift
  done
  local tansu
  tansu="$(find_tansu)" || die "tansu is not installed: run $0 install"
  if pid_alive; then die "already running (pid $(cat "$PIDFILE")); stop it first"; fi
  mkdir -p "$DATA"
  local storage="memory://tansu/"
  if [ -n "$sqlite" ]; then
    mkdir -p "$(dirname "$sqlite")"
    sqlite="$(cd "$(dirname "$sqlite")" && pwd)/$(basename "$sqlite")"
    storage="sqlite://$sqlite"
  fi
  local port
  port="$(choose_port)"
  echo "$port" > "$PORTFILE"
  echo "--- $(date -Is) start port $port storage $storage" >> "$LOG"
  (
    cd /
    exec setsid "$tansu" broker --cluster-id iris \
      --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" \
      --storage-engine "$storage"
  ) </dev/null >>"$LOG" 2>&1 &
  local pid=$!
  echo "$pid" > "$PIDFILE"
  for _ in $(seq 1 300); do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PIDFILE"
      tail -n 20 "$LOG" >&2 || true
      die "tansu exited during startup (log: $LOG)"
    fi
    if port_open "$port"; then
      echo "kafka (tansu) running pid $pid on 127.0.0.1:$port (storage $storage)"
      return 0
    fi
    sleep 0.1
  done
  tail -n 20 "$LOG" >&2 || true
  die "tansu did not accept connections on port $port within 30 s (log: $LOG)"
}

cmd_stop() {
  if ! pid_alive; then
    rm -f "$PIDFILE"
    echo "kafka not running"
    return 0
  fi
  local pid
  pid="$(cat "$PIDFILE")"
  kill -TERM "$pid"
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$PIDFILE"; echo "kafka stopped"; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
  echo "kafka killed after 10 s"
}

cmd_status() {
  local port
  port="$(current_port)"
  if pid_alive && port_open "$port"; then
    echo "kafka running pid $(cat "$PIDFILE") port $port"
  else
    echo "kafka not running (port $port)"
    return 1
  fi
}

cmd_check() {
  local port venv
  port="$(current_port)"
  cmd_status >/dev/null || die "broker not running on port $port"
  venv="$DATA/venv"
  if ! "$venv/bin/python" -c "import kafka" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q kafka-python
  fi
  "$venv/bin/python" - "$port" <<'PY'
import sys, time
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

bootstrap = f"127.0.0.1:{sys.argv[1]}"
topic = f"iris.check.{time.time_ns()}"
value = f"iris-check-{topic}".encode()
admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
assert topic in admin.list_topics(), f"{topic} not in metadata"
admin.close()
producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
sent = producer.send(topic, value=value, key=b"alice", partition=0).get(timeout=10)
producer.close()
consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=10000,
                         enable_auto_commit=False)
tp = TopicPartition(topic, 0)
consumer.assign([tp])
consumer.seek_to_beginning(tp)
got = next(iter(consumer), None)
consumer.close()
assert got is not None and got.value == value, f"read back {got!r}"
print(f"kafka check ok: created {topic}, produced offset {sent.offset}, fetched it back "
      f"from {bootstrap}")
PY
}

case "${1:-}" in
  install) cmd_install ;;
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  check) cmd_check ;;
  *) echo "usage: $0 install|start [--sqlite FILE]|stop|status|check" >&2; exit 2 ;;
esac
