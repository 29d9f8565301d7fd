#!/usr/bin/env bash
# Installs what the load-test harness needs and a fresh machine lacks: the peers it compares
# against (HAProxy, nginx with its stream module), the tools that drive and serve load (iperf3,
# oha), a local DNS server (dnsmasq) and shellcheck for the Vegeta scripts. Idempotent: a
# package or tool already at the pinned version is left alone. Prints the directory holding
# oha on its last line. Safe to run concurrently with itself and with scripts/install-tools.sh:
# one lock on the tools directory, builds aside, stamps written last (scripts/cargo-tools.sh).
# STATIC_INGRESS_TOOLS: the tools directory (default ~/.cache/static-ingress/tools).
set -euo pipefail

tools_root="${STATIC_INGRESS_TOOLS:-$HOME/.cache/static-ingress/tools}"

fail() {
  echo "loadtest/install.sh: $*" >&2
  exit 1
}

# shellcheck source=SCRIPTDIR/../scripts/cargo-tools.sh
source "$(dirname "$0")/../scripts/cargo-tools.sh"
# Held for the apt-get steps too, so two copies do not both decide a package is missing.
tools_lock
tools_clean

# Debian packages. Services that the packages would start are not used: the harness runs its
# own instances on loopback ports with its own configuration files.
packages=(haproxy nginx libnginx-mod-stream iperf3 dnsmasq-base shellcheck openssl)
missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$package")
  fi
done
if ((${#missing[@]} > 0)); then
  command -v apt-get >/dev/null || fail "apt-get not found: install ${missing[*]} by hand (Debian 12 packages)"
  [[ $(id -u) == 0 ]] || fail "installing ${missing[*]} needs root (apt-get install)"
  echo "installing Debian packages: ${missing[*]}" >&2
  # Another apt-get may hold the lock on a shared machine: wait for it rather than fail.
  apt-get -o DPkg::Lock::Timeout=600 update -qq >&2 || fail "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${missing[@]}" >&2 || fail "apt-get install ${missing[*]} failed"
fi

# oha: the constant-rate HTTPS load generator, pinned. Built once per machine (a few minutes).
cargo_tool oha 1.16.0 oha

echo "$tools_root/bin"
