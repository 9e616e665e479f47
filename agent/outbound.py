"""Outbound path (15001): a captured connection from a local enrolled pod to its original destination.

1. :func:`agent.admission.plan_outbound` decides once: the source must be a local enrolled
   workload (capture guarantees the IP arrived on that pod's interface), the destination must
   not be one of our own listeners, and the original destination picks the route: a service
   VIP -> a healthy endpoint; an enrolled workload on another node -> HBONE to
   ``<pod ip>:15008`` presenting the source's SVID and expecting the destination's SPIFFE ID;
   an enrolled workload on this node -> authorized and delivered locally (the node's own
   traffic to a pod is not captured, so HBONE to ourselves would go to the pod itself); an
   unenrolled workload or anything outside the mesh -> plaintext passthrough.
2. This module carries the plan out. Every refusal resets the app's connection (RST), is
   counted by kind (``ztagent_handshake_failures_total{direction="outbound"}``) and logged with
   who, what and why; a failed tunnel marks a service endpoint unhealthy so the next
   connection fails over.
"""

from __future__ import annotations

import logging

from agent.admission import OutboundPlan, Rejected, RejectKind, admit_same_node, plan_outbound
from agent.context import ProxyContext
from agent.delivery import deliver_local, relay_plain
from agent.downstream import Downstream
from agent.records import Path
from mesh.config import Workload, parse_ip
from tunnel.client import OutboundTarget, TunnelError
from tunnel.hbone import Authority

log = logging.getLogger("ztagent.outbound")

# Refusals that mean the mesh cannot carry this connection safely: logged as errors.
_SERIOUS = frozenset({RejectKind.WAYPOINT_UNSUPPORTED, RejectKind.WAYPOINT_MISSING, RejectKind.NO_CREDENTIAL})


def _refuse(ctx: ProxyContext, down: Downstream, rejected: Rejected, **fields: object) -> None:
    level = logging.ERROR if rejected.kind in _SERIOUS else logging.WARNING
    log.log(level, f"{rejected.reason}; refused",
            extra={"event": f"outbound_{rejected.kind.value.replace('-', '_')}", **fields})  # fmt: skip
    ctx.metrics.handshake_failures.labels("outbound", rejected.kind.value).inc()
    down.reset()


async def handle_outbound(ctx: ProxyContext, down: Downstream, original: tuple[str, int]) -> None:
    plan = plan_outbound(
        ctx.store,
        local_node=ctx.node_name,
        source_ip=down.peer_ip,
        original=original,
        to_own_listener=ctx.is_own_listener(original),
    )
    if isinstance(plan, Rejected):
        _refuse(ctx, down, plan, source_ip=down.peer[0])
        return
    if plan.path is Path.HBONE:
        await _hbone(ctx, down, plan)
    elif plan.path is Path.SAME_NODE:
        await _same_node(ctx, down, plan)
    else:
        await _passthrough(ctx, down, plan)


