"""One record per proxied connection: the facts are written once, everything else is derived.

A :class:`ConnectionRecord` holds what the agent learned about a connection when it admitted it
(direction, path, security, both workloads and principals, the service, the destination
address, the decision and the policy input). The Istio metric labels
(:meth:`ConnectionRecord.labels`), the access-log line (:meth:`ConnectionRecord.log_fields`) and
the admin views are derived from it, so the three can never disagree about a connection.

The derived forms are computed when needed (labels once, at open; log fields at close or
denial), not held per connection: with 10 000 open tunnels a per-connection dict of log fields
was a measurable part of the agent's memory per tunnel.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.metrics import DEFAULT_CLUSTER_ID, ConnectionLabels, ConnectionStats
from identity.spiffe import SpiffeId
from mesh.config import IPAddress, Service, Workload
from policy import Connection, Decision


class Direction(enum.StrEnum):
    INBOUND = "inbound"  # this node serves the destination (Istio reporter "destination")
    OUTBOUND = "outbound"  # this node serves the source (reporter "source")

    @property
    def reporter(self) -> str:
        return "destination" if self is Direction.INBOUND else "source"


class Path(enum.StrEnum):
    HBONE = "hbone"  # over an HBONE tunnel (mTLS between agents)
    PLAINTEXT = "plaintext"  # a non-mesh client to a local pod (15006, PERMISSIVE)
    SAME_NODE = "same-node"  # both ends on this node: authorized and delivered locally
    PASSTHROUGH = "passthrough"  # to something outside the mesh, plaintext from the node


class Security(enum.StrEnum):
    """Istio's ``connection_security_policy`` values."""

    MUTUAL_TLS = "mutual_tls"
    NONE = "none"


# Istio's canonical-service labels, with its fallbacks (app, then the workload name).
CANONICAL_NAME = "service.istio.io/canonical-name"
CANONICAL_REVISION = "service.istio.io/canonical-revision"

_ids = itertools.count(1)


