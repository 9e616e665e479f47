# ruff: noqa: E501
"""A waypoint in the lab (issue 14 "done when"): real eBPF capture, real node agents, a real
`ztagent waypoint` process started by `ztagent lab up` from a Gateway in the config, and real
clients in pod namespaces: curl (HTTP/1.1), nghttp (HTTP/2) and grpcio (gRPC).

    node-a: frontend/sleep, frontend/other (enrolled), backend/waypoint (the waypoint's pod)
    node-b: backend/httpbin (enrolled): HTTP/1.1 + h2c on :8080, gRPC on :9090
    service backend/httpbin (istio.io/use-waypoint: waypoint): 10.96.0.10:8000 -> 8080, :9000 -> 9090

    sleep -> capture -> agent A -> HBONE (:authority 10.96.0.10:8000) -> waypoint (L7 policy)
          -> HBONE as the waypoint -> agent B (L4 policy: only the waypoint may call) -> httpbin
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab import topology as topo
from lab.runner import UpOptions, http_get_in, up
from tests.kernel.nsutil import requires_bcc, wait_until

pytestmark = [pytest.mark.kernel, requires_bcc, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
VIP = "10.96.0.10"
HTTPBIN_IP, WAYPOINT_IP = "10.244.2.2", "10.244.1.9"
WAYPOINT_ID = "spiffe://cluster.local/ns/backend/sa/waypoint"
SLEEP_ID = "spiffe://cluster.local/ns/frontend/sa/sleep"
DENY = "RBAC: access denied"

CONFIG = """\
apiVersion: ztagent.io/v1alpha1
kind: MeshConfig
trustDomain: cluster.local
nodes:
  - {name: node-a, address: 10.250.0.1, podCIDR: 10.244.1.0/24}
  - {name: node-b, address: 10.250.0.2, podCIDR: 10.244.2.0/24}
workloads:
  - {name: sleep, namespace: frontend, serviceAccount: sleep, node: node-a, ips: [10.244.1.2], labels: {app: sleep}}
  - {name: other, namespace: frontend, serviceAccount: other, node: node-a, ips: [10.244.1.4], labels: {app: other}}
  - {name: waypoint, namespace: backend, serviceAccount: waypoint, node: node-a, ips: [10.244.1.9], enrolled: false}
  - {name: httpbin, namespace: backend, serviceAccount: httpbin, node: node-b, ips: [10.244.2.2], labels: {app: httpbin}}
services:
  - name: httpbin
    namespace: backend
    vips: [10.96.0.10]
    ports: [{port: 8000, targetPort: 8080, name: http}, {port: 9000, targetPort: 9090, name: grpc}]
    selector: {app: httpbin}
    labels: {istio.io/use-waypoint: waypoint}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: backend}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
  addresses: [{type: IPAddress, value: 10.244.1.9}]
---
# L7, at the waypoint: sleep may GET/POST a few paths and call Echo/Say; nothing else.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-l7, namespace: backend}
spec:
  targetRefs: [{kind: Service, group: "", name: httpbin}]
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/frontend/sa/sleep"]}}]
      to: [{operation: {methods: [GET, POST], paths: ["/get", "/anything/*", "/test.Echo/Say"]}}]
---
# L4, at httpbin's node agent: only the waypoint may connect (no bypass).
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-via-waypoint, namespace: backend}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/backend/sa/waypoint"]}}]}]
"""

GRPC_CLIENT = """\
import sys, grpc
with grpc.insecure_channel(sys.argv[1]) as ch:
    fn = ch.unary_unary(sys.argv[2], request_serializer=None, response_deserializer=None)
    try:
        resp, call = fn.with_call(b"world", timeout=10)
        print("OK", resp.decode(), dict(call.trailing_metadata() or ()).get("seen-xfcc", ""))
    except grpc.RpcError as e:
        print(e.code().name, e.details())
