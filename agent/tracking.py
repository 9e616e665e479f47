"""The open connections of one data-plane worker, and their accounting.

Every proxied connection is a :class:`~agent.records.ConnectionRecord` from open to close. The
tracker turns records into their outputs: the Istio TCP series (byte counts pushed as deltas at
every scrape and at close, so counters are live without a callback per chunk on the hot path),
the access log's ``connection_closed`` / ``connection_denied`` / ``connection_failed`` lines,
the policy-decision counters and the recent-denials ring shown by ``ztagent status``.

Inbound records are indexed by destination workload, so a policy or label change re-checks
only the connections to the workloads it affects, not every open connection.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from agent.metrics import FLAG_CONNECT, FLAG_DENY, FLAG_NONE, AgentMetrics, ConnectionStats
from agent.records import ConnectionRecord, Direction, Path, decision_fields
from policy import Decision
from serving.accesslog import AccessLog

log = logging.getLogger("ztagent.connections")

# agent.admission.RejectKind.UPSTREAM_FAILED's value (the tracker sits below admission in the
# agent's layers, so it names the kind rather than importing it).
UPSTREAM_FAILED = "upstream-failed"

# Interned label sets kept at most this many (then the cache starts over).
INTERN_LIMIT = 4096


class ConnectionTracker:
    """Open records plus the counters and logs derived from them.

    Connections between the same two workloads carry equal labels, so :meth:`open` swaps each
    new label set for an equal one already held: with 10 000 open tunnels that is most of the
    agent's memory per connection beyond the sockets.
    """

    def __init__(self, metrics: AgentMetrics, access_log: AccessLog, *, denials_kept: int = 50) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self.open: dict[int, ConnectionRecord] = {}
        self.recent_denials: deque[dict[str, Any]] = deque(maxlen=denials_kept)
        self.totals = {"opened": 0, "closed": 0, "denied": 0}
        self._by_destination: dict[str, dict[int, ConnectionRecord]] = {}
        self._counts: dict[tuple[Direction, Path], int] = {}
        self._interned: dict[Any, Any] = {}

    # -- lifecycle of a carried connection ------------------------------------------------------

    def _intern(self, key: Any, value: Any) -> Any:
        try:
            held = self._interned.get(key)
        except TypeError:  # an unhashable value somewhere: keep this one as it is
            return value
        if held is not None:
            return held
        if len(self._interned) >= INTERN_LIMIT:
            self._interned.clear()
        self._interned[key] = value
        return value

    def opened(self, record: ConnectionRecord) -> ConnectionRecord:
        """Start accounting for a connection that is now carried (after its upstream exists).

        What the record holds for its lifetime is shared with equal records: the labels, the
        decision, the destination address and the policy input (10 000 open tunnels between the
        same workloads would otherwise each hold a copy: about 0.8 KB per tunnel, measured)."""
        labels = record.labels(self.metrics.cluster_id)
        record.stats = ConnectionStats(self.metrics, self._intern(labels, labels))
        if record.decision is not None:
            record.decision = self._intern(record.decision, record.decision)
        record.destination = self._intern(("dst", *record.destination), record.destination)
        c = record.policy_input
        if c is not None:
            conn_key = ("conn", c.source_principal, c.source_ip, c.destination_namespace,
                        c.destination_port, c.destination_ip, id(c.destination_labels))  # fmt: skip
            record.policy_input = self._intern(conn_key, c)
        self.open[record.id] = record
        key = (record.direction, record.path)
        self._counts[key] = self._counts.get(key, 0) + 1
        if record.direction is Direction.INBOUND and record.policy_input is not None:
            dest = record.destination_key
            if dest is not None:
                self._by_destination.setdefault(dest, {})[record.id] = record
        self.totals["opened"] += 1
        return record

    def closed(self, record: ConnectionRecord, reason: str) -> None:
        if record.closed:
            return
        record.closed = True
        if self.open.pop(record.id, None) is not None:
            key = (record.direction, record.path)
            self._counts[key] -= 1
        dest = record.destination_key
        if dest is not None:
            peers = self._by_destination.get(dest)
            if peers is not None:
                peers.pop(record.id, None)
                if not peers:
                    del self._by_destination[dest]
        record.sync()
        stats = record.stats
        if stats is not None:
            stats.close()
        self.totals["closed"] += 1
        self.access_log.write(
            "connection_closed",
            **record.log_fields(),
            bytes_sent=stats.sent if stats is not None else 0,
            bytes_received=stats.received if stats is not None else 0,
            duration_ms=round((time.monotonic() - record.opened) * 1000, 1),
            close_reason=reason,
        )

    # -- decisions and failures -----------------------------------------------------------------

    def decided(self, record: ConnectionRecord, decision: Decision, *, recheck: bool = False) -> None:
        """Count one policy decision; a denial is also logged, access-logged and kept for status."""
        self.metrics.policy_decisions.labels("allow" if decision.allowed else "deny", decision.code).inc()
        if decision.allowed:
            return
        if not recheck:
            # A refused new connection is an Istio TCP series too (response_flags="DENY"), so
            # dashboards and Kiali draw the denied edge; a re-check closes a connection that was
            # counted when it opened, and its close is counted then.
            self.metrics.connection_failed(record.labels(self.metrics.cluster_id), FLAG_DENY)
        fields = record.log_fields()
        fields.update(decision_fields(decision))
        if recheck:
            fields["path"] = f"{record.path.value} (re-check)"
        self.totals["denied"] += 1
        self.recent_denials.append(self.access_log.write("connection_denied", **fields))
        who = record.source_principal or record.source_ip
        log.info(
            f"denied {who} -> {record.destination_key}:{record.destination[1]}: {decision.reason}",
            extra={"event": "policy_denied", "destination_workload": record.destination_key,
                   "code": decision.code},
        )  # fmt: skip

    def failed(self, record: ConnectionRecord, kind: str, reason: str, *, status: int | None = None) -> None:
        """A connection that was admitted but could not be carried (upstream, tunnel).

        Counted in the Istio TCP series as ztunnel counts it: ``CONNECT`` when no connection to
        the destination pod could be made, ``-`` for the source reporter's failed tunnels (ztunnel's
        outbound records those without a flag)."""
        flag = FLAG_CONNECT if kind == UPSTREAM_FAILED else FLAG_NONE
        self.metrics.connection_failed(record.labels(self.metrics.cluster_id), flag)
        fields = record.log_fields()
        fields.update(kind=kind, status=status, reason=reason)
        self.access_log.write("connection_failed", **fields)

    # -- queries --------------------------------------------------------------------------------

    def sync_all(self) -> None:
        for r in list(self.open.values()):
            r.sync()

    def inbound(self) -> Iterator[ConnectionRecord]:
        """Every open inbound connection that carries a policy input (re-checkable)."""
        for peers in list(self._by_destination.values()):
            yield from list(peers.values())

    def inbound_to(self, destinations: Iterable[str]) -> Iterator[ConnectionRecord]:
        """Open inbound connections to these destination workloads (``ns/name``)."""
        for key in destinations:
            yield from list(self._by_destination.get(key, {}).values())

    def count(self, direction: Direction | str, path: Path | str | None = None) -> int:
        d = Direction(direction)
        if path is not None:
            return self._counts.get((d, Path(path)), 0)
        return sum(n for (dd, _), n in self._counts.items() if dd is d)

    def abort_all(self, reason: str) -> None:
        for r in list(self.open.values()):
            r.abort(reason)


__all__ = ["ConnectionTracker"]
