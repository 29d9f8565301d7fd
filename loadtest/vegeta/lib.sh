# Shared by run-1x.sh, run-10x.sh and soak.sh (sourced, not run): argument checks and one
# Vegeta attack that saves its results, the exact command line and the text report.
# shellcheck shell=bash

vegeta_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# A rate as Vegeta takes it: requests per second ("100"), or per unit ("100/1s", "6000/1m").
check_rate() {
  [[ $1 =~ ^[1-9][0-9]*(/[0-9]*(ns|us|ms|s|m|h))?$ ]] ||
    die "rate must be a positive whole number of requests per second, or N/unit like 6000/1m; got '$1'"
}

# A Go duration, as Vegeta's -duration takes it ("30s", "5m", "4h", "1h30m").
check_duration() {
  [[ $1 =~ ^([0-9]+(ms|s|m|h))+$ ]] || die "duration must be a Go duration like 30s, 5m or 4h; got '$1'"
}

# The target: a URL (one GET per request) or the path of a Vegeta targets file.
targets_for() {
  local target=$1 out=$2
  if [[ -f $target ]]; then
    cp "$target" "$out"
  elif [[ $target =~ ^https?://[^/[:space:]]+ ]]; then
    printf 'GET %s\n' "$target" >"$out"
  else
    die "target must be an http(s) URL or an existing targets file (like $vegeta_dir/targets.txt); got '$target'"
  fi
}

# attack NAME RATE DURATION TARGET [extra vegeta attack flags...]
# Runs one attack with a new TCP (and TLS) connection per request (-keepalive=false), so every
# request opens a connection through the proxy as a new client would. Saves everything under
# $VEGETA_RESULTS (default loadtest/vegeta/results)/NAME-TIMESTAMP/ and prints the text report.
# With VEGETA_EVERY set (e.g. 1m), also prints a report at that interval while the attack runs.
# Exits 1 when any request failed, so a run that added errors cannot pass unnoticed.
attack() {
  local name=$1 rate=$2 duration=$3 target=$4
  shift 4
  command -v vegeta >/dev/null || die "vegeta not found on PATH (it is not installable on the CI machine; get a release binary for the load-test host)"
  check_rate "$rate"
  check_duration "$duration"

  local results_root="${VEGETA_RESULTS:-$vegeta_dir/results}"
  local dir
  dir="$results_root/$name-$(date -u +%Y%m%dT%H%M%SZ)"
  mkdir -p "$dir" || die "cannot create results directory $dir"
  targets_for "$target" "$dir/targets.txt"

  local cmd=(vegeta attack -targets="$dir/targets.txt" -rate="$rate" -duration="$duration"
    -keepalive=false -timeout="${VEGETA_TIMEOUT:-30s}" "$@")
  local line
  line="$(printf '%q ' "${cmd[@]}")"
  if [[ -n ${VEGETA_EVERY:-} ]]; then
    line+="| tee $(printf '%q' "$dir/results.bin") | vegeta report -every=$(printf '%q' "$VEGETA_EVERY")"
  else
    line+="-output=$(printf '%q' "$dir/results.bin")"
  fi
  echo "$line" >"$dir/command.txt"
  {
    echo "vegeta: $(vegeta -version 2>&1 | head -n 1)"
    echo "host: $(uname -n)"
    echo "started: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  } >"$dir/run.txt"
  echo "results in $dir" >&2
  echo "running: $line" >&2

  local status=0
  if [[ -n ${VEGETA_EVERY:-} ]]; then
    # A report every VEGETA_EVERY while a long run goes on; tee keeps every result.
    "${cmd[@]}" | tee "$dir/results.bin" | vegeta report -every="$VEGETA_EVERY" || status=$?
  else
    "${cmd[@]}" -output="$dir/results.bin" || status=$?
  fi
  echo "finished: $(date -u +%Y-%m-%dT%H:%M:%SZ) (exit status $status)" >>"$dir/run.txt"
  ((status == 0)) || die "vegeta attack failed with exit status $status; see $dir"

  vegeta report "$dir/results.bin" | tee "$dir/report.txt"
  vegeta report -type=json "$dir/results.bin" >"$dir/report.json" || die "vegeta report -type=json failed"

  # The JSON report holds "success" as a ratio from 0 to 1.
  local success
  success=$(grep -o '"success":[0-9.eE+-]*' "$dir/report.json" | head -n 1 | cut -d: -f2)
  [[ -n $success ]] || die "no success ratio in $dir/report.json"
  if ! awk -v s="$success" 'BEGIN { exit !(s >= 1) }'; then
    echo "$(basename "$0"): FAILED: success ratio $success is below 1 (see the error set above and $dir)" >&2
    exit 1
  fi
  echo "ok: every request succeeded; results in $dir" >&2
}
