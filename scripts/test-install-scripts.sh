#!/usr/bin/env bash
# Tests of the install scripts as a fresh machine meets them: many copies at once, a build
# killed half way, a changed requirement, a stamp missing. Every directory is new.
#   scripts/test-install-scripts.sh [--into DIR]
# With --into DIR (which must not exist yet), the concurrent python-tools.sh runs install into
# DIR and leave it there, so CI's later steps use the virtualenv this test just built.
set -euo pipefail
cd "$(dirname "$0")/.."

into=""
if [[ ${1:-} == --into ]]; then
  into="${2:?--into needs a directory}"
  [[ ! -e $into ]] || {
    echo "$into exists: --into wants a new directory" >&2
    exit 2
  }
fi

copies=6
work="$(mktemp -d)"
trap 'rm -rf -- "$work"' EXIT
failures=0
check() { # check DESCRIPTION COMMAND...: runs COMMAND, counts a failure
  local what=$1
  shift
  if "$@"; then
    echo "ok: $what" >&2
  else
    echo "FAILED: $what" >&2
    failures=$((failures + 1))
  fi
}
is() {
  [[ $1 == "$2" ]] || {
    echo "  expected [$2], got [$1]" >&2
    return 1
  }
}
runs() {
  "$@" >/dev/null 2>&1 || {
    echo "  does not run: $*" >&2
    return 1
  }
}

# Starts $copies copies of COMMAND, each writing out.N, err.N and rc.N into DIR: two at once,
# the others 0.4 s apart, as test binaries and make targets start, so some copies arrive while
# the first is half way through (a virtualenv whose python exists but whose pip does not yet).
start_together() { # start_together DIR COMMAND...
  local dir=$1 i
  shift
  mkdir -p "$dir"
  for ((i = 0; i < copies; i++)); do
    (
      sleep "$(((i > 0 ? i - 1 : 0) * 4))e-1"
      rc=0
      "$@" >"$dir/out.$i" 2>"$dir/err.$i" || rc=$?
      echo "$rc" >"$dir/rc.$i"
    ) &
  done
  wait
}

all_succeed() { # all_succeed DIR
  local dir=$1 i ok=0
  for ((i = 0; i < copies; i++)); do
    if [[ $(cat "$dir/rc.$i") != 0 ]]; then
      echo "  copy $i exited $(cat "$dir/rc.$i"):" >&2
      sed 's/^/    /' "$dir/err.$i" >&2
      ok=1
    fi
  done
  return $ok
}

same_last_line() { # same_last_line DIR: fails unless every copy printed the same last line
  local dir=$1 lines
  lines="$(for f in "$dir"/out.*; do tail -n 1 "$f"; done | sort -u)"
  [[ $(wc -l <<<"$lines") == 1 && -n $lines ]] || {
    echo "  last lines differ: $lines" >&2
    return 1
  }
}

# ---- python-tools.sh: concurrent installs of the real requirements into a new directory
venvs="${into:-$work/python-tools}"
echo "== python-tools.sh: $copies copies at once into $venvs" >&2
export STATIC_INGRESS_PYTHON_TOOLS="$venvs"
start_together "$work/py" scripts/python-tools.sh
check "every copy of python-tools.sh succeeds" all_succeed "$work/py"
check "every copy prints the same virtualenv" same_last_line "$work/py"
bin="$(tail -n 1 "$work/py/out.0")"
check "the virtualenv has pip" runs "$bin/pip" --version
check "the virtualenv has the test tools" runs "$bin/python" -c 'import moto, cfnlint, pytest'
check "moto_server runs" runs "$bin/moto_server" --help
check "one build, not one per copy" is "$(find "$venvs/builds" -mindepth 1 -maxdepth 1 | wc -l)" 1

unset STATIC_INGRESS_PYTHON_TOOLS

# ---- python-tools.sh on a copy with a tiny requirements file: stamps, rebuilds, a killed build.
# pip is in every new virtualenv, so these requirements install without the network.
echo "== python-tools.sh: stamps and rebuilds" >&2
mkdir -p "$work/copy"
cp scripts/python-tools.sh "$work/copy/"
export STATIC_INGRESS_PYTHON_TOOLS="$work/small"
printf 'pip>=1\n' >"$work/copy/requirements.txt"
first="$("$work/copy/python-tools.sh" 2>/dev/null | tail -n 1)" || true
check "a first install runs" runs "$first/pip" --version
again="$("$work/copy/python-tools.sh" 2>/dev/null | tail -n 1)" || true
check "an unchanged requirement reuses the virtualenv" is "$again" "$first"

printf 'pip>=2\n' >"$work/copy/requirements.txt"
changed="$("$work/copy/python-tools.sh" 2>/dev/null | tail -n 1)" || true
check "a changed requirement builds a new virtualenv" runs test "$changed" != "$first"
check "its stamp records the new requirement" runs grep -qx 'pip>=2' "$changed/../.stamp"
check "the new one runs" runs "$changed/pip" --version

# A build whose stamp is missing is not trusted, even under its published name.
rm -f -- "$changed/../.stamp" "$changed/pip"
rebuilt="$("$work/copy/python-tools.sh" 2>/dev/null | tail -n 1)" || true
check "a build without its stamp is built again" runs test "$rebuilt" != "$changed"
check "the rebuilt one has pip" runs "$rebuilt/pip" --version
check "the unstamped build is removed" runs test ! -e "$changed"

