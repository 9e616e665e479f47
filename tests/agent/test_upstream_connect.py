"""The agent's upstream connect (to local pods and passthrough destinations): a non-blocking
connect to an IP literal on both event loops, without the resolver, with the errno's exception."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from agent.upstream import UpstreamConnector
from tunnel.relay import connect_numeric

LOOPS = {"uvloop": uvloop.run, "asyncio": asyncio.run}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    return LOOPS[request.param]


def test_connects_to_a_listening_socket_without_asking_the_resolver(run: Any) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        address = server.getsockname()

        async def main() -> tuple[str, int]:
            loop = asyncio.get_running_loop()

            async def no_resolver(*_a: Any, **_k: Any) -> Any:
                raise AssertionError("the upstream connect must not resolve an IP literal")

            loop.getaddrinfo = no_resolver  # type: ignore[method-assign]
            sock = await UpstreamConnector(transparent=False).connect(*address)
            with sock:
                accepted, peer = server.accept()
                with accepted:
                    assert sock.getsockname() == peer
                    return sock.getpeername()  # type: ignore[no-any-return]

        assert run(main()) == address


def test_a_closed_port_raises_connection_refused_and_closes_the_socket(run: Any) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        address = server.getsockname()
    made: list[socket.socket] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        made.append(sock)
        sock.setblocking(False)
        with sock, pytest.raises(ConnectionRefusedError):
            await connect_numeric(loop, sock, address)
        with pytest.raises(ConnectionRefusedError):
            await UpstreamConnector(transparent=False).connect(*address)

    run(main())


def test_a_host_name_is_refused_before_any_connect(run: Any) -> None:
    async def main() -> None:
        with socket.socket() as sock:
            sock.setblocking(False)
            with pytest.raises(ValueError):
                await connect_numeric(asyncio.get_running_loop(), sock, ("localhost", 80))

    run(main())
