#!/usr/bin/env bash
# Builds the .deb (stripped) and its -dbgsym .ddeb beside it with cargo-deb, and prints the
# .deb's path on the last line.
#   scripts/build-deb.sh [PROFILE]   release (default: what ships) or dev (what `make test`
#                                    already built: the package tests' default, see Makefile)
set -euo pipefail
cd "$(dirname "$0")/.."

profile="${1:-release}"
tools="$(scripts/install-tools.sh | tail -n 1)"
if [[ "$profile" == dev ]]; then
  # The binary `make test` builds, by the same command, so that CI compiles nothing twice
  # (a plain `cargo build` would rebuild tokio and its dependents without the test features).
  cargo test --all-targets --no-run --quiet
  # Beside the release .deb, not over it: both have the same file name.
  out="$(PATH="$tools:$PATH" cargo deb --profile dev --no-build --quiet \
    --output "${CARGO_TARGET_DIR:-target}/debian-dev/")"
else
  out="$(PATH="$tools:$PATH" cargo deb --profile "$profile" --quiet)"
fi
# cargo-deb reports the debug-symbol package (.ddeb) and the .deb, one path a line.
deb="$(printf '%s\n' "$out" | grep '\.deb$' | tail -n 1 || true)"
dbgsym="$(printf '%s\n' "$out" | grep '\.ddeb$' | tail -n 1 || true)"
if [[ ! -f "$deb" || ! -f "$dbgsym" ]]; then
  echo "cargo deb did not report a .deb and its -dbgsym .ddeb: $out" >&2
  exit 1
fi
echo "debug symbols: $dbgsym" >&2
echo "$deb"
