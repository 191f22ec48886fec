#!/usr/bin/env bash
# The main job: starts (installing if needed) every local service, then runs every
# function as one local worker. It creates missing topics, applies migrations, and
# prints where its HTTP server listens. Ctrl-C stops it gracefully.
#
# Feed it events from another terminal:
#   cargo run -q -p exactly-once-cli --bin eo -- produce --count 1000 --duplicate-rate 0.25
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "[run] cargo not found: install Rust (https://rustup.rs) and run this again" >&2
  exit 1
fi

./scripts/services.sh
echo "[run] building and starting the worker (all functions)"
exec cargo run -q -p exactly-once-cli --bin eo -- run "$@"
