#!/usr/bin/env bash
# Checks the Vegeta scripts without Vegeta (it cannot be installed here): syntax (bash -n and
# the linter), then each script against a stand-in `vegeta` that records the command line it
# got and answers with a report whose success ratio the test chooses.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
scripts=("$here"/run-1x.sh "$here"/run-10x.sh "$here"/soak.sh "$here"/lib.sh)

for script in "${scripts[@]}"; do
  bash -n "$script" || { echo "vegeta/test.sh: syntax error in $script" >&2; exit 1; }
done
if command -v shellcheck >/dev/null; then
  shellcheck -x "${scripts[@]}" "$here/../install.sh" "$0" ||
    { echo "vegeta/test.sh: shellcheck found problems" >&2; exit 1; }
else
  echo "vegeta/test.sh: shellcheck missing (loadtest/install.sh installs it)" >&2
  exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin"
# The stand-in: `attack` logs its arguments and writes a results line where -output says
# (stdout by default, as Vegeta does); `report` prints text, or JSON with $STUB_SUCCESS.
cat >"$work/bin/vegeta" <<'STUB'
#!/usr/bin/env bash
case "$1" in
  -version) echo "Version: stub" ;;
  attack)
    echo "$*" >>"$STUB_LOG"
    out=/dev/stdout
    for arg in "$@"; do [[ $arg == -output=* ]] && out=${arg#-output=}; done
    echo "result" >"$out"
    exit "${STUB_ATTACK_STATUS:-0}" ;;
  report)
    if [[ " $* " == *" -type=json "* ]]; then
      echo "{\"latencies\":{},\"success\":${STUB_SUCCESS:-1},\"errors\":[]}"
    else
      [[ " $* " == *" -every="* ]] && cat >/dev/null
      echo "Success       [ratio]  stub"
    fi ;;
  *) echo "stub vegeta: unexpected $*" >&2; exit 64 ;;
esac
STUB
chmod +x "$work/bin/vegeta"

passed=0 failed=0
check() { # check NAME EXPECTED_STATUS PATTERN_IN_OUTPUT COMMAND...
  local name=$1 want=$2 pattern=$3
  shift 3
  local status=0
  : >"$work/log"
  "$@" >"$work/out" 2>&1 || status=$?
  if [[ $status == "$want" ]] && grep -qE -- "$pattern" "$work/out" "$work/log" "$work"/results/*/command.txt 2>/dev/null; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    echo "FAIL: $name: exit status $status (wanted $want), no '$pattern' in:" >&2
    cat "$work/out" "$work/log" >&2
  fi
  rm -rf "$work/results"
}

export PATH="$work/bin:$PATH" STUB_LOG="$work/log" VEGETA_RESULTS="$work/results"
check "1x passes rate, duration, no keepalive" 0 'attack .*-rate=7 -duration=2s -keepalive=false' \
  "$here/run-1x.sh" 7 2s https://static.example.test/
check "1x saves the exact command line" 0 '^vegeta attack -targets=.*-output=' \
  "$here/run-1x.sh" 7 2s https://static.example.test/
check "10x multiplies the normal rate" 0 '-rate=70 ' "$here/run-10x.sh" 7 2s https://static.example.test/
check "soak reports while it runs" 0 '\| vegeta report -every=1m' "$here/soak.sh" 7 2s https://static.example.test/
check "extra flags after -- reach vegeta" 0 '-keepalive=false -timeout=30s -insecure' \
  "$here/run-1x.sh" 7 2s "$here/targets.txt" -- -insecure
check "a failed request fails the run" 1 'success ratio 0.5 is below 1' \
  env STUB_SUCCESS=0.5 "$here/run-1x.sh" 7 2s https://static.example.test/
check "a failed attack fails the run" 2 'vegeta attack failed with exit status 3' \
  env STUB_ATTACK_STATUS=3 "$here/run-1x.sh" 7 2s https://static.example.test/
check "a bad rate is refused" 2 "rate must be .*got 'fast'" "$here/run-1x.sh" fast 2s https://static.example.test/
check "a duration without unit is refused" 2 "duration must be .*got '30'" "$here/soak.sh" 7 30 https://static.example.test/
check "a bad target is refused" 2 "target must be .*got 'static'" "$here/run-10x.sh" 7 2s static
check "missing arguments print usage" 2 'usage: ' "$here/run-1x.sh" 7
check "no vegeta on PATH says so" 2 'vegeta not found on PATH' env PATH=/usr/bin:/bin "$here/run-1x.sh" 7 2s https://x.test/

echo "vegeta scripts: $passed passed, $failed failed"
((failed == 0))
