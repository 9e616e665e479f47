"""Plain TCP <-> TCP relay: outbound passthrough to non-mesh destinations, inbound plaintext
(PERMISSIVE) to a local pod.

Protocol-based like tunnel/relay.py (no task per direction per chunk) with the same
backpressure rule: when one side's write buffer passes the high-water mark, the other side
stops reading until it drains. Half-close is carried (FIN becomes ``write_eof``); a reset on
one side aborts the other with RST.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from tunnel.relay import abort_with_rst, close_gracefully

if TYPE_CHECKING:
    from agent.downstream import Downstream

WRITE_HIGH = 1024 * 1024
WRITE_LOW = 256 * 1024


class _Side(asyncio.Protocol):
    def __init__(self, relay: PlainRelay, name: str) -> None:
        self.relay = relay
        self.name = name  # "down" (the client that connected to us) or "up" (where we connected)
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.eof = False
        self.lost = False
        self.early: list[bytes] = []  # read before the peer's transport existed
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the Transport API without subclassing asyncio.Transport.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        if not self.connected.done():
            self.connected.set_result(None)
        # Deliver what the peer read before we existed, then let it read again.
        peer = self.peer
        if peer is not None and peer.early:
            for chunk in peer.early:
                transport.write(chunk)
            peer.early.clear()
            if peer.transport is not None and not peer.transport.is_closing():
                peer.transport.resume_reading()
        if peer is not None and peer.eof and transport.can_write_eof():
            transport.write_eof()
            if self.eof:
                self.relay._close_both()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        self.relay._count(self.name, len(data))
        if peer is None or peer.transport is None:
            # The other side is still being attached: hold this chunk and stop reading.
            self.early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        if peer.transport.is_closing():
            return
        peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
        if peer is not None and peer.eof:
            self.relay._close_both()
        return True  # keep our write side open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("closed before connect"))
        peer = self.peer
        if exc is not None:
            if peer is not None:
                abort_with_rst(peer.transport)
            self.relay._finish(f"{self.name} aborted: {exc}")
            return
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            close_gracefully(peer.transport)  # flushes what is buffered first
        if peer is None or peer.lost:
            self.relay._finish("closed")

    # backpressure: our write buffer full -> stop reading from the peer
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()


class PlainRelay:
    """Relays bytes between an accepted connection and an upstream socket until both ends finish.

    ``on_bytes(direction, n)`` is called for every chunk: ``"received"`` for downstream ->
    upstream (request direction), ``"sent"`` for upstream -> downstream (Istio's convention).
    """

    def __init__(self, on_bytes: Callable[[str, int], None] | None = None) -> None:
        self._on_bytes = on_bytes
        self.down = _Side(self, "down")
        self.up = _Side(self, "up")
        self.down.peer, self.up.peer = self.up, self.down
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def _count(self, side: str, n: int) -> None:
        if self._on_bytes is not None:
            self._on_bytes("received" if side == "down" else "sent", n)

    async def start(self, downstream: Downstream, upstream: socket.socket) -> None:
        """Attach the upstream socket, then take over the held downstream connection (what the
        app sent while held is replayed to the upstream). Raises ConnectionError if the app
        left meanwhile."""
        loop = asyncio.get_running_loop()
        upstream.setblocking(False)
        await loop.create_connection(lambda: self.up, sock=upstream)
        if self.done.done():
            # Aborted while the upstream attached (a policy re-check now denies it, or shutdown):
            # the app's connection must not be relayed after all.
            abort_with_rst(self.up.transport)
            downstream.reset()
            raise ConnectionError(f"relay aborted before it started: {self.done.result()}")
        downstream.hand_over(self.down)

    def _close_both(self) -> None:
        for side in (self.down, self.up):
            if side.transport is not None and not side.transport.is_closing():
                close_gracefully(side.transport)

    def _finish(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_result(reason)

    def abort(self, reason: str) -> None:
        """Reset both sides (policy now denies this connection, or shutdown)."""
        abort_with_rst(self.down.transport)
        abort_with_rst(self.up.transport)
        self._finish(reason)
