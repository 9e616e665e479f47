"""Builders for mesh objects, an independent validity oracle and a store "answer sheet", shared
by the diff and store tests."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from identity.spiffe import SpiffeId, TrustDomain
from mesh.model import Node, PolicyDocument, Service, ServicePort, Snapshot, Workload, freeze
from mesh.parse import default_policy_parser
from mesh.store import WorkloadStore
from policy import Connection

TD = TrustDomain("cluster.local")
IP = ipaddress.ip_address


def node(name: str, address: str, cidr: str | None = None) -> Node:
    return Node(name, IP(address), ipaddress.ip_network(cidr) if cidr else None)


def wl(
    name: str,
    ns: str = "ns1",
    node: str = "node-a",
    ips: Sequence[str] = ("10.244.1.2",),
    labels: Mapping[str, str] | None = None,
    sa: str = "default",
    enrolled: bool = True,
    td: TrustDomain = TD,
) -> Workload:
    return Workload(
        name=name,
        namespace=ns,
        service_account=sa,
        node=node,
        ips=tuple(IP(i) for i in ips),
        labels=MappingProxyType(dict(labels or {})),
        enrolled=enrolled,
        spiffe_id=SpiffeId.for_workload(td, ns, sa),
    )


def svc(
    name: str,
    ns: str = "ns1",
    vips: Sequence[str] = ("10.96.0.1",),
    ports: Sequence[int] = (80,),
    selector: Mapping[str, str] | None = None,
) -> Service:
    return Service(
        name=name,
        namespace=ns,
        vips=tuple(IP(v) for v in vips),
        ports=tuple(ServicePort(p, p + 8000) for p in ports),
        selector=MappingProxyType(dict(selector or {})),
    )


def pol(name: str, ns: str, spec: Mapping[str, Any]) -> PolicyDocument:
    raw = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": dict(spec),
    }
    return PolicyDocument(
        "AuthorizationPolicy", "security.istio.io/v1", name, ns, freeze(raw), "<test>", 0, ""
    )


def snapshot(
    nodes: Iterable[Node],
    workloads: Iterable[Workload] = (),
    services: Iterable[Service] = (),
    policies: Iterable[PolicyDocument] = (),
    root: str = "istio-system",
) -> Snapshot:
    pols = tuple(policies)
    parsed, errors = default_policy_parser(pols)
    return Snapshot(
        trust_domain=TD,
        root_namespace=root,
        nodes=tuple(nodes),
        workloads=tuple(workloads),
        services=tuple(services),
        policies=pols,
        source="<test>",
        parsed_policies=parsed,
        policy_errors=tuple(errors),
    )


def violations(s: Snapshot, local_node: str) -> list[str]:
    """Every broken store invariant of ``s``, checked the slow, obvious way (the oracle the
    store's incremental checks are compared with)."""
    out: list[str] = []
    nodes = {n.name: n for n in s.nodes}
    if local_node not in nodes:
        out.append("local node missing")
    owners: dict[Any, str] = {}

    def own(ip: Any, who: str) -> None:
        if ip in owners and owners[ip] != who:
            out.append(f"{ip} owned by {owners[ip]} and {who}")
        owners[ip] = who

    for n in s.nodes:
        own(n.address, f"node {n.name}")
    ns = list(s.nodes)
    for i, a in enumerate(ns):
        for b in ns[i + 1 :]:
            if a.pod_cidr and b.pod_cidr and a.pod_cidr.overlaps(b.pod_cidr):
                out.append(f"{a.name} overlaps {b.name}")
    for w in s.workloads:
        n = nodes.get(w.node)
        if n is None:
            out.append(f"{w.key} on unknown node")
        if len(set(w.ips)) != len(w.ips):
            out.append(f"{w.key} lists an IP twice")
        for ip in w.ips:
            own(ip, f"workload {w.key}")
            if n is not None and n.pod_cidr is not None and ip not in n.pod_cidr:
                out.append(f"{w.key} {ip} outside {n.pod_cidr}")
        if w.spiffe_id.trust_domain != s.trust_domain:
            out.append(f"{w.key} outside the trust domain")
    for sv in s.services:
        if len(set(sv.vips)) != len(sv.vips):
            out.append(f"{sv.key} lists a VIP twice")
        for v in sv.vips:
            own(v, f"service {sv.key}")
    return out


PROBE_IPS = [f"10.244.1.{i}" for i in (1, 2, 3, 4, 200)] + [
    "10.244.2.1",
    "10.244.2.2",
    "10.250.0.2",
    "10.96.0.1",
]


def answers(store: WorkloadStore, *, ordered: bool = True) -> dict[str, Any]:
    """What the agent can ask the store, as comparable data (``ordered=False``: order-free)."""

    def seq(items: Iterable[Any]) -> Any:
        lst = list(items)
        return lst if ordered else sorted(lst, key=repr)

    snap = store.snapshot
    out: dict[str, Any] = {
        "objects": {k.value: seq(d.items()) for k, d in snap.objects().items()},
        "workloads": seq(w.key for w in store.workloads),
        "services": seq(s.key for s in store.services),
        "local_enrolled": seq(w.key for w in store.local_enrolled),
        "local": seq(w.key for w in store.local_workloads),
        "node": store.node,
        "policy_errors": sorted(map(str, store.policy_errors)),
    }
    for n in snap.nodes:
        out[f"on_node {n.name}"] = seq(w.key for w in store.on_node(n.name))
        out[f"node_named {n.name}"] = store.node_named(n.name)
    for ip in PROBE_IPS:
        w = store.by_ip(ip)
        out[f"by_ip {ip}"] = w
        out[f"local_ip {ip}"] = store.is_local_enrolled_ip(ip)
        out[f"is_vip {ip}"] = store.is_vip(ip)
        for port in (80, 443):
            out[f"service_at {ip}:{port}"] = store.service_at(ip, port)
            r = store.route(ip, port) if store.service_at(ip, port) is None else None
            out[f"route {ip}:{port}"] = r
    for s in store.services:
        out[f"endpoints {s.key}"] = seq(w.key for w in store.endpoints(s))
    for w in store.workloads:
        out[f"services_of {w.key}"] = seq(s.key for s in store.services_of(w))
        out[f"by_name {w.key}"] = store.by_name(w.namespace, w.name)
        conn = Connection(
            source_principal="cluster.local/ns/ns1/sa/default",
            source_ip=None,
            destination_namespace=w.namespace,
            destination_port=80,
            destination_labels=w.labels,
            destination_ip=w.ips[0],
        )
        out[f"verdict {w.key}"] = store.policy_index.evaluate(conn).verdict
    return out