# A build killed half way: the next run succeeds, and the leftover is removed. The kill lands
# wherever the build is, after its directory appeared; every outcome must be recovered from.
printf 'pip>=3\n' >"$work/copy/requirements.txt"
before="$(find "$work/small/builds" -mindepth 1 -maxdepth 1 | wc -l)"
setsid "$work/copy/python-tools.sh" >/dev/null 2>&1 &
victim=$!
for _ in $(seq 200); do
  (($(find "$work/small/builds" -mindepth 1 -maxdepth 1 | wc -l) > before)) && break
  sleep 0.05
done
kill -KILL -- "-$victim" 2>/dev/null || true
wait "$victim" 2>/dev/null || true
after_kill="$("$work/copy/python-tools.sh" 2>/dev/null | tail -n 1)" || true
check "after a killed build the next run succeeds" runs "$after_kill/pip" --version
check "a stamp is in place" runs grep -qx 'pip>=3' "$after_kill/../.stamp"
leftovers=0
for dir in "$work/small/builds"/*; do
  used=0
  for l in "$work/small"/venv-*; do
    [[ "$(readlink -f -- "$l")" == "$(readlink -f -- "$dir")" ]] && used=1
  done
  ((used)) || leftovers=$((leftovers + 1))
done
check "no unpublished build is left" is "$leftovers" 0
unset STATIC_INGRESS_PYTHON_TOOLS

# ---- install-tools.sh and loadtest/install.sh at once, with a stand-in cargo (a real build of
# these tools takes many minutes) that counts its installs and takes a while, as cargo does.
echo "== install-tools.sh and loadtest/install.sh: $copies copies at once" >&2
stubs="$work/stubs"
mkdir -p "$stubs"
cat >"$stubs/cargo" <<'STUB'
#!/usr/bin/env bash
# cargo install --locked --quiet --version V CRATE --root DIR
set -euo pipefail
[[ $1 == install ]] || exit 1
version="" crate="" root=""
shift
while (($#)); do
  case $1 in
    --version) version=$2; shift 2 ;;
    --root) root=$2; shift 2 ;;
    --*) shift ;;
    *) crate=$1; shift ;;
  esac
done
echo "$crate $version" >>"$STUB_LOG"
sleep 0.5
mkdir -p "$root/bin"
printf '#!/bin/sh\necho "%s %s"\n' "$crate" "$version" >"$root/bin/$crate"
chmod +x "$root/bin/$crate"
STUB
# Every Debian package counts as installed: this test is about the tools directory.
cat >"$stubs/dpkg-query" <<'STUB'
#!/bin/sh
printf 'install ok installed'
STUB
chmod +x "$stubs/cargo" "$stubs/dpkg-query"
export STUB_LOG="$work/cargo.log" STATIC_INGRESS_TOOLS="$work/tools"
: >"$STUB_LOG"
# Half the copies are install-tools.sh, half loadtest/install.sh: they share the tools directory.
either() {
  if (($1 % 2)); then scripts/install-tools.sh; else loadtest/install.sh; fi
}
mkdir -p "$work/tools-run"
for ((i = 0; i < copies; i++)); do
  (
    rc=0
    PATH="$stubs:$PATH" either "$i" >"$work/tools-run/out.$i" 2>"$work/tools-run/err.$i" || rc=$?
    echo "$rc" >"$work/tools-run/rc.$i"
  ) &
done
wait
check "every copy of the tool installers succeeds" all_succeed "$work/tools-run"
check "each tool is built once" is "$(sort "$STUB_LOG" | uniq -c | awk '{print $1}' | sort -u)" 1
check "every tool is built" is "$(wc -l <"$STUB_LOG")" 4
for tool in "cargo-deny 0.20.2" "cargo-deb 3.8.0" "cfn-guard 3.2.1" "oha 1.16.0"; do
  check "${tool% *} is in bin/ and runs" is "$("$work/tools/bin/${tool% *}" --version)" "$tool"
done
check "no build directory is left" is "$(find "$work/tools" -maxdepth 1 -name 'build-*' | wc -l)" 0

# A stamp that asks for something else (a changed pin) rebuilds that tool, and only it.
echo "cargo-deb 0.0.1 --locked" >"$work/tools/stamps/cargo-deb"
PATH="$stubs:$PATH" scripts/install-tools.sh >/dev/null 2>&1
check "a stale stamp rebuilds its tool alone" is "$(wc -l <"$STUB_LOG") $(tail -n 1 "$STUB_LOG")" "5 cargo-deb 3.8.0"
# A binary left by a build cut short (it does not run) and no stamp: rebuilt, not trusted.
rm -f "$work/tools/stamps/cfn-guard"
printf '\x7fELF' >"$work/tools/bin/cfn-guard"
PATH="$stubs:$PATH" scripts/install-tools.sh >/dev/null 2>&1
check "a broken binary without a stamp is rebuilt" is "$(tail -n 1 "$STUB_LOG")" "cfn-guard 3.2.1"
check "and then runs" is "$("$work/tools/bin/cfn-guard" --version)" "cfn-guard 3.2.1"
# A binary from before stamps existed that runs and reports the pinned version is kept.
rm -f "$work/tools/stamps/oha"
lines="$(wc -l <"$STUB_LOG")"
PATH="$stubs:$PATH" loadtest/install.sh >/dev/null 2>&1
check "a working binary of the pinned version without a stamp is kept" is "$(wc -l <"$STUB_LOG")" "$lines"
check "and gets its stamp" is "$(cat "$work/tools/stamps/oha")" "oha 1.16.0 --locked"

if ((failures > 0)); then
  echo "install script tests: $failures failed" >&2
  exit 1
fi
echo "install script tests: all passed" >&2
