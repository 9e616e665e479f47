"""mesh/diff.py: the changes between two snapshots, and snapshots with changes applied."""

from __future__ import annotations

import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.config import parse_config
from mesh.diff import apply_changes, diff, summarize
from mesh.model import Delete, Kind, MeshSettings, Upsert
from tests.mesh.meshgen import TD, node, pol, snapshot, svc, wl

A = snapshot(
    nodes=[node("node-a", "10.250.0.1"), node("node-b", "10.250.0.2")],
    workloads=[wl("w0", ips=["10.244.1.1"]), wl("w1", ips=["10.244.1.2"])],
    services=[svc("s0")],
    policies=[pol("p0", "ns1", {})],
)


def test_equal_snapshots_have_no_changes() -> None:
    assert diff(A, A) == []
    # Order alone is no change either.
    assert diff(A, snapshot(A.nodes[::-1], A.workloads[::-1], A.services, A.policies)) == []


def test_one_label_change_is_one_upsert() -> None:
    w0 = wl("w0", ips=["10.244.1.1"], labels={"app": "x"})
    b = snapshot(A.nodes, [w0, A.workloads[1]], A.services, A.policies)
    assert diff(A, b) == [Upsert(w0)]


def test_deletes_come_dependents_first_and_upserts_dependencies_first() -> None:
    # node-b replaced by node-c, w1 moved to it, s0 and p0 deleted, a root-namespace change.
    w1 = wl("w1", node="node-c", ips=["10.244.1.2"])
    b = snapshot([A.nodes[0], node("node-c", "10.250.0.3")], [A.workloads[0], w1], [], [], root="ns9")
    assert diff(A, b) == [
        Delete(Kind.POLICY, "AuthorizationPolicy/ns1/p0"),
        Delete(Kind.SERVICE, "ns1/s0"),
        Delete(Kind.NODE, "node-b"),
        Upsert(MeshSettings(TD, "ns9")),
        Upsert(node("node-c", "10.250.0.3")),
        Upsert(w1),
    ]


def test_from_nothing_every_object_is_an_upsert() -> None:
    changes = diff(None, A)
    assert all(isinstance(c, Upsert) for c in changes)
    assert {(c.kind, c.key) for c in changes} == {(k, key) for k, d in A.objects().items() for key in d}


def test_apply_reparses_policies_only_when_they_change() -> None:
    w0 = wl("w0", ips=["10.244.1.9"])
    kept = apply_changes(A, [Upsert(w0)])
    assert kept.parsed_policies is A.parsed_policies
    changed = apply_changes(A, [Delete(Kind.POLICY, "AuthorizationPolicy/ns1/p0")], digest="d2", source="s")
    assert changed.parsed_policies is not A.parsed_policies and changed.policies == ()
    assert (changed.digest, changed.source) == ("d2", "s")
    with pytest.raises(ValueError, match="settings cannot be deleted"):
        apply_changes(A, [Delete(Kind.SETTINGS, "")])


def test_diff_of_two_parsed_files_is_minimal() -> None:
    text = textwrap.dedent(
        """\
        apiVersion: ztagent.io/v1alpha1
        kind: MeshConfig
        trustDomain: cluster.local
        nodes: [{name: node-a, address: 10.250.0.1, podCIDR: 10.244.1.0/24}]
        workloads:
          - {name: a, namespace: ns1, node: node-a, ips: [10.244.1.2], labels: {app: a}}
          - {name: b, namespace: ns1, node: node-a, ips: [10.244.1.3], labels: {app: b}}
        """
    )
    old, new = parse_config(text), parse_config(text.replace("{app: b}", "{app: c}"))
    changes = diff(old, new)
    assert [(type(c).__name__, c.kind, c.key) for c in changes] == [("Upsert", Kind.WORKLOAD, "ns1/b")]
    assert summarize(changes) == "1 upsert(s), 0 delete(s): Workload ns1/b"


POOL_W = [wl(f"w{i}", ips=[f"10.244.1.{i + 1}"], labels={"app": "a" if i % 2 else "b"}) for i in range(5)] + [
    wl("w0", ips=["10.244.1.9"])
]
POOL_S = [svc("s0"), svc("s0", vips=["10.96.0.9"]), svc("s1", vips=["10.96.0.2"])]
POOL_P = [pol("p0", "ns1", {}), pol("p0", "ns1", {"action": "DENY", "rules": [{}]}), pol("p1", "ns2", {})]
POOL_N = [node("node-a", "10.250.0.1"), node("node-b", "10.250.0.2"), node("node-b", "10.250.0.3")]


def _unique_by_key(items: list[object]) -> list[object]:
    seen: dict[str, object] = {}
    for o in items:
        seen.setdefault(o.key, o)  # type: ignore[attr-defined]
    return list(seen.values())


SNAPSHOTS = st.builds(
    lambda n, w, s, p, root: snapshot(
        _unique_by_key(n),  # type: ignore[arg-type]
        _unique_by_key(w),  # type: ignore[arg-type]
        _unique_by_key(s),  # type: ignore[arg-type]
        _unique_by_key(p),  # type: ignore[arg-type]
        root=root,
    ),
    st.lists(st.sampled_from(POOL_N), max_size=3),
    st.lists(st.sampled_from(POOL_W), max_size=6),
    st.lists(st.sampled_from(POOL_S), max_size=3),
    st.lists(st.sampled_from(POOL_P), max_size=3),
    st.sampled_from(["istio-system", "ns1"]),
)


@settings(max_examples=200, deadline=None)
@given(SNAPSHOTS, SNAPSHOTS)
def test_applying_the_diff_gives_the_new_snapshot(a: object, b: object) -> None:
    from mesh.model import Snapshot

    assert isinstance(a, Snapshot) and isinstance(b, Snapshot)
    changes = diff(a, b)
    got = apply_changes(a, changes)
    assert {k: dict(d) for k, d in got.objects().items()} == {k: dict(d) for k, d in b.objects().items()}
    assert diff(got, b) == []
    # Minimal: one change per object that differs, none for the equal ones.
    keys = [(c.kind, c.key) for c in changes]
    assert len(keys) == len(set(keys))
    for kind, key in keys:
        assert a.objects()[kind].get(key) != b.objects()[kind].get(key)
