#!/usr/bin/env bash
# Checks `eo new` end to end: in a copy of this repository (tracked and new files, so
# the working tree is left alone), makes a function with the `eo` binary already built,
# then builds it and runs its own test against the local services. Part of the test
# command; needs `cargo build -p exactly-once-cli --bins` and scripts/services.sh first.
#
# The copy builds into the same target directory, so the dependencies are shared and
# this takes a few minutes. Its workspace crates may replace the main tree's builds of
# the same crates; the main tree then rebuilds them on its next cargo command (a cost
# in time only). The copy builds no binary but the new function's, so `eo` and the
# function binaries beside it stay the main tree's.
set -euo pipefail
cd "$(dirname "$0")/.."

# Absolute: the steps below run in the copy.
target="$(realpath -m "${CARGO_TARGET_DIR:-target}")"
eo="$target/debug/eo"
if [ ! -x "$eo" ]; then
  echo "[new-function] no $eo: run cargo build -p exactly-once-cli --bins first" >&2
  exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
copy="$work/repo"
mkdir -p "$copy"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done \
  | xargs -0 cp --parents -t "$copy"

name="new-fn-check"
echo "[new-function] eo new $name --topic new-fn-check.events (in a copy at $copy)"
(cd "$copy" && "$eo" new "$name" --topic new-fn-check.events)
# The generated function is registered everywhere: the parity tests must still pass.
echo "[new-function] cargo test -p $name, and the deployment parity tests"
(cd "$copy" && CARGO_TARGET_DIR="$target" cargo test --quiet -p "$name")
(cd "$copy" && CARGO_TARGET_DIR="$target" cargo test --quiet -p integration-tests --test integration deploy::)
echo "[new-function] ok"
