"""Inbound paths at the destination node: HBONE authorization + upstream, plaintext (15006),
and same-node delivery.

Every new inbound connection is decided by :meth:`policy.PolicyIndex.check` (PeerAuthentication,
then AuthorizationPolicy) for the destination workload. Denials are counted
(``ztagent_policy_decisions_total{action="deny"}``), access-logged with policy and reason, and
answered the way the path allows: 401 on HBONE, a reset on plaintext.

Upstream connections to the pod keep the original source IP when the kernel lets us (bind to the
source with IP_TRANSPARENT; the capture routing returns the pod's replies to us). Otherwise they
come from the node, and the log says so once.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import socket
from typing import TYPE_CHECKING, Any

from agent.metrics import ConnectionStats
from agent.node.capture import IP_TRANSPARENT, IPV6_TRANSPARENT, SOL_IP, SOL_IPV6
from agent.node.tracking import Tracked, connection_labels, decision_fields
from agent.proxy_plain import PlainRelay
from identity.spiffe import SpiffeId
from mesh.config import IPAddress, Workload
from policy import Connection, Decision
from tunnel.hbone import Authority, parse_ip
from tunnel.relay import connect_numeric
from tunnel.server import AuthzDecision, AuthzRequest

if TYPE_CHECKING:
    from agent.downstream import Downstream
    from agent.node.agent import NodeAgent

log = logging.getLogger("ztagent.inbound")

UPSTREAM_CONNECT_TIMEOUT = 10.0


class UpstreamConnector:
    """Connects to local pods, preserving the source IP where possible."""

    def __init__(self, *, transparent: bool) -> None:
        self.transparent = transparent
        self._warned = False

    async def connect(self, ip: str, port: int, source_ip: IPAddress | None = None) -> socket.socket:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if source_ip is not None and (source_ip.version == 6) == (family == socket.AF_INET6):
                self._bind_source(sock, source_ip)
            await asyncio.wait_for(connect_numeric(loop, sock, (ip, port)), UPSTREAM_CONNECT_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        return sock

    def _bind_source(self, sock: socket.socket, source_ip: IPAddress) -> None:
        try:
            if self.transparent:
                if source_ip.version == 4:
                    sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
                else:
                    sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            sock.bind((str(source_ip), 0))
        except OSError as exc:
            # Not a local address and no IP_TRANSPARENT (no capture routing, or no CAP_NET_ADMIN):
            # the pod sees the node's address instead. Correct, only less informative.
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.EPERM, errno.EACCES, errno.EADDRINUSE):
                raise
            if not self._warned:
                self._warned = True
                log.warning(
                    f"cannot keep source IP {source_ip} on connections to pods ({exc.strerror}); "
                    "pods will see the node's address",
                    extra={"event": "source_ip_not_preserved"},
                )


def verified_source_workload(agent: NodeAgent, peer: SpiffeId | str, ip: IPAddress | None) -> Workload | None:
    """The workload at ``ip``, but only if its SPIFFE ID is the authenticated peer's ``peer``.

    An HBONE peer's ``forwarded: for=`` is its own claim (ztunnel treats it as untrusted): any
    mesh identity could name any address. It is believed only when the address belongs to the
    workload whose identity the peer proved in the mTLS handshake."""
    if ip is None:
        return None
    w = agent.store.by_ip(ip)
    if w is None:
        return None
    claimed = str(peer) if isinstance(peer, SpiffeId) else peer
    if w.spiffe_id.principal != claimed.removeprefix("spiffe://"):
        return None
    return w


def _source_workload(agent: NodeAgent, principal: str | None, ip: IPAddress | None) -> Workload | None:
    """The source workload for labels: by IP, but only if its identity agrees with the peer's."""
    if principal is None:
        return agent.store.by_ip(ip) if ip is not None else None
    return verified_source_workload(agent, principal, ip)


def record_decision(
    agent: NodeAgent,
    d: Decision,
    *,
    path: str,
    source_ip: IPAddress | None,
    source_principal: str | None,
    destination: Workload,
    destination_ip: str,
    port: int,
) -> None:
    agent.metrics.policy_decisions.labels("allow" if d.allowed else "deny", d.code).inc()
    if d.allowed:
        return
    src_w = _source_workload(agent, source_principal, source_ip)
    agent.tracker.denied(
        {
            "direction": "inbound",
            "path": path,
            "source_ip": str(source_ip) if source_ip is not None else None,
            "source_workload": src_w.key if src_w else None,
            "source_principal": source_principal,
            "destination_workload": destination.key,
            "destination_principal": str(destination.spiffe_id),
            "destination": f"{destination_ip}:{port}",
            **decision_fields(d),
        }
    )
    log.info(
        f"denied {source_principal or source_ip} -> {destination.key}:{port}: {d.reason}",
        extra={"event": "policy_denied", "destination_workload": destination.key, "code": d.code},
    )


