"""In-memory storage with etcd's model: one global, monotonically increasing revision (the
resourceVersion of every write), an event history of bounded length (older revisions are
compacted: a watch or a continue token from before the window gets 410 Expired), and keys kept in
etcd's lexicographic order ("<namespace>/<name>"), which is the order lists come back in.

No sockets, no event loop: the server subscribes to committed events."""

from __future__ import annotations

import bisect
import collections
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .resources import Resource


class Expired(Exception):
    """The requested revision is older than the compacted one (410 Gone, reason Expired)."""

    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(f"too old resource version: {requested} ({oldest})")
        self.requested = requested
        self.oldest = oldest


@dataclass(frozen=True)
class Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    resource: Resource
    key: str
    obj: dict[str, Any]
    prev: dict[str, Any] | None


def object_key(namespace: str | None, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


class Store:
    def __init__(self, history: int = 10_000) -> None:
        if history < 1:
            raise ValueError("history must be at least 1 event")
        self.history = history
        self.rv = 1  # a fresh etcd starts at revision 1
        self.compacted_rv = 1
        self._objects: dict[Resource, dict[str, dict[str, Any]]] = collections.defaultdict(dict)
        self._keys: dict[Resource, list[str]] = collections.defaultdict(list)
        self._log: collections.deque[Event] = collections.deque()
        self.listeners: list[Callable[[Event], None]] = []

    # --- reads ---------------------------------------------------------------------------------

    def get(self, res: Resource, key: str) -> dict[str, Any] | None:
        return self._objects[res].get(key)

    def count(self, res: Resource) -> int:
        return len(self._objects[res])

    def check_rv(self, rv: int) -> None:
        if rv < self.compacted_rv:
            raise Expired(rv, self.compacted_rv)

    def _overlay(self, res: Resource, rv: int) -> dict[str, dict[str, Any] | None]:
        """What differs at revision `rv` from now: key -> the object then (None: absent then)."""
        self.check_rv(rv)
        overlay: dict[str, dict[str, Any] | None] = {}
        for ev in reversed(self._log):
            if ev.rv <= rv:
                break
            if ev.resource is res:
                overlay[ev.key] = None if ev.type == "ADDED" else ev.prev
        return overlay

    def scan(self, res: Resource, rv: int, start: str = "", prefix: str = "") -> Iterator[dict[str, Any]]:
        """Objects as of revision `rv`, in key order, from `start` (inclusive), under `prefix`."""
        overlay = self._overlay(res, rv)
        current = self._objects[res]
        keys = self._keys[res]
        extra = sorted(k for k in overlay if k not in current and k >= start and k.startswith(prefix))
        i = bisect.bisect_left(keys, max(start, prefix))
        j = 0
        while True:
            a = keys[i] if i < len(keys) and keys[i].startswith(prefix) else None
            b = extra[j] if j < len(extra) else None
            if a is None and b is None:
                return
            if b is None or (a is not None and a < b):
                key, i = a, i + 1
            else:
                key, j = b, j + 1
            assert key is not None
            obj = overlay[key] if key in overlay else current.get(key)
            if obj is not None:
                yield obj

    def events_since(self, res: Resource, rv: int) -> list[Event]:
        self.check_rv(rv)
        out = []
        for ev in reversed(self._log):
            if ev.rv <= rv:
                break
            if ev.resource is res:
                out.append(ev)
        out.reverse()
        return out

    # --- writes --------------------------------------------------------------------------------

    def _commit(
        self, ev_type: str, res: Resource, key: str, obj: dict[str, Any], prev: dict[str, Any] | None
    ) -> Event:
        ev = Event(self.rv, ev_type, res, key, obj, prev)
        self._log.append(ev)
        while len(self._log) > self.history:
            self.compacted_rv = self._log.popleft().rv
        for listener in list(self.listeners):
            listener(ev)
        return ev

    def put(self, res: Resource, key: str, obj: dict[str, Any]) -> Event:
        """Creates or replaces; stamps the new revision into metadata.resourceVersion."""
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
        objs = self._objects[res]
        prev = objs.get(key)
        if prev is None:
            bisect.insort(self._keys[res], key)
        objs[key] = obj
        return self._commit("ADDED" if prev is None else "MODIFIED", res, key, obj, prev)

    def delete(self, res: Resource, key: str) -> Event:
        objs = self._objects[res]
        prev = objs.pop(key)
        keys = self._keys[res]
        del keys[bisect.bisect_left(keys, key)]
        self.rv += 1
        # The DELETED event carries the last state with the deletion's revision, as etcd3's
        # watcher and the watch cache give it.
        gone = copy.deepcopy(prev)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        return self._commit("DELETED", res, key, gone, prev)

    def compact(self, rv: int | None = None) -> None:
        """Forgets history up to `rv` (default: everything), as an etcd compaction does."""
        target = self.rv if rv is None else min(rv, self.rv)
        while self._log and self._log[0].rv <= target:
            self._log.popleft()
        self.compacted_rv = max(self.compacted_rv, target)
