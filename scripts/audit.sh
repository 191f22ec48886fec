#!/usr/bin/env bash
# The dependency advisory check: `cargo audit` over Cargo.lock (and fuzz/Cargo.lock)
# against the RustSec advisory database, offline when a local copy of the database is at hand.
#
# Where the database comes from, first found wins:
#   1. $ADVISORY_DB (a checkout or copy of github.com/rustsec/advisory-db);
#   2. ../shared/advisory-db beside this checkout (the team's snapshot);
#   3. the copy cached by an earlier run under ~/.cache/exactly-once/advisory-db;
#   4. none: cargo audit fetches the current database (needs the network).
# The database is copied to a writable place first (cargo audit writes a lock file).
#
# cargo-audit itself is installed once into ~/.cache/exactly-once/tools (about 8
# minutes of compiling on 2 cores) unless it is there already or `cargo audit` works.
#
# Findings that are reviewed and accepted are listed in .cargo/audit.toml with the
# reason; docs/RELIABILITY.md ("Dependency advisories") explains each one. Anything
# else fails this script, and so does an accepted crate that a build starts to use
# (checked below with `cargo tree`).
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${XDG_CACHE_HOME:-$HOME/.cache}/exactly-once"
version=0.22.2

if [ -x "$cache/tools/bin/cargo-audit" ]; then
  audit=("$cache/tools/bin/cargo-audit" audit)
elif cargo audit --version >/dev/null 2>&1; then
  audit=(cargo audit)
else
  echo "[audit] installing cargo-audit $version into $cache/tools (once; a few minutes)"
  cargo install cargo-audit --locked --version "$version" --root "$cache/tools" --quiet
  audit=("$cache/tools/bin/cargo-audit" audit)
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Reasons given in .cargo/audit.toml that the build graph can check: an accepted crate
# must stay out of every build (only listed in Cargo.lock), or stay within the named
# workspace packages. `cargo tree -i` lists what depends on the crate, for every target
# platform and normal, build and dev dependencies; it prints nothing when the crate is in
# Cargo.lock but built by nothing.
graph_users() {
  local out
  if ! out="$(cargo tree --quiet --target all -e normal,build,dev --prefix none -i "$1" 2>"$work/tree.err")"; then
    # Not in Cargo.lock at all any more: nothing builds it (the ignore is then stale).
    grep -q 'did not match any packages' "$work/tree.err" && return 0
    cat "$work/tree.err" >&2
    return 1
  fi
  # Workspace packages are the lines with a local path: "bench v0.0.0 (/path/bench)".
  printf '%s\n' "$out" | sed -n 's|^\([^ ]*\) v[^ ]* (/.*|\1|p' | sort -u
}
graph_ok=1
accepted_only_in() { # crate, advisory, workspace packages allowed to build it ("" = none)
  local crate="$1" id="$2" allowed="$3" users user
  users="$(graph_users "$crate")" || { graph_ok=0; return; }
  for user in $users; do
    case " $allowed " in
      *" $user "*) ;;
      *) echo "[audit] $crate ($id, accepted in .cargo/audit.toml) is now built into $user: review the acceptance" >&2
         graph_ok=0 ;;
    esac
  done
}
accepted_only_in rsa RUSTSEC-2023-0071 ""
accepted_only_in ttf-parser RUSTSEC-2026-0192 "bench"
if [ "$graph_ok" != 1 ]; then
  exit 1
fi
echo "[audit] accepted crates still where .cargo/audit.toml says: rsa built by nothing, ttf-parser only by bench"

source_db="${ADVISORY_DB:-}"
if [ -z "$source_db" ] && [ -d ../shared/advisory-db/crates ]; then
  source_db=../shared/advisory-db
fi
if [ -n "$source_db" ]; then
  if [ ! -d "$source_db/crates" ]; then
    echo "[audit] ADVISORY_DB=$source_db is not an advisory database (no crates/ folder)" >&2
    exit 1
  fi
  cp -r "$source_db" "$work/db"
  # Keep a copy for runs from a clone that has no snapshot beside it. Built aside and
  # moved in, so that runs from other checkouts at the same time never read half a copy;
  # a failure here only costs the cache.
  mkdir -p "$cache"
  if fresh="$(mktemp -d "$cache/advisory-db.XXXXXX")" && cp -r "$source_db/." "$fresh/"; then
    rm -rf "$cache/advisory-db" && mv -T "$fresh" "$cache/advisory-db" 2>/dev/null || rm -rf "$fresh"
  fi
elif [ -d "$cache/advisory-db/crates" ]; then
  source_db="$cache/advisory-db"
  cp -r "$source_db" "$work/db"
fi

if [ -d "$work/db/crates" ]; then
  echo "[audit] cargo audit (offline, advisory database at $source_db)"
  db=(--db "$work/db" --no-fetch)
else
  echo "[audit] no local advisory database (set ADVISORY_DB to a copy of github.com/rustsec/advisory-db); fetching the current one"
  db=()
fi
"${audit[@]}" "${db[@]}" --deny warnings
# The fuzz targets are a workspace of their own with their own lock file. Its yanked check
# is skipped: it needs those crates in cargo's local index cache, which only a nightly
# fuzz build fills, and without them cargo audit prints errors (and still passes).
echo "[audit] cargo audit fuzz/Cargo.lock"
"${audit[@]}" "${db[@]}" --deny warnings --no-yanked --file fuzz/Cargo.lock
