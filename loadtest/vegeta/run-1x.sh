#!/usr/bin/env bash
# A run at normal load: RATE requests per second for DURATION against TARGET, each request on a
# new TCP and TLS connection. Saves results under loadtest/vegeta/results/ and prints Vegeta's
# text report; exits 1 if any request failed.
#
#   loadtest/vegeta/run-1x.sh RATE DURATION TARGET [-- extra vegeta attack flags]
#   loadtest/vegeta/run-1x.sh 50 5m https://static.example.com/
#   loadtest/vegeta/run-1x.sh 50 5m loadtest/vegeta/targets.txt -- -insecure
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"

(($# >= 3)) || die "usage: $0 RATE DURATION TARGET [-- extra vegeta attack flags]"
rate=$1 duration=$2 target=$3
shift 3
[[ ${1:-} == -- ]] && shift

attack 1x "$rate" "$duration" "$target" "$@"
