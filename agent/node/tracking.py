"""Open connections the agent proxies: metrics labels, live byte counts, access log, re-checks.

Every proxied connection is a :class:`Tracked` entry from open to close. Its byte counters are
read from the relay (tunnel streams count in their ``TunnelInfo``; the plaintext relay calls
back) and pushed to Prometheus as deltas, at every scrape and at close, so counters are live
without a callback per chunk on the hot path.

Inbound entries keep the policy input they were admitted with, so a policy change can
re-evaluate them and close the ones now denied.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agent.metrics import UNKNOWN, AgentMetrics, ConnectionLabels, ConnectionStats
from mesh.config import Service, Workload
from policy import Connection, Decision
from serving.accesslog import AccessLog

_ids = itertools.count(1)

# Istio's canonical-service labels, with its fallbacks (app, then the workload name).
CANONICAL_NAME = "service.istio.io/canonical-name"
CANONICAL_REVISION = "service.istio.io/canonical-revision"


def _workload_fields(prefix: str, w: Workload | None, principal: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if principal:
        out[f"{prefix}_principal"] = principal
    if w is None:
        return out
    labels = w.labels
    app = labels.get("app.kubernetes.io/name") or labels.get("app")
    version = labels.get("app.kubernetes.io/version") or labels.get("version")
    out.update(
        {
            f"{prefix}_workload": w.name,
            f"{prefix}_workload_namespace": w.namespace,
            f"{prefix}_app": app or UNKNOWN,
            f"{prefix}_version": version or UNKNOWN,
            f"{prefix}_canonical_service": labels.get(CANONICAL_NAME) or app or w.name,
            f"{prefix}_canonical_revision": labels.get(CANONICAL_REVISION) or version or "latest",
        }
    )
    return out


def connection_labels(
    *,
    reporter: str,
    source: Workload | None,
    source_principal: str | None,
    destination: Workload | None,
    destination_principal: str | None,
    service: Service | None,
    security: str,
) -> ConnectionLabels:
    fields: dict[str, Any] = {}
    fields.update(_workload_fields("source", source, source_principal))
    fields.update(_workload_fields("destination", destination, destination_principal))
    if service is not None:
        fields["destination_service"] = service.hostname
        fields["destination_service_name"] = service.name
        fields["destination_service_namespace"] = service.namespace
    elif destination is not None:
        # Istio reports the workload name as destination_service_name when no service was used.
        fields["destination_service_name"] = destination.name
        fields["destination_service_namespace"] = destination.namespace
    return ConnectionLabels(reporter=reporter, connection_security_policy=security, **fields)


@dataclass(slots=True)
class Tracked:
    direction: str  # "inbound" | "outbound"
    path: str  # "hbone" | "plaintext" | "same-node" | "passthrough"
    stats: ConnectionStats
    read_bytes: Callable[[], tuple[int, int]]  # cumulative (sent, received), Istio's directions
    abort: Callable[[str], None]
    log_fields: dict[str, Any]
    policy_input: Connection | None = None  # inbound: what the decision was made on
    destination_key: str | None = None  # inbound: "ns/name" of the local destination workload
    id: int = field(default_factory=lambda: next(_ids))
    opened: float = field(default_factory=time.monotonic)
    _pushed: tuple[int, int] = (0, 0)
    closed: bool = False

    def sync(self) -> None:
        sent, received = self.read_bytes()
        ps, pr = self._pushed
        if sent > ps:
            self.stats.add_sent(sent - ps)
        if received > pr:
            self.stats.add_received(received - pr)
        self._pushed = (max(sent, ps), max(received, pr))


# Interned per-connection descriptions kept at most this many (then the cache starts over).
INTERN_LIMIT = 4096


class Tracker:
    """All open proxied connections of one agent, plus the recent-denials ring for status.

    Connections between the same two workloads describe themselves identically (labels, log
    fields), so :meth:`add` swaps each new description for an equal one already held: with
    10 000 open tunnels that is most of the agent's memory per connection beyond the sockets.
    """

    def __init__(self, metrics: AgentMetrics, access_log: AccessLog, *, denials_kept: int = 50) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self.open: dict[int, Tracked] = {}
        self.recent_denials: deque[dict[str, Any]] = deque(maxlen=denials_kept)
        self.totals = {"opened": 0, "closed": 0, "denied": 0}
        self._interned: dict[Any, Any] = {}

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

    def add(self, t: Tracked) -> Tracked:
        # Never mutated after this point: safe to share between connections.
        t.log_fields = self._intern(("fields", *t.log_fields.items()), t.log_fields)
        t.stats.labels = self._intern(t.stats.labels, t.stats.labels)
        self.open[t.id] = t
        self.totals["opened"] += 1
        return t

    def close(self, t: Tracked, reason: str) -> None:
        if t.closed:
            return
        t.closed = True
        self.open.pop(t.id, None)
        t.sync()
        t.stats.close()
        self.totals["closed"] += 1
        self.access_log.write(
            "connection_closed",
            **t.log_fields,
            direction=t.direction,
            path=t.path,
            bytes_sent=t.stats.sent,
            bytes_received=t.stats.received,
            duration_ms=round((time.monotonic() - t.opened) * 1000, 1),
            close_reason=reason,
        )

    def sync_all(self) -> None:
        for t in list(self.open.values()):
            t.sync()

    def denied(self, fields: dict[str, Any]) -> None:
        self.totals["denied"] += 1
        rec = self.access_log.write("connection_denied", **fields)
        self.recent_denials.append(rec)

    def inbound(self) -> Iterator[Tracked]:
        return (
            t for t in list(self.open.values()) if t.direction == "inbound" and t.policy_input is not None
        )

    def count(self, direction: str, path: str | None = None) -> int:
        return sum(
            1 for t in self.open.values() if t.direction == direction and (path is None or t.path == path)
        )


def decision_fields(d: Decision) -> dict[str, Any]:
    return {
        "decision": d.verdict.value,
        "policy": ",".join(d.policies) or None,
        "reason": d.reason,
        "code": d.code,
        "mtls_mode": d.mtls.mode.value if d.mtls is not None else None,
    }
