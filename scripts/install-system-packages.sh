#!/usr/bin/env bash
# Installs the Debian packages the packaging tests need (make package-test, make
# container-test), when missing, or the packages named as arguments (make lab names its own;
# tests/proxy_protocol.rs asks for haproxy).
# Idempotent; needs root (as CI and the dev machines run).
#   - packer: `packer validate` of ami/ (Debian's 1.6; see ami/README.md)
#   - debootstrap: the Debian root file system the container test boots
#   - systemd-container: systemd-nspawn, which boots it
#   - shellcheck: lint of the shell scripts the AMI recipe and the tests run
#   - curl: asks the proxy's /health in the container
#   - chromium, chromium-driver: the headless browser that reads the status page
#   - prometheus (with promtool), dnsmasq-base: the monitoring kit's checks, against a proxy
#     that resolves its backend through a real DNS server
set -euo pipefail

packages=(packer debootstrap systemd-container shellcheck curl chromium chromium-driver prometheus dnsmasq-base)
if (($#)); then
  packages=("$@")
fi
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  echo "installing ${missing[*]} with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Another apt-get (a second test binary, a shared machine) may hold the lock: wait for it.
  apt-get -o DPkg::Lock::Timeout=600 update -q >&2
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" >&2
fi
