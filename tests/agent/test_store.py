"""WorkloadStore: lookups, service endpoints and load balancing, routing, policy index."""
# ruff: noqa: E501

from __future__ import annotations

import dataclasses
import random
import textwrap

import pytest

from mesh.config import parse_config
from mesh.errors import ChangeRefused
from mesh.store import DestinationKind, LoadBalancing, WorkloadStore

CFG = textwrap.dedent(
    """\
    apiVersion: ztagent.io/v1alpha1
    kind: MeshConfig
    trustDomain: cluster.local
    nodes:
      - {name: node-a, address: 10.250.0.1, podCIDR: 10.244.1.0/24}
      - {name: node-b, address: 10.250.0.2, podCIDR: 10.244.2.0/24}
    workloads:
      - {name: sleep, namespace: ns1, serviceAccount: sleep, node: node-a, ips: [10.244.1.2], labels: {app: sleep}}
      - {name: legacy, namespace: ns1, node: node-a, ips: [10.244.1.3], labels: {app: legacy}, enrolled: false}
      - {name: web-1, namespace: ns2, serviceAccount: web, node: node-b, ips: [10.244.2.2], labels: {app: web}}
      - {name: web-2, namespace: ns2, serviceAccount: web, node: node-b, ips: [10.244.2.3], labels: {app: web}}
      - {name: web-x, namespace: ns1, node: node-a, ips: [10.244.1.9], labels: {app: web}}
    services:
      - {name: web, namespace: ns2, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080}], selector: {app: web}}
      - {name: empty, namespace: ns2, vips: [10.96.0.11], ports: [{port: 80}], selector: {app: none}}
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: mesh-wide, namespace: istio-system}
    spec: {}
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: ns2-all, namespace: ns2}
    spec: {action: DENY, rules: [{}]}
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: ns2-db-only, namespace: ns2}
    spec: {selector: {matchLabels: {app: db}}, action: DENY, rules: [{}]}
    ---
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: ns2-web, namespace: ns2}
    spec: {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: ns1-all, namespace: ns1}
    spec: {}
    """
)


@pytest.fixture
def store() -> WorkloadStore:
    return WorkloadStore(parse_config(CFG), "node-a", rng=random.Random(7))


def test_lookups(store: WorkloadStore) -> None:
    assert store.by_ip("10.244.1.2").name == "sleep"  # type: ignore[union-attr]
    assert store.by_ip("10.244.9.9") is None and store.by_ip("not-an-ip") is None
    assert store.by_name("ns2", "web-1").node == "node-b"  # type: ignore[union-attr]
    assert [w.name for w in store.local_workloads] == ["sleep", "legacy", "web-x"]
    assert [w.name for w in store.local_enrolled] == ["sleep", "web-x"]
    assert store.is_local_enrolled_ip("10.244.1.3") is None  # not enrolled
    assert store.is_local_enrolled_ip("10.244.2.2") is None  # other node
    assert store.is_local_enrolled_ip("10.244.1.2") is not None


def test_unknown_local_node_is_refused() -> None:
    # A domain error (issue 11: KeyError no longer means "config refused").
    with pytest.raises(ChangeRefused, match="node-z"):
        WorkloadStore(parse_config(CFG), "node-z")


def test_service_endpoints_are_selector_matched_in_namespace(store: WorkloadStore) -> None:
    svc = store.service("ns2", "web")
    assert svc is not None
    # web-x has app=web but lives in ns1: a Service selects only in its own namespace.
    assert [w.name for w in store.endpoints(svc)] == ["web-1", "web-2"]
    assert [s.key for s in store.services_of(store.by_name("ns2", "web-1"))] == ["ns2/web"]  # type: ignore[arg-type]


def test_round_robin_skips_unhealthy_and_falls_back_when_all_are() -> None:
    now = [0.0]
    store = WorkloadStore(parse_config(CFG), "node-a", clock=lambda: now[0], unhealthy_for=5)
    svc = store.service("ns2", "web")
    assert svc is not None
    port = svc.ports[0]
    picks = [store.pick_endpoint(svc, port) for _ in range(4)]
    assert [p.address for p in picks if p] == [("10.244.2.2", 8080), ("10.244.2.3", 8080)] * 2
    store.mark_unhealthy("10.244.2.2", 8080)
    assert {store.pick_endpoint(svc, port).workload.name for _ in range(4)} == {"web-2"}  # type: ignore[union-attr]
    store.mark_unhealthy("10.244.2.3", 8080)
    assert {store.pick_endpoint(svc, port).workload.name for _ in range(4)} == {"web-1", "web-2"}  # type: ignore[union-attr]
    now[0] = 6.0  # marks expire
    assert store.is_healthy("10.244.2.2", 8080)


def test_random_strategy_uses_injected_rng(store: WorkloadStore) -> None:
    svc = store.service("ns2", "web")
    assert svc is not None
    names = {store.pick_endpoint(svc, svc.ports[0], LoadBalancing.RANDOM).workload.name for _ in range(50)}  # type: ignore[union-attr]
    assert names == {"web-1", "web-2"}


def test_route(store: WorkloadStore) -> None:
    r = store.route("10.96.0.10", 80)
    assert r is not None and r.kind is DestinationKind.WORKLOAD
    assert r.service is not None and r.service.name == "web" and r.address[1] == 8080
    assert r.node is not None and r.node.name == "node-b" and r.waypoint is None
    assert store.route("10.96.0.10", 81) is None  # VIP, port not exposed
    assert store.route("10.96.0.11", 80) is None  # no endpoints
    direct = store.route("10.244.2.3", 9000)
    assert (
        direct is not None
        and direct.kind is DestinationKind.WORKLOAD
        and direct.address == ("10.244.2.3", 9000)
    )
    legacy = store.route("10.244.1.3", 80)
    assert legacy is not None and legacy.kind is DestinationKind.UNENROLLED
    ext = store.route("192.0.2.1", 443)
    assert ext is not None and ext.kind is DestinationKind.EXTERNAL and ext.address == ("192.0.2.1", 443)


@pytest.mark.parametrize("parsed", [None, (), []])
def test_policies_that_are_not_a_policy_set_are_refused(parsed: object) -> None:
    # An empty index would allow everything: a config whose policies did not parse into a
    # PolicySet must not become a store at all.
    cfg = dataclasses.replace(parse_config(CFG), parsed_policies=parsed)
    with pytest.raises(TypeError, match="not a PolicySet"):
        WorkloadStore(cfg, "node-a")

