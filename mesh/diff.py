"""Snapshot -> snapshot: the :data:`~mesh.model.MeshChange` list between two versions of the mesh
(what a file source emits on reload), and the inverse, a snapshot with changes applied.

``apply_changes(old, diff(old, new))`` has the same objects as ``new`` (order aside: updated
objects keep their place, new ones go last, as in the store). Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from mesh.model import (
    Delete,
    Kind,
    MeshChange,
    MeshObject,
    MeshSettings,
    Node,
    PolicyDocument,
    Service,
    Snapshot,
    Upsert,
    Waypoint,
    Workload,
)
from mesh.parse import PolicyParser, default_policy_parser

T = TypeVar("T")

# Deletes go dependents-first and upserts dependencies-first, so a consumer that applies the
# list one change at a time never sees a workload on a node it does not know yet.
_DELETE_ORDER = (Kind.POLICY, Kind.WAYPOINT, Kind.SERVICE, Kind.WORKLOAD, Kind.NODE)
_UPSERT_ORDER = (Kind.SETTINGS, Kind.NODE, Kind.WORKLOAD, Kind.SERVICE, Kind.WAYPOINT, Kind.POLICY)


def diff(old: Snapshot | None, new: Snapshot) -> list[MeshChange]:
    """The changes that turn ``old`` into ``new``: one Upsert per added or changed object, one
    Delete per removed one; nothing for an object that is equal in both (O(mesh)). From
    ``None`` (nothing known yet), every object of ``new`` is an Upsert."""
    b = new.objects()
    a = old.objects() if old is not None else {k: {} for k in b}
    out: list[MeshChange] = []
    for kind in _DELETE_ORDER:
        out.extend(Delete(kind, key) for key in a[kind] if key not in b[kind])
    for kind in _UPSERT_ORDER:
        before = a[kind]
        out.extend(Upsert(obj) for key, obj in b[kind].items() if before.get(key) != obj)
    return out


def apply_changes(
    snapshot: Snapshot,
    changes: Iterable[MeshChange],
    *,
    source: str | None = None,
    digest: str | None = None,
    policy_parser: PolicyParser | None = None,
) -> Snapshot:
    """A new snapshot with ``changes`` applied in order (no validation: the store validates).

    Policies are re-parsed (``policy_parser``, default the policy/ package's) only when a
    policy or the root namespace changed; otherwise the parsed set is carried over.
    """
    objs = snapshot.objects()
    policies_touched = False
    for ch in changes:
        kind = ch.kind
        if isinstance(ch, Upsert):
            objs[kind][ch.key] = ch.obj
        elif kind is Kind.SETTINGS:
            raise ValueError("the mesh settings cannot be deleted")
        else:
            objs[kind].pop(ch.key, None)
        policies_touched = policies_touched or kind in (Kind.POLICY, Kind.SETTINGS)
    settings = objs[Kind.SETTINGS][""]
    assert isinstance(settings, MeshSettings)
    policies = _typed(objs[Kind.POLICY].values(), PolicyDocument)
    parsed, errors = snapshot.parsed_policies, snapshot.policy_errors
    if policies_touched:
        parser = policy_parser if policy_parser is not None else default_policy_parser
        parsed, new_errors = parser(policies)
        errors = tuple(new_errors)
    return Snapshot(
        trust_domain=settings.trust_domain,
        root_namespace=settings.root_namespace,
        nodes=_typed(objs[Kind.NODE].values(), Node),
        workloads=_typed(objs[Kind.WORKLOAD].values(), Workload),
        services=_typed(objs[Kind.SERVICE].values(), Service),
        policies=policies,
        source=snapshot.source if source is None else source,
        digest=snapshot.digest if digest is None else digest,
        parsed_policies=parsed,
        policy_errors=errors,
        waypoints=_typed(objs[Kind.WAYPOINT].values(), Waypoint),
        namespace_labels=settings.namespace_labels,
    )


def _typed(items: Iterable[MeshObject], cls: type[T]) -> tuple[T, ...]:
    out: list[T] = []
    for o in items:
        if not isinstance(o, cls):
            raise TypeError(f"a {type(o).__name__} was filed as a {cls.__name__}")
        out.append(o)
    return tuple(out)


def summarize(changes: Sequence[MeshChange]) -> str:
    """``"2 upserts, 1 delete: Workload ns1/a, Workload ns1/b, -Service ns2/x"`` for logs."""
    ups = sum(1 for c in changes if isinstance(c, Upsert))
    dels = len(changes) - ups
    items = ", ".join(
        f"{'' if isinstance(c, Upsert) else '-'}{c.kind.value} {c.key}".rstrip() for c in changes[:10]
    )
    more = f" (+{len(changes) - 10} more)" if len(changes) > 10 else ""
    return f"{ups} upsert(s), {dels} delete(s): {items}{more}"
