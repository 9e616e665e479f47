#!/usr/bin/env bash
# Runs inside the lab VM as root: records what the kernel offers, then ztagent's kernel tests.
#
#   sudo bash /ztagent/vagrant/guest-tests.sh [pytest args...]    (default: -m kernel tests/kernel)
#
# Results go to /var/tmp/ztagent-results: junit.xml, pytest.log, kernel.txt (uname, bpftool feature
# probe of the program types and helpers capture needs), rc. make vagrant-test copies them out.
set -uo pipefail
OUT=/var/tmp/ztagent-results
rm -rf "$OUT"; mkdir -p "$OUT"
cd /ztagent
PY=/opt/ztagent-venv/bin/python
[ -x "$PY" ] || PY=/ztagent/.venv/bin/python
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
{
  echo "uname: $(uname -r) $(uname -v)"
  echo "os: $(. /etc/os-release; echo "$PRETTY_NAME")"
  echo "python: $($PY --version 2>&1)  bcc: $($PY -c 'import bcc; print(bcc.__version__)' 2>&1 | tail -n 1)"
  echo "nft: $(nft --version 2>&1)  bpftool: $(bpftool version 2>&1 | head -n 1)"
  echo "--- bpftool feature probe kernel: what capture.c uses"
  probe=$(bpftool feature probe kernel 2>/dev/null)
  for want in "program_type sk_lookup" "map_type sockmap" "map_type hash"; do
    grep -q "eBPF $want is available" <<< "$probe" && echo "$want: available" || echo "$want: MISSING"
  done
  helpers=$(sed -n '/helpers supported for program type sk_lookup:/,/helpers supported for program type/p' <<< "$probe")
  for h in bpf_sk_assign bpf_sk_release bpf_map_lookup_elem; do
    grep -qx "[[:space:]]*- $h" <<< "$helpers" && echo "sk_lookup helper $h: available" || echo "sk_lookup helper $h: MISSING"
  done
  echo "(the ingress ifindex in struct bpf_sk_lookup, Linux >= 5.17, is not probed by bpftool: the verifier"
  echo " refuses the program's load where it is missing, which the tests show)"
  echo "--- nftables table with flags owner (the fast-reset guard, Linux >= 5.12)"
  if msg=$(printf 'table ip ztagent-vagrant-probe { flags owner; }\n' | nft -f - 2>&1); then
    echo "owner tables: supported"
  else
    echo "owner tables: refused: $msg"
  fi
} > "$OUT/kernel.txt" 2>&1
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-m kernel tests/kernel)
echo "[guest-tests] $(uname -r): pytest ${args[*]}" >&2
# Slower than native under emulation: the tests' own bounded waits stay as they are; only pytest's
# per-test ceiling is raised.
timeout "${ZTAGENT_GUEST_TIMEOUT:-5400}" "$PY" -m pytest -p no:cacheprovider -o timeout=900 -rA \
  --junitxml="$OUT/junit.xml" "${args[@]}" 2>&1 | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}
echo "$rc" > "$OUT/rc"
chmod -R a+rX "$OUT"
exit "$rc"
