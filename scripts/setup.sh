#!/usr/bin/env bash
# Sets up ztagent on a fresh Debian machine (run as root): system packages, kernel headers for BCC,
# bpffs, the project's virtualenv with the project and its test extras. Idempotent: a second run
# installs nothing and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

log() { printf '[setup] %s\n' "$*" >&2; }

# --- system packages -------------------------------------------------------------------------
APT_PACKAGES=(
  python3-bpfcc bpfcc-tools bpftool linux-headers-amd64   # eBPF capture (BCC compiles at load)
  iproute2 nftables iptables tcpdump                      # lab networking
  iperf3 wrk nghttp2-client nghttp2-server curl openssl   # real peers / load tools for tests and bench
  nginx-light                                             # 1 KB HTTP responder behind wrk in bench/
  prometheus                                              # real scraper for the metrics test
  containernetworking-plugins                             # real CNI plugins (ptp, bridge, host-local) for cni/
  kubectl                                                 # real client for tests/kubeapi (v1.32, in the image; Debian's kubernetes-client is 1.20)
  python3-venv
  vagrant vagrant-libvirt                                 # `vagrant validate` of vagrant/Vagrantfile in tests/vagrant (~40 MB of Ruby, no daemons; the VM host's libvirt/QEMU: vagrant/setup-host.sh)
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "missing system packages (${missing[*]}) and not root: run this script as root"; exit 1
  fi
  log "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  # Debian enables the prometheus service on install; ztagent's tests start their own.
  if command -v systemctl >/dev/null 2>&1; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
fi

# --- kernel headers for BCC --------------------------------------------------------------------
# BCC compiles its C against /lib/modules/$(uname -r)/build. VM kernels often ship without headers;
# Debian's newest installed headers work for the programs we load (see bpf/README.md).
krel=$(uname -r)
if { [ ! -e "/lib/modules/$krel/build/include" ] || [ ! -e "/lib/modules/$krel/source" ]; } && [ "$(id -u)" -eq 0 ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$hdr" ]; then
    log "pointing /lib/modules/$krel/build at $hdr"
    mkdir -p "/lib/modules/$krel"
    ln -sfn "$hdr" "/lib/modules/$krel/build"
    # Debian splits headers into -amd64 (generated) and -common (the tree BCC's kconfig.h lives in).
    common="${hdr%-amd64}-common"
    [ -d "$common" ] && ln -sfn "$common" "/lib/modules/$krel/source"
  else
    log "warning: no kernel headers found under /usr/src; eBPF capture will not load"
  fi
fi

# --- bpffs (pinned programs and maps survive agent restarts) ----------------------------------
if [ "$(id -u)" -eq 0 ] && ! mountpoint -q /sys/fs/bpf 2>/dev/null; then
  mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf
fi

# --- virtualenv -------------------------------------------------------------------------------
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then PY=$c; break; fi
  done
fi
[ -n "$PY" ] || { log "need Python >= 3.11"; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.ztagent-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing ztagent and its test extras"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[test]'
  touch "$stamp"
fi

# BCC's Python module is pure Python over libbcc (ctypes) and ships only for Debian's python3:
# expose exactly that package to the venv, not the whole of dist-packages.
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/bcc ] && [ ! -e "$site/bcc" ]; then
  ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
fi
log "ready: $VENV/bin/ztagent"