async def _hbone(ctx: ProxyContext, down: Downstream, plan: OutboundPlan) -> None:
    source, route, rec = plan.source, plan.route, plan.record
    dest = route.workload
    assert dest is not None or plan.waypoint is not None
    try:
        cred = ctx.credential(source.spiffe_id)
    except LookupError as exc:
        _refuse(ctx, down, Rejected(503, RejectKind.NO_CREDENTIAL,
                                    f"{source.key}: no certificate to present ({exc})"),
                identity=str(source.spiffe_id))  # fmt: skip
        return
    wp = plan.waypoint
    if wp is not None and plan.original is not None:
        # ztunnel's waypoint path: HBONE to the waypoint's address, expecting its identity;
        # the CONNECT authority is the original destination (the service VIP:port), so the
        # waypoint knows which service (and policy) the connection is for.
        dst_ip, dst_port = plan.original
        agent_address = Authority.of(str(wp.addresses[0]), wp.hbone_port)
        expected = (wp.spiffe_id,)
        dest_key = f"waypoint {wp.key}"
    else:
        assert dest is not None
        dst_ip, dst_port = route.address
        agent_address = Authority.of(dst_ip, ctx.hbone_port)
        expected = (dest.spiffe_id,)
        dest_key = dest.key
    target = OutboundTarget(
        source=cred,
        destination=Authority.of(dst_ip, dst_port),
        agent_address=agent_address,
        expected_identities=expected,
        source_address=Authority.of(plan.source_ip, down.peer[1]),
        baggage=baggage(source),
    )
    try:
        stream = await ctx.establish(target, down.reset)
    except TunnelError as exc:
        # The tunnel's message already says what is likely wrong (blocked port, no agent, ...).
        log.warning(
            f"{source.key} -> {dest_key} ({dst_ip}:{dst_port}) over HBONE via {agent_address}: {exc}",
            extra={"event": "tunnel_failed", "kind": exc.kind, "status": exc.status,
                   "source_workload": source.key, "destination_workload": dest_key},
        )  # fmt: skip
        if exc.status is None:
            ctx.metrics.handshake_failures.labels("outbound", exc.kind).inc()
        if wp is None and route.service is not None and exc.kind in ("connect-refused", "connect-timeout"):
            ctx.store.mark_unhealthy(dst_ip, dst_port)  # the next connection fails over
        ctx.connections.failed(rec, exc.kind, str(exc), status=exc.status)
        return
    try:
        down.hand_over(stream.tcp_protocol())
    except ConnectionError as exc:
        stream.abort(reason=str(exc))
        return
    info = stream.info
    rec.read_bytes = lambda: (info.bytes_sent, info.bytes_received)
    rec.abort = lambda reason: stream.abort(reason=reason)
    ctx.connections.opened(rec)
    # This task ends here; the stream and its record carry the connection from now on (a
    # suspended handler per open connection cost ~2 KB, a tenth of an idle tunnel). On shutdown
    # the worker aborts every open record, which completes ``done``.
    tracker = ctx.connections
    stream.done.add_done_callback(lambda _f: tracker.closed(rec, info.close_reason or "closed"))


async def _same_node(ctx: ProxyContext, down: Downstream, plan: OutboundPlan) -> None:
    dst_ip = parse_ip(plan.route.address[0])
    admitted = admit_same_node(ctx.store, source=plan.source, source_ip=plan.source_ip, route=plan.route,
                               destination_ip=dst_ip)  # fmt: skip
    if isinstance(admitted, Rejected):
        assert admitted.record is not None and admitted.record.decision is not None
        ctx.connections.decided(admitted.record, admitted.record.decision)
        down.reset()
        return
    assert admitted.record.decision is not None
    ctx.connections.decided(admitted.record, admitted.record.decision)
    await deliver_local(ctx, down, admitted)


async def _passthrough(ctx: ProxyContext, down: Downstream, plan: OutboundPlan) -> None:
    """Unenrolled or external destination: plaintext, from the node (the agent's own traffic is
    never captured, so this cannot loop)."""
    route, rec = plan.route, plan.record
    dst_ip, dst_port = route.address
    try:
        up = await ctx.connect_upstream(dst_ip, dst_port, None)
    except (OSError, TimeoutError) as exc:
        log.info(
            f"{plan.source.key} -> {dst_ip}:{dst_port} (passthrough): {exc!r}",
            extra={"event": "passthrough_failed", "source_workload": plan.source.key},
        )
        if route.service is not None:
            ctx.store.mark_unhealthy(dst_ip, dst_port)
        down.reset()
        return
    await relay_plain(ctx, down, up, rec)


def baggage(w: Workload) -> str:
    """W3C baggage as ztunnel sends it: who the source is, for the destination's telemetry."""
    items = {
        "k8s.namespace.name": w.namespace,
        "k8s.pod.name": w.name,
        "service.name": w.labels.get("app", w.name),
        "service.version": w.labels.get("version", "latest"),
    }
    return ",".join(f"{k}={v}" for k, v in items.items())


__all__ = ["baggage", "handle_outbound"]
