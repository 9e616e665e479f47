"""Admission: one decision per new connection and direction, made from one request context.

Nothing here does I/O. Each ``admit_*`` function looks the connection's facts up once (verified
peer identity, trusted source address and workload, destination workload and port, the policy
input), asks the policy index once, and returns either :class:`Admitted` (with the
:class:`~agent.records.ConnectionRecord` that carries those facts from then on) or
:class:`Rejected` (an HBONE status, a typed kind and a reason that says who, what and why).
The callers in :mod:`agent.inbound` and :mod:`agent.outbound` only carry out the answer:
connect, reply, relay — ztunnel's order (``inbound.rs``: build the request context, RBAC +
connect, 200, copy).

Trust rule for an HBONE peer's ``forwarded: for=`` (ztunnel treats it as the peer's untrusted
claim): the claimed address is believed only when it belongs to a workload whose identity the
peer proved in the mTLS handshake, or is the peer's own address; otherwise the TCP peer address
stands in. Admission and the re-check on a policy change use the same rule, so a re-check sees
what admission saw.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.records import ConnectionRecord, Direction, Path, Security
from identity.spiffe import SpiffeId
from mesh.config import IPAddress, Node, Service, Workload
from mesh.model import Waypoint
from mesh.store import DestinationKind, MissingWaypoint, Route
from policy import Connection, Decision, PolicyIndex

# HBONE statuses (tunnel.hbone.Status values; plaintext paths answer every rejection with a reset).
BAD_REQUEST = 400
UNAUTHORIZED = 401
SERVICE_UNAVAILABLE = 503


class RejectKind(enum.StrEnum):
    """Why a connection was refused: a low-cardinality metrics label and a log field."""

    NOT_LOCAL = "not-local"  # HBONE authority is not an enrolled workload on this node (never a relay)
    UNKNOWN_DESTINATION = "unknown-destination"  # captured plaintext to something we don't serve
    DENIED = "denied"  # policy (PeerAuthentication / AuthorizationPolicy)
    UNKNOWN_SOURCE = "unknown-source"  # outbound from an address that is no enrolled local workload
    LOOP = "loop"  # outbound to one of the agent's own listeners
    NO_ENDPOINT = "no-endpoint"  # a service VIP with no endpoint on that port
    WAYPOINT_UNSUPPORTED = "waypoint-unsupported"  # the destination needs a waypoint this agent cannot use
    WAYPOINT_MISSING = "waypoint-missing"  # istio.io/use-waypoint names a waypoint the mesh lacks
    NO_CREDENTIAL = "no-credential"  # no valid certificate for the source identity
    UPSTREAM_FAILED = "upstream-failed"  # the pod (or passthrough destination) did not accept


@dataclass(frozen=True, slots=True)
class Rejected:
    status: int  # what an HBONE stream answers (400/401/503)
    kind: RejectKind
    reason: str
    record: ConnectionRecord | None = None  # set when the facts were known (denials): for the logs


@dataclass(frozen=True, slots=True)
class Admitted:
    record: ConnectionRecord
    # Deliver to the pod from this address (the original source, kept with IP_TRANSPARENT), or
    # from the node when None.
    deliver_from: IPAddress | None = None
    # HBONE only: the peer claimed a source address that is not a workload with its identity,
    # so the peer's own address stands in (the caller logs it).
    untrusted_claim: IPAddress | None = None


class StoreView(Protocol):
    """What admission reads of the mesh (:class:`mesh.store.WorkloadStore` provides it)."""

    @property
    def policy_index(self) -> PolicyIndex: ...
    def by_ip(self, ip: str | IPAddress) -> Workload | None: ...
    def by_name(self, namespace: str, name: str) -> Workload | None: ...
    def is_local_enrolled_ip(self, ip: str | IPAddress) -> Workload | None: ...
    def services_of(self, workload: Workload) -> Sequence[Service]: ...
    def route(self, dst_ip: str, dst_port: int) -> Route | None: ...
    def node_named(self, name: str) -> Node | None: ...


# --------------------------------------------------------------------------------------------
# Inbound


def verified_workload(store: StoreView, peer: SpiffeId, ip: IPAddress | None) -> Workload | None:
    """The workload at ``ip``, but only if its SPIFFE ID is the authenticated ``peer``."""
    if ip is None:
        return None
    w = store.by_ip(ip)
    if w is None or w.spiffe_id != peer:
        return None
    return w


def trusted_source(
    store: StoreView, peer: SpiffeId, claimed: IPAddress | None, peer_ip: IPAddress
) -> tuple[IPAddress, Workload | None]:
    """The source address to believe for an HBONE stream, and the source workload if verified."""
    if claimed is not None:
        w = verified_workload(store, peer, claimed)
        if w is not None or claimed == peer_ip:
            return claimed, w
    return peer_ip, verified_workload(store, peer, peer_ip)


def policy_input(source: SpiffeId | None, source_ip: IPAddress | None, dest: Workload, dest_ip: IPAddress,
                 port: int) -> Connection:  # fmt: skip
    return Connection(
        source_principal=source.principal if source is not None else None,
        source_ip=source_ip,
        destination_namespace=dest.namespace,
        destination_port=port,
        destination_labels=dest.labels,
        destination_ip=dest_ip,
    )


def _service_for_port(store: StoreView, dest: Workload, port: int) -> Service | None:
    """The destination service a connection to ``dest``'s target ``port`` most likely used."""
    for s in store.services_of(dest):
        if any(p.target_port == port for p in s.ports):
            return s
    return None


