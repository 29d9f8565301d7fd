#!/usr/bin/env bash
# Prints the path of a minimal Debian root file system with systemd (for the container test),
# made once with debootstrap and cached under ~/.cache/static-ingress/rootfs/. The mirror is the
# Debian mirror this machine's apt already uses, read from apt at run time.
#   scripts/debian-rootfs.sh [SUITE]      (default: trixie, the AMI's Debian 13)
set -euo pipefail

suite="${1:-trixie}"
cache="${STATIC_INGRESS_ROOTFS_CACHE:-$HOME/.cache/static-ingress/rootfs}"
# Bump when the package list changes, so a stale cached tree is not reused.
recipe="v2 minbase systemd systemd-sysv ca-certificates"
root="$cache/$suite"

if [[ -f "$root/.static-ingress-rootfs" ]] && [[ "$(cat "$root/.static-ingress-rootfs")" == "$recipe" ]]; then
  echo "$root"
  exit 0
fi

# The first apt source labelled Debian (not Debian-Security): the main archive mirror.
# shellcheck disable=SC2016 # $(...) here is apt's format syntax, not the shell's
mirror="$(apt-get indextargets --format '$(LABEL) $(REPO_URI)' 'Identifier: Packages' \
  | awk '$1 == "Debian" { print $2; exit }')"
if [[ -z "$mirror" ]]; then
  echo "no Debian mirror in this machine's apt sources (apt-get update first?)" >&2
  exit 1
fi

mkdir -p "$cache"
tmp="$(mktemp -d "$cache/.$suite.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "debootstrap $suite from $mirror into $root (about a minute, once per machine)" >&2
timeout 900 debootstrap --variant=minbase --include=systemd,systemd-sysv,ca-certificates "$suite" "$tmp/root" "$mirror" \
  > "$tmp/debootstrap.log" 2>&1 || { tail -n 30 "$tmp/debootstrap.log" >&2; exit 1; }
echo "$recipe" > "$tmp/root/.static-ingress-rootfs"
rm -rf "$root"
mv "$tmp/root" "$root"
echo "$root"
