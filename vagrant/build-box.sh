#!/usr/bin/env bash
# Builds a Vagrant box (libvirt provider: qcow2 + metadata.json + Vagrantfile) with a chosen Debian
# kernel, from Debian packages only, and adds it to Vagrant as ztagent-<KERNEL>.
#
#   vagrant/build-box.sh [--dry-run] [--force] [--no-add] KERNEL      (KERNEL: see kernel_profile)
#
# Everything slow under emulation happens here, at native speed, in a chroot: package unpacking, the
# initramfs, the kernel headers BCC compiles against (the same version as the box's kernel, from the
# same suite), BCC, nftables, and the project's Python wheels in a virtualenv. The guest then runs
# scripts/setup.sh and finds every package already there.
#
# Stages are cached under $ZTAGENT_VAGRANT_BUILD/<KERNEL> (default vagrant/.build): rootfs/ (the
# debootstrap plus packages), wheels/, disk.qcow2, ztagent-<KERNEL>.box. --force rebuilds all.
#
# Adding a kernel: add a case to kernel_profile() naming the debootstrap suite, the mirror, and the
# apt target release the kernel comes from (e.g. a backports suite: KSUITE=bookworm-backports gives
# Debian 12 with 6.12). Ubuntu works the same with MIRROR=http://archive.ubuntu.com/ubuntu, its
# suite (noble: 6.8), KERNEL_PKGS="linux-image-generic linux-headers-generic" and ubuntu-keyring.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
DRY=0 FORCE=0 ADD=1 KERNEL=${KERNEL:-}
for a in "$@"; do
  case $a in
    --dry-run) DRY=1 ;;
    --force) FORCE=1 ;;
    --no-add) ADD=0 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    -*) echo "build-box: unknown option $a" >&2; exit 2 ;;
    *) KERNEL=$a ;;
  esac
done
KERNEL=${KERNEL:-debian12}

log() { printf '[build-box %s] %s\n' "$KERNEL" "$*" >&2; }
die() { log "error: $*"; exit 1; }

kernel_profile() {
  # SUITE: debootstrap suite; KSUITE: apt target release of the kernel (empty: SUITE's own).
  MIRROR=http://deb.debian.org/debian KSUITE="" EXTRA_SOURCES=""
  KERNEL_PKGS="linux-image-amd64 linux-headers-amd64"
  KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
  case $KERNEL in
    debian12) SUITE=bookworm ;;                               # 6.1
    debian13) SUITE=trixie ;;                                 # 6.12
    debian12-bpo) SUITE=bookworm KSUITE=bookworm-backports    # 6.12 (backports) on Debian 12's userland
                  EXTRA_SOURCES="deb $MIRROR bookworm-backports main" ;;
    debian12-k510) SUITE=bookworm KSUITE=bullseye         # 5.10 (Debian 11's) on Debian 12's userland:
                  EXTRA_SOURCES="deb $MIRROR bullseye main" ;; # older than capture needs (bpf/README.md)
    *) die "unknown KERNEL=$KERNEL (known: debian12 debian13 debian12-bpo debian12-k510; add one in kernel_profile)" ;;
  esac
}
kernel_profile

BUILD=${ZTAGENT_VAGRANT_BUILD:-$HERE/.build}/$KERNEL
ROOTFS=$BUILD/rootfs
WHEELS=$BUILD/wheels
DISK=$BUILD/disk.qcow2
BOX=$BUILD/ztagent-$KERNEL.box
BOXNAME=ztagent-$KERNEL
DISK_GB=${ZTAGENT_DISK_GB:-12}
VENV_IN_BOX=/opt/ztagent-venv
WHEELS_IN_BOX=/var/cache/ztagent/wheels
NICE=${NICE:-nice -n 10}

# Vagrant's well-known insecure key: Vagrant swaps it for a fresh one on the first `vagrant up`.
VAGRANT_PUB=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
  /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n 1 || true)

# The project's own system package list: one place (scripts/setup.sh), parsed, not copied.
setup_packages() {
  sed -n '/^APT_PACKAGES=(/,/^)/p' "$ROOT/scripts/setup.sh" | sed -e '1d;$d' -e 's/#.*//' | tr -s ' \n' '\n' | sed '/^$/d'
}
# What makes the rootfs a bootable Vagrant guest.
BOX_PACKAGES="systemd-sysv udev kmod openssh-server sudo ca-certificates rsync python3 python3-venv
  python3-pip initramfs-tools e2fsprogs procps less iputils-ping"

