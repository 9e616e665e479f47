"""Policy decisions per second with 10, 1 000 and 10 000 AuthorizationPolicies in the mesh.

    .venv/bin/python -m bench.policy_bench [--seconds S] [--sizes 10,1000,10000]

The policies are spread over many namespaces (10 per namespace, plus a few mesh-wide ones in the
root namespace); the destination's own namespace always holds the same 10. The index
(:class:`policy.PolicyIndex`) should decide at the same rate whatever the mesh size, because it
reads only the root and destination namespaces. The reference, measured in the same run on the
same connections, is a naive linear scan that checks every policy's scope
(:func:`policy.evaluate` over pre-compiled policies, so both sides skip parsing).
"""

from __future__ import annotations

import argparse
import ipaddress
import time
from collections.abc import Callable, Sequence
from typing import Any

from policy import CompiledPolicy, Connection, Decision, PolicyIndex, evaluate, parse_policies

ROOT = "istio-system"
PER_NAMESPACE = 10
TARGET_NS = "ns-target"


def _policy(ns: str, name: str, i: int) -> dict[str, Any]:
    """A realistic mix: selector ALLOWs by principal, a namespace DENY by port, an allow-nothing."""
    kind = i % PER_NAMESPACE
    spec: dict[str, Any]
    if kind == 0:
        spec = {}  # allow-nothing: the namespace default deny
    elif kind == 1:
        spec = {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["22", "2379"]}}]}]}
    elif kind == 2:
        spec = {
            "action": "DENY",
            "rules": [{"from": [{"source": {"notNamespaces": [ns, "istio-system", "monitoring"]}}]}],
            "selector": {"matchLabels": {"app": f"db-{i}"}},
        }
    else:
        spec = {
            "selector": {"matchLabels": {"app": f"app-{kind}"}},
            "rules": [
                {
                    "from": [
                        {
                            "source": {
                                "principals": [
                                    f"cluster.local/ns/{ns}/sa/client-{kind}",
                                    "cluster.local/ns/gw/*",
                                ]
                            }
                        },
                        {"source": {"namespaces": ["monitoring"], "ipBlocks": ["10.0.0.0/8"]}},
                    ],
                    "to": [{"operation": {"ports": ["8080", "9090"]}}],
                    "when": [{"key": "source.ip", "notValues": ["10.66.0.0/16"]}],
                }
            ],
        }
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def build_documents(total: int) -> list[dict[str, Any]]:
    docs = [_policy(TARGET_NS, f"p{i}", i) for i in range(min(PER_NAMESPACE, total))]
    # Two mesh-wide policies (root namespace) once the mesh is big enough to have them.
    if total > PER_NAMESPACE:
        docs.append(_policy(ROOT, "mesh-deny-ssh", 1))
        docs.append(_policy(ROOT, "mesh-db", 2))
    n = 0
    while len(docs) < total:
        ns = f"ns-{n // PER_NAMESPACE}"
        docs.append(_policy(ns, f"p{n % PER_NAMESPACE}", n % PER_NAMESPACE))
        n += 1
    return docs


def connections() -> list[Connection]:
    out = []
    for k in range(3, PER_NAMESPACE):
        for principal, port in (
            (f"cluster.local/ns/{TARGET_NS}/sa/client-{k}", 8080),  # allowed
            (f"cluster.local/ns/{TARGET_NS}/sa/client-{k}", 22),  # denied by port
            ("cluster.local/ns/other/sa/x", 8080),  # no ALLOW matches
            (None, 9090),  # plaintext
        ):
            out.append(
                Connection(
                    source_principal=principal,
                    source_ip=ipaddress.ip_address("10.1.2.3"),
                    destination_namespace=TARGET_NS,
                    destination_port=port,
                    destination_labels={"app": f"app-{k}", "version": "v1"},
                    destination_ip=ipaddress.ip_address("10.1.9.9"),
                )
            )
    return out


def rate(decide: Callable[[Connection], Decision], conns: Sequence[Connection], seconds: float) -> float:
    """Decisions per second over at least ``seconds`` (bounded: at most 2 000 000 decisions)."""
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while done < 2_000_000:
        for c in conns:
            decide(c)
        done += len(conns)
        if time.perf_counter() >= deadline:
            break
    return done / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=1.0, help="measuring time per figure (default 1 s)")
    ap.add_argument("--sizes", default="10,1000,10000", help="mesh sizes (policies), comma-separated")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    conns = connections()

    print(
        f"{'policies':>9} {'namespaces':>10} {'index dec/s':>12} {'linear dec/s':>13} {'index/linear':>12}"
        f" {'parse ms':>9} {'build ms':>9}"
    )
    results = []
    for total in sizes:
        docs = build_documents(total)
        t0 = time.perf_counter()
        ps = parse_policies(docs)
        t1 = time.perf_counter()
        idx = PolicyIndex(ps, ROOT)  # what a policy change costs the agent: parse + rebuild
        t2 = time.perf_counter()
        assert ps.ok, ps.errors[:3]
        compiled = [CompiledPolicy.compile(p) for p in ps.authorization]
        # Both must reach the same decisions, or the comparison means nothing.
        for c in conns:
            assert idx.evaluate(c) == evaluate(c, compiled, ROOT), c
        namespaces = len({p.meta.namespace for p in ps.authorization})
        rate(idx.evaluate, conns, args.seconds / 5)  # warm-up: allocator and caches settle first
        r_idx = rate(idx.evaluate, conns, args.seconds)
        r_lin = rate(lambda c, compiled=compiled: evaluate(c, compiled, ROOT), conns, args.seconds)  # type: ignore[misc]
        results.append((total, r_idx, r_lin))
        print(
            f"{total:>9} {namespaces:>10} {r_idx:>12,.0f} {r_lin:>13,.0f} {r_idx / r_lin:>11.1f}x"
            f" {(t1 - t0) * 1e3:>9.1f} {(t2 - t1) * 1e3:>9.1f}"
        )
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(
            f"index rate at {last[0]} policies = {last[1] / first[1]:.2f} x the rate at {first[0]} "
            f"(flat = the cost does not grow with policies that do not select the destination); "
            f"linear scan: {last[2] / first[2]:.3f} x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
