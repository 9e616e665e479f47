"""Client -> server -> backend over real sockets and real mTLS (certificates from identity.ca)."""

from __future__ import annotations

import asyncio
import os

from .conftest import running_mesh, sha, wait_for_condition


async def test_echo_through_tunnel(client_cred, server_cred, bundles) -> None:
    async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles) as mesh:
        r, w = await mesh.connect()
        w.write(b"hello hbone")
        await w.drain()
        assert await r.readexactly(11) == b"hello hbone"
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 5) == b""  # backend's FIN carried back
        w.close()
        await wait_for_condition(
            lambda: len(mesh.server_obs.closed) == 1 and len(mesh.client_obs.closed) == 1
        )
        s_info, c_info = mesh.server_obs.closed[0], mesh.client_obs.closed[0]
        for info in (s_info, c_info):
            assert info.bytes_received == 11 and info.bytes_sent == 11
            assert info.source_principal == str(client_cred.spiffe_id)
            assert info.destination_principal == str(server_cred.spiffe_id)
            assert info.connection_security_policy == "mutual_tls"
        assert s_info.direction == "inbound" and c_info.direction == "outbound"
        assert not mesh.tunnel_errors


async def test_large_transfer_intact(client_cred, server_cred, bundles) -> None:
    async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles) as mesh:
        blob = os.urandom(64 * 1024 * 1024)
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
        assert len(got) == len(blob)
        assert sha(bytes(got)) == sha(blob)
        w.close()
