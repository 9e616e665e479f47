"""The server hands the connector the client's original source (`forwarded: for=`), which the
agent binds its upstream socket to (ztunnel keeps the source IP the same way)."""

from __future__ import annotations

import socket

from tunnel.hbone import Authority
from tunnel.server import tcp_connect

from .conftest import running_mesh


async def test_connector_gets_destination_and_forwarded_source(client_cred, server_cred, bundles) -> None:
    calls: list[tuple[Authority, Authority | None]] = []

    async def connector(destination: Authority, source: Authority | None) -> socket.socket:
        calls.append((destination, source))
        return await tcp_connect(destination, source)

    async with running_mesh(
        client_cred=client_cred, server_cred=server_cred, bundles=bundles, connector=connector
    ) as mesh:
        r, w = await mesh.connect()
        w.write(b"who am i")
        await w.drain()
        assert await r.readexactly(8) == b"who am i"
        app_host, app_port = w.get_extra_info("sockname")[:2]
        w.close()
        # The client's default source is the captured app's own address, not the agent's.
        assert calls == [(mesh.backend, Authority.of(app_host, app_port))]
        assert mesh.server_obs.opened[0].source == Authority.of(app_host, app_port)
        assert not mesh.tunnel_errors