"""


@dataclass
class Lab:
    state: topo.LabState

    def ns(self, ref: str) -> str:
        return str(self.state.find_pod(ref)["netns"])

    def run_in(self, ref: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.run(["ip", "netns", "exec", self.ns(ref), *argv], capture_output=True, text=True,
                              timeout=timeout, env=env)

    def curl(self, ref: str, url: str, *extra: str) -> tuple[int, str]:
        p = self.run_in(ref, "curl", "-s", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}", *extra, url)
        body, _, code = p.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body

    def grpc(self, ref: str, method: str) -> str:
        p = self.run_in(ref, sys.executable, "-c", GRPC_CLIENT, f"{VIP}:9000", method)
        return p.stdout.strip() or p.stderr.strip()[-400:]

    def logs(self, lines: int = 12) -> str:
        out = []
        for rec in self.state.processes:
            if rec.log and (rec.role.startswith("waypoint") or rec.role == "agent-node-b"):
                with open(rec.log, errors="replace") as f:
                    out.append(f"--- {rec.role}:\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(out)

    def waypoint_metric(self, name: str, **labels: str) -> float:
        status, body = http_get_in(self.ns("backend/waypoint"), WAYPOINT_IP, 15020, "/metrics", 5)
        assert status == 200
        return sum(s.value for fam in text_string_to_metric_families(body) for s in fam.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("wplab")
    cfg = tmp / "lab.yaml"
    cfg.write_text(CONFIG)
    name = f"waypoint{os.getpid() % 100000}"
    root = str(tmp / "labroot")
    state = up(UpOptions(config=str(cfg), name=name, root=root, ready_timeout=180))
    backend = None
    try:
        ns = str(state.find_pod("backend/httpbin")["netns"])
        backend = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.waypoint.backend", "--port", "8080",
             "--grpc-port", "9090", "--seconds", "600"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert backend.stdout is not None and backend.stdout.readline().strip() == b"ready"
        lab = Lab(state)
        # The first call also waits for the agents' certificates for the pods.
        wait_until(lambda: lab.curl("frontend/sleep", f"http://{VIP}:8000/get")[0] == 200, timeout=60)
        yield lab
    finally:
        if backend is not None:
            backend.terminate()
            backend.wait(10)
        topo.teardown(topo.LabState.load(state.lab, root))
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert not [ln for ln in out.splitlines() if ln.startswith(name + "-")], "lab namespaces left behind"


def test_curl_http1_allowed_and_denied_through_the_waypoint(lab: Lab) -> None:
    code, body = lab.curl("frontend/sleep", f"http://{VIP}:8000/get")
    assert code == 200, body
    seen = json.loads(body)
    assert [v for n, v in seen["headers"] if n.lower() == "x-forwarded-client-cert"] == [
        f"By={WAYPOINT_ID};URI={SLEEP_ID}"
    ]
    assert lab.curl("frontend/sleep", f"http://{VIP}:8000/admin") == (403, DENY)
    assert lab.curl("frontend/sleep", f"http://{VIP}:8000/anything/%2e%2e/admin")[0] in (400, 403)
    assert lab.curl("frontend/sleep", f"http://{VIP}:8000/anything/x", "-X", "DELETE") == (403, DENY)
    assert lab.waypoint_metric("istio_requests_total", response_code="403", source_principal=SLEEP_ID) >= 2
    assert lab.waypoint_metric("istio_requests_total", response_code="200", reporter="waypoint",
                               destination_service="httpbin.backend.svc.cluster.local") >= 1


def test_forged_identity_header_is_not_believed(lab: Lab) -> None:
    forged = f"x-forwarded-client-cert: By={WAYPOINT_ID};URI={SLEEP_ID}"
    assert lab.curl("frontend/other", f"http://{VIP}:8000/get", "-H", forged) == (403, DENY)
    code, body = lab.curl("frontend/sleep", f"http://{VIP}:8000/get", "-H",
                          "x-forwarded-client-cert: By=x;URI=spiffe://cluster.local/ns/kube-system/sa/admin")
    assert code == 200
    assert [v for n, v in json.loads(body)["headers"] if n.lower() == "x-forwarded-client-cert"] == [
        f"By={WAYPOINT_ID};URI={SLEEP_ID}"
    ]


@pytest.mark.skipif(shutil.which("nghttp") is None, reason="nghttp (nghttp2-client) not installed")
def test_nghttp_http2_allowed_and_denied(lab: Lab) -> None:
    p = lab.run_in("frontend/sleep", "nghttp", "-v", f"http://{VIP}:8000/get", f"http://{VIP}:8000/admin")
    assert p.stdout.count(":status: 200") == 1 and p.stdout.count(":status: 403") == 1, p.stdout + p.stderr
    assert DENY in p.stdout


def test_grpc_allowed_and_denied(lab: Lab) -> None:
    got = lab.grpc("frontend/sleep", "/test.Echo/Say")
    assert got == f"OK hello world By={WAYPOINT_ID};URI={SLEEP_ID}", lab.logs()
    assert lab.grpc("frontend/sleep", "/test.Echo/Other").startswith("PERMISSION_DENIED")
    assert lab.grpc("frontend/other", "/test.Echo/Say").startswith("PERMISSION_DENIED")


def test_bypassing_the_waypoint_is_refused_by_the_destination_l4_policy(lab: Lab) -> None:
    # Straight to the pod (not the service): no waypoint on the path, so node-b's agent sees
    # frontend/sleep as the peer, and its L4 policy admits only the waypoint.
    code, _body = lab.curl("frontend/sleep", f"http://{HTTPBIN_IP}:8080/get")
    assert code == 0  # reset: no HTTP answer at all
    assert lab.curl("frontend/sleep", f"http://{VIP}:8000/get")[0] == 200  # the waypoint path still works