def _decide(store: StoreView, record: ConnectionRecord, conn: Connection) -> Decision:
    d = store.policy_index.check(conn)
    record.decision = d
    record.policy_input = conn
    return d


def admit_hbone(
    store: StoreView,
    *,
    peer_identity: SpiffeId,
    peer_ip: IPAddress,
    local_ip: IPAddress,
    destination_ip: IPAddress,
    destination_port: int,
    claimed_source: IPAddress | None,
) -> Admitted | Rejected:
    """One HBONE CONNECT stream arriving at this node's agent."""
    where = f"{destination_ip}:{destination_port}"
    if destination_ip != local_ip:
        # ztunnel's rule: the CONNECT IP must be the local workload the connection arrived for.
        return Rejected(BAD_REQUEST, RejectKind.NOT_LOCAL,
                        f"{where} is not the workload this connection was made to ({local_ip})")  # fmt: skip
    dest = store.is_local_enrolled_ip(destination_ip)
    if dest is None:
        reason = f"{where} is not an enrolled workload on this node"
        return Rejected(BAD_REQUEST, RejectKind.NOT_LOCAL, reason)
    source_ip, source_w = trusted_source(store, peer_identity, claimed_source, peer_ip)
    record = ConnectionRecord(
        direction=Direction.INBOUND,
        path=Path.HBONE,
        security=Security.MUTUAL_TLS,
        destination=(str(destination_ip), destination_port),
        source_workload=source_w,
        source_identity=peer_identity,
        source_ip=source_ip,
        destination_workload=dest,
        destination_identity=dest.spiffe_id,
        service=_service_for_port(store, dest, destination_port),
    )
    d = _decide(store, record, policy_input(peer_identity, source_ip, dest, destination_ip, destination_port))
    if not d.allowed:
        return Rejected(UNAUTHORIZED, RejectKind.DENIED, f"denied: {d.reason}", record)
    believed = claimed_source is not None and source_ip == claimed_source and claimed_source != peer_ip
    untrusted = claimed_source if claimed_source is not None and source_ip != claimed_source else None
    # Deliver from the original source only when the claim was believed, and never as the
    # destination itself (a connection to oneself cannot be faked).
    deliver_from = source_ip if believed and source_ip != destination_ip else None
    return Admitted(record, deliver_from=deliver_from, untrusted_claim=untrusted)


