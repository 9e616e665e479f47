"""Two real node agents on loopback with a real CA (tests/agent/mesh.py): HBONE end to end,
policy at the destination, live policy changes, PeerAuthentication, metrics, admin, status."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.agent.mesh import Mesh, running_mesh
from tests.agent.prom import prometheus_scraping

pytestmark = pytest.mark.timeout(180)

ZTAGENT = [sys.executable, "-m", "cli.main"]

ALLOW_SLEEP_ONLY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: ns2}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/ns1/sa/sleep"]}
"""
DENY_ALL_NS2 = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: ns2}
spec: {action: DENY, rules: [{}]}
"""
STRICT_NS2 = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: ns2}
spec: {mtls: {mode: STRICT}}
"""


@pytest.fixture
async def mesh(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with running_mesh(tmp_path) as m:
        yield m


def samples(text: str, name: str, **labels: str) -> list[float]:
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out.append(s.value)
    return out


async def status_cli(mesh: Mesh, node: str, *args: str) -> tuple[int, str, str]:
    admin = mesh.agents[node].addresses()["admin"].removeprefix("http://")
    proc = await asyncio.create_subprocess_exec(
        *ZTAGENT, "status", "--admin", admin, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def wait_until(pred: Any, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


# --------------------------------------------------------------------------------------------


async def test_service_vip_over_hbone_with_identity_metrics_and_logs(mesh: Mesh) -> None:
    payload = b"hello mesh " * 1000
    got = await mesh.roundtrip(mesh.sleep_ip, "node-a", f"{mesh.vip}:8000", payload)
    assert got == payload
    # The destination agent connected to the app (HBONE terminated at node B).
    assert mesh.echo.peers

    b_metrics = await mesh.metrics_text("node-b")
    dest = dict(
        reporter="destination",
        source_workload="sleep",
        source_workload_namespace="ns1",
        source_principal="spiffe://cluster.local/ns/ns1/sa/sleep",
        destination_workload="httpbin",
        destination_workload_namespace="ns2",
        destination_principal="spiffe://cluster.local/ns/ns2/sa/httpbin",
        destination_service="httpbin.ns2.svc.cluster.local",
        connection_security_policy="mutual_tls",
    )
    assert samples(b_metrics, "istio_tcp_connections_opened_total", **dest) == [1]
    await wait_until(lambda: not mesh.agents["node-b"].tracker.open)
    b_metrics = await mesh.metrics_text("node-b")
    assert samples(b_metrics, "istio_tcp_connections_closed_total", **dest) == [1]
    assert samples(b_metrics, "istio_tcp_received_bytes_total", **dest) == [len(payload)]
    assert samples(b_metrics, "istio_tcp_sent_bytes_total", **dest) == [len(payload)]
    assert samples(b_metrics, "ztagent_policy_decisions_total", action="allow", reason="no-policy") == [1]

    a_metrics = await mesh.metrics_text("node-a")
    src = dict(
        reporter="source",
        source_workload="sleep",
        destination_workload="httpbin",
        destination_service="httpbin.ns2.svc.cluster.local",
    )
    assert samples(a_metrics, "istio_tcp_connections_opened_total", **src) == [1]
    await wait_until(lambda: not mesh.agents["node-a"].tracker.open)
    a_metrics = await mesh.metrics_text("node-a")
    assert samples(a_metrics, "istio_tcp_received_bytes_total", **src) == [len(payload)]

    closed_b = [r for r in mesh.access_log("node-b") if r["event"] == "connection_closed"]
    assert closed_b and closed_b[-1]["source_principal"] == "spiffe://cluster.local/ns/ns1/sa/sleep"
    assert closed_b[-1]["destination_workload"] == "ns2/httpbin" and closed_b[-1]["decision"] == "ALLOW"
    assert closed_b[-1]["security"] == "mutual_tls" and closed_b[-1]["bytes_received"] == len(payload)

    # Admin endpoints describe what happened.
    certs = await mesh.admin("node-a", "/certs")
    ids = {c["identity"] for c in certs}
    assert {"spiffe://cluster.local/ns/ns1/sa/sleep", "spiffe://cluster.local/ns/ns1/sa/other"} <= ids
    assert all(c.get("serial") and c["expiresInSeconds"] > 0 for c in certs)
    wl = await mesh.admin("node-b", "/workloads")
    assert {w["name"]: w["enrolled"] for w in wl}["legacy"] is False
    dump = await mesh.admin("node-b", "/config_dump")
    # ztunnel's config_dump shape (issue 17): endpoints keyed by workload UID.
    assert list(dump["services"][0]["endpoints"]) == ["Kubernetes//Pod/ns2/httpbin"]
    status = await mesh.admin("node-a", "/status")
    assert status["healthy"] and status["ready"] and status["tunnels"]["pooledConnections"] >= 1


async def test_direct_pod_ip_and_pooled_connections(mesh: Mesh) -> None:
    for i in range(5):
        got = await mesh.roundtrip(mesh.sleep_ip, "node-a", f"{mesh.httpbin_ip}:{mesh.echo.port}", b"x%d" % i)
        assert got == b"x%d" % i
    # Five tunnels, one pooled mTLS connection (same source and destination identity).
    assert mesh.agents["node-a"].hbone_client.connections == 1


async def test_unenrolled_external_and_same_node_paths(mesh: Mesh) -> None:
    # Unenrolled destination: plaintext passthrough, counted with security "none".
    assert (
        await mesh.roundtrip(mesh.sleep_ip, "node-a", f"{mesh.ip(41)}:{mesh.legacy.port}", b"legacy")
        == b"legacy"
    )
    # Same node: authorized locally and delivered keeping the source pod's IP.
    assert (
        await mesh.roundtrip(mesh.sleep_ip, "node-a", f"{mesh.ip(11)}:{mesh.local.port}", b"local")
        == b"local"
    )
    assert mesh.local.peers[-1][0] == mesh.sleep_ip
    # Outside the mesh, nothing listening (TEST-NET): the app's connection is reset, not hung.
    assert await mesh.roundtrip(mesh.sleep_ip, "node-a", "192.0.2.1:9", b"x") == b""
    m = await mesh.metrics_text("node-a")
    assert samples(
        m,
        "istio_tcp_connections_opened_total",
        reporter="source",
        destination_workload="legacy",
        connection_security_policy="none",
    ) == [1]
    assert samples(
        m,
        "istio_tcp_connections_opened_total",
        reporter="destination",
        destination_workload="other",
        source_principal="spiffe://cluster.local/ns/ns1/sa/sleep",
    ) == [1]


async def test_source_not_enrolled_here_is_refused(mesh: Mesh) -> None:
    # httpbin's IP belongs to node-b: agent A holds no identity for it and must not proxy for it.
    got = await mesh.roundtrip(mesh.httpbin_ip, "node-a", f"{mesh.vip}:8000", b"spoof")
    assert got == b""
    m = await mesh.metrics_text("node-a")
    assert samples(m, "ztagent_handshake_failures_total", direction="outbound", reason="unknown-source") == [
        1
    ]


async def test_namespace_allow_admits_exactly_the_allowed_principal(mesh: Mesh) -> None:
    mesh.set_policies(ALLOW_SLEEP_ONLY)
    await mesh.wait_applied()
    assert await mesh.roundtrip(mesh.sleep_ip, "node-a", f"{mesh.vip}:8000", b"ok") == b"ok"
    assert await mesh.roundtrip(mesh.other_ip, "node-a", f"{mesh.vip}:8000", b"no") == b""
    # A plaintext client never matches a principal: denied too.
    assert await mesh.roundtrip(None, "node-b", f"{mesh.httpbin_ip}:{mesh.echo.port}", b"no") == b""

    denied = [r for r in mesh.access_log("node-b") if r["event"] == "connection_denied"]
    assert [d.get("source_principal") for d in denied] == ["spiffe://cluster.local/ns/ns1/sa/other", None]
    assert all(d["policy"] == "ns2/allow-sleep" and d["code"] == "no-allow-matched" for d in denied)
    m = await mesh.metrics_text("node-b")
    assert samples(m, "ztagent_policy_decisions_total", action="deny", reason="no-allow-matched") == [2]
    assert samples(m, "ztagent_policy_decisions_total", action="allow", reason="allow-matched") == [1]
    failed = [r for r in mesh.access_log("node-a") if r["event"] == "connection_failed"]
    assert failed and failed[-1]["status"] == 401

    code, out, _ = await status_cli(mesh, "node-b")
    assert code == 0, out
    assert "Recent denials (2)" in out and "ns2/allow-sleep" in out
    code, out, _ = await status_cli(mesh, "node-b", "-o", "json")
    st = json.loads(out)
    assert st["recentDenials"][0]["reason"].startswith("no ALLOW policy matched")


async def test_policy_change_cuts_an_open_connection(mesh: Mesh) -> None:
    r, w = await mesh.connect_as(mesh.sleep_ip, "node-a", f"{mesh.vip}:8000")
    try:
        w.write(b"ping")
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
        mesh.set_policies(DENY_ALL_NS2)
        await mesh.wait_applied()
        # The destination agent re-evaluated and reset the stream: the app sees the end.
        data = b""
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            for _ in range(50):
                w.write(b"more")
                await w.drain()
                data = await asyncio.wait_for(r.read(4), 5)
                if not data:
                    raise ConnectionResetError("closed")
                await asyncio.sleep(0.05)
    finally:
        w.close()
    m = await mesh.metrics_text("node-b")
    assert samples(m, "ztagent_connections_closed_by_policy_total", namespace="ns2") == [1]
    cut = [r for r in mesh.access_log("node-b") if r["event"] == "connection_denied"]
    assert cut and cut[-1]["policy"] == "ns2/deny-all" and "re-check" in cut[-1]["path"]
    # New connections are refused as well.
    assert await mesh.roundtrip(mesh.sleep_ip, "node-a", f"{mesh.vip}:8000", b"x") == b""


async def test_permissive_counts_plaintext_and_strict_refuses_it(mesh: Mesh) -> None:
    target = f"{mesh.httpbin_ip}:{mesh.echo.port}"
    assert await mesh.roundtrip(None, "node-b", target, b"plain") == b"plain"
    m = await mesh.metrics_text("node-b")
    assert samples(m, "ztagent_plaintext_connections_total", namespace="ns2") == [1]
    assert samples(
        m,
        "istio_tcp_connections_opened_total",
        reporter="destination",
        connection_security_policy="none",
        destination_workload="httpbin",
    ) == [1]

    mesh.set_policies(STRICT_NS2)
    await mesh.wait_applied()
    assert await mesh.roundtrip(None, "node-b", target, b"plain") == b""
    # mTLS from the mesh still works under STRICT.
    assert await mesh.roundtrip(mesh.sleep_ip, "node-a", f"{mesh.vip}:8000", b"mtls") == b"mtls"
    m = await mesh.metrics_text("node-b")
    assert samples(m, "ztagent_policy_decisions_total", action="deny", reason="mtls-required") == [1]
    assert samples(m, "ztagent_plaintext_connections_total", namespace="ns2") == [1]
    denied = [r for r in mesh.access_log("node-b") if r["event"] == "connection_denied"]
    assert denied[-1]["policy"] == "ns2/strict" and denied[-1]["mtls_mode"] == "STRICT"


async def test_bad_config_update_is_refused_and_reported(mesh: Mesh) -> None:
    good = mesh.config_path.read_text()
    mesh.write_config(good.replace(f"{mesh.base}.40]", f"{mesh.base}.400]"))
    await wait_until(lambda: mesh.agents["node-b"].status()["config"]["errors"])
    st = await mesh.admin("node-b", "/status")
    assert not st["healthy"]
    assert any(
        "workloads[2].ips[0]" in e and "mesh.yaml: document 0 (MeshConfig)" in e
        for e in st["config"]["errors"]
    )
    code, out, _ = await status_cli(mesh, "node-b")
    assert code == 1 and "UNHEALTHY" in out and "refused update" in out
    # The last good config keeps serving.
    assert await mesh.roundtrip(mesh.sleep_ip, "node-a", f"{mesh.vip}:8000", b"still") == b"still"
    mesh.write_config(good + "# touched\n")
    await wait_until(lambda: not mesh.agents["node-b"].status()["config"]["errors"])
    code, _, _ = await status_cli(mesh, "node-b")
    assert code == 0


async def test_status_cli_unreachable_is_a_clear_error() -> None:
    proc = await asyncio.create_subprocess_exec(
        *ZTAGENT, "status", "--admin", "127.0.0.1:1", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"cannot reach the ztagent admin endpoint at 127.0.0.1:1" in err


async def test_prometheus_scrapes_both_agents(mesh: Mesh) -> None:
    assert await mesh.roundtrip(mesh.sleep_ip, "node-a", f"{mesh.vip}:8000", b"scrape me") == b"scrape me"
    targets = [mesh.agents[n].addresses()["metrics"].removeprefix("http://") for n in ("node-a", "node-b")]

    def query() -> list[dict[str, Any]]:
        with prometheus_scraping(targets) as prom:
            return prom.wait_for(
                'sum by (reporter) (istio_tcp_connections_opened_total{source_workload="sleep",'
                'destination_service="httpbin.ns2.svc.cluster.local"})'
            ) and prom.wait_for(
                "count(count by (reporter) (istio_tcp_connections_opened_total"
                '{source_workload="sleep"}) ) == 2'
            )

    result = await asyncio.to_thread(query)
    assert float(result[0]["value"][1]) == 2


async def test_workload_added_and_removed_at_runtime(mesh: Mesh) -> None:
    from tests.agent.mesh import EchoApp

    # A new workload "web" on node-b, listening on the service's target port, becomes the service's
    # endpoint: agent B must fetch its certificate and serve HBONE for it, agent A route to it.
    app = EchoApp(mesh.ip(42), port=mesh.echo.port)
    await app.start()
    try:
        extra = (
            f"  - {{name: web, namespace: ns2, serviceAccount: web, node: node-b, ips: [{mesh.ip(42)}], "
            "labels: {app: web}}\n"
        )
        added = (
            mesh.config_text()
            .replace("services:\n", extra + "services:\n")
            .replace("selector: {app: httpbin}", "selector: {app: web}")
        )
        # The CA is not told: it must re-read the file when node-b asks for web's certificate.
        mesh.write_config(added)
        await mesh.wait_applied()
        await wait_until(
            lambda: any(
                c["identity"].endswith("/ns/ns2/sa/web") and c.get("serial")
                for c in mesh.agents["node-b"].certs()
            )
        )
        assert await mesh.roundtrip(mesh.sleep_ip, "node-a", f"{mesh.vip}:8000", b"to web") == b"to web"
        assert len(app.peers) == 1
        m = await mesh.metrics_text("node-b")
        assert samples(
            m,
            "istio_tcp_connections_opened_total",
            reporter="destination",
            destination_workload="web",
            destination_principal="spiffe://cluster.local/ns/ns2/sa/web",
        ) == [1]
        # The first fetch succeeded: no denial, no backoff.
        web_failures = samples(
            m, "ztagent_cert_rotation_failures_total", identity="spiffe://cluster.local/ns/ns2/sa/web"
        )
        assert web_failures in ([], [0]), web_failures
        code, out, _ = await status_cli(mesh, "node-b", "-o", "json")
        assert code == 0 and "spiffe://cluster.local/ns/ns2/sa/web" in out

        # Removing web again closes its open connections and drops its identity.
        r, w = await mesh.connect_as(mesh.sleep_ip, "node-a", f"{mesh.vip}:8000")
        w.write(b"hi")
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(2), 5) == b"hi"
        mesh.write_config(mesh.config_text())
        await mesh.wait_applied()
        try:
            rest = await asyncio.wait_for(r.read(), 10)
        except ConnectionResetError:
            rest = b""
        assert rest == b""
        w.close()
        await wait_until(
            lambda: not any(c["identity"].endswith("/ns/ns2/sa/web") for c in mesh.agents["node-b"].certs())
        )
    finally:
        await app.close()


async def test_destination_agent_down_resets_the_app_and_says_why(mesh: Mesh) -> None:
    await mesh.agents["node-b"].stop()
    assert await mesh.roundtrip(mesh.sleep_ip, "node-a", f"{mesh.vip}:8000", b"anyone?") == b""
    m = await mesh.metrics_text("node-a")
    assert samples(m, "ztagent_handshake_failures_total", direction="outbound", reason="connect-refused") == [
        1
    ]
    failed = [r for r in mesh.access_log("node-a") if r["event"] == "connection_failed"]
    assert failed[-1]["kind"] == "connect-refused" and "is the node agent running" in failed[-1]["reason"]
    assert not mesh.echo.peers  # nothing went around the mesh


async def test_closed_port_on_the_pod_resets_and_is_logged(mesh: Mesh) -> None:
    assert await mesh.roundtrip(None, "node-b", f"{mesh.httpbin_ip}:1", b"x") == b""
    failed = [r for r in mesh.access_log("node-b") if r["event"] == "connection_failed"]
    assert (
        failed
        and failed[-1]["kind"] == "upstream-failed"
        and failed[-1]["destination_workload"] == "ns2/httpbin"
    )
    m = await mesh.metrics_text("node-b")
    # Issue 17: an upstream connect failure is ztunnel's response_flags="CONNECT", not a handshake
    # failure.
    assert samples(m, "ztagent_handshake_failures_total", direction="inbound", reason="upstream-failed") == []
    flagged = dict(reporter="destination", destination_workload="httpbin", response_flags="CONNECT")
    assert samples(m, "istio_tcp_connections_failed_total", **flagged) == [1]
    assert samples(m, "istio_tcp_connections_closed_total", **flagged) == [1]


async def test_a_broken_policy_update_keeps_its_last_good_version_and_traffic_flows(mesh: Mesh) -> None:
    """One typo in one policy is not an outage: the update is refused for that policy alone,
    its last good version stays in force, open and new connections flow, and status, a metric
    and the log name it."""
    mesh.set_policies(ALLOW_SLEEP_ONLY, STRICT_NS2)
    await mesh.wait_applied()
    r, w = await mesh.connect_as(mesh.sleep_ip, "node-a", f"{mesh.vip}:8000")
    try:
        w.write(b"ping")
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
        broken = ALLOW_SLEEP_ONLY.replace("action: ALLOW", "action: ALOW")
        mesh.set_policies(broken, STRICT_NS2)
        await mesh.wait_applied()
        # The open connection survives (no re-check denied it) ...
        w.write(b"pong")
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(4), 5) == b"pong"
    finally:
        w.close()
    # ... new connections from the allowed principal still pass, the others are still denied.
    assert await mesh.roundtrip(mesh.sleep_ip, "node-a", f"{mesh.vip}:8000", b"new") == b"new"
    assert await mesh.roundtrip(mesh.other_ip, "node-a", f"{mesh.vip}:8000", b"x") == b""
    st = await mesh.admin("node-b", "/status")
    stale = st["config"]["stalePolicies"]
    assert list(stale) == ["AuthorizationPolicy/ns2/allow-sleep"]
    assert "ALOW" in stale["AuthorizationPolicy/ns2/allow-sleep"][0]
    assert st["healthy"] is False and any("last good version in force" in p for p in st["problems"])
    m = await mesh.metrics_text("node-b")
    assert samples(m, "ztagent_policies_last_good_in_force") == [1]
    assert samples(m, "ztagent_policies_invalid") == [0]
    # Fixed again: back to normal.
    mesh.set_policies(ALLOW_SLEEP_ONLY, STRICT_NS2)
    await mesh.wait_applied()
    st = await mesh.admin("node-b", "/status")
    assert st["config"]["stalePolicies"] == {}
    assert samples(await mesh.metrics_text("node-b"), "ztagent_policies_last_good_in_force") == [0]


async def test_a_policy_that_never_parsed_is_enforced_fail_closed(mesh: Mesh) -> None:
    """Without a good version to keep, an invalid ALLOW allows nothing."""
    mesh.set_policies(ALLOW_SLEEP_ONLY.replace("action: ALLOW", "action: ALOW"))
    await mesh.wait_applied()
    assert await mesh.roundtrip(mesh.sleep_ip, "node-a", f"{mesh.vip}:8000", b"x") == b""
    m = await mesh.metrics_text("node-b")
    assert samples(m, "ztagent_policies_invalid") == [1]
    assert samples(m, "ztagent_policies_last_good_in_force") == [0]
