#!/usr/bin/env bash
# Installs what the kernel lab needs on the VM host (run as root; Debian 12 or newer): Vagrant with its
# libvirt provider, libvirt and QEMU, and the box builder's tools. Idempotent. Not part of `make setup`:
# CI never boots a VM (scripts/setup.sh installs only vagrant + vagrant-libvirt, for `vagrant validate`).
# On a laptop with VirtualBox instead, install VirtualBox and Vagrant from their vendors and skip this.
set -euo pipefail
PACKAGES=(
  vagrant vagrant-libvirt                       # Vagrant 2.3 + the libvirt provider 0.11
  libvirt-daemon-system libvirt-clients dnsmasq-base qemu-system-x86 qemu-utils   # libvirt 9, QEMU 7.2; NAT needs dnsmasq
  debootstrap extlinux syslinux-common parted e2fsprogs dpkg-repack rsync openssh-client   # vagrant/build-box.sh
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || { echo "[setup-host] missing ${missing[*]}: run as root" >&2; exit 1; }
  echo "[setup-host] installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
echo "[setup-host] ready: $(vagrant --version), $(vagrant plugin list | tr '\n' ' ')" >&2
