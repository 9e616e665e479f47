"""The client's listener protocol (accepted connections become tunnel TCP sides directly)."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from tunnel.hbone import Authority

from .conftest import running_mesh, sha, wait_for_condition


async def test_echo_large_and_half_close(client_cred, server_cred, bundles) -> None:
    async with running_mesh(
        client_cred=client_cred, server_cred=server_cred, bundles=bundles, outbound="protocol"
    ) as mesh:
        blob = os.urandom(8 * 1024 * 1024)
        r, w = await mesh.connect()
        w.write(blob)
        w.write_eof()
        got = bytearray()
        while chunk := await asyncio.wait_for(r.read(1 << 20), 10):
            got += chunk
        assert sha(bytes(got)) == sha(blob)
        w.close()
        await wait_for_condition(lambda: len(mesh.client_obs.closed) == 1)
        info = mesh.client_obs.closed[0]
        assert info.bytes_received == info.bytes_sent == len(blob)
        assert info.source is not None and info.source.port == w.get_extra_info("sockname")[1]
        assert mesh.server_obs.opened[0].source == info.source  # forwarded: for= carried it


async def test_failure_resets_the_accepted_connection(client_cred, server_cred, bundles) -> None:
    async with running_mesh(
        client_cred=client_cred, server_cred=server_cred, bundles=bundles, outbound="protocol"
    ) as mesh:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
        s.close()
        mesh.destination = Authority.of("127.0.0.1", free)
        r, w = await mesh.connect()
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(r.readexactly(1), 5)
        w.close()
        await wait_for_condition(lambda: "status-503" in mesh.client_obs.kinds())


async def test_app_gone_before_tunnel_up(client_cred, server_cred, bundles) -> None:
    gate = asyncio.Event()

    async def slow(_req):
        from tunnel.server import AuthzDecision

        await gate.wait()
        return AuthzDecision(True)

    async with running_mesh(
        client_cred=client_cred, server_cred=server_cred, bundles=bundles, outbound="protocol", authorize=slow
    ) as mesh:
        _r, w = await mesh.connect()
        await wait_for_condition(lambda: mesh.server.open_tunnels == 1)
        w.transport.abort()  # the app resets while its tunnel is still being authorized
        await asyncio.sleep(0.1)
        gate.set()
        # once the tunnel is up the reset is seen and carried across; nothing stays open
        await wait_for_condition(lambda: mesh.server.open_tunnels == 0 and len(mesh.client_obs.closed) == 1)
        r2, w2 = await mesh.connect()
        w2.write(b"next")
        assert await asyncio.wait_for(r2.readexactly(4), 5) == b"next"
        w2.close()
