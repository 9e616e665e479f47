#!/usr/bin/env bash
# `make lab`: bring up the example lab (two nodes, four pods, a service, a policy), send one HTTP
# request from frontend/sleep on node-a to the backend/httpbin service on node-b, show that it went
# through both node agents over HBONE (their counters), and remove the lab on exit (also on Ctrl-C).
#   LAB_NAME=ztlab LAB_CONFIG=examples/lab.yaml KEEP=1 (leave the lab up; `ztagent lab down` later)
set -euo pipefail
cd "$(dirname "$0")/.."
ZT=${ZTAGENT:-$PWD/.venv/bin/ztagent}
PY=$PWD/.venv/bin/python
LAB=${LAB_NAME:-ztlab}
CONFIG=${LAB_CONFIG:-examples/lab.yaml}

[ "$(id -u)" -eq 0 ] || { echo "lab-demo: needs root (network namespaces, eBPF)" >&2; exit 1; }

cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then echo "lab $LAB left running: $ZT lab down --name $LAB"; return; fi
  echo "== removing lab $LAB"
  "$ZT" lab down --name "$LAB" | sed 's/^/   /' || true
}
"$ZT" lab down --name "$LAB" >/dev/null 2>&1 || true   # leftovers of an earlier, crashed run
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== bringing up lab $LAB from $CONFIG"
"$ZT" lab up --config "$CONFIG" --name "$LAB" --detach

echo "== an HTTP server in backend/httpbin (node-b, 10.244.2.2:8080)"
"$ZT" lab exec --name "$LAB" backend/httpbin -- "$PY" -m http.server 8080 --bind 0.0.0.0 >/dev/null 2>&1 &
disown  # lab down stops it with everything else in the lab's namespaces
for _ in $(seq 50); do
  "$ZT" lab exec --name "$LAB" backend/httpbin -- curl -s -o /dev/null -m 1 http://127.0.0.1:8080/ && break
  sleep 0.2
done

# Prints one line per connection-opened series of the given reporter (Istio's metric and labels).
read -r -d '' COUNTERS <<'PYEOF' || true
import sys
from prometheus_client.parser import text_string_to_metric_families
node, reporter = sys.argv[1], sys.argv[2]
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        if s.name == "istio_tcp_connections_opened_total" and s.labels.get("reporter") == reporter:
            lb = s.labels
            print(f"   {node} ({reporter}): {lb.get('source_workload')} -> {lb.get('destination_workload')}"
                  f"  peer identity {lb.get('source_principal')}  connections opened: {int(s.value)}")
PYEOF
show_counters() {  # node reporter
  "$ZT" lab exec --name "$LAB" --node "$1" -- curl -s -m 5 http://127.0.0.1:15020/metrics | "$PY" -c "$COUNTERS" "$1" "$2"
}

echo "== frontend/sleep (node-a) -> http://10.96.0.10:8000/ (service backend/httpbin, a VIP)"
"$ZT" lab exec --name "$LAB" frontend/sleep -- \
  curl -sS -m 10 -o /dev/null -w '   HTTP %{http_code} in %{time_total}s\n' http://10.96.0.10:8000/
echo "== it crossed both agents (pod -> eBPF -> agent node-a -> HBONE mTLS -> agent node-b -> pod):"
show_counters node-a source
show_counters node-b destination

echo "== frontend/legacy (not in the mesh) -> httpbin: refused by the AuthorizationPolicy at node-b"
if "$ZT" lab exec --name "$LAB" frontend/legacy -- curl -sS -m 5 -o /dev/null http://10.244.2.2:8080/ 2>/dev/null; then
  echo "   unexpectedly allowed" >&2; exit 1
else
  echo "   refused, as the policy says"
fi

echo "== node-b's agent: ztagent status (its admin endpoint, inside the node's network namespace)"
"$ZT" lab exec --name "$LAB" --node node-b -- ztagent status | sed 's/^/   /'
