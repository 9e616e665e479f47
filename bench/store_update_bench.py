"""The cost of applying one workload change to the store, at 100 and at 10 000 workloads.

    .venv/bin/python -m bench.store_update_bench [--reps 2000] [--sizes 100,10000] [--services 1000]

Both meshes have the same 1 000 services (50 in each of 20 namespaces, each selecting one
``app`` label) and 10 policies; the workloads are spread over the 20 namespaces and over nodes
of 100 pods each (``node-0`` is the local node). Four changes are timed, each as one
``WorkloadStore.apply([change])``, median of ``--reps``: a label change that moves a workload
from one service to another, an IP change, adding a workload and deleting it. The cost must
not grow with the mesh (ratio ~1). For scale, the last line is what every change cost before
``apply()``: a whole ``WorkloadStore`` built from the snapshot, median of a few. (Before the
constructor used the label index too, that was 7.9 ms at 100 and 753 ms at 10 000 workloads on
this machine: its endpoint matching scanned every workload for every service.)

GC is paused while timing so a collection triggered by the big mesh's garbage does not land in
one sample and not the other.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import statistics
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from identity.spiffe import SpiffeId, TrustDomain
from mesh.model import (
    Delete,
    Kind,
    Node,
    PolicyDocument,
    Service,
    ServicePort,
    Snapshot,
    Upsert,
    Workload,
    freeze,
)
from mesh.parse import default_policy_parser
from mesh.store import WorkloadStore

TD = TrustDomain("cluster.local")
NAMESPACES = 20
PODS_PER_NODE = 100


def _ns(i: int) -> str:
    return f"ns-{i % NAMESPACES}"


def _workload(i: int, *, app: int | None = None, ip_offset: int = 0) -> Workload:
    node = i // PODS_PER_NODE
    ns = _ns(i)
    host = i % PODS_PER_NODE + 1 + ip_offset
    return Workload(
        name=f"pod-{i}",
        namespace=ns,
        service_account=f"sa-{i % 7}",
        node=f"node-{node}",
        ips=(ipaddress.ip_address(f"10.{100 + node // 256}.{node % 256}.{host}"),),
        labels=MappingProxyType(
            {"app": f"app-{(i // NAMESPACES) % 50 if app is None else app}", "version": "v1"}
        ),
        enrolled=True,
        spiffe_id=SpiffeId.for_workload(TD, ns, f"sa-{i % 7}"),
    )


def build(n_workloads: int, n_services: int) -> Snapshot:
    n_nodes = max(1, -(-n_workloads // PODS_PER_NODE)) + 1  # one spare for the "add" change
    nodes = tuple(
        Node(
            f"node-{k}",
            ipaddress.ip_address(f"10.250.{k // 256}.{k % 256}"),
            ipaddress.ip_network(f"10.{100 + k // 256}.{k % 256}.0/24"),
        )
        for k in range(n_nodes)
    )
    services = tuple(
        Service(
            name=f"svc-{j}",
            namespace=_ns(j),
            vips=(ipaddress.ip_address(f"10.96.{j // 256}.{j % 256}"),),
            ports=(ServicePort(80, 8080, "http"),),
            selector=MappingProxyType({"app": f"app-{(j // NAMESPACES) % 50}"}),
        )
        for j in range(n_services)
    )
    raw: list[dict[str, Any]] = [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": f"p-{k}", "namespace": _ns(k)},
            "spec": {"selector": {"matchLabels": {"app": f"app-{k}"}}, "action": "DENY", "rules": [{}]},
        }
        for k in range(10)
    ]
    policies = tuple(
        PolicyDocument(
            "AuthorizationPolicy",
            "security.istio.io/v1",
            r["metadata"]["name"],
            r["metadata"]["namespace"],
            freeze(r),
            "<bench>",
            k,
            "",
        )
        for k, r in enumerate(raw)
    )
    parsed, errors = default_policy_parser(policies)
    return Snapshot(
        trust_domain=TD,
        root_namespace="istio-system",
        nodes=nodes,
        workloads=tuple(_workload(i) for i in range(n_workloads)),
        services=services,
        policies=policies,
        source="<bench>",
        parsed_policies=parsed,
        policy_errors=tuple(errors),
    )


def _median_ns(fn: Callable[[], object], reps: int, budget_s: float) -> float:
    samples = []
    deadline = time.monotonic() + budget_s
    gc.collect()
    gc.disable()
    try:
        for _ in range(reps):
            t0 = time.perf_counter_ns()
            fn()
            samples.append(time.perf_counter_ns() - t0)
            if time.monotonic() > deadline:
                break
    finally:
        gc.enable()
    return statistics.median(samples)


def measure(n_workloads: int, n_services: int, reps: int) -> dict[str, float]:
    snap = build(n_workloads, n_services)
    store = WorkloadStore(snap, "node-0")
    target = n_workloads // 2  # a workload in the middle of the mesh (on some remote node)
    base = _workload(target)
    app = int(base.labels["app"].removeprefix("app-"))
    relabelled = _workload(target, app=(app + 1) % 50)
    moved_ip = _workload(target, ip_offset=PODS_PER_NODE)  # same /24, a free host number
    extra = _workload(n_workloads)  # lands on the spare node
    flip = {"label": [Upsert(relabelled), Upsert(base)], "ip": [Upsert(moved_ip), Upsert(base)]}
    state = {"label": 0, "ip": 0}

    def toggle(kind: str) -> Callable[[], None]:
        def run() -> None:
            i = state[kind]
            state[kind] = i ^ 1
            store.apply([flip[kind][i]])

        return run

    out: dict[str, float] = {}
    for kind in ("label", "ip"):
        out[f"{kind} change"] = _median_ns(toggle(kind), reps, 10.0)
        if state[kind]:
            store.apply([flip[kind][1]])  # back to base
            state[kind] = 0

    # Add and delete alternate; each is timed on its own.
    add_samples: list[int] = []
    del_samples: list[int] = []
    gc.collect()
    gc.disable()
    try:
        deadline = time.monotonic() + 10.0
        for _ in range(reps):
            t0 = time.perf_counter_ns()
            store.apply([Upsert(extra)])
            t1 = time.perf_counter_ns()
            store.apply([Delete(Kind.WORKLOAD, extra.key)])
            t2 = time.perf_counter_ns()
            add_samples.append(t1 - t0)
            del_samples.append(t2 - t1)
            if time.monotonic() > deadline:
                break
    finally:
        gc.enable()
    out["add workload"] = statistics.median(add_samples)
    out["delete workload"] = statistics.median(del_samples)
    # The reference: a reload without apply() (the whole store built again), a few times.
    out["full rebuild"] = _median_ns(lambda: WorkloadStore(snap, "node-0"), max(3, reps // 400), 30.0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--sizes", default="100,10000")
    ap.add_argument("--services", type=int, default=1000)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {n: measure(n, args.services, args.reps) for n in sizes}
    small, big = sizes[0], sizes[-1]
    print(f"store update cost, median of {args.reps} (µs); {args.services} services, 10 policies")
    print(f"{'change':<20}" + "".join(f"{f'{n} workloads':>18}" for n in sizes) + f"{'ratio':>10}")
    for kind in results[small]:
        vals = [results[n][kind] / 1000 for n in sizes]
        ratio = results[big][kind] / results[small][kind]
        print(f"{kind:<20}" + "".join(f"{v:>18.1f}" for v in vals) + f"{ratio:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
