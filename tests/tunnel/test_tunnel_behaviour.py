"""Statuses, half-close, pooling, rotation and server identity checks over real sockets and mTLS."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from identity.spiffe import SpiffeId
from tunnel.client import TunnelError
from tunnel.hbone import Authority
from tunnel.server import AuthzDecision, AuthzRequest

from .conftest import Mesh, issue, running_mesh, start_backend, wait_for_condition


async def echo_once(mesh: Mesh, payload: bytes = b"still alive") -> None:
    r, w = await mesh.connect()
    w.write(payload)
    await w.drain()
    assert await asyncio.wait_for(r.readexactly(len(payload)), 5) == payload
    w.close()


async def expect_reset(mesh: Mesh) -> TunnelError:
    """The app's connection is reset (or closed) and the client raised a TunnelError."""
    before = len(mesh.tunnel_errors)
    r, w = await mesh.connect()
    w.write(b"x")
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(r.readexactly(1), 5)
    w.close()
    await wait_for_condition(lambda: len(mesh.tunnel_errors) > before)
    err = mesh.tunnel_errors[-1]
    assert isinstance(err, TunnelError)
    return err


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def test_half_close_client_first(client_cred, server_cred, bundles) -> None:
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's FIN arrives through the tunnel
        got.set_result(data)
        writer.write(b"after your FIN: " + str(len(data)).encode())
        await writer.drain()
        writer.close()

    async with running_mesh(
        client_cred=client_cred, server_cred=server_cred, bundles=bundles, backend_handler=handler
    ) as mesh:
        r, w = await mesh.connect()
        w.write(b"request body")
        w.write_eof()
        assert await asyncio.wait_for(got, 5) == b"request body"
        assert await asyncio.wait_for(r.read(), 5) == b"after your FIN: 12"
        w.close()


async def test_half_close_server_first(client_cred, server_cred, bundles) -> None:
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"banner")
        writer.write_eof()  # server is done talking, still listening
        got.set_result(await reader.read())
        writer.close()

    async with running_mesh(
        client_cred=client_cred, server_cred=server_cred, bundles=bundles, backend_handler=handler
    ) as mesh:
        r, w = await mesh.connect()
        assert await asyncio.wait_for(r.read(), 5) == b"banner"  # banner then EOF (FIN carried)
        w.write(b"reply after the server's FIN")
        w.write_eof()
        assert await asyncio.wait_for(got, 5) == b"reply after the server's FIN"
        w.close()


async def test_upstream_refused_is_503(client_cred, server_cred, bundles) -> None:
    async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles) as mesh:
        mesh.destination = Authority.of("127.0.0.1", free_port())
        err = await expect_reset(mesh)
        assert err.status == 503 and "could not connect" in str(err)
        assert mesh.server.stats["upstream-failed"] == 1
        mesh.destination = None
        await echo_once(mesh)  # same pooled connection still carries tunnels


async def test_deny_is_401(client_cred, server_cred, bundles) -> None:
    seen: list[AuthzRequest] = []

    async def deny_port_7(req: AuthzRequest) -> AuthzDecision:
        seen.append(req)
        return AuthzDecision(req.destination.port != 7, "policy ns2/deny-7")

    async with running_mesh(
        client_cred=client_cred, server_cred=server_cred, bundles=bundles, authorize=deny_port_7
    ) as mesh:
        await echo_once(mesh)
        req = seen[0]
        assert req.peer_identity == client_cred.spiffe_id
        assert req.connection.local_identity == server_cred.spiffe_id
        assert req.source.ip == req.connection.peer.ip  # from forwarded: for= (the app's address)
        assert req.headers["traceparent"].startswith("00-")
        assert req.headers["forwarded"].startswith('for="127.0.0.1:')
        mesh.destination = Authority.of("127.0.0.1", 7)
        err = await expect_reset(mesh)
        assert err.status == 401 and "denied by authorization policy" in str(err)
        assert ("denied" in mesh.server_obs.kinds()) and "ns2/deny-7" in mesh.server_obs.rejections[-1][1]


