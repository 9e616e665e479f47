# ruff: noqa: E501
"""Issue 17: the agent as a drop-in for ztunnel, seen from outside.

A two-node loopback mesh (real CA, real agents, real HBONE mTLS; tests/agent/mesh.py) carries an
allowed connection (sleep -> httpbin via the service VIP), two denied ones (other -> httpbin over
HBONE, and a plaintext client, both refused by an ALLOW policy at node-b) and a failed one (sleep ->
httpbin while httpbin's app is down: no upstream). Then:

* the exposition has ztunnel's series and values (DENY / CONNECT flags, connections_failed,
  mutual_tls at both reporters, the cluster ID, istio_build, process_*, no *_created);
* a real Prometheus scrapes both agents and evaluates the PromQL of Istio's stock dashboards
  (ztunnel-dashboard.gen.json and istio-workload-dashboard.json, queries copied verbatim with the
  dashboard variables filled in), and each returns data for these edges, the denied one and the
  mTLS lock included;
* admin: /config_dump in the shape istioctl's configdump types read, /connections, POST /logging;
* the HBONE 200 carries the destination's baggage; readiness answers 500 while not ready.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agent.admin import parse_level_spec
from serving.http import build_readiness_app, serve
from tests.agent.mesh import Mesh, running_mesh
from tests.agent.prom import prometheus_scraping
from tests.agent.test_agent_loopback import ALLOW_SLEEP_ONLY, samples, wait_until
from tunnel import hbone
from tunnel.hbone import Authority
from tunnel.tls import build_client_context

pytestmark = pytest.mark.timeout(240)

SLEEP = "spiffe://cluster.local/ns/ns1/sa/sleep"
OTHER = "spiffe://cluster.local/ns/ns1/sa/other"


@pytest.fixture
async def mesh(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with running_mesh(tmp_path) as m:
        m.set_policies(ALLOW_SLEEP_ONLY)
        await m.wait_applied()
        yield m


async def make_edges(mesh: Mesh) -> None:
    """Allowed, denied and failed connections (see the module docstring)."""
    assert (
        await mesh.roundtrip(mesh.sleep_ip, "node-a", f"{mesh.vip}:8000", b"allowed" * 100)
        == b"allowed" * 100
    )
    assert await mesh.roundtrip(mesh.other_ip, "node-a", f"{mesh.vip}:8000", b"denied") == b""
    assert await mesh.roundtrip(None, "node-b", f"{mesh.httpbin_ip}:{mesh.echo.port}", b"denied") == b""
    pod = f"{mesh.httpbin_ip}:{mesh.echo.port}"
    await mesh.echo.close()  # httpbin's app is down: node-b cannot connect upstream
    assert await mesh.roundtrip(mesh.sleep_ip, "node-a", pod, b"failed") == b""
    await wait_until(
        lambda: not mesh.agents["node-a"].tracker.open and not mesh.agents["node-b"].tracker.open
    )


async def test_exposition_matches_ztunnel(mesh: Mesh) -> None:
    await make_edges(mesh)
    b = await mesh.metrics_text("node-b")
    a = await mesh.metrics_text("node-a")

    # The denied edge: opened as ztunnel opens it (flags "-", bytes at zero), closed and failed DENY.
    denied = dict(reporter="destination", source_workload="other", source_principal=OTHER,
                  destination_workload="httpbin", connection_security_policy="mutual_tls")  # fmt: skip
    assert samples(b, "istio_tcp_connections_opened_total", **denied, response_flags="-") == [1]
    assert samples(b, "istio_tcp_received_bytes_total", **denied, response_flags="-") == [0]
    assert samples(b, "istio_tcp_connections_closed_total", **denied, response_flags="DENY") == [1]
    assert samples(b, "istio_tcp_connections_failed_total", **denied, response_flags="DENY") == [1]
    plain = dict(reporter="destination", source_workload="unknown", destination_workload="httpbin")
    assert samples(b, "istio_tcp_connections_failed_total", **plain, response_flags="DENY",
                   connection_security_policy="none") == [1]  # fmt: skip
    # The failed edge: no upstream -> CONNECT (not a handshake failure).
    failed = dict(reporter="destination", source_workload="sleep", destination_workload="httpbin",
                  connection_security_policy="mutual_tls")  # fmt: skip
    assert samples(b, "istio_tcp_connections_failed_total", **failed, response_flags="CONNECT") == [1]
    assert samples(b, "istio_tcp_connections_closed_total", **failed, response_flags="CONNECT") == [1]
    assert samples(b, "ztagent_handshake_failures_total", reason="upstream-failed") == []
    # The allowed edge, at both reporters: mutual_tls, the cluster ID on both sides, no failure.
    for text, reporter in ((a, "source"), (b, "destination")):
        ok = dict(reporter=reporter, source_workload="sleep", destination_workload="httpbin",
                  destination_service="httpbin.ns2.svc.cluster.local", response_flags="-")  # fmt: skip
        # (closed with "-": the failed connection to the same pair is opened with "-" too, as
        # ztunnel opens it before it knows the outcome, and closed with its flag.)
        assert samples(text, "istio_tcp_connections_closed_total", **ok, connection_security_policy="mutual_tls",
                       source_cluster="Kubernetes", destination_cluster="Kubernetes") == [1]  # fmt: skip
        # ztunnel's app/version are the canonical service and revision.
        assert samples(text, "istio_tcp_connections_closed_total", **ok, destination_app="httpbin",
                       destination_version="v1", source_version="latest") == [1]  # fmt: skip
    # The source reporter of the denied tunnel: closed and failed, without a flag (ztunnel's outbound).
    src_denied = dict(reporter="source", source_workload="other", destination_workload="httpbin")
    assert samples(a, "istio_tcp_connections_failed_total", **src_denied, response_flags="-") == [1]
    assert samples(
        a, "istio_tcp_connections_failed_total", **src_denied, connection_security_policy="mutual_tls"
    ) == [1]

    for text in (a, b):
        assert samples(text, "istio_build", component="ztunnel") == [1]
        assert samples(text, "process_resident_memory_bytes")[0] > 1e6
        assert samples(text, "process_open_fds")[0] > 0
        assert "_created" not in text
        assert samples(text, "workload_manager_active_proxy_count") in ([2], [1])
    assert samples(a, "workload_manager_active_proxy_count") == [2]  # sleep and other
    assert samples(b, "workload_manager_pending_proxy_count") == [0]


def _ztunnel_dashboard_queries() -> list[str]:
    """Istio's ztunnel dashboard (manifests/addons/dashboards/ztunnel-dashboard.gen.json), the
    queries of series a ztunnel exports; $__rate_interval filled in. container_* (cAdvisor),
    istio_dns_requests_total and istio_xds_connection_terminations_total are not the proxy's
    own series (kubelet) or need DNS proxying / xDS, which ztagent does not do."""
    rate = "1m"
    return [
        'sum(istio_build{component="ztunnel"}) by (tag)',
        f'sum by (pod) (\n  rate(\n    istio_tcp_connections_opened_total{{pod=~"ztunnel-.*"}}\n  [{rate}])\n)',
        f'-sum by (pod) (\n  rate(\n    istio_tcp_connections_closed_total{{pod=~"ztunnel-.*"}}\n  [{rate}])\n)',
        f'sum by (pod) (\n  rate(\n    istio_tcp_sent_bytes_total{{pod=~"ztunnel-.*"}}\n  [{rate}])\n)',
        f'sum by (pod) (\n  rate(\n    istio_tcp_received_bytes_total{{pod=~"ztunnel-.*"}}\n  [{rate}])\n)',
        'sum by (pod) (workload_manager_active_proxy_count{pod=~"ztunnel-.*"})',
        'sum by (pod) (workload_manager_pending_proxy_count{pod=~"ztunnel-.*"})',
    ]


def _fill(q: str, **variables: str) -> str:
    for k, v in sorted(variables.items(), key=lambda kv: -len(kv[0])):
        q = q.replace(f"${k}", v)
    return q


# Istio's workload dashboard (istio-workload-dashboard.json): its TCP panels and variables.
WORKLOAD_TCP = {
    "tcp_server_traffic": 'sum(irate(istio_tcp_sent_bytes_total{reporter="$qrep", destination_workload_namespace=~"$namespace", destination_workload=~"$workload"}[1m])) + sum(irate(istio_tcp_received_bytes_total{reporter="$qrep", destination_workload_namespace=~"$namespace", destination_workload=~"$workload"}[1m]))',
    "in_received_mtls": 'round(sum(irate(istio_tcp_received_bytes_total{reporter="$qrep", connection_security_policy="mutual_tls", destination_workload_namespace=~"$namespace", destination_workload=~"$workload", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[1m])) by (source_workload, source_workload_namespace), 0.001)',
    "in_received_plain": 'round(sum(irate(istio_tcp_received_bytes_total{reporter="$qrep", connection_security_policy!="mutual_tls", destination_workload_namespace=~"$namespace", destination_workload=~"$workload", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[1m])) by (source_workload, source_workload_namespace), 0.001)',
    "in_sent_mtls": 'round(sum(irate(istio_tcp_sent_bytes_total{connection_security_policy="mutual_tls", reporter="$qrep", destination_workload_namespace=~"$namespace", destination_workload=~"$workload", source_workload=~"$srcwl", source_workload_namespace=~"$srcns"}[1m])) by (source_workload, source_workload_namespace), 0.001)',
    "out_sent_mtls": 'round(sum(irate(istio_tcp_received_bytes_total{connection_security_policy="mutual_tls", reporter="source", source_workload_namespace=~"$namespace", source_workload=~"$workload", destination_service=~"$dstsvc"}[1m])) by (destination_service), 0.001)',
    "out_received_mtls": 'round(sum(irate(istio_tcp_sent_bytes_total{reporter="source", connection_security_policy="mutual_tls", source_workload_namespace=~"$namespace", source_workload=~"$workload", destination_service=~"$dstsvc"}[1m])) by (destination_service), 0.001)',
}
WORKLOAD_VARIABLES = {
    "namespace": "query_result(sum(istio_requests_total) by (destination_workload_namespace) or sum(istio_tcp_sent_bytes_total) by (destination_workload_namespace))",
    "workload": 'query_result((sum(istio_requests_total{destination_workload_namespace=~"$namespace"}) by (destination_workload) or sum(istio_requests_total{source_workload_namespace=~"$namespace"}) by (source_workload)) or (sum(istio_tcp_sent_bytes_total{destination_workload_namespace=~"$namespace"}) by (destination_workload) or sum(istio_tcp_sent_bytes_total{source_workload_namespace=~"$namespace"}) by (source_workload)))',
    "srcwl": 'query_result(sum(istio_requests_total{reporter="$qrep", destination_workload="$workload", destination_workload_namespace=~"$namespace", source_workload_namespace=~"$srcns"}) by (source_workload) or sum(istio_tcp_sent_bytes_total{reporter="$qrep", destination_workload="$workload", destination_workload_namespace=~"$namespace", source_workload_namespace=~"$srcns"}) by (source_workload))',
    "dstsvc": 'query_result(sum(istio_requests_total{reporter="source", source_workload=~"$workload", source_workload_namespace=~"$namespace"}) by (destination_service) or sum(istio_tcp_sent_bytes_total{reporter="source", source_workload=~"$workload", source_workload_namespace=~"$namespace"}) by (destination_service))',
}


def _values(result: list[dict[str, Any]], label: str) -> set[str]:
    return {r["metric"].get(label, "") for r in result}


async def test_istio_dashboards_show_the_edges_with_a_real_prometheus(mesh: Mesh) -> None:
    await make_edges(mesh)
    targets = {n: mesh.agents[n].addresses()["metrics"].removeprefix("http://") for n in ("node-a", "node-b")}
    # As Kubernetes service discovery labels a ztunnel pod's target.
    labels = {t: {"pod": f"ztunnel-{n}", "namespace": "istio-system"} for n, t in targets.items()}

    def evaluate() -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        with prometheus_scraping(list(targets.values()), target_labels=labels) as prom:
            # irate/rate need two samples of every series: wait for the third scrape.
            prom.wait_for("count_over_time(istio_build[1m]) >= 3", timeout=60)
            for i, q in enumerate(_ztunnel_dashboard_queries()):
                out[f"ztunnel{i}"] = prom.query(q)
            # The workload dashboard's variables, as Grafana would resolve them for httpbin.
            ns = {"namespace": "ns2", "qrep": "destination", "srcns": "ns1|unknown"}
            out["var_workload"] = prom.query(
                _fill(WORKLOAD_VARIABLES["workload"], **ns).removeprefix("query_result")
            )
            out["var_srcwl"] = prom.query(
                _fill(WORKLOAD_VARIABLES["srcwl"], **ns, workload="httpbin").removeprefix("query_result")
            )
            inbound = {**ns, "workload": "httpbin", "srcwl": "sleep|other|unknown"}
            for key in ("tcp_server_traffic", "in_received_mtls", "in_received_plain", "in_sent_mtls"):
                out[key] = prom.query(_fill(WORKLOAD_TCP[key], **inbound))
            src = {"namespace": "ns1", "qrep": "source"}
            out["var_dstsvc"] = prom.query(
                _fill(WORKLOAD_VARIABLES["dstsvc"], **src, workload="sleep|other").removeprefix(
                    "query_result"
                )
            )
            outbound = {**src, "workload": "sleep|other", "dstsvc": "httpbin.ns2.svc.cluster.local"}
            for key in ("out_sent_mtls", "out_received_mtls"):
                out[key] = prom.query(_fill(WORKLOAD_TCP[key], **outbound))
            # The denied edge as Kiali and alerting read it.
            out["denied"] = prom.query(
                'sum by (source_workload, destination_workload) (istio_tcp_connections_failed_total{response_flags="DENY"})'
            )
            out["connect"] = prom.query(
                'sum by (destination_workload) (istio_tcp_connections_closed_total{response_flags="CONNECT"})'
            )
        return out

    got = await asyncio.to_thread(evaluate)
    for key, result in got.items():
        assert result, f"dashboard query {key} returned no data"
    # ztunnel dashboard: a series per agent pod, the build tag.
    assert _values(got["ztunnel0"], "tag") == {mesh.agents["node-a"].version}
    for i in range(1, 7):
        assert _values(got[f"ztunnel{i}"], "pod") == {"ztunnel-node-a", "ztunnel-node-b"}, i
    # Workload dashboard: httpbin is offered as a workload, both mesh sources as inbound
    # workloads (the denied one too), and the mTLS lock is drawn for both.
    assert "httpbin" in _values(got["var_workload"], "destination_workload")
    assert {"sleep", "other"} <= _values(got["var_srcwl"], "source_workload")
    assert _values(got["in_received_mtls"], "source_workload") == {"sleep", "other"}
    assert _values(got["in_received_plain"], "source_workload") == {"unknown"}  # the denied plaintext client
    # (the failed edge went to httpbin's pod IP, not its service: "unknown" there, as in Istio)
    assert "httpbin.ns2.svc.cluster.local" in _values(got["var_dstsvc"], "destination_service")
    assert _values(got["out_sent_mtls"], "destination_service") == {"httpbin.ns2.svc.cluster.local"}
    assert ("other", "httpbin") in {
        (r["metric"]["source_workload"], r["metric"]["destination_workload"]) for r in got["denied"]
    }
    assert _values(got["connect"], "destination_workload") == {"httpbin"}


async def test_failed_edge_counts_once(mesh: Mesh) -> None:
    await make_edges(mesh)
    a = await mesh.metrics_text("node-a")
    # node-a's side of the failed tunnel (node-b answered 503): closed and failed, no flag.
    src = dict(reporter="source", source_workload="sleep", destination_workload="httpbin", response_flags="-")
    assert samples(a, "istio_tcp_connections_failed_total", **src) == [1]


# -- admin ------------------------------------------------------------------------------------


def _post(url: str) -> tuple[int, str]:
    req = urllib.request.Request(url, method="POST", data=b"")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_config_dump_in_ztunnels_shape_and_open_connections(mesh: Mesh) -> None:
    r, w = await mesh.connect_as(mesh.sleep_ip, "node-a", f"{mesh.vip}:8000")
    try:
        w.write(b"hold")
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(4), 5) == b"hold"
        conns = await mesh.admin("node-b", "/connections")
        (c,) = conns
        assert c["direction"] == "inbound" and c["protocol"] == "HBONE" and c["security"] == "mutual_tls"
        assert c["sourcePrincipal"] == SLEEP and c["destinationWorkload"] == "ns2/httpbin"
        assert c["bytesReceived"] == 4 and c["src"] == mesh.sleep_ip
        dump = await mesh.admin("node-b", "/config_dump")
    finally:
        w.close()

    # The keys and field names of istioctl's pkg/config/xds/configdump ZtunnelDump.
    assert {"workloads", "services", "policies", "certificates", "workloadState"} <= set(dump)
    wl = {x["name"]: x for x in dump["workloads"]}
    assert wl["httpbin"]["protocol"] == "HBONE" and wl["legacy"]["protocol"] == "TCP"
    assert (
        wl["httpbin"]["uid"] == "Kubernetes//Pod/ns2/httpbin" and wl["httpbin"]["clusterId"] == "Kubernetes"
    )
    assert wl["httpbin"]["workloadIps"] == [mesh.httpbin_ip] and wl["httpbin"]["canonicalRevision"] == "v1"
    assert wl["httpbin"]["trustDomain"] == "cluster.local" and wl["httpbin"]["node"] == "node-b"
    (svc,) = dump["services"]
    assert svc["hostname"] == "httpbin.ns2.svc.cluster.local" and svc["vips"] == [f"/{mesh.vip}"]
    assert svc["ports"] == {"8000": mesh.echo.port}
    assert svc["endpoints"]["Kubernetes//Pod/ns2/httpbin"]["port"] == {"8000": mesh.echo.port}
    (pol,) = dump["policies"]
    assert pol == {"name": "allow-sleep", "namespace": "ns2", "scope": "Namespace", "action": "Allow",
                   "rules": [[[{"principals": [{"Exact": "cluster.local/ns/ns1/sa/sleep"}]}]]]}  # fmt: skip
    certs = {c["identity"]: c for c in dump["certificates"]}
    httpbin = certs["spiffe://cluster.local/ns/ns2/sa/httpbin"]
    assert httpbin["state"] == "Available" and httpbin["certChain"][0]["pem"].startswith(
        "-----BEGIN CERTIFICATE-----"
    )
    assert (
        httpbin["rootCerts"]
        and httpbin["certChain"][0]["expirationTime"] > httpbin["certChain"][0]["validFrom"]
    )
    state = dump["workloadState"]["Kubernetes//Pod/ns2/httpbin"]
    assert state["state"] == "Up" and state["info"]["serviceAccount"] == "httpbin"
    assert state["connections"]["inbound"][0]["protocol"] == "HBONE"
    # ztagent's own keys stay beside ztunnel's.
    assert dump["trustDomain"] == "cluster.local" and dump["policyErrors"] == []
    assert [d["metadata"]["name"] for d in dump["policyDocuments"]] == ["allow-sleep"]


async def test_runtime_log_level_switch(mesh: Mesh) -> None:
    url = mesh.agents["node-a"].addresses()["admin"] + "/logging"
    try:
        status, body = await asyncio.to_thread(_post, url + "?level=connections:debug,warn")
        assert status == 200 and body == "current log level is connections:debug,warn\n"
        assert logging.getLogger("ztagent.connections").getEffectiveLevel() == logging.DEBUG
        assert logging.getLogger("ztagent.agent").getEffectiveLevel() == logging.WARNING
        status, body = await asyncio.to_thread(_post, url + "?level=verbose")
        assert status == 400 and "unknown level 'verbose'" in body
        assert logging.getLogger("ztagent.connections").getEffectiveLevel() == logging.DEBUG  # unchanged
    finally:
        status, body = await asyncio.to_thread(_post, url + "?level=info")
    assert status == 200 and body == "current log level is info\n"
    assert logging.getLogger("ztagent.connections").getEffectiveLevel() == logging.INFO


def test_level_spec_errors_name_the_part() -> None:
    assert parse_level_spec("access:debug,info") == [("access", logging.DEBUG), (None, logging.INFO)]
    for bad in ("", "info,", "access:loud"):
        with pytest.raises(ValueError, match="level: "):
            parse_level_spec(bad)


# -- wire -------------------------------------------------------------------------------------


async def test_hbone_200_carries_the_destinations_baggage(mesh: Mesh) -> None:
    """A raw HTTP/2 CONNECT over real mTLS to node-b's HBONE port, presenting sleep's SVID."""
    agent_a = mesh.agents["node-a"]
    from identity.spiffe import SpiffeId

    cred = agent_a.cert_manager.current(SpiffeId.parse(SLEEP))
    ctx = build_client_context(cred, agent_a.cert_manager.bundles())
    host, port = mesh.agents["node-b"].addresses()["hbone"][0].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname=None,
                                                   local_addr=(mesh.sleep_ip, 0))  # fmt: skip
    try:
        core = hbone.ClientConnection()
        sid = core.open_stream(Authority.parse(f"{mesh.httpbin_ip}:{mesh.echo.port}"))
        resp = None
        while resp is None:
            writer.write(core.data_to_send())
            await writer.drain()
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "node-b closed the HBONE connection"
            for ev in core.receive_data(data):
                if isinstance(ev, hbone.ConnectResponse) and ev.stream_id == sid:
                    resp = ev
        assert resp.status == 200
        assert dict(resp.headers)["baggage"] == (
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=ns2,k8s.pod.name=httpbin,"
            "service.name=httpbin,service.version=v1"
        )
    finally:
        writer.close()


async def test_readiness_answers_500_while_not_ready() -> None:
    state = {"ready": (False, ["workload certificates", "capture"])}
    site = await serve(build_readiness_app(lambda: state["ready"]), "127.0.0.1", 0)

    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(site.url + "/healthz/ready", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    try:
        assert await asyncio.to_thread(get) == (500, "not ready, pending: capture, workload certificates\n")
        state["ready"] = (True, [])
        assert await asyncio.to_thread(get) == (200, "ready\n")
    finally:
        await site.close()
