"""``connections_accepted`` counts peers that passed verification, not every finished handshake."""

from __future__ import annotations

import asyncio

from .conftest import running_mesh, wait_for_condition
from .test_tls_probes import expect_refused, live_tunnel


async def test_peer_refused_by_verification_is_not_counted_as_accepted(
    client_cred, server_cred, bundles
) -> None:
    async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles) as mesh:
        # The TLS handshake itself completes; verify_peer then refuses the peer (no 'h2' ALPN).
        await asyncio.to_thread(
            expect_refused, mesh.server_addr, cred=client_cred, bundles=bundles, alpn=["http/1.1"]
        )
        await wait_for_condition(lambda: mesh.server.stats["alpn"] == 1)
        await wait_for_condition(lambda: not mesh.server._handshakes)  # its accept task is done
        assert mesh.server.stats["connections_accepted"] == 0
        _r, w = await live_tunnel(mesh)  # a verified peer is counted
        assert mesh.server.stats["connections_accepted"] == 1
        w.close()
