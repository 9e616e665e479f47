#!/usr/bin/env bash
# Prints the libvirt driver a box's kernel can boot under here: "kvm" or "qemu" (software emulation).
#
#   vagrant/kvm-probe.sh KERNEL       (needs the box built: vagrant/build-box.sh KERNEL)
#
# /dev/kvm existing is not enough: on nested or restricted hosts QEMU aborts on an MSR, or the guest
# hangs after "Probing EDD". So boot the box's own kernel and initramfs under KVM for a bounded time and
# look for userspace starting (the initramfs's /init); anything else means emulation. The answer is
# cached in vagrant/.build/<KERNEL>/driver (delete it, or set ZTAGENT_LIBVIRT_DRIVER, to override).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
KERNEL=${1:-debian12}
BUILD=${ZTAGENT_VAGRANT_BUILD:-$HERE/.build}/$KERNEL
out=$BUILD/driver
if [ -s "$out" ]; then cat "$out"; exit 0; fi
answer() { mkdir -p "$BUILD"; echo "$1" > "$out"; echo "[kvm-probe $KERNEL] $2" >&2; echo "$1"; }
[ -w /dev/kvm ] || { answer qemu "no usable /dev/kvm"; exit 0; }
kver=$(cat "$BUILD/kernel-version" 2>/dev/null) || { echo "[kvm-probe] build the box first" >&2; exit 1; }
k=$BUILD/rootfs/boot/vmlinuz-$kver i=$BUILD/rootfs/boot/initrd.img-$kver
log=$BUILD/kvm-probe.log
# panic=1 + -no-reboot: the initramfs finds no root disk and gives up; we only need to see /init run.
timeout 60 qemu-system-x86_64 -accel kvm -cpu host -m 512 -nographic -no-reboot -kernel "$k" -initrd "$i" \
  -append "console=ttyS0 panic=1 edd=off rootdelay=1 root=/dev/ztagent-none" > "$log" 2>&1 &
pid=$!
for _ in $(seq 1 55); do
  if grep -q -e 'Run /init as init process' -e 'Begin: Loading essential drivers' "$log" 2>/dev/null; then
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    answer kvm "KVM boots $kver"; exit 0
  fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 1
done
kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
answer qemu "KVM cannot boot $kver here (last line: $(tail -n 1 "$log" | tr -d '\r' | cut -c1-120)); using emulation"
