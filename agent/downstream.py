"""An app's connection accepted by one of the agent's listeners (15001 outbound, 15006 inbound).

The listeners are asyncio servers, not accept loops: the event loop builds the transport while
accepting, and that transport is handed whole to whatever carries the connection (the HBONE
stream's TCP side, or a plain relay). Accepting sockets and wrapping each in a second transport
afterwards cost about 15% of the new connections per second (issue 6).

Until the agent has decided where the connection goes (policy, route, tunnel), the transport
is paused and what the app sends first (a request that raced the decision, or its FIN) is kept
by ``tunnel.relay.HeldConnection``, then replayed to the new protocol in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from tunnel.hbone import parse_ip
from tunnel.relay import HeldConnection

log = logging.getLogger("ztagent.downstream")

Handler = Callable[["Downstream"], Coroutine[Any, Any, None]]


class Downstream(HeldConnection):
    """An app's connection held paused (``tunnel.relay.HeldConnection``) while the agent's
    handler decides, then handed to its carrier."""

    def __init__(self, handler: Handler, spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        super().__init__()
        self._handler = handler
        self._spawn = spawn
        self.peer: tuple[str, int] = ("?", 0)
        self.local: tuple[str, int] = ("?", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if not peer or not local:
            self.reset()  # already gone (reset right after the handshake)
            return
        self.peer = (str(peer[0]).split("%")[0], int(peer[1]))
        self.local = (str(local[0]).split("%")[0], int(local[1]))
        self._spawn(self._handler(self))

    @property
    def peer_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            return parse_ip(self.peer[0])
        except ValueError:
            return None


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
