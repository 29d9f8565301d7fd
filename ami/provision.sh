#!/bin/sh
# Runs on the Packer build instance as root: installs the static-ingress .deb and the kernel
# settings, enables the unit, and leaves the image clean for cloud-init on first boot.
set -eu

export DEBIAN_FRONTEND=noninteractive

# Security updates go into the image; instances never update themselves (a fleet is replaced
# by a new AMI instead).
apt-get update
apt-get -y -o Dpkg::Options::=--force-confold dist-upgrade

# apt resolves the package's dependencies from the Debian mirror the base image is set up with.
apt-get -y install /tmp/static-ingress.deb
rm -f /tmp/static-ingress.deb

install -m 0644 /tmp/60-static-ingress.conf /etc/sysctl.d/60-static-ingress.conf
rm -f /tmp/60-static-ingress.conf
sysctl --system >/dev/null

# The package enables the unit; make sure, and check what was installed. It is not started
# here: the backend address only arrives with the launch template's user data.
systemctl enable static-ingress.service
systemctl is-enabled static-ingress.service
systemd-analyze verify static-ingress.service
static-ingress --version

# Nothing of this build instance should leak into the fleet's instances.
apt-get clean
cloud-init clean --logs
rm -f /etc/ssh/ssh_host_* /root/.ssh/authorized_keys /home/admin/.ssh/authorized_keys
truncate -s 0 /etc/machine-id
