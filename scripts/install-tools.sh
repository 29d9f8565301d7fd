#!/usr/bin/env bash
# Installs the tools the checks need that a fresh machine lacks, and prints their directory on
# the last line. Idempotent: tools already installed (in the cache below, kept between runs on
# the same machine) are not built again. Safe to run concurrently with itself and with
# loadtest/install.sh (one lock, builds aside, stamps written last: see scripts/cargo-tools.sh).
# STATIC_INGRESS_TOOLS: the tools directory (default ~/.cache/static-ingress/tools).
set -euo pipefail

tools_root="${STATIC_INGRESS_TOOLS:-$HOME/.cache/static-ingress/tools}"

fail() {
  echo "scripts/install-tools.sh: $*" >&2
  exit 1
}

# shellcheck source=SCRIPTDIR/cargo-tools.sh
source "$(dirname "$0")/cargo-tools.sh"
tools_lock
tools_clean

# cargo-deny: licence, source and duplicate-crate checks (offline; advisories need a database
# that cannot be fetched here, so they are not checked).
cargo_tool cargo-deny 0.20.2 cargo-deny
# cargo-deb: builds the .deb (make deb).
cargo_tool cargo-deb 3.8.0 cargo-deb
# cfn-guard: checks the CloudFormation templates against cloudformation/rules.guard.
cargo_tool cfn-guard 3.2.1 cfn-guard

echo "$tools_root/bin"
