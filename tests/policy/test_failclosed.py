"""Mutation fuzzing: damaged documents never crash the parser and never fail open.

Start from valid policies, replace random parts with random values, and check:
* parse_policy returns a policy (it never raises for a document whose kind/apiVersion are valid);
* a damaged policy that carries errors and is enforced at L4 denies whatever it selects;
* a damaged PeerAuthentication that carries errors makes its scope STRICT.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from policy import Action, AuthorizationPolicy, PeerAuthentication, PolicyIndex, Verdict, parse_policy
from tests.policy.util import SLEEP, conn

BASES: list[dict[str, Any]] = [
    {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow", "namespace": "ns2"},
        "spec": {
            "selector": {"matchLabels": {"app": "httpbin"}},
            "rules": [
                {
                    "from": [{"source": {"principals": [SLEEP], "ipBlocks": ["10.244.0.0/16"]}}],
                    "to": [{"operation": {"ports": ["8080"]}}],
                    "when": [{"key": "source.namespace", "values": ["ns1"]}],
                }
            ],
        },
    },
    {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny", "namespace": "ns2"},
        "spec": {
            "action": "DENY",
            "rules": [
                {
                    "from": [{"source": {"notNamespaces": ["ns1"]}}],
                    "to": [{"operation": {"notPorts": ["22"]}}],
                }
            ],
        },
    },
    {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "pa", "namespace": "ns2"},
        "spec": {
            "selector": {"matchLabels": {"app": "httpbin"}},
            "mtls": {"mode": "PERMISSIVE"},
            "portLevelMtls": {8080: {"mode": "DISABLE"}},
        },
    },
]

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.text(max_size=12),
    st.sampled_from(
        ["*", "ALLOW", "DENY", "STRICT", "10.0.0/33", "::1/129", "spiffe://x/ns/a/sa/b", "ns1/sa"]
    ),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(v: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(v, dict):
        for k, x in v.items():
            out.extend(_paths(x, (*prefix, k)))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out.extend(_paths(x, (*prefix, i)))
    return out


@st.composite
def damaged(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 3))):
        # Mutate inside spec (and metadata.namespace/annotations) only: kind/apiVersion stay valid.
        candidates = [
            p
            for p in _paths(doc)
            if (p[:1] == ("spec",) and len(p) > 1) or p in (("metadata", "namespace"), ("metadata",))
        ]
        path = draw(st.sampled_from(candidates))
        parent: Any = doc
        for k in path[:-1]:
            parent = parent[k]
        if draw(st.booleans()) and isinstance(parent, dict):
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = draw(_VALUES)
    return doc


@settings(max_examples=400, deadline=None)
@given(damaged())
def test_damaged_documents_never_crash_or_fail_open(doc: dict[str, Any]) -> None:
    p = parse_policy(doc)  # must not raise
    if not p.errors:
        return  # the mutation happened to produce a valid policy: nothing to check
    idx = PolicyIndex([p])
    c = conn()  # ns2, app=httpbin: the workload the bases target
    if isinstance(p, AuthorizationPolicy):
        enforced = not p.dry_run and not p.for_waypoint and p.action is not Action.AUDIT
        selected = bool(idx.select(c.destination_namespace, c.destination_labels))
        if enforced and selected:
            for probe in (c, conn(None), conn(port=22), conn("cluster.local/ns/ns3/sa/x", src="192.0.2.1")):
                assert idx.evaluate(probe).verdict is Verdict.DENY, [str(e) for e in p.errors]
    elif isinstance(p, PeerAuthentication):
        for port in (8080, 9090):
            d = idx.mtls(
                "ns2" if p.meta.namespace in ("ns2", "") else p.meta.namespace, {"app": "httpbin"}, port
            )
            if d.policy == p.key:
                assert d.strict, (d, [str(e) for e in p.errors])
