#!/usr/bin/env bash
# Ten times normal load: 10 x NORMAL_RATE requests per second for DURATION against TARGET, each
# request on a new TCP and TLS connection, as the 2016 design was proven. Saves results under
# loadtest/vegeta/results/ and prints Vegeta's text report; exits 1 if any request failed.
#
#   loadtest/vegeta/run-10x.sh NORMAL_RATE DURATION TARGET [-- extra vegeta attack flags]
#   loadtest/vegeta/run-10x.sh 50 5m https://static.example.com/     # attacks at 500/s
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"

(($# >= 3)) || die "usage: $0 NORMAL_RATE DURATION TARGET [-- extra vegeta attack flags]"
normal_rate=$1 duration=$2 target=$3
shift 3
[[ ${1:-} == -- ]] && shift
[[ $normal_rate =~ ^[1-9][0-9]*$ ]] ||
  die "NORMAL_RATE must be a positive whole number of requests per second (the 1x rate); got '$normal_rate'"

attack 10x "$((normal_rate * 10))" "$duration" "$target" "$@"
