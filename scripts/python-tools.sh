#!/usr/bin/env bash
# Creates a virtualenv with the Python tools in scripts/requirements.txt and prints its bin
# directory on the last line. Kept between runs; a change of the requirements (or of python3)
# builds a new one.
#
# Safe to run many at once (test binaries, make targets and CI all call it, possibly together):
#   - one lock (flock) per tools directory: one copy builds, the others wait for it, then use
#     what it built;
#   - a virtualenv is built in a directory of its own and published by renaming a symlink onto
#     it, so the published name never points at a half-made one (a virtualenv cannot be moved
#     into place itself: its scripts hold its absolute path);
#   - a stamp, written last, records what was asked for (the Python version and the exact
#     requirements): a virtualenv without the right stamp is never used.
#
# STATIC_INGRESS_PYTHON_TOOLS: the tools directory (default ~/.cache/static-ingress/python-tools).
# .ci/run points it at a new directory on every run, so a broken install step fails CI.
# STATIC_INGRESS_WHEELS: the wheels kept between builds (default ~/.cache/static-ingress/wheels).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
requirements="$here/requirements.txt"
root="${STATIC_INGRESS_PYTHON_TOOLS:-$HOME/.cache/static-ingress/python-tools}"
wheels="${STATIC_INGRESS_WHEELS:-$HOME/.cache/static-ingress/wheels}"
# A cold install (moto and its dependencies) takes a few minutes on a slow link; waiting longer
# than this for another copy means that copy is stuck.
lock_wait_seconds=1200

fail() {
  echo "scripts/python-tools.sh: $*" >&2
  exit 1
}

command -v python3 >/dev/null || fail "python3 not found: install Python 3 (Debian: python3-venv)"
# What was asked for. The interpreter's path and version are part of it: a virtualenv runs on
# the interpreter it was made with.
asked="$(
  python3 -c 'import sys; print("python", sys.version.split()[0], sys.executable)'
  cat "$requirements"
)"
key="$(printf '%s\n' "$asked" | sha256sum | cut -c1-16)"
link="$root/venv-$key"

# The bin directory of the published virtualenv for $key, if it is complete and runs.
published() {
  local dir
  [[ -L $link ]] || return 1
  dir="$(readlink -f -- "$link")" || return 1
  cmp -s -- "$dir/.stamp" <(printf '%s\n' "$asked") || return 1
  "$dir/bin/python" -c '' 2>/dev/null || return 1
  echo "$dir/bin"
}

# Fast path, without the lock: a published name only ever points at a stamped build.
if bin="$(published)"; then
  echo "$bin"
  exit 0
fi

mkdir -p "$root/builds" "$wheels"
exec 9>>"$root/.lock"
if ! flock -w "$lock_wait_seconds" 9; then
  fail "another install has held $root/.lock for ${lock_wait_seconds}s: is it stuck?"
fi
# The copy we waited for may have built it.
if bin="$(published)"; then
  echo "$bin"
  exit 0
fi

build="$(mktemp -d "$root/builds/venv-$key.XXXXXX")"
fetched=""
trap 'rm -rf -- "$build" $fetched' EXIT
echo "creating the Python test tools in $build (once per change of scripts/requirements.txt)" >&2
python3 -m venv "$build" >&2 || fail "python3 -m venv $build failed (Debian: install python3-venv)"
# The wheels are kept between virtualenvs (pip's own HTTP cache is not: the package index here
# answers with no-store), so a new virtualenv installs offline. --no-compile: compiling every
# module of moto up front takes most of the install; Python compiles what it imports, once.
pip=("$build/bin/pip" --disable-pip-version-check)
offline=(install --quiet --no-compile --no-index --find-links "$wheels" -r "$requirements")
if ! "${pip[@]}" "${offline[@]}" >/dev/null 2>&1; then
  echo "fetching the wheels of scripts/requirements.txt into $wheels" >&2
  fetched="$(mktemp -d "$wheels/.fetch.XXXXXX")"
  "${pip[@]}" wheel --quiet --find-links "$wheels" -w "$fetched" -r "$requirements" >&2 ||
    fail "pip wheel -r $requirements failed"
  # Whole files only, by rename: another virtualenv may be installing from $wheels right now.
  for f in "$fetched"/*; do
    [[ -e $f ]] || continue
    mv -f -- "$f" "$wheels/"
  done
  rmdir -- "$fetched"
  "${pip[@]}" "${offline[@]}" >&2 || fail "pip install -r $requirements failed"
fi
"$build/bin/python" -c '' || fail "the new virtualenv's python does not run"
# Written last: only a build that got this far is ever trusted.
printf '%s\n' "$asked" >"$build/.stamp"
# rename(2) replaces the name at once: readers see no virtualenv or a complete one.
ln -sfn -- "$build" "$link.new"
mv -T -- "$link.new" "$link"
trap - EXIT
# Under the lock no other build runs here, so a build that no name points at is the leftover of
# one that died (killed, disk full, pip failed) or one replaced just now for failing its check:
# never trusted again, removed.
for dir in "$root"/builds/*; do
  [[ -e $dir ]] || continue
  used=0
  for l in "$root"/venv-*; do
    if [[ -L $l && "$(readlink -f -- "$l")" == "$(readlink -f -- "$dir")" ]]; then
      used=1
    fi
  done
  ((used)) || rm -rf -- "$dir"
done

echo "$build/bin"
