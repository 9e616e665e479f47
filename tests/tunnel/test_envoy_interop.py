"""Interop with real Envoy 1.40 both ways: bytes intact, large transfer, half-close."""

from __future__ import annotations

import asyncio
import os

import pytest

from bench.envoy import ENVOY, hbone_client_config, hbone_server_config, start_envoy
from tunnel.hbone import Authority

from .conftest import Recorder, running_mesh, sha, start_backend, wait_for_condition

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not ENVOY.exists(), reason="Envoy binary not installed at .venv/bin/envoy"),
]


async def exercise(host: str, port: int) -> None:
    """Echo, 32 MiB both ways with a hash check, and half-close in both orders."""
    r, w = await asyncio.open_connection(host, port, limit=1 << 22)
    w.write(b"hello envoy")
    assert await asyncio.wait_for(r.readexactly(11), 10) == b"hello envoy"
    blob = os.urandom(32 * 1024 * 1024)

    async def send() -> None:
        for i in range(0, len(blob), 1 << 20):
            w.write(blob[i : i + (1 << 20)])
            await w.drain()
        w.write_eof()  # client half-closes: FIN -> END_STREAM -> FIN at the backend

    sender = asyncio.create_task(send())
    got = bytearray()
    while chunk := await asyncio.wait_for(r.read(1 << 20), 30):
        got += chunk
    await sender
    assert len(got) == len(blob) and sha(bytes(got)) == sha(blob)  # and the backend's FIN came back
    w.close()


async def server_first_half_close(host: str, port: int, got: asyncio.Future[bytes]) -> None:
    r, w = await asyncio.open_connection(host, port)
    w.write(b"?")  # Envoy as client opens the tunnel on first byte or at once; make it deterministic
    assert await asyncio.wait_for(r.read(), 10) == b"banner"  # banner then FIN
    w.write(b"reply after FIN")
    w.write_eof()
    assert await asyncio.wait_for(got, 10) == b"?reply after FIN"
    w.close()


def banner_backend(loop: asyncio.AbstractEventLoop):
    got: asyncio.Future[bytes] = loop.create_future()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"banner")
        writer.write_eof()
        got.set_result(await reader.read())
        writer.close()

    return handler, got


async def test_envoy_client_to_our_server(client_cred, server_cred, bundles) -> None:
    async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles) as mesh:
        env = await asyncio.to_thread(
            start_envoy,
            hbone_client_config(
                target=str(mesh.backend),
                server=(str(mesh.server_addr.ip), mesh.server_addr.port),
                cred=client_cred,
                bundles=bundles,
                expect_san=str(server_cred.spiffe_id),
            ),
        )
        try:
            await exercise("127.0.0.1", env.listener_port)
            await wait_for_condition(lambda: len(mesh.server_obs.closed) == 1)
            info = mesh.server_obs.closed[0]
            assert info.source_principal == str(client_cred.spiffe_id)
            assert info.bytes_received == 11 + 32 * 1024 * 1024 == info.bytes_sent
        finally:
            await asyncio.to_thread(env.stop)


async def test_envoy_client_half_close_server_first(client_cred, server_cred, bundles) -> None:
    handler, got = banner_backend(asyncio.get_running_loop())
    async with running_mesh(
        client_cred=client_cred, server_cred=server_cred, bundles=bundles, backend_handler=handler
    ) as mesh:
        env = await asyncio.to_thread(
            start_envoy,
            hbone_client_config(
                target=str(mesh.backend),
                server=(str(mesh.server_addr.ip), mesh.server_addr.port),
                cred=client_cred,
                bundles=bundles,
                expect_san=str(server_cred.spiffe_id),
            ),
        )
        try:
            await server_first_half_close("127.0.0.1", env.listener_port, got)
        finally:
            await asyncio.to_thread(env.stop)


async def test_our_client_to_envoy_terminator(client_cred, server_cred, bundles) -> None:
    from .conftest import echo_handler

    backend, baddr = await start_backend(echo_handler)
    env = await asyncio.to_thread(
        start_envoy,
        hbone_server_config(backend=(str(baddr.ip), baddr.port), cred=server_cred, bundles=bundles),
    )
    try:
        # our server is unused here; the client talks to Envoy's HBONE listener
        async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles) as mesh:
            mesh.server_addr = Authority.of("127.0.0.1", env.listener_port)
            mesh.destination = baddr
            await exercise(*mesh.outbound_addr)
            assert not mesh.tunnel_errors
            assert mesh.client.stats["connections_opened"] == 1
            rec: Recorder = mesh.client_obs
            await wait_for_condition(lambda: len(rec.closed) == 1)
            assert rec.closed[0].destination_principal == str(server_cred.spiffe_id)
            stats = await asyncio.to_thread(env.stats)
            assert stats.get("http.hbone_in.downstream_cx_ssl_total", 0) >= 1
    finally:
        await asyncio.to_thread(env.stop)
        backend.close()


async def test_our_client_to_envoy_half_close_server_first(client_cred, server_cred, bundles) -> None:
    """Envoy's CONNECT terminator ends the whole tunnel when its upstream FINs first (END_STREAM
    then RST_STREAM(NO_ERROR)); what must hold is that the bytes before that FIN reach our app
    intact followed by a clean EOF, not destroyed by a TCP RST."""
    handler, _got = banner_backend(asyncio.get_running_loop())
    backend, baddr = await start_backend(handler)
    env = await asyncio.to_thread(
        start_envoy,
        hbone_server_config(backend=(str(baddr.ip), baddr.port), cred=server_cred, bundles=bundles),
    )
    try:
        async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles) as mesh:
            mesh.server_addr = Authority.of("127.0.0.1", env.listener_port)
            mesh.destination = baddr
            r, w = await asyncio.open_connection(*mesh.outbound_addr)
            assert await asyncio.wait_for(r.read(), 10) == b"banner"  # then EOF, no reset
            w.close()
            await wait_for_condition(lambda: len(mesh.client_obs.closed) == 1)
            assert "RST_STREAM NO_ERROR" in mesh.client_obs.closed[0].close_reason
    finally:
        await asyncio.to_thread(env.stop)
        backend.close()
