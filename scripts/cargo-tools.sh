# shellcheck shell=bash
# Sourced by scripts/install-tools.sh and loadtest/install.sh (not run): installs pinned crates'
# binaries into one tools directory, safe when several installs run at once.
#   - one lock (flock) on the tools directory, shared by both scripts: one copy builds a tool,
#     the others wait for it and then find it installed;
#   - each tool is built aside (cargo install --root into a temporary directory) and moved into
#     bin/ with rename(2), so bin/ never holds a half-written binary;
#   - a stamp per tool, written last, records what was asked for (crate, version, flags): a tool
#     without the right stamp is built again, and a changed pin rebuilds.
# The caller sets tools_root and defines fail MESSAGE.
: "${tools_root:?the caller sets tools_root}"

# A cold cargo install of the largest tool takes several minutes on 2 cores; waiting longer than
# this for another copy means that copy is stuck.
tools_lock_wait_seconds=3600

# Takes the lock for the rest of the calling script (released when it exits).
tools_lock() {
  mkdir -p "$tools_root/bin" "$tools_root/stamps"
  exec 9>>"$tools_root/.lock"
  flock -w "$tools_lock_wait_seconds" 9 ||
    fail "another install has held $tools_root/.lock for ${tools_lock_wait_seconds}s: is it stuck?"
}

# cargo_tool CRATE VERSION BINARY: installs BINARY from CRATE at VERSION unless its stamp says it
# is there. Call with the lock held.
cargo_tool() {
  local crate=$1 version=$2 binary=$3
  local asked="$crate $version --locked"
  local bin="$tools_root/bin/$binary" stamp="$tools_root/stamps/$binary"
  if [[ -x $bin ]] && cmp -s -- "$stamp" <(printf '%s\n' "$asked"); then
    return 0
  fi
  # Installed by an earlier version of this script, which wrote no stamp: a binary that runs and
  # reports the pinned version is complete (one cut short would not run), so keep it.
  if [[ ! -e $stamp ]] && "$bin" --version 2>/dev/null | grep -qw -- "$version"; then
    printf '%s\n' "$asked" >"$stamp.new"
    mv -f -- "$stamp.new" "$stamp"
    return 0
  fi
  command -v cargo >/dev/null || fail "cargo not found: install Rust (rustup) to build $crate"
  echo "installing $crate $version into $tools_root (a few minutes, once per machine)" >&2
  local build
  build="$(mktemp -d "$tools_root/build-$binary.XXXXXX")"
  # Without CARGO_TARGET_DIR cargo install builds in a temporary directory of its own, so the
  # tool's build never mixes with the project's.
  if ! env -u CARGO_TARGET_DIR cargo install --locked --quiet --version "$version" "$crate" \
    --root "$build" >&2; then
    rm -rf -- "$build"
    fail "cargo install $crate $version failed"
  fi
  if ! "$build/bin/$binary" --version >/dev/null; then
    rm -rf -- "$build"
    fail "$crate $version was built, but $binary --version does not run"
  fi
  mv -f -- "$build/bin/$binary" "$bin"
  rm -rf -- "$build"
  # Written last: only a tool that got this far is trusted.
  printf '%s\n' "$asked" >"$stamp.new"
  mv -f -- "$stamp.new" "$stamp"
}

# Leftovers of builds that died (killed, disk full): never moved into bin/, so never used. Call
# with the lock held: then no build is running.
tools_clean() {
  rm -rf -- "$tools_root"/build-*
}
