#!/usr/bin/env bash
# Local Redis for the Iris cluster mode and its tests (sessions live in `session:{user}`).
#
#   scripts/redis.sh install          Debian's redis-server, only if no redis-server is on PATH
#                                     (`apt-get update` only when the package is unknown)
#   scripts/redis.sh start [--aof]    start on 127.0.0.1:$REDIS_PORT (default 16379), wait until
#                                     it answers PING. No persistence (no RDB, no AOF) unless
#                                     --aof: then appendonly with fsync every second, for restart
#                                     tests. Data, pid and log under ./data/redis/ (REDIS_DATA).
#   scripts/redis.sh stop             SIGTERM (Redis fsyncs its AOF and exits), SIGKILL after 10 s
#   scripts/redis.sh status           exit 0 and "running pid P port N" when it answers PING
#
# The server runs as: redis-server --bind 127.0.0.1 --port N --protected-mode yes --daemonize yes
#   --pidfile data/redis/redis.pid --logfile data/redis/redis.log --dir data/redis --save ''
#   --appendonly no|yes [--appendfsync everysec]
# `status` and `start` check liveness with a real command: `redis-cli -p N ping` must print PONG
# (redis-cli comes with redis-tools, a dependency of redis-server). Verified on Debian 12 with
# redis-server 7.0.15.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA="${REDIS_DATA:-$ROOT/data/redis}"
PORT="${REDIS_PORT:-16379}"
PIDFILE="$DATA/redis.pid"
LOG="$DATA/redis.log"

die() { echo "redis.sh: $*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root (or sudo) to run: $*"
  fi
}

pid_alive() {
  [ -f "$PIDFILE" ] || return 1
  local pid
  pid="$(cat "$PIDFILE")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

ping_ok() {
  [ "$(redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null)" = "PONG" ]
}

cmd_install() {
  if command -v redis-server >/dev/null; then
    echo "redis-server already installed: $(command -v redis-server)"
    return 0
  fi
  if ! apt-cache show redis-server >/dev/null 2>&1; then
    as_root apt-get update
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server
  command -v redis-server >/dev/null || die "redis-server not found after install"
}

cmd_start() {
  local aof=no
  while [ $# -gt 0 ]; do
    case "$1" in
      --aof) aof=yes ;;
      *) die "unknown option for start: $1" ;;
    esac
    shift
  done
  command -v redis-server >/dev/null || cmd_install
  if pid_alive; then
    die "already running (pid $(cat "$PIDFILE")); stop it first"
  fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    die "port $PORT is already in use (set REDIS_PORT)"
  fi
  mkdir -p "$DATA"
  rm -f "$PIDFILE"
  local extra=()
  if [ "$aof" = yes ]; then extra=(--appendfsync everysec); fi
  redis-server --bind 127.0.0.1 --port "$PORT" --protected-mode yes \
    --daemonize yes --pidfile "$PIDFILE" --logfile "$LOG" --dir "$DATA" \
    --save '' --appendonly "$aof" "${extra[@]}"
  for _ in $(seq 1 100); do
    if ping_ok && pid_alive; then
      echo "redis running pid $(cat "$PIDFILE") on 127.0.0.1:$PORT (aof: $aof)"
      return 0
    fi
    sleep 0.1
  done
  tail -n 20 "$LOG" >&2 || true
  die "redis did not answer PING on port $PORT within 10 s (log: $LOG)"
}

cmd_stop() {
  if ! pid_alive; then
    rm -f "$PIDFILE"
    echo "redis not running"
    return 0
  fi
  local pid
  pid="$(cat "$PIDFILE")"
  kill -TERM "$pid"
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$PIDFILE"; echo "redis stopped"; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
  echo "redis killed after 10 s"
}

cmd_status() {
  if pid_alive && ping_ok; then
    echo "redis running pid $(cat "$PIDFILE") port $PORT"
  else
    echo "redis not running (port $PORT)"
    return 1
  fi
}

case "${1:-}" in
  install) cmd_install ;;
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 install|start [--aof]|stop|status" >&2; exit 2 ;;
esac
