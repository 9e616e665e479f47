"""Accepted connections held paused while the agent decides, then handed to their carrier.

Real loopback sockets: an app socket connects to a listener served by Downstream protocols;
the handler plays the agent (it waits, refuses, fails or relays to a real upstream).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from agent.downstream import Downstream, downstream_factory
from agent.plain import PlainRelay

Handler = Callable[[Downstream], Awaitable[None]]


async def _listen(handler: Handler, tasks: set[asyncio.Task[Any]]) -> tuple[asyncio.AbstractServer, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(downstream_factory(handler, tasks), "127.0.0.1", 0)  # type: ignore[arg-type]
    return server, server.sockets[0].getsockname()[1]


@pytest.fixture
async def echo_upstream() -> AsyncIterator[int]:
    """Echoes until the client's FIN, then closes (FIN back)."""

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
        w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def _client(port: int, send: bytes, *, half_close: bool) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(send)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


async def test_a_request_and_fin_sent_before_the_decision_reach_the_upstream_in_order(
    echo_upstream: int,
) -> None:
    tasks: set[asyncio.Task[Any]] = set()
    seen = asyncio.Event()

    async def handler(down: Downstream) -> None:
        # Decide slowly: the app has sent its whole request and its FIN meanwhile (held in the
        # kernel or, on uvloop, partly in the Downstream: see the uvloop tests below).
        await asyncio.sleep(0.3)
        seen.set()
        loop = asyncio.get_running_loop()
        up = socket.socket()
        up.setblocking(False)
        await loop.sock_connect(up, ("127.0.0.1", echo_upstream))
        relay = PlainRelay()
        await relay.start(down, up)
        await relay.done

    server, port = await _listen(handler, tasks)
    try:
        payload = b"".join(b"chunk-%04d;" % i for i in range(3000))  # more than one read
        got = await asyncio.to_thread(_client, port, payload, half_close=True)
        assert seen.is_set()
        assert got == payload  # replayed whole and in order, then the FIN crossed both ways
    finally:
        server.close()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_refused_connection_is_reset() -> None:
    tasks: set[asyncio.Task[Any]] = set()

    async def handler(down: Downstream) -> None:
        assert down.peer[0] == "127.0.0.1" and down.local[1] == port
        down.reset()

    server, port = await _listen(handler, tasks)
    try:
        with pytest.raises(ConnectionResetError):
            await asyncio.to_thread(_client, port, b"hi", half_close=False)
    finally:
        server.close()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_failing_handler_resets_its_connection_and_the_listener_lives_on() -> None:
    tasks: set[asyncio.Task[Any]] = set()
    calls = []

    async def handler(down: Downstream) -> None:
        calls.append(down.peer)
        raise RuntimeError("bug in routing")

    server, port = await _listen(handler, tasks)
    try:
        for _ in range(2):
            with pytest.raises(ConnectionResetError):
                await asyncio.to_thread(_client, port, b"hi", half_close=False)
        assert len(calls) == 2
    finally:
        server.close()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