def admit_plaintext(
    store: StoreView, *, source_ip: IPAddress | None, destination_ip: IPAddress, destination_port: int
) -> Admitted | Rejected:
    """A captured non-mesh connection to a local pod (15006): STRICT refuses, PERMISSIVE admits."""
    where = f"{destination_ip}:{destination_port}"
    dest = store.is_local_enrolled_ip(destination_ip)
    if dest is None:
        reason = f"plaintext connection from {source_ip} to {where}: not an enrolled local workload"
        return Rejected(BAD_REQUEST, RejectKind.UNKNOWN_DESTINATION, reason)
    record = ConnectionRecord(
        direction=Direction.INBOUND,
        path=Path.PLAINTEXT,
        security=Security.NONE,
        destination=(str(destination_ip), destination_port),
        source_workload=store.by_ip(source_ip) if source_ip is not None else None,
        source_ip=source_ip,
        destination_workload=dest,
        destination_identity=dest.spiffe_id,
    )
    d = _decide(store, record, policy_input(None, source_ip, dest, destination_ip, destination_port))
    if not d.allowed:
        return Rejected(UNAUTHORIZED, RejectKind.DENIED, f"denied: {d.reason}", record)
    return Admitted(record, deliver_from=source_ip)


def admit_same_node(
    store: StoreView, *, source: Workload, source_ip: IPAddress, route: Route, destination_ip: IPAddress
) -> Admitted | Rejected:
    """Both ends on this node: authorized as the destination agent would authorize it.

    The source identity is as strong as on HBONE: the capture tied the connection to the source
    pod's interface, and this agent holds that pod's identity."""
    dest = route.workload
    assert dest is not None
    port = route.address[1]
    record = ConnectionRecord(
        direction=Direction.INBOUND,
        path=Path.SAME_NODE,
        security=Security.MUTUAL_TLS,
        destination=route.address,
        source_workload=source,
        source_identity=source.spiffe_id,
        source_ip=source_ip,
        destination_workload=dest,
        destination_identity=dest.spiffe_id,
    )
    d = _decide(store, record, policy_input(source.spiffe_id, source_ip, dest, destination_ip, port))
    if not d.allowed:
        return Rejected(UNAUTHORIZED, RejectKind.DENIED, f"denied: {d.reason}", record)
    return Admitted(record, deliver_from=source_ip)


def recheck(store: StoreView, record: ConnectionRecord, local_node: str) -> Decision | str | None:
    """Re-evaluate an open inbound connection with the current policy and mesh.

    Returns None when it stays allowed, a Decision when policy now denies it, or a reason
    string when its destination is no longer an enrolled workload on this node."""
    conn, admitted = record.policy_input, record.destination_workload
    if conn is None or admitted is None:
        return None
    w = store.by_name(admitted.namespace, admitted.name)
    if w is None or not w.enrolled or w.node != local_node:
        return "destination no longer an enrolled workload on this node"
    d = store.policy_index.check(
        Connection(
            source_principal=conn.source_principal,
            source_ip=conn.source_ip,
            destination_namespace=w.namespace,
            destination_port=conn.destination_port,
            destination_labels=w.labels,
            destination_ip=conn.destination_ip,
        )
    )
    return None if d.allowed else d


# --------------------------------------------------------------------------------------------
# Outbound


@dataclass(frozen=True, slots=True)
class OutboundPlan:
    """Where an admitted outbound connection goes, and the record describing it."""

    path: Path  # HBONE, SAME_NODE or PASSTHROUGH
    source: Workload
    source_ip: IPAddress
    route: Route
    record: ConnectionRecord
    # Set when the destination is waypoint-fronted: HBONE goes to the waypoint (its address
    # and identity), the CONNECT authority stays the original destination (ztunnel's rule).
    waypoint: Waypoint | None = None
    original: tuple[str, int] | None = None


