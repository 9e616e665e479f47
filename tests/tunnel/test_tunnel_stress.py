"""Backpressure (memory stays under the water marks), vanishing peers, keepalive: each leaves the
other tunnels running."""

from __future__ import annotations

import asyncio
import contextlib

from tunnel import hbone, relay
from tunnel.server import ServerConfig

from .conftest import running_mesh, wait_for_condition
from .test_tls_probes import live_tunnel, still_live, tls_connect

# Worst case per stream: the TCP writer's high water, plus a full stream window the peer may
# send before it sees credit withheld, plus one frame in flight.
STREAM_BOUND = relay.TCP_WRITE_HIGH + hbone.STREAM_WINDOW + hbone.MAX_FRAME_SIZE


def streams(sessions) -> list[relay.TunnelStream]:
    return [st for s in sessions for st in s.streams.values()]


def tls_buffered(sessions) -> int:
    return max((s.transport.get_write_buffer_size() for s in sessions if s.transport), default=0)


async def write_until_stalled(w: asyncio.StreamWriter, limit: int) -> int:
    chunk = b"\xab" * (1 << 20)
    sent = 0
    while sent < limit:
        w.write(chunk)
        try:
            await asyncio.wait_for(w.drain(), 1.0)
        except TimeoutError:
            return sent + len(chunk)
        sent += len(chunk)
    return sent


async def test_backend_stops_reading_memory_bounded(client_cred, server_cred, bundles) -> None:
    release = asyncio.Event()

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if (await reader.read(4)) == b"hold":  # the probe tunnel echoes; the stalled one never reads
            writer.write(b"hold")
            while data := await reader.read(65536):
                writer.write(data)
            return
        await release.wait()
        writer.close()

    async with running_mesh(
        client_cred=client_cred, server_cred=server_cred, bundles=bundles, backend_handler=never_reads
    ) as mesh:
        r0, w0 = await live_tunnel(mesh)
        _r, w = await mesh.connect()
        w.write(b"stal")
        sent = await write_until_stalled(w, 512 << 20)
        assert sent < 128 << 20, "backpressure did not hold: the app could write without bound"
        srv = [st for st in streams(mesh.server.sessions) if st.info.bytes_received > 4]
        cli = [st for st in streams(mesh.client._all) if st.info.bytes_received > 4]
        assert len(srv) == 1 and len(cli) == 1
        assert srv[0].buffered_bytes <= STREAM_BOUND
        assert cli[0].buffered_bytes <= relay.TCP_READ_CHUNK
        assert tls_buffered(mesh.client._all) <= relay.TLS_WRITE_HIGH + hbone.MAX_FRAME_SIZE
        await still_live(r0, w0)  # the stalled stream holds at most its window of the connection's
        release.set()
        w.close()


async def test_app_stops_reading_memory_bounded(client_cred, server_cred, bundles) -> None:
    stalled = asyncio.Event()
    sent_box: list[int] = []

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(4)
        if first == b"hold":
            writer.write(b"hold")
            while data := await reader.read(65536):
                writer.write(data)
            return
        sent_box.append(await write_until_stalled(writer, 512 << 20))
        stalled.set()
        with contextlib.suppress(Exception):
            await reader.read()
        writer.close()

    async with running_mesh(
        client_cred=client_cred, server_cred=server_cred, bundles=bundles, backend_handler=firehose
    ) as mesh:
        r0, w0 = await live_tunnel(mesh)
        r, w = await mesh.connect()
        r._limit = 1  # type: ignore[attr-defined]  # the app reads nothing: let its buffer stay tiny
        w.write(b"go!!")
        await asyncio.wait_for(stalled.wait(), 30)
        assert sent_box[0] < 128 << 20
        cli = [st for st in streams(mesh.client._all) if st.info.bytes_sent > 4]
        srv = [st for st in streams(mesh.server.sessions) if st.info.bytes_sent > 4]
        assert len(cli) == 1 and len(srv) == 1
        assert cli[0].buffered_bytes <= STREAM_BOUND
        assert srv[0].buffered_bytes <= relay.TCP_READ_CHUNK
        assert tls_buffered(mesh.server.sessions) <= relay.TLS_WRITE_HIGH + hbone.MAX_FRAME_SIZE
        await still_live(r0, w0)
        w.transport.abort()