async def test_an_app_that_resets_while_held_is_seen_as_reset_by_its_carrier() -> None:
    # Reading is paused while held, so the kernel's RST is noticed when reading resumes at the
    # hand-over: the carrier (tunnel stream or relay) sees an abort and propagates it.
    tasks: set[asyncio.Task[Any]] = set()
    recorder_box: list[_Recorder] = []
    reset_sent = asyncio.Event()

    async def handler(down: Downstream) -> None:
        await asyncio.wait_for(reset_sent.wait(), 5)
        await asyncio.sleep(0.05)
        rec = _Recorder()
        recorder_box.append(rec)
        down.hand_over(rec)
        with pytest.raises(RuntimeError, match="already handed over"):
            down.hand_over(_Recorder())  # one carrier only

    server, port = await _listen(handler, tasks)
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # RST
        reset_sent.set()
        for _ in range(100):
            if recorder_box:
                break
            await asyncio.sleep(0.02)
        exc = await asyncio.wait_for(recorder_box[0].lost, 5)
        assert isinstance(exc, ConnectionResetError)
        await asyncio.gather(*tasks)  # the handler's own assertions held
    finally:
        server.close()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_relay_aborted_before_it_started_resets_the_app_instead_of_relaying(
    echo_upstream: int,
) -> None:
    # A policy re-check can abort a tracked relay while its upstream is still being attached.
    tasks: set[asyncio.Task[Any]] = set()
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handler(down: Downstream) -> None:
        loop = asyncio.get_running_loop()
        up = socket.socket()
        up.setblocking(False)
        await loop.sock_connect(up, ("127.0.0.1", echo_upstream))
        relay = PlainRelay()
        relay.abort("policy now denies it")
        try:
            await relay.start(down, up)
        except ConnectionError as exc:
            outcome.set_result(str(exc))
            return
        outcome.set_result("relayed")

    server, port = await _listen(handler, tasks)
    try:
        with pytest.raises(ConnectionResetError):
            await asyncio.to_thread(_client, port, b"hi", half_close=False)
        assert "policy now denies it" in await asyncio.wait_for(outcome, 5)
    finally:
        server.close()
        await asyncio.gather(*tasks, return_exceptions=True)


# uvloop (what `ztagent run` uses) reads once more after connection_made paused the transport, so
# the held-input path runs there; the default asyncio loop never reads while paused.
def _with_uvloop(scenario: Callable[[], Awaitable[None]]) -> None:
    import uvloop

    uvloop.run(scenario())


async def _echo_server() -> asyncio.Server:
    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
        w.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def _relay_to(down: Downstream, port: int) -> None:
    loop = asyncio.get_running_loop()
    up = socket.socket()
    up.setblocking(False)
    await loop.sock_connect(up, ("127.0.0.1", port))
    relay = PlainRelay()
    await relay.start(down, up)
    await relay.done


def test_bytes_read_while_held_are_replayed_first() -> None:
    async def scenario() -> None:
        echo = await _echo_server()
        held: list[int] = []
        tasks: set[asyncio.Task[Any]] = set()

        async def handler(down: Downstream) -> None:
            for _ in range(300):
                if down._early:
                    break
                await asyncio.sleep(0.01)
            held.append(sum(len(c) for c in down._early))
            await _relay_to(down, echo.sockets[0].getsockname()[1])

        server, port = await _listen(handler, tasks)
        try:
            payload = b"".join(b"%06d;" % i for i in range(20000))

            def client() -> bytes:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(payload[:50000])
                    time.sleep(0.5)  # the agent holds the connection and what it read
                    s.sendall(payload[50000:])
                    s.shutdown(socket.SHUT_WR)
                    out = b""
                    while chunk := s.recv(65536):
                        out += chunk
                    return out

            got = await asyncio.to_thread(client)
            assert held and held[0] > 0, "nothing was read while held: the replay path did not run"
            assert got == payload
        finally:
            server.close()
            echo.close()
            await asyncio.gather(*tasks, return_exceptions=True)

    _with_uvloop(scenario)


def test_a_fin_received_while_held_is_carried_after_the_hand_over() -> None:
    async def scenario() -> None:
        echo = await _echo_server()
        saw_fin: list[bool] = []
        tasks: set[asyncio.Task[Any]] = set()

        async def handler(down: Downstream) -> None:
            for _ in range(300):
                if down._early_eof:
                    break
                await asyncio.sleep(0.01)
            saw_fin.append(down._early_eof)
            await _relay_to(down, echo.sockets[0].getsockname()[1])

        server, port = await _listen(handler, tasks)
        try:

            def client() -> bytes:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.shutdown(socket.SHUT_WR)  # FIN before the agent decided anything
                    return s.recv(100)

            # The upstream gets the FIN at the hand-over, closes, and its FIN reaches the app.
            assert await asyncio.to_thread(client) == b""
            assert saw_fin == [True], "the FIN was not seen while held: the early-FIN path did not run"
        finally:
            server.close()
            echo.close()
            await asyncio.gather(*tasks, return_exceptions=True)

    _with_uvloop(scenario)