def check_and_record(
    agent: NodeAgent,
    *,
    path: str,
    source_ip: IPAddress | None,
    source: SpiffeId | None,
    destination: Workload,
    destination_ip: str,
    port: int,
) -> tuple[Connection, Decision]:
    """Decide one new connection to a local workload and account for the decision (metrics,
    and for a denial the access log and status). ``source`` is the authenticated source identity
    (None for plaintext). Returns the policy input too: open connections keep it for re-checks."""
    conn = Connection(
        source_principal=source.principal if source is not None else None,
        source_ip=source_ip,
        destination_namespace=destination.namespace,
        destination_port=port,
        destination_labels=destination.labels,
        destination_ip=parse_ip(destination_ip),
    )
    d = agent.policy_index.check(conn)
    record_decision(
        agent,
        d,
        path=path,
        source_ip=source_ip,
        source_principal=str(source) if source is not None else None,
        destination=destination,
        destination_ip=destination_ip,
        port=port,
    )
    return conn, d


# --------------------------------------------------------------------------------------------
# HBONE (server callbacks)


# The source IP authorize_hbone decided to believe for this request, read by hbone_upstream. The
# tunnel server awaits the authorizer and then the connector in the same task, so the value set
# here is the one the connector sees; any other context sees the default (None: deliver from the
# node), which fails safe.
_trusted_source_ip: contextvars.ContextVar[IPAddress | None] = contextvars.ContextVar(
    "ztagent_trusted_source_ip", default=None
)


def trusted_source_ip(
    agent: NodeAgent, peer: SpiffeId | str, claimed: IPAddress | None, peer_ip: IPAddress | None
) -> IPAddress | None:
    """The source IP of an HBONE stream: the ``forwarded: for=`` claim when the store maps it to a
    workload with the peer's identity (or it is the peer's own address), else the TCP peer address.
    Admission and the re-check on policy change both use this, so they see the same source."""
    if claimed is not None and (claimed == peer_ip or verified_source_workload(agent, peer, claimed)):
        return claimed
    return peer_ip


def trusted_hbone_source(agent: NodeAgent, req: AuthzRequest) -> IPAddress:
    """``trusted_source_ip`` for an HBONE request, logging an untrusted claim."""
    claimed, peer_ip = req.source.ip, req.connection.peer.ip
    if trusted_source_ip(agent, req.peer_identity, claimed, peer_ip) == claimed:
        return claimed
    log.warning(
        f"HBONE peer {req.peer_identity} at {peer_ip} claims source {claimed} (forwarded: for=), "
        "which is not a workload with that identity; using the peer address",
        extra={
            "event": "untrusted_forwarded_source",
            "source_principal": str(req.peer_identity),
            "source_ip": str(peer_ip),
            "claimed_source_ip": str(claimed),
        },
    )
    return peer_ip


async def authorize_hbone(agent: NodeAgent, req: AuthzRequest) -> AuthzDecision:
    _trusted_source_ip.set(None)
    dest = agent.store.is_local_enrolled_ip(req.destination.ip)
    if dest is None:
        return AuthzDecision(False, f"{req.destination.ip} is not an enrolled workload on this node")
    source_ip = trusted_hbone_source(agent, req)
    _, d = check_and_record(
        agent,
        path="hbone",
        source_ip=source_ip,
        source=req.peer_identity,
        destination=dest,
        destination_ip=str(req.destination.ip),
        port=req.destination.port,
    )
    if d.allowed and source_ip != req.connection.peer.ip:
        _trusted_source_ip.set(source_ip)
    return AuthzDecision(d.allowed, d.reason)


async def hbone_upstream(agent: NodeAgent, destination: Authority, source: Authority | None) -> socket.socket:
    """The HBONE server's connector: connect to the local pod from the original source IP (the
    peer's ``forwarded: for=``), like plaintext and same-node delivery, but only when
    :func:`authorize_hbone` verified that address belongs to the peer's identity. Otherwise, or
    when it names the destination itself (a connection to oneself cannot be faked), from the node."""
    trusted = _trusted_source_ip.get()
    source_ip = None
    if source is not None and source.ip == trusted and source.ip != destination.ip:
        source_ip = source.ip
    return await agent.upstream.connect(str(destination.ip), destination.port, source_ip)


