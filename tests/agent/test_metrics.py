"""Metrics: Istio names/labels in the exposition, and a real Prometheus scraping them."""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import ISTIO_TCP_LABELS, AgentMetrics, ConnectionLabels, ConnectionStats
from serving.http import build_metrics_app, serve
from tests.agent.prom import prometheus_scraping


def _labels() -> ConnectionLabels:
    return ConnectionLabels(
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


def test_istio_names_and_labels_in_exposition() -> None:
    m = AgentMetrics()
    st = ConnectionStats(m, _labels())
    st.add_received(100)
    st.add_sent(7)
    st.close()
    st.close()  # idempotent
    m.policy_decisions.labels("deny", "no-allow-match").inc()
    fams = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    for name in ("istio_tcp_connections_opened", "istio_tcp_connections_closed"):
        (s,) = [s for s in fams[name].samples if s.name == name + "_total"]
        assert s.value == 1 and set(s.labels) == set(ISTIO_TCP_LABELS)
        assert s.labels["connection_security_policy"] == "mutual_tls"
        assert s.labels["source_workload_namespace"] == "ns1"
    sent = [s for s in fams["istio_tcp_sent_bytes"].samples if s.name.endswith("_total")]
    recv = [s for s in fams["istio_tcp_received_bytes"].samples if s.name.endswith("_total")]
    assert sent[0].value == 7 and recv[0].value == 100
    (d,) = [s for s in fams["ztagent_policy_decisions"].samples if s.name.endswith("_total")]
    assert d.labels == {"action": "deny", "reason": "no-allow-match"} and d.value == 1


async def test_real_prometheus_scrapes_and_queries_a_series() -> None:
    m = AgentMetrics()
    site = await serve(build_metrics_app(m), "127.0.0.1", 0)
    try:
        st = ConnectionStats(m, _labels())
        st.add_received(4242)

        def fetch() -> bytes:
            with urllib.request.urlopen(f"{site.url}/stats/prometheus", timeout=5) as r:
                return bytes(r.read())

        assert b"istio_tcp_received_bytes_total" in await asyncio.to_thread(fetch)

        def scrape_and_query() -> list[dict[str, object]]:
            with prometheus_scraping([f"127.0.0.1:{site.port}"]) as prom:
                return prom.wait_for(
                    'istio_tcp_received_bytes_total{reporter="destination",'
                    'source_principal="spiffe://cluster.local/ns/ns1/sa/sleep"}'
                )

        result = await asyncio.to_thread(scrape_and_query)
        assert float(result[0]["value"][1]) == 4242  # type: ignore[index]
        assert result[0]["metric"]["destination_workload"] == "httpbin"  # type: ignore[index]
    finally:
        await site.close()
