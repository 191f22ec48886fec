#!/usr/bin/env bash
# The test command: starts (installing if needed) every local service, validates the
# deployment templates offline, then runs every test of the workspace against them. Each test creates and drops its own Postgres
# schema, ClickHouse database and Redis key prefix, so tests run in parallel.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "[test] cargo not found: install Rust (https://rustup.rs) and run this again" >&2
  exit 1
fi

./scripts/services.sh
./scripts/infra-check.sh
echo "[test] cargo test --workspace"
cargo test --workspace "$@"
