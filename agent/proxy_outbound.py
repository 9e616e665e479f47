"""Outbound path (15001): a captured connection from a local enrolled pod to its original destination.

1. The source workload is the local enrolled workload owning the peer IP (capture guarantees
   the IP arrived on that pod's interface). Anything else is refused: the agent proxies only
   for pods it holds identities for.
2. The original destination picks the route (:meth:`mesh.store.WorkloadStore.route`):
   a service VIP -> a healthy endpoint; an enrolled workload on another node -> HBONE to
   ``<pod ip>:15008`` presenting the source's SVID and expecting the destination's SPIFFE ID;
   an enrolled workload on this node -> authorized and delivered locally (the node's own traffic
   to a pod is not captured, so HBONE to ourselves would go to the pod itself); an unenrolled
   workload or anything outside the mesh -> plaintext passthrough.
3. Failures reset the app's connection (RST), are counted by reason and logged with a hint.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from agent.metrics import ConnectionStats
from agent.node.tracking import Tracked, connection_labels, decision_fields
from agent.proxy_inbound import check_and_record, deliver_local, run_relay
from agent.proxy_plain import PlainRelay
from mesh.config import IPAddress, Workload
from mesh.store import DestinationKind, Route
from tunnel.client import OutboundTarget, TunnelError
from tunnel.hbone import Authority

if TYPE_CHECKING:
    from agent.downstream import Downstream
    from agent.node.agent import NodeAgent

log = logging.getLogger("ztagent.outbound")


async def handle_outbound(agent: NodeAgent, down: Downstream, original: tuple[str, int]) -> None:
    peer = down.peer
    src_ip = down.peer_ip
    store = agent.store
    source = store.is_local_enrolled_ip(src_ip) if src_ip is not None else None
    if source is None:
        log.warning(
            f"outbound connection from {peer[0]} to {original[0]}:{original[1]}: the source is not an "
            "enrolled workload on this node; refused",
            extra={"event": "outbound_unknown_source", "source_ip": peer[0]},
        )
        agent.metrics.handshake_failures.labels("outbound", "unknown-source").inc()
        down.reset()
        return
    if agent.is_own_listener(original):
        log.warning(
            f"outbound connection from {source.key} to the agent's own listener {original}: refused (loop)",
            extra={"event": "outbound_loop"},
        )
        down.reset()
        return
    route = store.route(original[0], original[1])
    if route is None:
        log.warning(
            f"{source.key} -> {original[0]}:{original[1]}: service has no endpoint on that port; refused",
            extra={"event": "no_endpoint", "source_workload": source.key},
        )
        agent.metrics.handshake_failures.labels("outbound", "no-endpoint").inc()
        down.reset()
        return
    if route.waypoint is not None:
        # Seam for the waypoint issue: HBONE to the waypoint instead of the destination. Until it
        # exists, refuse: bypassing a waypoint would skip its L7 policy (fail closed).
        log.error(
            f"{source.key} -> {original}: destination has a waypoint, which this agent cannot route to yet",
            extra={"event": "waypoint_unsupported"},
        )
        down.reset()
        return
    assert src_ip is not None
    if route.kind is DestinationKind.WORKLOAD and route.workload is not None:
        if route.workload.node == agent.node_name:
            await _same_node(agent, down, source, src_ip, route)
        else:
            await _hbone(agent, down, source, src_ip, peer[1], route)
    else:
        await _passthrough(agent, down, source, src_ip, route)


async def _hbone(
    agent: NodeAgent, down: Downstream, source: Workload, src_ip: IPAddress, src_port: int, route: Route
) -> None:
    dest = route.workload
    assert dest is not None
    try:
        cred = agent.cert_manager.current(source.spiffe_id)
    except LookupError as exc:
        log.error(
            f"{source.key}: no certificate to present ({exc}); refusing its outbound connection",
            extra={"event": "no_credential", "identity": str(source.spiffe_id)},
        )
        agent.metrics.handshake_failures.labels("outbound", "no-credential").inc()
        down.reset()
        return
    dst_ip, dst_port = route.address
    destination = Authority.of(dst_ip, dst_port)
    agent_address = Authority.of(dst_ip, agent.hbone_port)
    target = OutboundTarget(
        source=cred,
        destination=destination,
        agent_address=agent_address,
        expected_identities=(dest.spiffe_id,),
        source_address=Authority.of(src_ip, src_port),
        baggage=_baggage(source),
    )
    try:
        stream = await agent.hbone_client.establish(target, down.reset)
    except TunnelError as exc:
        # The tunnel's message already says what is likely wrong (blocked port, no agent, ...).
        log.warning(
            f"{source.key} -> {dest.key} ({dst_ip}:{dst_port}) over HBONE via {agent_address}: {exc}",
            extra={
                "event": "tunnel_failed",
                "kind": exc.kind,
                "status": exc.status,
                "source_workload": source.key,
                "destination_workload": dest.key,
            },
        )
        if exc.status is None:
            agent.metrics.handshake_failures.labels("outbound", exc.kind).inc()
        if route.service is not None and exc.kind in ("connect-refused", "connect-timeout"):
            agent.store.mark_unhealthy(dst_ip, dst_port)
        agent.tracker.access_log.write(
            "connection_failed",
            reporter="source",
            source_workload=source.key,
            source_principal=str(source.spiffe_id),
            destination_workload=dest.key,
            destination_principal=str(dest.spiffe_id),
            destination=f"{dst_ip}:{dst_port}",
            destination_service=route.service.hostname if route.service else None,
            kind=exc.kind,
            status=exc.status,
            reason=str(exc),
        )
        return
    try:
        down.hand_over(stream.tcp_protocol())
    except ConnectionError as exc:
        stream.abort(reason=str(exc))
        return
    info = stream.info
    labels = connection_labels(
        reporter="source",
        source=source,
        source_principal=str(source.spiffe_id),
        destination=dest,
        destination_principal=str(dest.spiffe_id),
        service=route.service,
        security="unknown",  # Istio's value at the source reporter
    )
    tracked = agent.tracker.add(
        Tracked(
            direction="outbound",
            path="hbone",
            stats=ConnectionStats(agent.metrics, labels),
            read_bytes=lambda: (info.bytes_sent, info.bytes_received),
            abort=lambda reason: stream.abort(reason=reason),
            log_fields={
                "reporter": "source",
                "source_workload": source.key,
                "source_principal": str(source.spiffe_id),
                "destination_workload": dest.key,
                "destination_principal": str(dest.spiffe_id),
                "destination": f"{dst_ip}:{dst_port}",
                "destination_service": route.service.hostname if route.service else None,
                "security": "mutual_tls",
            },
        )
    )
    # This task ends here; the stream and its tracker entry carry the connection from now on
    # (a suspended handler per open connection cost ~2 KB, a tenth of an idle tunnel). On
    # shutdown the agent aborts every tracked connection, which completes ``done``.
    stream.done.add_done_callback(lambda _f: agent.tracker.close(tracked, info.close_reason or "closed"))


async def _same_node(
    agent: NodeAgent, down: Downstream, source: Workload, src_ip: IPAddress, route: Route
) -> None:
    """Both ends on this node: authorize as the destination agent would, then connect locally.

    The source identity is as strong as on HBONE: the capture tied the connection to the source
    pod's interface, and we hold that pod's identity.
    """
    dest = route.workload
    assert dest is not None
    dst_ip, dst_port = route.address
    conn, d = check_and_record(
        agent,
        path="same-node",
        source_ip=src_ip,
        source=source.spiffe_id,
        destination=dest,
        destination_ip=dst_ip,
        port=dst_port,
    )
    if not d.allowed:
        down.reset()
        return
    await deliver_local(
        agent,
        down,
        dest=dest,
        dst=(dst_ip, dst_port),
        source_ip=src_ip,
        source_principal=str(source.spiffe_id),
        source_workload=source,
        policy_input=conn,
        decision=d,
        path="same-node",
        security="mutual_tls",
    )


async def _passthrough(
    agent: NodeAgent, down: Downstream, source: Workload, src_ip: IPAddress, route: Route
) -> None:
    """Unenrolled or external destination: plaintext, from the node (the agent's own traffic is
    never captured, so this cannot loop)."""
    dst_ip, dst_port = route.address
    try:
        up = await agent.upstream.connect(dst_ip, dst_port, None)
    except (OSError, TimeoutError) as exc:
        log.info(
            f"{source.key} -> {dst_ip}:{dst_port} (passthrough): {exc!r}",
            extra={"event": "passthrough_failed", "source_workload": source.key},
        )
        if route.service is not None:
            agent.store.mark_unhealthy(dst_ip, dst_port)
        down.reset()
        return
    counts = [0, 0]

    def on_bytes(direction: str, n: int) -> None:
        counts[0 if direction == "sent" else 1] += n

    relay = PlainRelay(on_bytes)
    dest = route.workload
    labels = connection_labels(
        reporter="source",
        source=source,
        source_principal=str(source.spiffe_id),
        destination=dest,
        destination_principal=None,
        service=route.service,
        security="none",
    )
    tracked = agent.tracker.add(
        Tracked(
            direction="outbound",
            path="passthrough",
            stats=ConnectionStats(agent.metrics, labels),
            read_bytes=lambda: (counts[0], counts[1]),
            abort=relay.abort,
            log_fields={
                "reporter": "source",
                "source_workload": source.key,
                "source_principal": str(source.spiffe_id),
                "destination_workload": dest.key if dest else None,
                "destination": f"{dst_ip}:{dst_port}",
                "destination_service": route.service.hostname if route.service else None,
                "security": "none",
                "reason": f"destination is {route.kind.value}: passthrough",
            },
        )
    )
    await run_relay(agent, relay, down, up, tracked)


def _baggage(w: Workload) -> str:
    """W3C baggage as ztunnel sends it: who the source is, for the destination's telemetry."""
    items = {
        "k8s.namespace.name": w.namespace,
        "k8s.pod.name": w.name,
        "service.name": w.labels.get("app", w.name),
        "service.version": w.labels.get("version", "latest"),
    }
    return ",".join(f"{k}={v}" for k, v in items.items())


__all__ = ["decision_fields", "handle_outbound"]
