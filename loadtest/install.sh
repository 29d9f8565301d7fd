#!/usr/bin/env bash
# Installs what the load-test harness needs and a fresh machine lacks: the peers it compares
# against (HAProxy, nginx with its stream module), the tools that drive and serve load (iperf3,
# oha), a local DNS server (dnsmasq) and shellcheck for the Vegeta scripts. Idempotent: a
# package or tool already at the pinned version is left alone. Prints the directory holding
# oha on its last line.
set -euo pipefail

tools_root="${STATIC_INGRESS_TOOLS:-$HOME/.cache/static-ingress/tools}"
mkdir -p "$tools_root/bin"

fail() { echo "loadtest/install.sh: $*" >&2; exit 1; }

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
oha_version="1.16.0"
if ! "$tools_root/bin/oha" --version 2>/dev/null | grep -qx "oha $oha_version"; then
  command -v cargo >/dev/null || fail "cargo not found: install Rust (rustup) to build oha"
  echo "installing oha $oha_version into $tools_root (a few minutes, once per machine)" >&2
  # A temporary target directory, so oha's build never mixes with the project's.
  env -u CARGO_TARGET_DIR cargo install --locked --quiet --version "$oha_version" oha \
    --root "$tools_root" >&2 || fail "cargo install oha $oha_version failed"
fi

echo "$tools_root/bin"
