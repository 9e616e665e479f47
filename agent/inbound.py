"""Inbound at the destination node: HBONE streams, plaintext (15006), and local delivery.

Each path asks :mod:`agent.admission` once, accounts for the decision, then carries it out:
HBONE answers with the tunnel server's status (401 denied, 400 not a local workload, 503
upstream failed, else 200 and relay); plaintext and same-node delivery reset a refused
connection and otherwise relay to the pod from the original source address.
"""

from __future__ import annotations

import logging

from agent.admission import Rejected, RejectKind, admit_hbone, admit_plaintext
from agent.context import ProxyContext
from agent.delivery import deliver_local
from agent.downstream import Downstream
from agent.records import ConnectionRecord, baggage
from agent.tracking import ConnectionTracker
from mesh.config import parse_ip
from tunnel.hbone import Status
from tunnel.relay import TunnelStream
from tunnel.server import Accept, Refuse, StreamRequest

log = logging.getLogger("ztagent.inbound")


class _CarriedStream:
    """The tunnel server's per-stream observer: ties one admitted stream to its record."""

    __slots__ = ("record", "tracker")

    def __init__(self, tracker: ConnectionTracker, record: ConnectionRecord) -> None:
        self.tracker = tracker
        self.record = record

    def opened(self, stream: TunnelStream) -> None:
        info = stream.info
        rec = self.record
        rec.read_bytes = lambda: (info.bytes_sent, info.bytes_received)
        rec.abort = lambda reason: stream.abort(reason=reason)
        self.tracker.opened(rec)

    def closed(self, stream: TunnelStream) -> None:
        self.tracker.closed(self.record, stream.info.close_reason or "closed")


class HboneInbound:
    """The HBONE server's admission for this node: one call per CONNECT stream."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx

    async def __call__(self, req: StreamRequest) -> Accept | Refuse:
        ctx = self.ctx
        conn = req.connection
        outcome = admit_hbone(
            ctx.store,
            peer_identity=conn.peer_identity,
            peer_ip=conn.peer.ip,
            local_ip=conn.local.ip,
            destination_ip=req.destination.ip,
            destination_port=req.destination.port,
            claimed_source=req.forwarded.ip if req.forwarded is not None else None,
        )
        if isinstance(outcome, Rejected):
            if outcome.record is not None and outcome.record.decision is not None:
                ctx.connections.decided(outcome.record, outcome.record.decision)
            return Refuse(Status(outcome.status), outcome.kind.value, outcome.reason)
        rec = outcome.record
        assert rec.decision is not None
        ctx.connections.decided(rec, rec.decision)
        if outcome.untrusted_claim is not None:
            log.warning(
                f"HBONE peer {conn.peer_identity} at {conn.peer.ip} claims source {outcome.untrusted_claim} "
                "(forwarded: for=), which is not a workload with that identity; using the peer address",
                extra={
                    "event": "untrusted_forwarded_source",
                    "source_principal": str(conn.peer_identity),
                    "source_ip": str(conn.peer.ip),
                    "claimed_source_ip": str(outcome.untrusted_claim),
                },
            )
        try:
            dst = req.destination
            sock = await ctx.connect_upstream(str(dst.ip), dst.port, outcome.deliver_from)
        except (OSError, TimeoutError) as exc:
            reason = f"upstream connect failed: {exc!r}"
            ctx.connections.failed(rec, RejectKind.UPSTREAM_FAILED.value, reason, status=503)
            return Refuse(Status.SERVICE_UNAVAILABLE, RejectKind.UPSTREAM_FAILED.value, reason)
        dw = rec.destination_workload
        # ztunnel's 200 carries the destination's baggage (who answered, for the source's telemetry).
        headers = (("baggage", baggage(dw, ctx.metrics.cluster_id)),) if dw is not None else ()
        return Accept(sock, _CarriedStream(ctx.connections, rec), response_headers=headers)


def _refuse(ctx: ProxyContext, down: Downstream, rejected: Rejected) -> None:
    """Reset a refused downstream connection, counting and logging why."""
    rec = rejected.record
    if rec is not None and rec.decision is not None:
        ctx.connections.decided(rec, rec.decision)
    else:
        log.warning(rejected.reason, extra={"event": f"inbound_{rejected.kind.value.replace('-', '_')}"})
        ctx.metrics.handshake_failures.labels("inbound", rejected.kind.value).inc()
    down.reset()


async def handle_plaintext(ctx: ProxyContext, down: Downstream, original: tuple[str, int]) -> None:
    """A captured non-mesh connection to a local pod: STRICT refuses, PERMISSIVE admits."""
    try:
        dst_ip = parse_ip(original[0])
    except ValueError:
        down.reset()
        return
    outcome = admit_plaintext(ctx.store, source_ip=down.peer_ip, destination_ip=dst_ip,
                              destination_port=original[1])  # fmt: skip
    if isinstance(outcome, Rejected):
        _refuse(ctx, down, outcome)
        return
    rec = outcome.record
    assert rec.decision is not None and rec.destination_workload is not None
    ctx.connections.decided(rec, rec.decision)
    ctx.metrics.plaintext_connections.labels(rec.destination_workload.namespace).inc()
    await deliver_local(ctx, down, outcome)


__all__ = ["HboneInbound", "handle_plaintext"]
