#!/usr/bin/env bash
# The test command: starts (installing if needed) every local service and the Python
# Kafka clients the payload tests produce with, validates the
# deployment templates offline, checks Cargo.lock against known advisories
# (scripts/audit.sh), checks the lints, runs every test of the workspace against them,
# checks that `eo new` makes a working function, makes the shortened fault-injection
# runs, then builds the fuzz targets. Each test creates and drops its own Postgres
# schema, ClickHouse database and Redis key prefix, so tests run in parallel.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "[test] cargo not found: install Rust (https://rustup.rs) and run this again" >&2
  exit 1
fi

./scripts/services.sh
# Clients nobody here wrote, for the payload tests: Confluent's Python client and
# fastavro, pinned, in a virtualenv of their own (installed once).
EO_PYTHON="$(./scripts/pyclients.sh)"
export EO_PYTHON
./scripts/infra-check.sh
# Known advisories (RustSec) against Cargo.lock, offline from the team's snapshot of the
# database; accepted findings are in .cargo/audit.toml (docs/RELIABILITY.md says why).
./scripts/audit.sh
# Lints (Cargo.toml [workspace.lints]: no unwrap in the library crates outside tests),
# warnings as errors.
if cargo clippy --version >/dev/null 2>&1; then
  echo "[test] cargo clippy --workspace --all-targets"
  cargo clippy --quiet --workspace --all-targets -- -D warnings
else
  echo "[test] WARNING: clippy not installed, lints not checked (rustup component add clippy)" >&2
fi
echo "[test] cargo test --workspace"
cargo test --workspace "$@"
# The binaries the next steps drive: eo (and chaos-faults for the Lambda fault run).
cargo build --quiet -p exactly-once-cli --bins
# `eo new` makes a function that builds, passes its own test and keeps the deployment
# parity tests green (in a copy of the repository).
./scripts/new-function-check.sh
# The shortened fault-injection runs: real consumers under kill -9, Redis FLUSHALL and
# outages, a ClickHouse outage, terminated Postgres backends and a rebalance; exact
# counts at the end. They stop and start services, so they run after the tests, alone.
echo "[test] eo-faults chaos --short (worker)"
cargo run --quiet -p exactly-once-faults -- chaos --short --seed 7
# The same schedule against the Lambda path: each function's binary in Lambda mode
# behind the local MSK event source mapping (eo esm), plus a stalled invocation past
# its timeout and a poller restart.
echo "[test] eo-faults chaos --short --runtime lambda"
cargo build --quiet -p user-events -p notifications
cargo run --quiet -p exactly-once-faults -- chaos --short --seed 7 --runtime lambda
# The fuzz targets must keep building (running them is scripts/fuzz.sh run). They need
# a nightly toolchain; without one this step says so and is skipped.
if rustup run nightly rustc --version >/dev/null 2>&1; then
  ./scripts/fuzz.sh build
else
  echo "[test] WARNING: no nightly toolchain, fuzz targets not built (rustup toolchain install nightly)" >&2
fi
