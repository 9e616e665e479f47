"""An app's connection accepted by one of the agent's listeners (15001 outbound, 15006 inbound).

The listeners are asyncio servers, not accept loops: the event loop builds the transport while
accepting, and that transport is handed whole to whatever carries the connection (the HBONE
stream's TCP side, or a plain relay). Accepting sockets and wrapping each in a second transport
afterwards cost a third of the agent's CPU per new connection (issue 6, new connections/s).

Until the agent has decided where the connection goes (policy, route, tunnel), the transport
is paused and what the app sends first (a request that raced the decision, or its FIN) is kept
here, then replayed to the new protocol in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Coroutine
from typing import Any, cast

from tunnel.hbone import parse_ip
from tunnel.relay import abort_with_rst

log = logging.getLogger("ztagent.downstream")

Handler = Callable[["Downstream"], Coroutine[Any, Any, None]]


class Downstream(asyncio.Protocol):
    """Holds an accepted connection paused until :meth:`hand_over` gives it to its carrier."""

    def __init__(self, handler: Handler, spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self._handler = handler
        self._spawn = spawn
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = ("?", 0)
        self.local: tuple[str, int] = ("?", 0)
        self._early: list[bytes] = []
        self._early_eof = False
        self.lost = False  # the app closed or reset before the hand-over
        self.handed_over = False  # from then on the transport belongs to its carrier

    # -- while held -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if not peer or not local:
            self.reset()  # already gone (reset right after the handshake)
            return
        self.peer = (str(peer[0]).split("%")[0], int(peer[1]))
        self.local = (str(local[0]).split("%")[0], int(local[1]))
        self._spawn(self._handler(self))

    def data_received(self, data: bytes) -> None:
        # uvloop may deliver one read after pause_reading(); keep it and pause again.
        self._early.append(data)
        if self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._early_eof = True
        return True  # keep our side open: the app half-closed, the answer may still come

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    # -- the agent's side -------------------------------------------------------------------------
    @property
    def peer_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            return parse_ip(self.peer[0])
        except ValueError:
            return None

    @property
    def usable(self) -> bool:
        return (
            not self.lost
            and not self.handed_over
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def reset(self) -> None:
        """Refuse the connection with a TCP RST (ztunnel resets rather than FINs)."""
        if not self.handed_over:
            abort_with_rst(self.transport)
            self.lost = True

    def hand_over(self, protocol: asyncio.Protocol) -> None:
        """Make ``protocol`` the connection's protocol: ``connection_made``, then the bytes and
        FIN that arrived while held, then reading resumes unless the protocol paused it."""
        if self.handed_over:
            raise RuntimeError("the connection was already handed over")
        transport = self.transport
        if transport is None or not self.usable:
            raise ConnectionError("the app's connection closed before it was handed over")
        self.handed_over = True
        transport.set_protocol(protocol)
        early, self._early = self._early, []
        if not self._early_eof:
            # Resume first: reads are only delivered from the next loop iteration, after the
            # replay below, and a pause_reading() during the replay still wins.
            transport.resume_reading()
        protocol.connection_made(transport)
        for data in early:
            protocol.data_received(data)
        if self._early_eof and not protocol.eof_received():
            transport.close()


def downstream_factory(handler: Handler, tasks: set[asyncio.Task[Any]]) -> Callable[[], Downstream]:
    """A protocol factory for ``loop.create_server(..., sock=listener)``; each connection's
    ``handler`` runs as a task kept in ``tasks`` (cancelled on shutdown), and a handler that
    fails unexpectedly resets its connection instead of leaving the app hanging."""

    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def guarded(down: Downstream) -> Coroutine[Any, Any, None]:
        async def run() -> None:
            try:
                await handler(down)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    if down.usable:
                        down.reset()
                raise
            except Exception:
                log.exception(
                    f"connection {down.peer[0]}:{down.peer[1]} -> {down.local[0]}:{down.local[1]} "
                    "failed unexpectedly; reset",
                    extra={"event": "handler_error"},
                )
                if down.usable:
                    down.reset()

        return run()

    return lambda: Downstream(guarded, spawn)
