"""WorkloadStore.apply: incremental changes answer exactly like a store rebuilt from the
resulting snapshot; refused batches change nothing; AppliedChanges says what changed."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mesh.diff import apply_changes, diff
from mesh.errors import ChangeRefused
from mesh.model import Delete, Kind, MeshChange, MeshSettings, Snapshot, Upsert
from mesh.store import WorkloadStore
from tests.mesh.meshgen import TD, answers, node, pol, snapshot, svc, violations, wl

LOCAL = "node-a"

INITIAL = snapshot(
    nodes=[node("node-a", "10.250.0.1", "10.244.1.0/24"), node("node-b", "10.250.0.2", "10.244.2.0/24")],
    workloads=[
        wl("w0", ips=["10.244.1.1"], labels={"app": "a"}),
        wl("w1", ns="ns2", node="node-b", ips=["10.244.2.1"], labels={"app": "a", "tier": "x"}),
    ],
    services=[
        svc("s0", selector={"app": "a"}),
        svc("s1", ns="ns2", vips=["10.96.0.2"], selector={"app": "a"}),
    ],
    policies=[pol("p0", "ns1", {"action": "DENY", "rules": [{}]})],
)

# A small universe, so random changes collide (same IPs, same keys, same selectors) often.
NODES = st.sampled_from(
    [
        node("node-a", "10.250.0.1", "10.244.1.0/24"),
        node("node-a", "10.250.0.1", "10.244.1.0/25"),  # 10.244.1.200 falls outside
        node("node-a", "10.250.0.1"),
        node("node-b", "10.250.0.2", "10.244.2.0/24"),
        node("node-b", "10.250.0.2"),
        node("node-b", "10.250.0.9", "10.244.0.0/16"),  # overlaps node-a's CIDR
        node("node-c", "10.250.0.3"),
        node("node-c", "10.244.1.3"),  # an address a workload may hold
    ]
)
IPS = st.lists(
    st.sampled_from(
        [
            "10.244.1.1",
            "10.244.1.2",
            "10.244.1.3",
            "10.244.1.200",
            "10.244.2.1",
            "10.244.2.2",
            "10.250.0.2",
            "10.96.0.1",
        ]
    ),
    min_size=1,
    max_size=2,
)
LABELS = st.dictionaries(st.sampled_from(["app", "tier"]), st.sampled_from(["a", "b", "x"]), max_size=2)
WORKLOADS = st.builds(
    wl,
    name=st.sampled_from(["w0", "w1", "w2", "w3"]),
    ns=st.sampled_from(["ns1", "ns2"]),
    node=st.sampled_from(["node-a", "node-b", "node-c"]),
    ips=IPS,
    labels=LABELS,
    sa=st.sampled_from(["default", "sa1"]),
    enrolled=st.booleans(),
)
SERVICES = st.builds(
    svc,
    name=st.sampled_from(["s0", "s1", "s2"]),
    ns=st.sampled_from(["ns1", "ns2"]),
    vips=st.lists(
        st.sampled_from(["10.96.0.1", "10.96.0.2", "10.96.0.3", "10.244.1.1"]), min_size=1, max_size=2
    ),
    ports=st.sampled_from([(80,), (80, 443), (443,)]),
    selector=LABELS,
)
POLICIES = st.builds(
    pol,
    name=st.sampled_from(["p0", "p1"]),
    ns=st.sampled_from(["ns1", "ns2", "istio-system"]),
    spec=st.sampled_from(
        [
            {},
            {"action": "DENY", "rules": [{}]},
            {"selector": {"matchLabels": {"app": "a"}}, "action": "DENY", "rules": [{}]},
            {
                "action": "ALLOW",
                "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/ns1/sa/default"]}}]}],
            },
        ]
    ),
)
CHANGES: st.SearchStrategy[MeshChange] = st.one_of(
    st.builds(Upsert, WORKLOADS),
    st.builds(Delete, st.just(Kind.WORKLOAD), st.sampled_from(["ns1/w0", "ns1/w1", "ns2/w1", "ns2/w2"])),
    st.builds(Upsert, SERVICES),
    st.builds(Delete, st.just(Kind.SERVICE), st.sampled_from(["ns1/s0", "ns2/s1", "ns1/s2"])),
    st.builds(Upsert, NODES),
    st.builds(Delete, st.just(Kind.NODE), st.sampled_from(["node-a", "node-b", "node-c"])),
    st.builds(Upsert, POLICIES),
    st.builds(
        Delete,
        st.just(Kind.POLICY),
        st.sampled_from(["AuthorizationPolicy/ns1/p0", "AuthorizationPolicy/ns2/p1"]),
    ),
    st.builds(Upsert, st.builds(MeshSettings, st.just(TD), st.sampled_from(["istio-system", "ns2"]))),
)
BATCHES = st.lists(st.lists(CHANGES, min_size=1, max_size=4), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(BATCHES)
def test_incremental_apply_answers_like_a_rebuild(batches: list[list[MeshChange]]) -> None:
    store = WorkloadStore(INITIAL, LOCAL)
    model = INITIAL
    for batch in batches:
        before = answers(store)
        candidate = apply_changes(model, batch)
        try:
            store.apply(batch, digest=f"v{len(batch)}")
        except ChangeRefused as exc:
            # Refused exactly when the result breaks an invariant, and then nothing changed.
            assert violations(candidate, LOCAL), (batch, exc)
            assert answers(store) == before
            event("batch refused")
            continue
        event("batch applied")
        assert violations(candidate, LOCAL) == [], batch
        model = candidate
        assert answers(store) == answers(WorkloadStore(model, LOCAL))
    # The same end state reached in one batch (the file source's diff): swaps of IPs between
    # workloads, moves between nodes, deletes and re-creates all in one all-or-nothing apply.
    one_shot = WorkloadStore(INITIAL, LOCAL)
    one_shot.apply(diff(INITIAL, model))
    assert answers(one_shot, ordered=False) == answers(WorkloadStore(model, LOCAL), ordered=False)


def _store() -> WorkloadStore:
    return WorkloadStore(INITIAL, LOCAL)


REFUSALS: list[tuple[list[MeshChange], str]] = [
    (
        [Upsert(wl("w9", ips=["10.244.1.1"]))],
        "workloads[ns1/w9].ips[0]: IP 10.244.1.1 is already used by workload ns1/w0",
    ),
    (
        [Upsert(node("node-c", "10.250.0.3")), Upsert(wl("w9", node="node-c", ips=["10.250.0.2"]))],
        "workloads[ns1/w9].ips[0]: IP 10.250.0.2 is already used by node node-b",
    ),
    ([Upsert(wl("w9", ips=["10.96.0.1"], node="node-a"))], "IP 10.96.0.1 is outside podCIDR"),
    ([Upsert(wl("w9", node="node-z"))], "workloads[ns1/w9].node: unknown node 'node-z'"),
    (
        [Upsert(wl("w9", node="node-b", ips=["10.244.1.9"]))],
        "IP 10.244.1.9 is outside podCIDR 10.244.2.0/24 of node 'node-b'",
    ),
    ([Upsert(wl("w9", ips=["10.244.1.9", "10.244.1.9"]))], "ips[1]: IP 10.244.1.9 is listed twice"),
    (
        [Upsert(svc("s9", vips=["10.96.0.2"]))],
        "services[ns1/s9].vips[0]: VIP 10.96.0.2 is already used by service ns2/s1",
    ),
    ([Upsert(svc("s9", vips=["10.244.1.1"]))], "VIP 10.244.1.1 is already used by workload ns1/w0"),
    ([Delete(Kind.NODE, "node-b")], "nodes[node-b]: workload ns2/w1 still runs on it"),
    ([Delete(Kind.NODE, "node-a")], "nodes[node-a]: is this agent's node"),
    (
        [Upsert(node("node-c", "10.250.0.1"))],
        "nodes[node-c].address: IP 10.250.0.1 is already used by node node-a",
    ),
    (
        [Upsert(node("node-c", "10.250.0.3", "10.244.0.0/16"))],
        "nodes[node-c].podCIDR: 10.244.0.0/16 overlaps",
    ),
    (
        [Upsert(node("node-a", "10.250.0.1", "10.244.1.128/25"))],
        "workload ns1/w0 has IP 10.244.1.1 outside 10.244.1.128/25",
    ),
    ([Delete(Kind.SETTINGS, "")], "settings: cannot be deleted"),
    ([Upsert(MeshSettings(TD, "Bad_NS"))], "settings.rootNamespace: 'Bad_NS' is not a valid namespace"),
    (
        [Upsert(dataclasses.replace(MeshSettings(TD), trust_domain=type(TD)("other.td")))],
        "is outside other.td",
    ),
    # A good change and a bad one in one batch: neither is applied.
    (
        [Upsert(wl("w8", ips=["10.244.1.8"])), Upsert(wl("w9", ips=["10.244.1.8"]))],
        "IP 10.244.1.8 is already used by workload ns1/w8",
    ),
]


@pytest.mark.parametrize(("batch", "expected"), REFUSALS, ids=[e[:60] for _, e in REFUSALS])
def test_refused_changes_name_the_field_and_leave_the_store_unchanged(
    batch: list[MeshChange], expected: str
) -> None:
    store = _store()
    before = answers(store)
    index_before = store.policy_index
    with pytest.raises(ChangeRefused) as ei:
        store.apply(batch, source="mesh.yaml")
    msgs = [str(i) for i in ei.value.issues]
    assert any(m.startswith("mesh.yaml: ") and expected in m for m in msgs), msgs
    assert answers(store) == before and store.policy_index is index_before
    assert not isinstance(ei.value, KeyError)  # a domain error, not a lookup failure


def test_moves_and_swaps_in_one_batch_need_no_ordering() -> None:
    store = _store()
    # Swap the IPs of two workloads, and move a VIP from one service to another, in one batch.
    a = wl("w0", ips=["10.244.1.5"], labels={"app": "a"})
    b = wl("w5", ips=["10.244.1.1"])
    applied = store.apply(
        [Upsert(b), Upsert(a), Upsert(svc("s0", vips=["10.96.0.9"], selector={"app": "a"}))]
    )
    assert store.by_ip("10.244.1.1") == b and store.by_ip("10.244.1.5") == a
    assert store.service_at("10.96.0.1", 80) is None and store.service_at("10.96.0.9", 80) is not None
    assert {w.key for w in applied.local_added} == {"ns1/w5"}
    assert [(o.key, n.key) for o, n in applied.local_changed] == [("ns1/w0", "ns1/w0")]


def test_applied_changes_say_what_the_agent_must_do() -> None:
    store = _store()
    # A local workload's labels change: it stays, the services selecting it are re-matched,
    # its connections need a re-check, the enrolled set's identities and IPs did not change.
    w0 = INITIAL.workloads[0]
    relabelled = wl("w0", ips=["10.244.1.1"], labels={"app": "b"})
    ap = store.apply([Upsert(relabelled)])
    assert ap.local_changed == ((w0, relabelled),) and not ap.local_added and not ap.local_removed
    assert ap.recheck == {"ns1/w0"} and not ap.recheck_all and not ap.local_enrolled_changed
    assert ap.endpoints_changed == {"ns1/s0"} and not ap.services_changed
    assert store.endpoints(INITIAL.services[0]) == ()
    # A remote workload moves to this node: local_added, enrolled set changed.
    moved = wl("w1", ns="ns2", node="node-a", ips=["10.244.1.7"], labels={"app": "a", "tier": "x"})
    ap = store.apply([Upsert(moved)])
    assert ap.local_added == (moved,) and ap.local_enrolled_changed
    assert [w.key for w in store.local_enrolled] == ["ns1/w0", "ns2/w1"]
    assert [w.key for w in store.endpoints(INITIAL.services[1])] == ["ns2/w1"]
    # A policy change: the index is rebuilt, everything is re-checked; workloads untouched.
    index = store.policy_index
    ap = store.apply([Delete(Kind.POLICY, "AuthorizationPolicy/ns1/p0")])
    assert ap.policies_changed == {"AuthorizationPolicy/ns1/p0"} and ap.recheck_all
    assert store.policy_index is not index and not ap.recheck
    # No policy change: the index object is kept (not rebuilt).
    index = store.policy_index
    ap = store.apply([Upsert(svc("s7", vips=["10.96.0.7"]))])
    assert store.policy_index is index and ap.services_changed == {"ns1/s7"}
    # Resending an unchanged object changes nothing.
    assert not store.apply([Upsert(moved)])
    # Deleting the local workload: removed, enrolled set changed.
    ap = store.apply([Delete(Kind.WORKLOAD, "ns1/w0")], digest="v9")
    assert ap.local_removed == (relabelled,) and ap.local_enrolled_changed and store.digest == "v9"
    assert store.snapshot.digest == "v9" and [w.key for w in store.snapshot.workloads] == ["ns2/w1"]


def test_a_poisoned_policy_from_a_change_is_enforced_and_reported() -> None:
    store = _store()
    bad = pol("p1", "ns1", {"action": "DENY", "rules": [{"from": [{"source": {"principles": ["x"]}}]}]})
    store.apply([Upsert(bad)])
    assert any("principles" in str(e) for e in store.policy_errors)


def test_the_store_refuses_a_snapshot_without_its_node() -> None:
    with pytest.raises(ChangeRefused, match="node 'node-z' is not in the config"):
        WorkloadStore(INITIAL, "node-z")


def test_snapshot_is_cached_until_the_next_change() -> None:
    store = _store()
    assert store.snapshot is INITIAL
    store.apply([Upsert(wl("w7", ips=["10.244.1.7"]))])
    snap = store.snapshot
    assert (
        isinstance(snap, Snapshot) and snap is store.snapshot and "ns1/w7" in {w.key for w in snap.workloads}
    )


def test_waypoints_are_kept_and_reported() -> None:
    from identity.spiffe import SpiffeId
    from mesh.model import Waypoint
    from tests.mesh.meshgen import IP

    store = _store()
    wp = Waypoint(
        "waypoint", "ns1", "waypoint", (IP("10.96.0.50"),), SpiffeId.for_workload(TD, "ns1", "waypoint")
    )
    ap = store.apply([Upsert(wp)])
    assert ap.waypoints_changed == {"ns1/waypoint"} and store.waypoint("ns1", "waypoint") == wp
    assert store.snapshot.waypoints == (wp,) and store.waypoint_for(None, None) is None  # not bound yet
    ap = store.apply([Delete(Kind.WAYPOINT, "ns1/waypoint")])
    assert ap.waypoints_changed == {"ns1/waypoint"} and store.waypoint("ns1", "waypoint") is None


def test_a_broken_update_of_a_good_policy_keeps_the_good_version_in_force() -> None:
    """Last good, per object: one typo in one policy is not an outage."""
    store = _store()
    good_index = store.policy_index
    broken = pol("p0", "ns1", {"action": "DENI", "rules": [{}]})
    ap = store.apply([Upsert(broken)])
    assert store.policy_index is good_index and not ap.policies_changed  # nothing changed in force
    assert list(store.stale_policies) == ["AuthorizationPolicy/ns1/p0"]
    assert "DENI" in str(store.stale_policies["AuthorizationPolicy/ns1/p0"][0])
    assert store.policy_errors == ()  # the poisoned version is not the one in force
    # Sent again as it was (the source's view is the broken one; a fix resends the good text).
    store.apply([Upsert(INITIAL.policies[0])])
    assert store.stale_policies == {}
    # A new good version replaces the old one; a later broken one keeps *that* one.
    newer = pol("p0", "ns1", {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["80"]}}]}]})
    store.apply([Upsert(newer)])
    store.apply([Upsert(broken)])
    assert [d.raw for d in store.snapshot.policies if d.name == "p0"] == [newer.raw]
    # Deleting the policy ends its refusal too.
    store.apply([Delete(Kind.POLICY, "AuthorizationPolicy/ns1/p0")])
    assert store.stale_policies == {}


def test_a_policy_that_never_had_a_good_version_goes_in_poisoned() -> None:
    store = _store()
    store.apply([Upsert(pol("p9", "ns1", {"action": "DENI", "rules": [{}]}))])
    assert store.stale_policies == {}
    assert any("DENI" in str(e) for e in store.policy_errors)
