"""The config-source interface: an initial snapshot, then an async stream of change sets.

A role (node agent, CA server, waypoint) takes a :class:`ConfigSource` by injection and runs::

    snapshot = await source.initial()            # raises ConfigError: refuse to start
    store = WorkloadStore(snapshot, node)
    async for event in source.changes():         # until cancelled
        if isinstance(event, ChangeSet):
            applied = store.apply(event.changes, source=event.source, digest=event.digest)
        else:                                    # ConfigRefused: keep serving the last good state
            report(event.error)

Contract for implementations:

* ``initial()`` is awaited once, before ``changes()``; it returns a complete, valid snapshot or
  raises :class:`~mesh.errors.ConfigError`. It may do network I/O (a Kubernetes LIST): it is a
  coroutine so nothing blocks the loop.
* ``changes()`` is an async iterator that yields, in order, each :class:`ChangeSet` relative to
  the last good state (the initial snapshot, then the previous change set), or a
  :class:`ConfigRefused` for an update that could not be used. A refusal changes nothing: the
  next ChangeSet is still relative to the last good state. An empty ChangeSet means "the source
  is good again at the serving version" (after a refusal). The iterator ends only when cancelled.
* A consumer that refuses a change set itself (the store's ``ChangeRefused``) keeps its old
  state; the source does not know, so the next change set may repeat part of the refused one
  (Upserts are idempotent, Deletes of absent keys are no-ops).

A list-then-watch Kubernetes source fits without a blocking call: ``initial()`` LISTs nodes,
pods, services and policies and builds the snapshot (remembering the resourceVersions);
``changes()`` WATCHes from there and turns each event into a one-change ChangeSet (an ADDED or
MODIFIED object is an ``Upsert``, DELETED a ``Delete``, each keyed), and on ``410 Gone``
re-LISTs and yields ``diff(last, relisted)`` as one ChangeSet.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from mesh.errors import ConfigError, ConfigIssue
from mesh.model import MeshChange, Snapshot


@dataclass(frozen=True)
class ChangeSet:
    """Changes to apply together (all or nothing), bringing the mesh to version ``digest``."""

    changes: tuple[MeshChange, ...]
    source: str  # names the origin in logs and errors ("mesh.yaml", "k8s:cluster-a")
    digest: str  # the version after the set: a file's sha256, a Kubernetes resourceVersion

    def __bool__(self) -> bool:
        return bool(self.changes)


@dataclass(frozen=True)
class ConfigRefused:
    """An update the source could not use; the last good state keeps serving."""

    error: ConfigError
    source: str

    @property
    def issues(self) -> tuple[ConfigIssue, ...]:
        return self.error.issues


SourceEvent = ChangeSet | ConfigRefused


@runtime_checkable
class ConfigSource(Protocol):
    """Where a role's view of the mesh comes from; see the module docstring for the contract."""

    @property
    def name(self) -> str:
        """How logs and ``/status`` name the source (``file:/etc/ztagent/mesh.yaml``)."""
        ...

    async def initial(self) -> Snapshot:
        """The first complete snapshot; raises ConfigError (the role refuses to start)."""
        ...

    def changes(self) -> AsyncIterator[SourceEvent]:
        """Change sets and refusals after the initial snapshot, until cancelled."""
        ...