async def test_non_local_authority_is_400_and_never_relayed(client_cred, server_cred, bundles) -> None:
    contacted: list[int] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        contacted.append(1)
        writer.close()

    other = await asyncio.start_server(record, "127.0.0.2", 0)
    try:
        async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles) as mesh:
            mesh.destination = Authority.of("127.0.0.2", other.sockets[0].getsockname()[1])
            err = await expect_reset(mesh)
            assert err.status == 400
            assert mesh.server.stats["not-local"] == 1
            assert contacted == []  # never an open relay
    finally:
        other.close()


async def test_many_streams_share_one_handshake(client_cred, server_cred, bundles) -> None:
    async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles) as mesh:
        await asyncio.gather(*(echo_once(mesh, f"conn {i}".encode()) for i in range(60)))
        assert mesh.client.stats["connections_opened"] == 1
        assert mesh.server.stats["connections_accepted"] == 1
        assert mesh.client.stats["tunnels_opened"] == 60


async def test_pool_opens_second_connection_beyond_100_streams(client_cred, server_cred, bundles) -> None:
    async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles) as mesh:
        conns = [await mesh.connect() for _ in range(130)]
        for i, (_r, w) in enumerate(conns):
            w.write(f"{i:04d}".encode())
        for i, (r, _w) in enumerate(conns):
            assert await asyncio.wait_for(r.readexactly(4), 10) == f"{i:04d}".encode()
        assert mesh.client.stats["connections_opened"] == 2
        assert mesh.server.stats["connections_accepted"] == 2
        assert mesh.server.open_tunnels == 130
        for _r, w in conns:
            w.close()
        await wait_for_condition(lambda: mesh.server.open_tunnels == 0)


async def test_server_identity_mismatch_aborts(client_cred, server_cred, bundles) -> None:
    wrong = SpiffeId.for_workload("cluster.local", "ns2", "not-httpbin")
    async with running_mesh(
        client_cred=client_cred, server_cred=server_cred, bundles=bundles, expected=[wrong]
    ) as mesh:
        err = await expect_reset(mesh)
        assert err.kind == "server-identity-mismatch"
        assert str(server_cred.spiffe_id) in str(err) and str(wrong) in str(err)
        assert mesh.server.open_tunnels == 0


async def test_rotation_next_handshake_uses_new_cert(ca, client_cred, server_cred, bundles) -> None:
    current = {"server": server_cred}
    async with running_mesh(
        client_cred=client_cred,
        server_cred=server_cred,
        bundles=bundles,
        server_credentials=lambda _ip: current["server"],
    ) as mesh:
        await echo_once(mesh)
        # server rotation: the next handshake presents the new leaf, no restart
        current["server"] = issue(ca, "ns2", "httpbin")
        from .test_tls_probes import probe_peer_leaf

        leaf = await asyncio.to_thread(probe_peer_leaf, mesh.server_addr, client_cred, bundles)
        assert leaf == current["server"].chain[0]
        assert leaf != server_cred.chain[0]
        # client rotation: the pool retires the old connection and handshakes with the new cert
        r, w = await mesh.connect()  # a long-lived tunnel on the old connection keeps running
        w.write(b"old")
        assert await r.readexactly(3) == b"old"
        mesh.source = issue(ca, "ns1", "sleep")
        await echo_once(mesh)
        assert mesh.client.stats["connections_opened"] == 2
        w.write(b"still")
        assert await r.readexactly(5) == b"still"
        w.close()
        await wait_for_condition(lambda: mesh.client.connections == 1)


async def test_connect_refused_and_timeout_messages(client_cred, server_cred, bundles) -> None:
    async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles) as mesh:
        mesh.server_addr = Authority.of("127.0.0.1", free_port())
        err = await expect_reset(mesh)
        assert err.kind == "connect-refused" and "is the node agent running" in str(err)


