# ruff: noqa: E501
"""Waypoint binding the Istio way: Gateway documents, Namespace documents, use-waypoint labels."""

from __future__ import annotations

import pytest

from mesh.config import parse_config
from mesh.errors import ConfigError
from mesh.model import Waypoint, WaypointFor
from mesh.store import MissingWaypoint, WorkloadStore

BASE = """\
apiVersion: ztagent.io/v1alpha1
kind: MeshConfig
trustDomain: cluster.local
nodes: [{{name: n1, address: 10.0.0.1}}]
workloads:
  - {{name: a, namespace: ns1, serviceAccount: a, node: n1, ips: [10.1.0.1], labels: {{app: a{wl}}}}}
  - {{name: b, namespace: ns2, serviceAccount: b, node: n1, ips: [10.1.0.2], labels: {{app: b}}}}
services:
  - {{name: svc, namespace: ns1, vips: [10.96.0.1], ports: [{{port: 80}}], selector: {{app: a}}{svc}}}
  - {{name: other, namespace: ns2, vips: [10.96.0.2], ports: [{{port: 80}}], selector: {{app: b}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: wp, namespace: ns1{gwlabels}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
  addresses: [{{type: IPAddress, value: 10.1.0.9}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: shared, namespace: infra}}
spec: {{gatewayClassName: istio-waypoint, addresses: [{{value: 10.1.0.10}}]}}
{extra}"""


def store(wl: str = "", svc: str = "", gwlabels: str = "", extra: str = "") -> WorkloadStore:
    snap = parse_config(BASE.format(wl=wl, svc=svc, gwlabels=gwlabels, extra=extra), file="t.yaml")
    return WorkloadStore(snap, "n1")


def key(x: object) -> str | None:
    if isinstance(x, Waypoint | MissingWaypoint):
        return x.key
    assert x is None
    return None


def test_gateway_document_is_a_waypoint_with_istios_identity() -> None:
    s = store()
    wp = s.waypoint("ns1", "wp")
    assert wp is not None and str(wp.spiffe_id) == "spiffe://cluster.local/ns/ns1/sa/wp"
    assert wp.traffic_for is WaypointFor.SERVICE and wp.hbone_port == 15008
    assert s.waypoint("infra", "shared") is not None


def test_precedence_service_label_over_namespace_and_none_opts_out() -> None:
    ns_doc = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: ns1, labels: {istio.io/use-waypoint: wp}}\n"
    svc_a, svc_b = store(extra=ns_doc).service("ns1", "svc"), store().service("ns2", "other")
    assert svc_a is not None and svc_b is not None
    s = store(extra=ns_doc)
    assert key(s.waypoint_for(None, svc_a)) == "ns1/wp"  # namespace label
    assert key(s.waypoint_for(None, s.service("ns2", "other"))) is None  # other namespace: unbound
    s = store(svc=", labels: {istio.io/use-waypoint: none}", extra=ns_doc)
    assert key(s.waypoint_for(None, s.service("ns1", "svc"))) is None  # the service opts out
    s = store(svc=", labels: {istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: infra}",
              extra=ns_doc)  # fmt: skip
    assert key(s.waypoint_for(None, s.service("ns1", "svc"))) == "infra/shared"  # service beats namespace


def test_a_service_waypoint_does_not_take_pod_addressed_traffic_unless_for_workload() -> None:
    s = store(wl=", istio.io/use-waypoint: wp")
    a = s.by_name("ns1", "a")
    assert key(s.waypoint_for(a, None)) is None  # wp is for: service (the default)
    s = store(wl=", istio.io/use-waypoint: wp", gwlabels=", labels: {istio.io/waypoint-for: all}")
    assert key(s.waypoint_for(s.by_name("ns1", "a"), None)) == "ns1/wp"
    route = s.route("10.1.0.1", 80)
    assert route is not None and key(route.waypoint) == "ns1/wp"


def test_a_label_naming_no_waypoint_fails_closed() -> None:
    s = store(svc=", labels: {istio.io/use-waypoint: nope}")
    got = s.waypoint_for(None, s.service("ns1", "svc"))
    assert isinstance(got, MissingWaypoint) and got.key == "ns1/nope"


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ("metadata: {name: g, namespace: ns1}\nspec: {gatewayClassName: istio, addresses: [{value: 10.1.0.11}]}",
         "spec.gatewayClassName"),
        ("metadata: {name: g, namespace: ns1}\nspec: {gatewayClassName: istio-waypoint}", "spec"),
        ("metadata: {name: g, namespace: ns1}\nspec: {gatewayClassName: istio-waypoint, addresses: [{value: x}]}",
         "spec.addresses[0].value"),
        ("metadata: {name: g, namespace: ns1, labels: {istio.io/waypoint-for: pods}}\n"
         "spec: {gatewayClassName: istio-waypoint, addresses: [{value: 10.1.0.11}]}",
         "metadata.labels.istio.io/waypoint-for"),
        ("metadata: {name: g, namespace: ns1}\nspec: {gatewayClassName: istio-waypoint, addresses: [{value: 10.1.0.11}], "
         "listeners: [{name: m, port: 15008, protocol: HTTP}]}", "spec.listeners[0].protocol"),
        ("metadata: {name: g, namespace: ns1}\nspec: {gatewayClassName: istio-waypoint, addresses: [{value: 10.1.0.11}], "
         "tls: {}}", "spec"),
    ],
)
def test_bad_gateway_documents_are_refused_naming_the_field(doc: str, field: str) -> None:
    extra = "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n" + doc + "\n"
    with pytest.raises(ConfigError) as ei:
        store(extra=extra)
    assert any(i.path.startswith(field) and i.kind == "Gateway" for i in ei.value.issues), ei.value.issues
