#!/usr/bin/env bash
# The fuzz targets in fuzz/ (cargo-fuzz, libFuzzer), over what the outside world
# reaches first: the MSK event (Lambda's payload and POST /invoke's body), its records
# (base64, signed header bytes, odd types), id extraction from headers and payloads, and
# values framed for a schema registry (the frame, Avro datums, schemas).
#
#   scripts/fuzz.sh build            build every target (what the test command checks)
#   scripts/fuzz.sh run [SECONDS]    run each target for SECONDS (default 60)
#   scripts/fuzz.sh run 600 msk_event    one target for ten minutes
#
# Needs a nightly toolchain (rustup toolchain install nightly) and cargo-fuzz, which it
# installs from crates.io when missing. Findings land in fuzz/artifacts/<target>/; replay
# one with: cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[fuzz] $*" >&2; }

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  log "no nightly toolchain: run 'rustup toolchain install nightly' (cargo-fuzz needs it)"
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz from crates.io"
  cargo install --locked cargo-fuzz
fi
# The fuzz crate is not part of the workspace: its own target directory (beside the
# workspace's when CARGO_TARGET_DIR points elsewhere, so CI reuses it).
target_dir="${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/fuzz}"
target_dir="${target_dir:-fuzz/target}"
unset CARGO_TARGET_DIR
targets=(msk_event msk_record event_id payload)

case "${1:-build}" in
  build)
    log "building ${targets[*]}"
    cargo +nightly fuzz build --fuzz-dir fuzz --target-dir "$target_dir"
    ;;
  run)
    seconds="${2:-60}"
    if [ $# -ge 3 ]; then targets=("${@:3}"); fi
    for t in "${targets[@]}"; do
      mkdir -p "fuzz/corpus/$t"
      seeds=()
      if [ -d "fuzz/seeds/$t" ]; then seeds=("fuzz/seeds/$t"); fi
      log "$t for ${seconds}s"
      cargo +nightly fuzz run --fuzz-dir fuzz --target-dir "$target_dir" "$t" "fuzz/corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1
    done
    ;;
  *)
    echo "usage: $0 build | run [SECONDS] [TARGET...]" >&2
    exit 2
    ;;
esac