def hbone_is_local(agent: NodeAgent, authority: Authority, conn: Any) -> bool:
    """ztunnel's rule (the CONNECT IP is the workload the connection arrived for) and that
    workload must be enrolled here: never an open relay."""
    return authority.ip == conn.local.ip and agent.store.is_local_enrolled_ip(authority.ip) is not None


# --------------------------------------------------------------------------------------------
# Plaintext inbound (15006)


async def handle_plaintext(agent: NodeAgent, down: Downstream, original: tuple[str, int]) -> None:
    """A captured non-mesh connection to a local pod: STRICT refuses, PERMISSIVE admits."""
    peer = down.peer
    src_ip = down.peer_ip
    dst_ip, dst_port = original
    dest = agent.store.is_local_enrolled_ip(dst_ip)
    if dest is None:
        # Captured traffic for something we do not serve (stale enrollment?): refuse loudly.
        log.warning(
            f"plaintext connection from {peer[0]} to {dst_ip}:{dst_port}: not an enrolled local workload",
            extra={"event": "inbound_unknown_destination"},
        )
        down.reset()
        return
    conn, d = check_and_record(
        agent,
        path="plaintext",
        source_ip=src_ip,
        source=None,
        destination=dest,
        destination_ip=dst_ip,
        port=dst_port,
    )
    if not d.allowed:
        down.reset()
        return
    agent.metrics.plaintext_connections.labels(dest.namespace).inc()
    await deliver_local(
        agent,
        down,
        dest=dest,
        dst=(dst_ip, dst_port),
        source_ip=src_ip,
        source_principal=None,
        source_workload=agent.store.by_ip(src_ip) if src_ip is not None else None,
        policy_input=conn,
        decision=d,
        path="plaintext",
        security="none",
    )


async def deliver_local(
    agent: NodeAgent,
    down: Downstream,
    *,
    dest: Workload,
    dst: tuple[str, int],
    source_ip: IPAddress | None,
    source_principal: str | None,
    source_workload: Workload | None,
    policy_input: Connection,
    decision: Decision,
    path: str,
    security: str,
) -> None:
    """Connect to the local pod and relay (plaintext inbound and same-node mesh traffic)."""
    try:
        up = await agent.upstream.connect(dst[0], dst[1], source_ip)
    except (OSError, TimeoutError) as exc:
        log.warning(
            f"cannot connect to {dest.key} at {dst[0]}:{dst[1]}: {exc!r}",
            extra={"event": "upstream_failed", "destination_workload": dest.key},
        )
        agent.tracker.access_log.write(
            "connection_failed",
            reporter="destination",
            path=path,
            source_ip=str(source_ip) if source_ip is not None else None,
            source_principal=source_principal,
            destination_workload=dest.key,
            destination=f"{dst[0]}:{dst[1]}",
            kind="upstream-failed",
            reason=f"cannot connect to the pod: {exc!r}",
        )
        agent.metrics.handshake_failures.labels("inbound", "upstream-failed").inc()
        down.reset()
        return
    labels = connection_labels(
        reporter="destination",
        source=source_workload,
        source_principal=source_principal,
        destination=dest,
        destination_principal=str(dest.spiffe_id),
        service=None,
        security=security,
    )
    counts = [0, 0]

    def on_bytes(direction: str, n: int) -> None:
        counts[0 if direction == "sent" else 1] += n

    relay = PlainRelay(on_bytes)
    tracked = agent.tracker.add(
        Tracked(
            direction="inbound",
            path=path,
            stats=ConnectionStats(agent.metrics, labels),
            read_bytes=lambda: (counts[0], counts[1]),
            abort=relay.abort,
            log_fields={
                "reporter": "destination",
                "source_ip": str(source_ip) if source_ip is not None else None,
                "source_workload": source_workload.key if source_workload else None,
                "source_principal": source_principal,
                "destination_workload": dest.key,
                "destination_principal": str(dest.spiffe_id),
                "destination": f"{dst[0]}:{dst[1]}",
                "security": security,
                **decision_fields(decision),
            },
            policy_input=policy_input,
            destination_key=dest.key,
        )
    )
    await run_relay(agent, relay, down, up, tracked)


async def run_relay(
    agent: NodeAgent, relay: PlainRelay, down: Downstream, up: socket.socket, tracked: Tracked
) -> None:
    reason = "aborted"
    try:
        await relay.start(down, up)
        reason = await relay.done
    except (OSError, ConnectionError) as exc:
        reason = f"relay failed: {exc!r}"
        relay.abort(reason)
        down.reset()
        up.close()
    finally:
        agent.tracker.close(tracked, reason)
