"""Delivery of an admitted connection over plain TCP: to a local pod (plaintext inbound and
same-node mesh traffic) or to a passthrough destination, relayed until both ends finish."""

from __future__ import annotations

import logging
import socket

from agent.admission import Admitted, RejectKind
from agent.context import ProxyContext
from agent.downstream import Downstream
from agent.plain import PlainRelay
from agent.records import ConnectionRecord

log = logging.getLogger("ztagent.delivery")


async def deliver_local(ctx: ProxyContext, down: Downstream, admitted: Admitted) -> None:
    """Connect to the local pod and relay (plaintext inbound and same-node mesh traffic)."""
    rec = admitted.record
    ip, port = rec.destination
    try:
        up = await ctx.connect_upstream(ip, port, admitted.deliver_from)
    except (OSError, TimeoutError) as exc:
        log.warning(
            f"cannot connect to {rec.destination_key} at {ip}:{port}: {exc!r}",
            extra={"event": "upstream_failed", "destination_workload": rec.destination_key},
        )
        # Counted as ztunnel counts it (istio_tcp_*{response_flags="CONNECT"}, in the tracker), not
        # as a handshake failure: the mesh side worked, the pod did not answer.
        ctx.connections.failed(rec, RejectKind.UPSTREAM_FAILED.value, f"cannot connect to the pod: {exc!r}")
        down.reset()
        return
    await relay_plain(ctx, down, up, rec)


async def relay_plain(ctx: ProxyContext, down: Downstream, up: socket.socket, rec: ConnectionRecord) -> None:
    """Relay a held downstream connection to ``up`` until both ends finish, tracked as ``rec``."""
    counts = [0, 0]

    def on_bytes(direction: str, n: int) -> None:
        counts[0 if direction == "sent" else 1] += n

    relay = PlainRelay(on_bytes)
    rec.read_bytes = lambda: (counts[0], counts[1])
    rec.abort = relay.abort
    ctx.connections.opened(rec)
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
        ctx.connections.closed(rec, reason)


__all__ = ["deliver_local", "relay_plain"]
