"""Issue 17: ztunnel's local config (LOCAL_XDS_PATH shape: workloads, services, policies,
camelCase), with the lab's node map beside it, drives a real lab.

`ztagent ztunnel-import` translates it; `ztagent lab up` runs the mesh it describes (network
namespaces, eBPF capture, a CA, two real agents); curl from the pods shows the service VIP,
HBONE and the translated policy at work. The lab is named ztunnel17-*, and removed in a finally
block; nothing it made may be left.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.runner import http_get_in
from tests.kernel.nsutil import requires_bcc
from tests.kernel.test_lab import REPO, ZTAGENT, Lab, _metric, http_server

pytestmark = [pytest.mark.kernel]

# The lab of examples/lab.yaml, written as ztunnel's local config: workloads attached to the
# service and to the policy by name, a WorkloadSelector policy in ztunnel's RBAC form.
LOCAL = """\
workloads:
- uid: Kubernetes//Pod/frontend/sleep
  name: sleep
  namespace: frontend
  serviceAccount: sleep
  workloadIps: ["10.244.1.2"]
  protocol: HBONE
  node: node-a
  network: ""
  canonicalName: sleep
- uid: Kubernetes//Pod/frontend/legacy
  name: legacy
  namespace: frontend
  serviceAccount: legacy
  workloadIps: ["10.244.1.3"]
  protocol: TCP
  node: node-a
- uid: Kubernetes//Pod/backend/httpbin
  name: httpbin
  namespace: backend
  serviceAccount: httpbin
  workloadIps: ["10.244.2.2"]
  protocol: HBONE
  node: node-b
  canonicalName: httpbin
  canonicalRevision: v1
  authorizationPolicies: [backend/httpbin-allow-sleep]
  services:
    "backend/httpbin.backend.svc.cluster.local":
      8000: 8080
- uid: Kubernetes//Pod/backend/reviews
  name: reviews
  namespace: backend
  serviceAccount: reviews
  workloadIps: ["10.244.1.4"]
  protocol: HBONE
  node: node-a
services:
- name: httpbin
  namespace: backend
  hostname: httpbin.backend.svc.cluster.local
  vips: [/10.96.0.10]
  ports:
    8000: 8080
  subjectAltNames: [spiffe://cluster.local/ns/backend/sa/httpbin]
policies:
- name: httpbin-allow-sleep
  namespace: backend
  scope: WorkloadSelector
  action: Allow
  rules:
  - - - principals: [{Exact: spiffe://cluster.local/ns/frontend/sa/sleep}]
    - - destinationPorts: [8080]
"""
# The lab's node map (the nodes of examples/lab.yaml).
NODES = """\
trustDomain: cluster.local
nodes:
  - {name: node-a, address: 10.250.0.1, podCIDR: 10.244.1.0/24}
  - {name: node-b, address: 10.250.0.2, podCIDR: 10.244.2.0/24}
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lb = Lab(tmp_path)
    lb.name = f"ztunnel17-{os.getpid() % 100000}"
    try:
        yield lb
    finally:
        lb.cleanup()
        assert lb.leftovers() == []


def _curl(lab: Lab, pod: str, url: str) -> subprocess.CompletedProcess[str]:
    return lab.exec(pod, "curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", url)


@requires_bcc
def test_ztunnel_local_config_drives_the_lab(lab: Lab, tmp_path: Path) -> None:
    local, nodes, mesh = tmp_path / "local.yaml", tmp_path / "nodes.yaml", tmp_path / "mesh.yaml"
    local.write_text(LOCAL)
    nodes.write_text(NODES)
    got = subprocess.run(
        [*ZTAGENT, "ztunnel-import", str(local), "--nodes", str(nodes), "-o", str(mesh)],
        env=lab.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert got.returncode == 0, got.stderr

    lab.cli("up", "--config", str(mesh), "--name", lab.name, "--detach", "--ready-timeout", "90", timeout=240)
    state = lab.state()
    http_server(lab, "backend/httpbin", "10.244.2.2", 8080)
    # sleep -> the service VIP and the pod IP: captured, HBONE to node-b, allowed by the policy.
    for url in ("http://10.96.0.10:8000/", "http://10.244.2.2:8080/"):
        ok = _curl(lab, "frontend/sleep", url)
        assert ok.stdout == "200", (url, ok.stdout, ok.stderr)
    # reviews is enrolled too, but the translated WorkloadSelector policy admits only sleep.
    denied = _curl(lab, "backend/reviews", "http://10.96.0.10:8000/")
    assert denied.returncode != 0 and denied.stdout in ("", "000"), denied.stdout
    # legacy (protocol TCP: not enrolled) is not captured; node-b's policy refuses its plaintext.
    assert _curl(lab, "frontend/legacy", "http://10.244.2.2:8080/").returncode != 0

    metrics_b = http_get_in(state.nodes["node-b"]["netns"], "127.0.0.1", 15020, "/metrics")[1]
    assert (
        _metric(
            metrics_b,
            "istio_tcp_connections_closed_total",
            reporter="destination",
            source_principal="spiffe://cluster.local/ns/frontend/sa/sleep",
            response_flags="-",
            destination_canonical_revision="v1",
            connection_security_policy="mutual_tls",
        )
        >= 2
    )
    assert (
        _metric(
            metrics_b,
            "istio_tcp_connections_failed_total",
            response_flags="DENY",
            source_principal="spiffe://cluster.local/ns/backend/sa/reviews",
        )
        >= 1
    )
    # The agent's ztunnel-shaped dump names the policy as ztunnel would.
    admin = subprocess.run(
        [
            *ZTAGENT,
            "lab",
            "exec",
            "--name",
            lab.name,
            "--node",
            "node-b",
            "--",
            sys.executable,
            "-m",
            "cli.main",
            "ztunnel-config",
            "policies",
            "-o",
            "json",
        ],
        env=lab.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert admin.returncode == 0, admin.stderr
    assert '"scope": "WorkloadSelector"' in admin.stdout and '"httpbin-allow-sleep"' in admin.stdout