async def test_graceful_drain_lets_streams_finish(client_cred, server_cred, bundles) -> None:
    async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles) as mesh:
        r, w = await mesh.connect()
        w.write(b"before")
        assert await r.readexactly(6) == b"before"
        drain = asyncio.create_task(mesh.server.drain(10))
        await asyncio.sleep(0.2)
        # the open tunnel keeps working during the drain ...
        w.write(b"during")
        assert await asyncio.wait_for(r.readexactly(6), 5) == b"during"
        # ... new connections are not accepted
        s = socket.socket()
        with pytest.raises(ConnectionRefusedError):
            s.connect((str(mesh.server_addr.ip), mesh.server_addr.port))
        s.close()
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        await asyncio.wait_for(drain, 5)  # finished as soon as the last stream did
        assert not drain.exception()
        assert mesh.server.open_tunnels == 0


async def test_backend_for_unused_start_backend() -> None:
    srv, addr = await start_backend()
    assert addr.port > 0
    srv.close()


async def test_equal_credential_copies_do_not_retire_the_pool(client_cred, server_cred, bundles) -> None:
    from identity.svid import WorkloadCredential

    async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles) as mesh:
        await echo_once(mesh)
        # the agent may hand over a fresh but equal object each time (e.g. re-read from its store)
        mesh.source = WorkloadCredential.from_pem(client_cred.chain_pem(), client_cred.key_pem())
        await echo_once(mesh)
        assert mesh.client.stats["connections_opened"] == 1
        assert mesh.client.contexts.builds == 1


async def test_connect_timeout_names_the_likely_cause(client_cred, server_cred, bundles) -> None:
    """A port whose SYNs go unanswered (here: a listener whose accept queue is full, so the kernel
    drops them) must fail after connect_timeout with a message about NetworkPolicy/firewall."""
    from tunnel.client import ClientConfig

    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue (backlog 0 admits one or two)
            f = socket.socket()
            f.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                f.connect(blackhole.getsockname())
            fillers.append(f)
        await asyncio.sleep(0.2)
        async with running_mesh(
            client_cred=client_cred,
            server_cred=server_cred,
            bundles=bundles,
            client_config=ClientConfig(connect_timeout=0.5),
        ) as mesh:
            mesh.server_addr = Authority.of(*blackhole.getsockname())
            err = await expect_reset(mesh)
            assert err.kind == "connect-timeout", err
            assert "within 0.5s" in str(err)
            assert f"HBONE port {mesh.server_addr.port} may be blocked between the nodes" in str(err)
            assert "NetworkPolicy or a firewall" in str(err)
    finally:
        for f in fillers:
            f.close()
        blackhole.close()


async def test_open_tunnel_on_a_socketpair_end(client_cred, server_cred, bundles) -> None:
    """docs/contracts.md: open_tunnel takes any connected socket, also a socketpair end (in-process
    callers such as a waypoint). Its peer has no IP address: the tunnel goes without a
    `forwarded` header (the server then uses the connection's peer), instead of IndexError."""
    seen: list[AuthzRequest] = []

    async def record(req: AuthzRequest) -> AuthzDecision:
        seen.append(req)
        return AuthzDecision(True, "test")

    async with running_mesh(
        client_cred=client_cred, server_cred=server_cred, bundles=bundles, authorize=record
    ) as mesh:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        stream = await asyncio.wait_for(
            mesh.client.open_tunnel(
                ours,
                source=client_cred,
                destination=mesh.backend,
                agent_address=mesh.server_addr,
                expected_identities=mesh.expected,
            ),
            10,
        )
        try:
            theirs.sendall(b"through a socketpair")
            theirs.settimeout(5)
            got = b""
            while len(got) < 20:
                got += await asyncio.to_thread(theirs.recv, 100)
            assert got == b"through a socketpair"
            assert stream.info.source is None
            (req,) = seen
            assert "forwarded" not in req.headers and req.source.ip.is_loopback
        finally:
            theirs.close()
            stream.abort()
