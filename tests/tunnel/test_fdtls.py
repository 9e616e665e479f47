# ruff: noqa: E501
"""HBONE over tunnel.fdtls (TLS on the socket's fd) at both ends: the same mTLS, framing and relay
behaviour as over the loop's SSL transport. (A fd server with a uvloop-TLS client failed its
handshake once under heavy load, UNEXPECTED_EOF, not diagnosed: tunnel/fdtls.py stays off by
default.)"""

from __future__ import annotations

import asyncio
import os
import ssl

from tunnel.client import ClientConfig
from tunnel.server import ServerConfig

from .conftest import running_mesh, sha, wait_for_condition

FD = {"server_config": ServerConfig(tls_on_fd=True), "client_config": ClientConfig(tls_on_fd=True)}


async def test_echo_half_close_and_accounting(client_cred, server_cred, bundles) -> None:
    async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles, **FD) as mesh:
        r, w = await mesh.connect()
        w.write(b"hello over the fd")
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(17), 5) == b"hello over the fd"
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        await wait_for_condition(lambda: len(mesh.server_obs.closed) == 1 and len(mesh.client_obs.closed) == 1)
        assert mesh.server_obs.closed[0].bytes_received == 17
        assert mesh.server_obs.closed[0].source_principal == str(client_cred.spiffe_id)
        assert not mesh.tunnel_errors


async def test_large_transfer_both_ways_with_backpressure(client_cred, server_cred, bundles) -> None:
    async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles, **FD) as mesh:
        blob = os.urandom(24 * 1024 * 1024)
        r, w = await mesh.connect()

        async def send() -> None:
            view = memoryview(blob)
            for i in range(0, len(blob), 1 << 20):
                w.write(view[i : i + (1 << 20)])
                await w.drain()
            w.write_eof()

        sender = asyncio.create_task(send())
        got = bytearray()
        while chunk := await asyncio.wait_for(r.read(1 << 20), 30):
            got += chunk
        await sender
        assert len(got) == len(blob) and sha(bytes(got)) == sha(blob)
        w.close()


async def test_many_streams_on_one_connection(client_cred, server_cred, bundles) -> None:
    async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles, **FD) as mesh:
        async def one(i: int) -> bytes:
            r, w = await mesh.connect()
            payload = f"stream {i} ".encode() * 100
            w.write(payload)
            w.write_eof()
            data = await asyncio.wait_for(r.read(), 10)
            w.close()
            return data if data == payload else b"mismatch"

        results = await asyncio.gather(*(one(i) for i in range(40)))
        assert all(r != b"mismatch" for r in results)
        assert mesh.client.connections == 1  # pooled: one TLS connection carried all of them


async def test_untrusted_client_is_refused_at_the_handshake(client_cred, server_cred, bundles) -> None:
    async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles, **FD) as mesh:
        # A plain TLS client without a certificate: the server must refuse it (mTLS), counted.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        try:
            r, w = await asyncio.wait_for(
                asyncio.open_connection(str(mesh.server_addr.ip), mesh.server_addr.port, ssl=ctx), 5
            )
            await asyncio.wait_for(r.read(1), 5)  # TLS 1.3: the refusal comes after the client's Finished
            w.close()
        except (ssl.SSLError, ConnectionError, OSError):
            pass
        await wait_for_condition(lambda: mesh.server.stats["tls-handshake"] >= 1)
        assert mesh.server.stats["connections_accepted"] == 0
