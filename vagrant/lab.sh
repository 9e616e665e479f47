#!/usr/bin/env bash
# The kernel lab's driver (make vagrant-test / vagrant-clean call it; run as root on the host).
#
#   vagrant/lab.sh test KERNEL [pytest args...]   box (build or reuse), up, tests, results out, halt
#   vagrant/lab.sh clean [KERNEL...]              destroy the VMs, their volumes, the network; loops
#
# The VM is halted, not destroyed, after a run: the next run boots it (provisioned already) instead of
# importing the box again. ZTAGENT_VAGRANT_TEARDOWN=destroy destroys it instead. Results land in
# vagrant/results/<KERNEL>/: junit.xml, pytest.log, kernel.txt, run.log, rc.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
cmd=${1:-}; shift || true
log() { printf '[vagrant-lab] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (libvirtd, loop devices)"
export VAGRANT_CWD=$HERE
KNOWN_KERNELS="debian12 debian13 debian12-bpo debian12-k510"

# No system manager here: start libvirt's daemons by hand when they are not running.
daemons() {
  pgrep -x virtlogd >/dev/null || virtlogd -d
  pgrep -x libvirtd >/dev/null || libvirtd -d
  for _ in $(seq 1 30); do virsh -c qemu:///system version >/dev/null 2>&1 && return 0; sleep 1; done
  die "libvirtd does not answer on qemu:///system"
}

use_kernel() {
  KERNEL=$1
  [[ " $KNOWN_KERNELS " == *" $KERNEL "* ]] || die "KERNEL=$KERNEL unknown (known: $KNOWN_KERNELS)"
  export ZTAGENT_KERNEL=$KERNEL
  # One Vagrant machine per kernel: each keeps its own state and domain.
  export VAGRANT_DOTFILE_PATH=$HERE/.vagrant/$KERNEL
}

teardown() {
  local how=${ZTAGENT_VAGRANT_TEARDOWN:-halt}
  log "teardown ($how)"
  if [ "$how" = destroy ]; then vagrant destroy -f >&2 || true; else vagrant halt >&2 || vagrant halt -f >&2 || true; fi
}

# vagrant-libvirt streams a new box into the storage pool through libvirt (~6 min for 3 GB here). In a
# directory pool a sparse copy under the volume name it looks for (its get_volume_name: box name, version
# 0 and the box image's mtime) is the same volume in seconds. Any other pool: let Vagrant upload.
seed_volume() {
  local img=${VAGRANT_HOME:-$HOME/.vagrant.d}/boxes/ztagent-$KERNEL/0/libvirt/box.img pooldir vol
  [ -f "$img" ] || return 0
  pooldir=$(virsh -q pool-dumpxml default 2>/dev/null | sed -n 's:.*<path>\(.*\)</path>.*:\1:p' | head -n 1)
  virsh -q pool-dumpxml default 2>/dev/null | grep -q "<pool type='dir'>" && [ -d "$pooldir" ] || return 0
  vol=ztagent-${KERNEL}_vagrant_box_image_0_$(stat -c %Y "$img")_box.img
  [ ! -e "$pooldir/$vol" ] || return 0
  log "seeding volume $vol (sparse copy into $pooldir)"
  cp --sparse=always "$img" "$pooldir/$vol.tmp" && mv "$pooldir/$vol.tmp" "$pooldir/$vol" && virsh -q pool-refresh default >/dev/null
}

lab_test() {
  use_kernel "${1:-debian12}"; shift || true
  local results=$HERE/results/$KERNEL t0 rc
  t0=$(date +%s)
  mkdir -p "$results"
  # run.log without Vagrant's carriage-return progress bars.
  exec > >(tee >(sed -u 's/\r/\n/g; s/\x1b\[K//g' | grep --line-buffered -v -e 'Progress: ' -e '^$' > "$results/run.log")) 2>&1
  daemons
  if vagrant box list 2>/dev/null | grep -q "^ztagent-$KERNEL "; then
    log "box ztagent-$KERNEL cached"
  else
    nice -n 10 "$HERE/build-box.sh" "$KERNEL" || die "box build failed"
  fi
  [ -n "${ZTAGENT_LIBVIRT_DRIVER:-}" ] || ZTAGENT_LIBVIRT_DRIVER=$("$HERE/kvm-probe.sh" "$KERNEL") || die "kvm probe failed"
  export ZTAGENT_LIBVIRT_DRIVER
  log "libvirt driver: $ZTAGENT_LIBVIRT_DRIVER"
  seed_volume
  trap teardown EXIT
  log "vagrant up ($(( $(date +%s) - t0 ))s)"
  # `up` syncs the tree; provisioning runs once, here, for a new and for a halted machine alike: the
  # project's setup is idempotent and reinstalls the project only if pyproject.toml changed.
  vagrant up --provider libvirt --no-provision || die "vagrant up failed"
  vagrant provision || die "provisioning failed"
  log "kernel tests ($(( $(date +%s) - t0 ))s)"
  vagrant ssh -c "sudo ZTAGENT_GUEST_TIMEOUT=${ZTAGENT_GUEST_TIMEOUT:-5400} bash /ztagent/vagrant/guest-tests.sh $*"
  rc=$?
  log "tests exited $rc; copying results ($(( $(date +%s) - t0 ))s)"
  local cfg; cfg=$(mktemp)
  vagrant ssh-config --host ztagent-lab > "$cfg"
  scp -q -F "$cfg" 'ztagent-lab:/var/tmp/ztagent-results/*' "$results/" || log "copying results failed"
  rm -f "$cfg"
  log "results in $results ($(( $(date +%s) - t0 ))s): $(grep -Eo '[0-9]+ (passed|failed|skipped|error)[a-z]*' "$results/pytest.log" 2>/dev/null | tr '\n' ' ')"
  return "$rc"
}

# Everything this lab creates is named ztagent-vagrant-* (domains, volumes) or ztagent-vagrant
# (network): remove exactly that, whatever state Vagrant's own files are in.
lab_clean() {
  local kernels=("$@") k d v
  [ ${#kernels[@]} -gt 0 ] || read -r -a kernels <<< "$KNOWN_KERNELS"
  if pgrep -x libvirtd >/dev/null; then
    for k in "${kernels[@]}"; do
      if [ -d "$HERE/.vagrant/$k" ]; then
        (use_kernel "$k"; vagrant destroy -f >/dev/null 2>&1) || true
        rm -rf "$HERE/.vagrant/$k"
      fi
    done
    for d in $(virsh -q list --all --name | grep '^ztagent-vagrant-' || true); do
      log "domain $d"; virsh -q destroy "$d" >/dev/null 2>&1; virsh -q undefine "$d" --nvram >/dev/null 2>&1 || virsh -q undefine "$d" >/dev/null
    done
    for v in $(virsh -q vol-list default 2>/dev/null | awk '{print $1}' | grep -E '^(ztagent-vagrant-|ztagent-(debian|ubuntu))' || true); do
      log "volume $v"; virsh -q vol-delete "$v" --pool default >/dev/null
    done
    if virsh -q net-info ztagent-vagrant >/dev/null 2>&1; then
      log "network ztagent-vagrant"; virsh -q net-destroy ztagent-vagrant >/dev/null 2>&1; virsh -q net-undefine ztagent-vagrant >/dev/null
    fi
  fi
  # A box build killed mid-way can leave a loop device on its disk image.
  for d in $(losetup -nO NAME,BACK-FILE | awk '$2 ~ /vagrant\/.build\/.*disk.raw/ {print $1}'); do
    log "loop $d"; losetup -d "$d"
  done
  grep -E " $HERE/.build/[^ ]*" /proc/mounts | awk '{print $2}' | sort -r | while read -r m; do
    log "mount $m"; umount -l "$m"
  done
  log "clean (boxes and vagrant/.build stay as caches: vagrant box remove ztagent-<KERNEL>; rm -rf vagrant/.build)"
}

case $cmd in
  test) lab_test "$@" ;;
  clean) lab_clean "$@" ;;
  *) sed -n '2,9p' "$0"; exit 2 ;;
esac
