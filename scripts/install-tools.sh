#!/usr/bin/env bash
# Installs the tools the checks need that a fresh machine lacks. Idempotent: tools already
# installed (in the cache below, kept between runs on the same machine) are not built again.
set -euo pipefail

tools_root="${STATIC_INGRESS_TOOLS:-$HOME/.cache/static-ingress/tools}"
mkdir -p "$tools_root/bin"

# cargo-deny: licence, source and duplicate-crate checks (offline; advisories need a database
# that cannot be fetched here, so they are not checked).
deny_version="0.20.2"
if ! "$tools_root/bin/cargo-deny" --version 2>/dev/null | grep -q "$deny_version"; then
  echo "installing cargo-deny $deny_version into $tools_root (a few minutes, once per machine)"
  cargo install --locked --quiet --version "$deny_version" cargo-deny --root "$tools_root"
fi

# cargo-deb: builds the .deb (make deb).
deb_version="3.8.0"
if ! "$tools_root/bin/cargo-deb" --version 2>/dev/null | grep -q "$deb_version"; then
  echo "installing cargo-deb $deb_version into $tools_root (a few minutes, once per machine)"
  cargo install --locked --quiet --version "$deb_version" cargo-deb --root "$tools_root"
fi

# cfn-guard: checks the CloudFormation templates against cloudformation/rules.guard.
guard_version="3.2.1"
if ! "$tools_root/bin/cfn-guard" --version 2>/dev/null | grep -q "$guard_version"; then
  echo "installing cfn-guard $guard_version into $tools_root (a few minutes, once per machine)"
  cargo install --locked --quiet --version "$guard_version" cfn-guard --root "$tools_root"
fi

echo "$tools_root/bin"