def plan_outbound(
    store: StoreView,
    *,
    local_node: str,
    source_ip: IPAddress | None,
    original: tuple[str, int],
    to_own_listener: bool,
) -> OutboundPlan | Rejected:
    """A captured connection from a local pod to ``original``: pick the route, once."""
    dst = f"{original[0]}:{original[1]}"
    source = store.is_local_enrolled_ip(source_ip) if source_ip is not None else None
    if source is None or source_ip is None:
        return Rejected(BAD_REQUEST, RejectKind.UNKNOWN_SOURCE,
                        f"outbound connection from {source_ip} to {dst}: the source is not an enrolled "
                        "workload on this node")  # fmt: skip
    if to_own_listener:
        reason = f"{source.key} -> {dst}: the agent's own listener (loop)"
        return Rejected(BAD_REQUEST, RejectKind.LOOP, reason)
    route = store.route(original[0], original[1])
    if route is None:
        return Rejected(SERVICE_UNAVAILABLE, RejectKind.NO_ENDPOINT,
                        f"{source.key} -> {dst}: service has no endpoint on that port")  # fmt: skip
    wp = route.waypoint
    if isinstance(wp, MissingWaypoint):
        # Going direct would skip the L7 policy the label asked for: refuse (fail closed).
        return Rejected(SERVICE_UNAVAILABLE, RejectKind.WAYPOINT_MISSING,
                        f"{source.key} -> {dst}: istio.io/use-waypoint names waypoint {wp.key}, which "
                        "the mesh config does not declare")  # fmt: skip
    if wp is not None and not isinstance(wp, Waypoint):
        return Rejected(SERVICE_UNAVAILABLE, RejectKind.WAYPOINT_UNSUPPORTED,
                        f"{source.key} -> {dst}: destination has a waypoint ({wp!r}) this agent cannot "
                        "route to")  # fmt: skip
    if wp is not None:
        if source.spiffe_id == wp.spiffe_id:
            # The waypoint's own upstream traffic is never sent back to it (a loop).
            return Rejected(BAD_REQUEST, RejectKind.LOOP, f"{source.key} -> {dst}: from its own waypoint")
        if not wp.addresses:
            return Rejected(SERVICE_UNAVAILABLE, RejectKind.WAYPOINT_UNSUPPORTED,
                            f"{source.key} -> {dst}: waypoint {wp.key} has no address")  # fmt: skip
        record = ConnectionRecord(
            direction=Direction.OUTBOUND,
            path=Path.HBONE,
            security=Security.MUTUAL_TLS,
            destination=original,
            source_workload=source,
            source_identity=source.spiffe_id,
            destination_identity=wp.spiffe_id,
            service=route.service,
            note=f"via waypoint {wp.key}",
        )
        return OutboundPlan(Path.HBONE, source, source_ip, route, record, waypoint=wp, original=original)
    dest = route.workload
    if route.kind is DestinationKind.WORKLOAD and dest is not None:
        path = Path.SAME_NODE if dest.node == local_node else Path.HBONE
        record = ConnectionRecord(
            direction=Direction.OUTBOUND,
            path=path,
            security=Security.MUTUAL_TLS,
            destination=route.address,
            source_workload=source,
            source_identity=source.spiffe_id,
            destination_workload=dest,
            destination_identity=dest.spiffe_id,
            service=route.service,
        )
        return OutboundPlan(path, source, source_ip, route, record)
    record = ConnectionRecord(
        direction=Direction.OUTBOUND,
        path=Path.PASSTHROUGH,
        security=Security.NONE,
        destination=route.address,
        source_workload=source,
        source_identity=source.spiffe_id,
        destination_workload=dest,
        service=route.service,
        note=f"destination is {route.kind.value}: passthrough",
    )
    return OutboundPlan(Path.PASSTHROUGH, source, source_ip, route, record)


__all__ = [
    "Admitted",
    "OutboundPlan",
    "RejectKind",
    "Rejected",
    "StoreView",
    "admit_hbone",
    "admit_plaintext",
    "admit_same_node",
    "plan_outbound",
    "recheck",
    "trusted_source",
    "verified_workload",
]