async def test_app_vanishes_mid_stream(client_cred, server_cred, bundles) -> None:
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def reader_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(4)
        if first == b"hold":
            writer.write(b"hold")
            while data := await reader.read(65536):
                writer.write(data)
            return
        try:
            while await reader.read(65536):
                pass
            outcome.set_result("eof")
        except ConnectionResetError:
            outcome.set_result("reset")
        writer.close()

    async with running_mesh(
        client_cred=client_cred, server_cred=server_cred, bundles=bundles, backend_handler=reader_backend
    ) as mesh:
        r0, w0 = await live_tunnel(mesh)
        _r, w = await mesh.connect()
        w.write(b"data" * 10000)
        await w.drain()
        await asyncio.sleep(0.1)
        relay.abort_with_rst(w.transport)  # the app's socket resets mid-stream
        assert await asyncio.wait_for(outcome, 5) == "reset"  # RST carried across as RST
        await wait_for_condition(lambda: mesh.server.open_tunnels == 1)
        await still_live(r0, w0)


async def test_hbone_peer_vanishes_mid_stream(client_cred, server_cred, bundles) -> None:
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(65536):
                pass
            outcome.set_result("eof")
        except ConnectionResetError:
            outcome.set_result("reset")
        writer.close()

    async with running_mesh(
        client_cred=client_cred, server_cred=server_cred, bundles=bundles, backend_handler=backend
    ) as mesh:
        _r, w = await mesh.connect()
        w.write(b"x" * 1000)
        await wait_for_condition(lambda: mesh.server.open_tunnels == 1)
        (session,) = list(mesh.client._all)
        session.transport.abort()  # the whole source node goes away
        assert await asyncio.wait_for(outcome, 5) == "reset"
        await wait_for_condition(lambda: mesh.server.open_tunnels == 0 and not mesh.server.sessions)
        w.close()


async def test_silent_peer_dropped_by_keepalive(client_cred, server_cred, bundles) -> None:
    cfg = ServerConfig(keepalive_interval=0.2, keepalive_timeout=0.6)
    async with running_mesh(
        client_cred=client_cred, server_cred=server_cred, bundles=bundles, server_config=cfg
    ) as mesh:
        r0, w0 = await live_tunnel(mesh)  # a real client answers PINGs: kept

        def silent_peer() -> bytes:
            # completes TLS and sends the HTTP/2 preface, then never answers anything
            with tls_connect(mesh.server_addr, client_cred, bundles) as s:
                s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                s.settimeout(5)
                got = b""
                while chunk := s.recv(65536):
                    got += chunk
                return got

        await asyncio.to_thread(silent_peer)  # returns when the server closed it
        assert mesh.server.stats["keepalive-timeout"] == 1
        await still_live(r0, w0)
        assert len(mesh.server.sessions) == 1


async def test_idle_stream_reset_and_idle_pool_released(client_cred, server_cred, bundles) -> None:
    from tunnel.client import ClientConfig

    ccfg = ClientConfig(keepalive_interval=0.1, keepalive_timeout=5, pool_idle_timeout=0.4)
    scfg = ServerConfig(stream_idle_timeout=0.3)
    async with running_mesh(
        client_cred=client_cred,
        server_cred=server_cred,
        bundles=bundles,
        client_config=ccfg,
        server_config=scfg,
    ) as mesh:
        r, w = await mesh.connect()
        w.write(b"ping")
        assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
        # no bytes either way for longer than the idle timeout: the server resets the tunnel
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(r.read(), 5) == b""
        await wait_for_condition(lambda: len(mesh.server_obs.closed) == 1)
        assert "idle" in mesh.server_obs.closed[0].close_reason
        # and the pooled connection, now without streams, is released after pool_idle_timeout
        await wait_for_condition(lambda: mesh.client.connections == 0)
        await wait_for_condition(lambda: all(s.is_closed for s in mesh.server.sessions))
        w.close()


async def test_many_stalled_readers_do_not_freeze_the_shared_connection(
    client_cred, server_cred, bundles
) -> None:
    """Six backends that stop reading, all on one pooled connection: together they could hold
    more than the 16 MiB connection window, yet a seventh tunnel must still get through."""
    release = asyncio.Event()

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if (await reader.read(4)) == b"hold":
            writer.write(b"hold")
            while data := await reader.read(65536):
                writer.write(data)
            return
        await release.wait()
        writer.close()

    async with running_mesh(
        client_cred=client_cred, server_cred=server_cred, bundles=bundles, backend_handler=backend
    ) as mesh:
        writers = []
        for _ in range(6):
            _r, w = await mesh.connect()
            w.write(b"stal")
            writers.append(w)
        await asyncio.gather(*(write_until_stalled(w, 64 << 20) for w in writers))
        assert mesh.client.stats["connections_opened"] == 1
        r0, w0 = await live_tunnel(mesh)
        await still_live(r0, w0)
        total = sum(st.buffered_bytes for st in streams(mesh.server.sessions))
        assert total <= relay.SESSION_WITHHOLD_BUDGET + hbone.CONNECTION_WINDOW + 7 * relay.TCP_WRITE_HIGH
        release.set()
        for w in writers:
            w.transport.abort()
        w0.close()
