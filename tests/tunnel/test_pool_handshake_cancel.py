"""Cancellation around a shared HBONE handshake: pool slots come back, waiters are not cancelled.

A gate (a real TCP relay in front of the real HBONE server) holds the handshake open so the test
can cancel callers while they wait on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from tunnel.client import ClientConfig, TunnelStream
from tunnel.hbone import Authority

from .conftest import Mesh, running_mesh, wait_for_condition


class Gate:
    """Accepts TCP on loopback and relays to ``target`` only once ``opened`` is set."""

    def __init__(self, target: Authority) -> None:
        self.target = target
        self.opened = asyncio.Event()
        self.accepted = 0
        self.addr: Authority | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            await asyncio.wait_for(self.opened.wait(), 10)
            ur, uw = await asyncio.open_connection(str(self.target.ip), self.target.port)
        except (TimeoutError, OSError):
            w.close()
            return
        await asyncio.gather(self._pipe(r, uw), self._pipe(ur, w))

    def _spawn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        t = asyncio.get_running_loop().create_task(self._handle(r, w))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)


@contextlib.asynccontextmanager
async def gated(target: Authority) -> AsyncIterator[Gate]:
    gate = Gate(target)
    srv = await asyncio.start_server(gate._spawn, "127.0.0.1", 0)
    gate.addr = Authority.of("127.0.0.1", srv.sockets[0].getsockname()[1])
    try:
        yield gate
    finally:
        srv.close()
        for t in list(gate._tasks):
            t.cancel()
        await asyncio.gather(*gate._tasks, return_exceptions=True)


async def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(app end, end handed to the client), a connected loopback TCP pair."""
    lsock = socket.socket()
    try:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        app = socket.create_connection(lsock.getsockname(), timeout=5)
        conn, _ = lsock.accept()
    finally:
        lsock.close()
    app.setblocking(False)
    conn.setblocking(False)
    return app, conn


def open_via(mesh: Mesh, gate: Gate, sock: socket.socket) -> asyncio.Task[TunnelStream]:
    assert gate.addr is not None
    return asyncio.get_running_loop().create_task(
        mesh.client.open_tunnel(
            sock,
            source=mesh.source,
            destination=mesh.backend,
            agent_address=gate.addr,
            expected_identities=mesh.expected,
        )
    )


async def echo(app: socket.socket, payload: bytes) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(app, payload)
    got = b""
    async with asyncio.timeout(5):
        while len(got) < len(payload):
            chunk = await loop.sock_recv(app, 65536)
            assert chunk, "tunnel closed before the echo came back"
            got += chunk
    assert got == payload


def only_session(mesh: Mesh):  # type: ignore[no-untyped-def]
    sessions = [s for lst in mesh.client.pool.values() for s in lst]
    assert len(sessions) == 1
    return sessions[0]


async def test_cancelled_waiter_gives_its_pool_slot_back(client_cred, server_cred, bundles) -> None:
    cfg = ClientConfig(keepalive_interval=0.05, keepalive_timeout=5, pool_idle_timeout=0.2)
    async with (
        running_mesh(
            client_cred=client_cred, server_cred=server_cred, bundles=bundles, client_config=cfg
        ) as mesh,
        gated(mesh.server_addr) as gate,
    ):
        a_app, a_sock = await tcp_pair()
        b_app, b_sock = await tcp_pair()
        try:
            creator = open_via(mesh, gate, a_sock)
            await wait_for_condition(lambda: gate.accepted == 1)
            session = only_session(mesh)
            waiter = open_via(mesh, gate, b_sock)
            await wait_for_condition(lambda: session.reserved == 2)  # waiting on the shared handshake
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            gate.opened.set()
            stream = await asyncio.wait_for(creator, 5)
            await echo(a_app, b"through the shared connection")
            a_app.close()
            await asyncio.wait_for(stream.done, 5)
            # Every slot is back: the connection is idle and the pool closes it.
            await wait_for_condition(lambda: session.reserved == 0)
            await wait_for_condition(lambda: mesh.client.connections == 0)
        finally:
            for s in (a_app, b_app, a_sock, b_sock):
                s.close()


async def test_cancelled_handshake_creator_does_not_cancel_waiters(client_cred, server_cred, bundles) -> None:
    async with (
        running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles) as mesh,
        gated(mesh.server_addr) as gate,
    ):
        a_app, a_sock = await tcp_pair()
        b_app, b_sock = await tcp_pair()
        try:
            creator = open_via(mesh, gate, a_sock)
            await wait_for_condition(lambda: gate.accepted == 1)
            session = only_session(mesh)
            waiter = open_via(mesh, gate, b_sock)
            await wait_for_condition(lambda: session.reserved == 2)
            creator.cancel()  # e.g. the creator's pod went away mid-handshake
            with pytest.raises(asyncio.CancelledError):
                await creator
            gate.opened.set()
            # The waiter is not cancelled by someone else's cancellation: it gets a new connection.
            stream = await asyncio.wait_for(waiter, 5)
            await echo(b_app, b"waiter still tunnels")
            b_app.close()
            await asyncio.wait_for(stream.done, 5)
            assert mesh.client.stats["connections_opened"] == 1
            assert gate.accepted == 2
        finally:
            for s in (a_app, b_app, a_sock, b_sock):
                s.close()
