#!/usr/bin/env bash
# Runs every test of the workspace: builds the binaries the cross-process tests start, then
# `cargo test`. Extra arguments go to `cargo test` (for example a test name filter).
# Ends with one summary line over every test binary: "N passed, N failed, N skipped".
set -euo pipefail
cd "$(dirname "$0")/.."
# The tests start their own broker and Redis processes: install them if absent (tansu is a
# cargo build of about 12 minutes the first time; redis-server comes from Debian).
scripts/kafka.sh install
scripts/redis.sh install
cargo build --workspace --bins
if [ -z "${IRIS_SCYLLA_NODES:-}" ]; then
  echo "note: IRIS_SCYLLA_NODES is not set: no ScyllaDB tests run (none can run on this machine)"
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { p += $4; f += $6; s += $8 } END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
