#!/usr/bin/env bash
# The test command: starts (installing if needed) every local service, validates the
# deployment templates offline, runs every test of the workspace against them, makes
# the shortened fault-injection run, then builds the fuzz targets. Each test creates and drops its own Postgres
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
# The shortened fault-injection run: real workers under kill -9, Redis FLUSHALL and
# outages, a ClickHouse outage, terminated Postgres backends and a rebalance; exact
# counts at the end. It stops and starts services, so it runs after the tests, alone.
echo "[test] eo chaos --short"
cargo run --quiet -p exactly-once-cli -- chaos --short --seed 7
# The fuzz targets must keep building (running them is scripts/fuzz.sh run). They need
# a nightly toolchain; without one this step says so and is skipped.
if rustup run nightly rustc --version >/dev/null 2>&1; then
  ./scripts/fuzz.sh build
else
  echo "[test] WARNING: no nightly toolchain, fuzz targets not built (rustup toolchain install nightly)" >&2
fi
