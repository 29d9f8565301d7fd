#!/usr/bin/env bash
# A soak: RATE requests per second (sensible, normal traffic) for a long DURATION (hours)
# against TARGET, each request on a new TCP and TLS connection. Prints a report every minute
# while it runs (VEGETA_EVERY to change), saves results under loadtest/vegeta/results/ and
# prints the final text report; exits 1 if any request failed.
#
#   loadtest/vegeta/soak.sh RATE DURATION TARGET [-- extra vegeta attack flags]
#   loadtest/vegeta/soak.sh 50 4h https://static.example.com/
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"

(($# >= 3)) || die "usage: $0 RATE DURATION TARGET [-- extra vegeta attack flags]"
rate=$1 duration=$2 target=$3
shift 3
[[ ${1:-} == -- ]] && shift

VEGETA_EVERY="${VEGETA_EVERY:-1m}" attack soak "$rate" "$duration" "$target" "$@"