need_tools=(debootstrap qemu-img parted losetup mkfs.ext4 extlinux dpkg-repack chroot mount tar python3)
plan() {
  cat <<EOF
kernel profile   $KERNEL: debootstrap $SUITE from $MIRROR${KSUITE:+, kernel from $KSUITE}
kernel packages  $KERNEL_PKGS (image and headers from one suite: same version)
setup packages   $(setup_packages | tr '\n' ' ')
box packages     $(echo $BOX_PACKAGES)
initramfs        MODULES=list (virtio, ahci, ext4): a chroot cannot guess the guest's disk for MODULES=dep
python wheels    host pip -> $WHEELS (the project's deps + [test] + build backend), guest: --no-index
guest venv       $VENV_IN_BOX, wheels at $WHEELS_IN_BOX, /etc/pip.conf no-index
disk             ${DISK_GB}G msdos/ext4 + extlinux -> $DISK
box              $BOX (libvirt: box.img metadata.json Vagrantfile) -> vagrant box add $BOXNAME
cache            $BUILD ($( [ -f "$ROOTFS/.done" ] && echo "rootfs cached" || echo "rootfs to build"); $( [ -f "$BOX" ] && echo "box cached" || echo "box to build"))
EOF
}

check_tools() {
  local missing=()
  for t in "${need_tools[@]}"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
  [ -n "$VAGRANT_PUB" ] || missing+=("vagrant (its insecure key vagrant.pub)")
  [ -f /usr/lib/EXTLINUX/mbr.bin ] || [ -f /usr/lib/syslinux/mbr/mbr.bin ] || missing+=("syslinux-common (mbr.bin)")
  [ -f "$KEYRING" ] || missing+=("$KEYRING")
  if [ ${#missing[@]} -gt 0 ]; then
    log "missing tools: ${missing[*]} (install them with vagrant/setup-host.sh)"
    return 1
  fi
  log "tools ok: ${need_tools[*]} mbr.bin vagrant.pub keyring"
}

if [ "$DRY" = 1 ]; then
  plan
  check_tools
  exit $?
fi
[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, chroot, loop devices)"
check_tools || exit 1
if [ "$FORCE" = 1 ]; then log "--force: removing $BUILD"; rm -rf "$BUILD"; fi
mkdir -p "$BUILD"

# --- cleanup of mounts and loop devices, also on failure ------------------------------------------
MNT=$BUILD/mnt LOOP=""
chroot_mounts=()
cleanup() {
  local m
  for ((i=${#chroot_mounts[@]}-1; i>=0; i--)); do umount -l "${chroot_mounts[$i]}" 2>/dev/null || true; done
  chroot_mounts=()
  if mountpoint -q "$MNT" 2>/dev/null; then umount "$MNT" || umount -l "$MNT" || true; fi
  if [ -n "$LOOP" ]; then losetup -d "$LOOP" 2>/dev/null || true; LOOP=""; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mount_chroot() {
  local d=$1
  for m in proc sys dev dev/pts; do
    mkdir -p "$d/$m"
    case $m in
      proc) mount -t proc proc "$d/proc" ;;
      sys) mount -t sysfs sys "$d/sys" ;;
      dev) mount --bind /dev "$d/dev" ;;
      dev/pts) mount -t devpts devpts "$d/dev/pts" ;;
    esac
    chroot_mounts+=("$d/$m")
  done
}
in_chroot() { DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 $NICE chroot "$ROOTFS" "$@"; }

# --- stage 1: rootfs -------------------------------------------------------------------------------
# The base (debootstrap, kernel, what makes a Vagrant guest) is built once; the project's packages and
# wheels are brought up to date on every run, so a changed scripts/setup.sh or pyproject.toml updates a
# cached rootfs in place instead of rebuilding it. Any change touches rootfs/.done, which rebuilds the disk.
build_base() {
  local tmp=$BUILD/rootfs.tmp
  ROOTFS=$tmp
  # A base whose packages are in (.packages-done) resumes at the configuration after a failure.
  if [ -f "$tmp/.packages-done" ]; then
    log "resuming $tmp: packages are in"
    mount_chroot "$tmp"
  else
  rm -rf "$tmp"
  log "debootstrap $SUITE (minbase) into $tmp"
  $NICE debootstrap --variant=minbase --keyring="$KEYRING" --include=ca-certificates "$SUITE" "$tmp" "$MIRROR" \
    > "$BUILD/debootstrap.log" 2>&1 || { tail -n 20 "$BUILD/debootstrap.log" >&2; die "debootstrap failed (log: $BUILD/debootstrap.log)"; }
  {
    echo "deb $MIRROR $SUITE main"
    echo "deb $MIRROR $SUITE-updates main"
    [ -z "$EXTRA_SOURCES" ] || echo "$EXTRA_SOURCES"
  } > "$tmp/etc/apt/sources.list"
  # MODULES=most (Debian's default) makes mkinitramfs crawl for 18+ min under emulation and MODULES=dep
  # would guess from the build host's disk; list exactly what a libvirt or VirtualBox guest boots from.
  mkdir -p "$tmp/etc/initramfs-tools/conf.d"
  echo "MODULES=list" > "$tmp/etc/initramfs-tools/conf.d/ztagent-vagrant"
  printf '%s\n' virtio_pci virtio_blk virtio_scsi virtio_net ahci ata_piix sd_mod ext4 >> "$tmp/etc/initramfs-tools/modules"
  echo 'do_symlinks = yes' > "$tmp/etc/kernel-img.conf"
  mount_chroot "$tmp"
  no_daemons "$tmp"
  in_chroot apt-get update -q > "$BUILD/apt.log" 2>&1
  local kopt=()
  [ -z "$KSUITE" ] || kopt=(-t "$KSUITE")
  log "apt-get install: kernel ($KERNEL_PKGS${KSUITE:+ from $KSUITE}) and box packages (log: $BUILD/apt.log)"
  # shellcheck disable=SC2086
  in_chroot apt-get install -y -q --no-install-recommends "${kopt[@]}" $KERNEL_PKGS >> "$BUILD/apt.log" 2>&1 \
    || { tail -n 20 "$BUILD/apt.log" >&2; die "kernel install failed"; }
  # shellcheck disable=SC2086
  in_chroot apt-get install -y -q --no-install-recommends $BOX_PACKAGES >> "$BUILD/apt.log" 2>&1 \
    || { tail -n 20 "$BUILD/apt.log" >&2; die "package install failed"; }
  if in_chroot apt-cache show systemd-networkd >/dev/null 2>&1; then   # its own package from trixie on
    in_chroot apt-get install -y -q --no-install-recommends systemd-networkd >> "$BUILD/apt.log" 2>&1
  fi
  touch "$tmp/.packages-done"
  fi
  check_headers "$tmp"
  configure_guest "$tmp"
  cleanup
  rm -f "$tmp/.packages-done"
  rm -rf "$BUILD/rootfs"; mv "$tmp" "$BUILD/rootfs"
  ROOTFS=$BUILD/rootfs
}

no_daemons() { printf '#!/bin/sh\nexit 101\n' > "$1/usr/sbin/policy-rc.d"; chmod +x "$1/usr/sbin/policy-rc.d"; }

# Every package scripts/setup.sh wants, installed in the box so the guest's setup installs none.
sync_packages() {
  local pkgs=() p todo=() missing=() repack=()
  mapfile -t pkgs < <(setup_packages)
  for p in "${pkgs[@]}"; do
    chroot "$ROOTFS" dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || todo+=("$p")
  done
  [ ${#todo[@]} -gt 0 ] || { log "setup packages: all in the rootfs"; return 0; }
  mount_chroot "$ROOTFS"
  no_daemons "$ROOTFS"
  log "setup packages to install: ${todo[*]}"
  in_chroot apt-get update -q >> "$BUILD/apt.log" 2>&1
  local rest=()
  for p in "${todo[@]}"; do
    if in_chroot apt-cache show --no-all-versions "$p" >/dev/null 2>&1; then rest+=("$p"); continue; fi
    # Not in this suite's archive (e.g. kubectl comes from a vendor repository on the build host):
    # repack the host's installed copy so scripts/setup.sh finds it installed, or fail naming it.
    if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then repack+=("$p"); else missing+=("$p"); fi
  done
  [ ${#missing[@]} -eq 0 ] || die "packages in scripts/setup.sh that $SUITE lacks and the host cannot repack: ${missing[*]}"
  if [ ${#rest[@]} -gt 0 ]; then
    in_chroot apt-get install -y -q --no-install-recommends "${rest[@]}" >> "$BUILD/apt.log" 2>&1 \
      || { tail -n 20 "$BUILD/apt.log" >&2; die "installing ${rest[*]} failed"; }
  fi
  for p in "${repack[@]}"; do
    log "repacking the host's $p into the box (not in $SUITE's archive)"
    # Uncompressed: kubectl alone is 400 MB, which xz would take minutes over for a deb used once.
    rm -f "$BUILD"/"$p"_*.deb
    (cd "$BUILD" && dpkg-repack --deb-option=-Znone "$p" >> "$BUILD/apt.log" 2>&1) || die "dpkg-repack $p failed"
    cp "$BUILD"/"$p"_*.deb "$ROOTFS/tmp/"
    in_chroot sh -c "apt-get install -y -q --no-install-recommends /tmp/${p}_*.deb" >> "$BUILD/apt.log" 2>&1 \
      || die "installing the repacked $p failed"
    rm -f "$ROOTFS"/tmp/"$p"_*.deb "$BUILD"/"$p"_*.deb
  done
  check_headers "$ROOTFS"
  quiet_services "$ROOTFS"
  in_chroot apt-get clean
  rm -f "$ROOTFS/usr/sbin/policy-rc.d"
  cleanup
  touch "$ROOTFS/.done"
}

# Under emulation every idle daemon costs test time; the tests start their own nginx and prometheus.
quiet_services() {
  local s
  for s in prometheus nginx apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer; do
    in_chroot systemctl disable "$s" >/dev/null 2>&1 || true
  done
}

sync_wheels() {
  local reqs=$BUILD/requirements.txt
  python3 - "$ROOT/pyproject.toml" > "$reqs.new" <<'PYEOF'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))
for r in p["build-system"]["requires"] + p["project"]["dependencies"] + p["project"]["optional-dependencies"]["test"]:
    print(r)
PYEOF
  if cmp -s "$reqs.new" "$ROOTFS$WHEELS_IN_BOX/requirements.txt" && [ -x "$ROOTFS$VENV_IN_BOX/bin/python" ]; then
    rm -f "$reqs.new"; log "wheels and venv up to date"; return 0
  fi
  mv "$reqs.new" "$reqs"
  mount_chroot "$ROOTFS"
  build_wheels "$ROOTFS"
  install_venv "$ROOTFS"
  cleanup
  touch "$ROOTFS/.done"
}

# BCC compiles against /lib/modules/<running>/build: the headers must be the box kernel's own version.
check_headers() {
  local d=$1 kver
  kver=$(ls "$d/lib/modules" | sort -V | tail -n 1)
  [ "$(ls "$d/lib/modules" | wc -l)" = 1 ] || die "more than one kernel in the box: $(ls "$d/lib/modules")"
  [ -d "$d/usr/src/linux-headers-$kver" ] || die "headers for $kver missing (have: $(ls "$d/usr/src"))"
  # Resolved inside the rootfs: the link is absolute (/usr/src/...), which the host would resolve in its own tree.
  chroot "$d" test -e "/lib/modules/$kver/build/include" || die "/lib/modules/$kver/build does not lead to headers"
  log "kernel $kver with matching headers"
  echo "$kver" > "$BUILD/kernel-version"
}

configure_guest() {
  local d=$1
  echo "ztagent-$KERNEL" > "$d/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 ztagent-%s\n' "$KERNEL" > "$d/etc/hosts"
  : > "$d/etc/machine-id"   # a fresh one on first boot
  printf 'UUID=%s / ext4 errors=remount-ro 0 1\n' "$ROOT_UUID" > "$d/etc/fstab"
  # net.ifnames=0 on the kernel line: the NIC is eth0 under libvirt and VirtualBox alike.
  mkdir -p "$d/etc/systemd/network"
  printf '[Match]\nName=eth* en*\n\n[Network]\nDHCP=yes\n' > "$d/etc/systemd/network/80-dhcp.network"
  in_chroot systemctl enable systemd-networkd ssh >/dev/null 2>&1
  in_chroot systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1 || true
  # The user Vagrant logs in as.
  in_chroot useradd -m -s /bin/bash -U vagrant 2>/dev/null || true
  echo 'vagrant ALL=(ALL) NOPASSWD: ALL' > "$d/etc/sudoers.d/vagrant"; chmod 440 "$d/etc/sudoers.d/vagrant"
  install -d -m 700 -o 1000 -g 1000 "$d/home/vagrant/.ssh"
  install -m 600 -o 1000 -g 1000 "$VAGRANT_PUB" "$d/home/vagrant/.ssh/authorized_keys"
  printf 'UseDNS no\n' > "$d/etc/ssh/sshd_config.d/vagrant.conf"
  # Host keys are made on first boot (ssh.service's ExecStartPre does not): do it here instead.
  in_chroot ssh-keygen -A >/dev/null
  # The project's setup runs as root under sudo with secure_path: keep it using the prebuilt venv.
  printf 'Defaults env_keep += "VENV PIP_NO_INDEX PIP_FIND_LINKS"\n' > "$d/etc/sudoers.d/ztagent"
  chmod 440 "$d/etc/sudoers.d/ztagent"
  # The guest reaches no Python index of ours: pip installs only the wheels built into the box.
  printf '[global]\nno-index = true\nfind-links = %s\n' "$WHEELS_IN_BOX" > "$d/etc/pip.conf"
}

# Python wheels: built on the host, whose pip reaches the indexes (a local mirror here, PyPI on a laptop)
# the guest cannot. For a guest Python other than the host's, download binary wheels for its version.
build_wheels() {
  local d=$1 gpy hpy pip reqs
  gpy=$(chroot "$d" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  pip=("$ROOT/.venv/bin/python" -m pip)
  [ -x "$ROOT/.venv/bin/python" ] || pip=(python3 -m pip)
  hpy=$("${pip[0]}" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  reqs=$BUILD/requirements.txt
  rm -rf "$WHEELS.tmp"; mkdir -p "$WHEELS.tmp"
  if [ "$gpy" = "$hpy" ]; then
    log "wheels for Python $gpy (the host's): pip wheel"
    $NICE "${pip[@]}" wheel -q -w "$WHEELS.tmp" -r "$reqs" > "$BUILD/wheels.log" 2>&1 \
      || { tail -n 20 "$BUILD/wheels.log" >&2; die "pip wheel failed"; }
  else
    log "wheels for the guest's Python $gpy (host has $hpy): binary wheels by target"
    local plat=() g
    g=$(chroot "$d" python3 -c 'import platform; print(platform.libc_ver()[1].replace(".", "_"))')
    for minor in $(seq 17 "${g#2_}"); do plat+=(--platform "manylinux_2_${minor}_x86_64"); done
    plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    $NICE "${pip[@]}" download -q -d "$WHEELS.tmp" --only-binary=:all: --python-version "$gpy" \
      --implementation cp "${plat[@]}" -r "$reqs" > "$BUILD/wheels.log" 2>&1 \
      || { tail -n 20 "$BUILD/wheels.log" >&2; die "pip download for Python $gpy failed"; }
  fi
  rm -rf "$WHEELS"; mv "$WHEELS.tmp" "$WHEELS"
  log "$(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)"
  mkdir -p "$d$WHEELS_IN_BOX"
  cp "$WHEELS"/* "$d$WHEELS_IN_BOX/"
  cp "$reqs" "$d$WHEELS_IN_BOX/requirements.txt"
}

install_venv() {
  local d=$1
  log "virtualenv $VENV_IN_BOX from the wheelhouse (--no-index)"
  in_chroot python3 -m venv "$VENV_IN_BOX"
  in_chroot "$VENV_IN_BOX/bin/python" -m pip install -q --no-index --find-links "$WHEELS_IN_BOX" \
    -r "$WHEELS_IN_BOX/requirements.txt" >> "$BUILD/wheels.log" 2>&1 \
    || { tail -n 20 "$BUILD/wheels.log" >&2; die "venv install failed"; }
}

# --- stage 2: disk image ---------------------------------------------------------------------------
build_disk() {
  local raw=$BUILD/disk.raw kver mbr
  kver=$(cat "$BUILD/kernel-version")
  mbr=/usr/lib/EXTLINUX/mbr.bin; [ -f "$mbr" ] || mbr=/usr/lib/syslinux/mbr/mbr.bin
  rm -f "$raw"
  truncate -s "${DISK_GB}G" "$raw"
  parted -s "$raw" mklabel msdos mkpart primary ext4 1MiB 100% set 1 boot on
  # The loop device maps the partition itself (offset 1 MiB): partition scanning (losetup -P) needs
  # udev to make /dev/loopNp1, which machines without a system manager (like this one) do not run.
  LOOP=$(losetup -f --show -o $((1024 * 1024)) "$raw")
  log "partition on $LOOP"
  # extlinux 6.04 reads ext4 without the 64bit feature.
  mkfs.ext4 -q -F -L ztroot -U "$ROOT_UUID" -O ^64bit "$LOOP"
  mkdir -p "$MNT"; mount "$LOOP" "$MNT"
  log "copying the rootfs ($(du -sh --exclude=proc "$ROOTFS" 2>/dev/null | cut -f1))"
  $NICE tar -C "$ROOTFS" --exclude=./.done -cf - . | tar -C "$MNT" -xpf -
  mkdir -p "$MNT/boot/extlinux"
  extlinux --install "$MNT/boot/extlinux" >/dev/null 2>&1
  cat > "$MNT/boot/extlinux/extlinux.conf" <<EOF
DEFAULT linux
PROMPT 0
TIMEOUT 1
LABEL linux
  LINUX /boot/vmlinuz-$kver
  INITRD /boot/initrd.img-$kver
  APPEND root=UUID=$ROOT_UUID ro console=tty0 console=ttyS0,115200n8 net.ifnames=0 biosdevname=0 edd=off
EOF
  sync
  umount "$MNT"
  losetup -d "$LOOP"; LOOP=""
  dd if="$mbr" of="$raw" bs=440 count=1 conv=notrunc status=none
  log "qcow2"
  $NICE qemu-img convert -O qcow2 "$raw" "$DISK.tmp"
  rm -f "$raw"; mv "$DISK.tmp" "$DISK"
}

build_box() {
  local dir=$BUILD/box
  rm -rf "$dir"; mkdir -p "$dir"
  ln "$DISK" "$dir/box.img" 2>/dev/null || cp "$DISK" "$dir/box.img"
  printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %s}\n' "$DISK_GB" > "$dir/metadata.json"
  cat > "$dir/Vagrantfile" <<'EOF'
# Box defaults (vagrant/Vagrantfile sets the rest): the disk is virtio.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.disk_bus = "virtio"
  end
end
EOF
  # Uncompressed: the qcow2 is already sparse and gzip would cost minutes for little.
  tar -C "$dir" -cf "$BOX.tmp" metadata.json Vagrantfile box.img
  mv "$BOX.tmp" "$BOX"; rm -rf "$dir"
  log "box $BOX ($(du -h "$BOX" | cut -f1))"
}

ROOT_UUID_FILE=$BUILD/root-uuid
[ -s "$ROOT_UUID_FILE" ] || cat /proc/sys/kernel/random/uuid > "$ROOT_UUID_FILE"
ROOT_UUID=$(cat "$ROOT_UUID_FILE")

t0=$(date +%s)
if [ -d "$ROOTFS/etc" ]; then log "base rootfs cached ($ROOTFS)"; else build_base; fi
sync_packages
sync_wheels
[ -f "$ROOTFS/.done" ] || touch "$ROOTFS/.done"
log "rootfs at $(( $(date +%s) - t0 ))s"
if [ -f "$DISK" ] && [ "$DISK" -nt "$ROOTFS/.done" ]; then log "disk cached"; else build_disk; fi
if [ -f "$BOX" ] && [ "$BOX" -nt "$DISK" ]; then log "box file cached"; else build_box; fi
if [ "$ADD" = 1 ]; then
  log "vagrant box add $BOXNAME"
  vagrant box add --force --name "$BOXNAME" --provider libvirt "$BOX" >&2
  # Vagrant keeps its own copy; disk.qcow2 stays to package it again.
  rm -f "$BOX"
fi
log "done in $(( $(date +%s) - t0 ))s"