def _workload_labels(prefix: str, w: Workload | None, principal: str | None, cluster: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if principal:
        out[f"{prefix}_principal"] = principal
    if w is None:
        return out
    labels = w.labels
    app = labels.get("app.kubernetes.io/name") or labels.get("app")
    version = labels.get("app.kubernetes.io/version") or labels.get("version")
    canonical = labels.get(CANONICAL_NAME) or app or w.name
    revision = labels.get(CANONICAL_REVISION) or version or "latest"
    out.update(
        {
            f"{prefix}_workload": w.name,
            f"{prefix}_workload_namespace": w.namespace,
            # ztunnel reports the canonical service and revision as app and version.
            f"{prefix}_app": canonical,
            f"{prefix}_version": revision,
            f"{prefix}_canonical_service": canonical,
            f"{prefix}_canonical_revision": revision,
            f"{prefix}_cluster": cluster,
        }
    )
    return out


def baggage(w: Workload, cluster_id: str = DEFAULT_CLUSTER_ID) -> str:
    """W3C baggage for ``w`` in Istio's format (``k8s.cluster.name=...,k8s.namespace.name=...,
    k8s.<type>.name=...,service.name=<canonical>,service.version=<revision>``): what the
    destination puts on its HBONE 200 so the source's telemetry knows who answered. The mesh
    model has pods, not their controllers, so the type is ``pod``."""
    labels = _workload_labels("w", w, None, cluster_id)
    items = (
        ("k8s.cluster.name", cluster_id),
        ("k8s.namespace.name", w.namespace),
        ("k8s.pod.name", w.name),
        ("service.name", labels["w_canonical_service"]),
        ("service.version", labels["w_canonical_revision"]),
    )
    return ",".join(f"{k}={v}" for k, v in items)


def decision_fields(d: Decision) -> dict[str, Any]:
    """A decision as the access log and status show it."""
    return {
        "decision": d.verdict.value,
        "policy": ",".join(d.policies) or None,
        "reason": d.reason,
        "code": d.code,
        "mtls_mode": d.mtls.mode.value if d.mtls is not None else None,
    }


def _never_aborts(reason: str) -> None:
    return None


def _no_bytes() -> tuple[int, int]:
    return (0, 0)


@dataclass(slots=True, eq=False)
class ConnectionRecord:
    """What the agent knows about one proxied connection, from admission to close."""

    direction: Direction
    path: Path
    security: Security
    destination: tuple[str, int]  # the address delivered to (endpoint ip:targetPort, or original)
    source_workload: Workload | None = None
    # Identities are kept as the SpiffeId objects the TLS session and the workloads already
    # hold (shared), and only turned into strings for labels and logs.
    source_identity: SpiffeId | None = None  # authenticated source; None for plaintext
    source_ip: IPAddress | None = None  # the trusted source address (inbound)
    destination_workload: Workload | None = None
    destination_identity: SpiffeId | None = None
    service: Service | None = None
    decision: Decision | None = None  # inbound and same-node: what admitted it
    policy_input: Connection | None = None  # inbound: what the decision was made on (re-checks)
    note: str | None = None  # e.g. why a connection went plaintext
    # Live state, set once the connection is carried.
    read_bytes: Callable[[], tuple[int, int]] = _no_bytes  # cumulative (sent, received), Istio's sense
    abort: Callable[[str], None] = _never_aborts
    stats: ConnectionStats | None = None
    id: int = field(default_factory=lambda: next(_ids))
    opened: float = field(default_factory=time.monotonic)
    closed: bool = False
    _pushed: tuple[int, int] = (0, 0)

    @property
    def reporter(self) -> str:
        return self.direction.reporter

    @property
    def source_principal(self) -> str | None:
        """``spiffe://...`` of the source, as labels and logs name it."""
        return str(self.source_identity) if self.source_identity is not None else None

    @property
    def destination_principal(self) -> str | None:
        return str(self.destination_identity) if self.destination_identity is not None else None

    @property
    def destination_key(self) -> str | None:
        w = self.destination_workload
        return w.key if w is not None else None

    def labels(self, cluster_id: str = DEFAULT_CLUSTER_ID) -> ConnectionLabels:
        """The Istio TCP metric labels of this connection, as ztunnel derives them; known
        workloads are in cluster ``cluster_id``."""
        fields: dict[str, Any] = {}
        fields.update(_workload_labels("source", self.source_workload, self.source_principal, cluster_id))
        fields.update(
            _workload_labels("destination", self.destination_workload, self.destination_principal, cluster_id)
        )
        if self.service is not None:
            fields["destination_service"] = self.service.hostname
            fields["destination_service_name"] = self.service.name
            fields["destination_service_namespace"] = self.service.namespace
        elif self.destination_workload is not None:
            # Istio reports the workload name as destination_service_name when no service was used.
            fields["destination_service_name"] = self.destination_workload.name
            fields["destination_service_namespace"] = self.destination_workload.namespace
        # Both reporters of an HBONE connection say mutual_tls (ztunnel does; the workload
        # dashboard's mTLS lock is drawn from it).
        return ConnectionLabels(
            reporter=self.reporter, connection_security_policy=self.security.value, **fields
        )

    def log_fields(self) -> dict[str, Any]:
        """The access log's description of this connection (without the event's own fields)."""
        sw, dw, svc = self.source_workload, self.destination_workload, self.service
        out: dict[str, Any] = {
            "reporter": self.reporter,
            "direction": self.direction.value,
            "path": self.path.value,
            "source_ip": str(self.source_ip) if self.source_ip is not None else None,
            "source_workload": sw.key if sw is not None else None,
            "source_principal": self.source_principal,
            "destination_workload": dw.key if dw is not None else None,
            "destination_principal": self.destination_principal,
            "destination": f"{self.destination[0]}:{self.destination[1]}",
            "destination_service": svc.hostname if svc is not None else None,
            "security": self.security.value,
        }
        if self.decision is not None:
            out.update(decision_fields(self.decision))
        elif self.direction is Direction.INBOUND:
            out["decision"] = "ALLOW"
        if self.note is not None:
            out["reason"] = self.note
        return out

    def sync(self) -> None:
        """Push byte counts read since the last sync to the Prometheus counters."""
        if self.stats is None:
            return
        sent, received = self.read_bytes()
        ps, pr = self._pushed
        if sent > ps:
            self.stats.add_sent(sent - ps)
        if received > pr:
            self.stats.add_received(received - pr)
        self._pushed = (max(sent, ps), max(received, pr))


__all__ = ["ConnectionRecord", "Direction", "Path", "Security", "baggage", "decision_fields"]
