#!/usr/bin/env bash
# Runs every test of the workspace: builds the binaries the cross-process tests start, then
# `cargo test`. Extra arguments go to `cargo test` (for example a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
if [ -z "${IRIS_SCYLLA_NODES:-}" ]; then
  echo "note: IRIS_SCYLLA_NODES is not set: no ScyllaDB tests run (none can run on this machine)"
fi
cargo test --workspace "$@"
