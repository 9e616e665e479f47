"""An HBONE peer's ``forwarded: for=`` is only its claim: the destination agent believes it only
when the address belongs to a workload with the peer's authenticated identity (tests/agent/mesh.py:
real agents, real CA, real mTLS). A peer naming another workload's IP gets neither that
workload's ipBlocks permissions nor its address on the pod's connection."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from pathlib import Path

import pytest

from tests.agent.mesh import Mesh, running_mesh
from tunnel.client import TunnelError
from tunnel.hbone import Authority

pytestmark = pytest.mark.timeout(120)


def allow_only_from(ip: str) -> str:
    return f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-ip, namespace: ns2}}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {{ipBlocks: ["{ip}/32"]}}
"""


@pytest.fixture
async def mesh(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with running_mesh(tmp_path) as m:
        yield m


async def hbone_as_sleep(mesh: Mesh, claimed_source: str, payload: bytes) -> bytes:
    """Open a tunnel to httpbin presenting sleep's real certificate (as node-a holds it) with
    ``forwarded: for=<claimed_source>``; returns what the echo app sent back (b"" if refused)."""
    a = mesh.agents["node-a"]
    sleep = a.store.by_ip(ipaddress.ip_address(mesh.sleep_ip))
    httpbin = a.store.by_ip(ipaddress.ip_address(mesh.httpbin_ip))
    assert sleep is not None and httpbin is not None
    cred = a.cert_manager.current(sleep.spiffe_id)
    app, inner = socket.socketpair()
    try:
        try:
            await a.hbone_client.open_tunnel(
                inner,
                source=cred,
                destination=Authority.of(mesh.httpbin_ip, mesh.echo.port),
                agent_address=Authority.of(mesh.httpbin_ip, mesh.hbone_port),
                expected_identities=[httpbin.spiffe_id],
                source_address=Authority.of(claimed_source, 40000),
            )
        except TunnelError:
            return b""
        app.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(app, payload)
        app.shutdown(socket.SHUT_WR)
        out = b""
        for _ in range(100):
            chunk = await asyncio.wait_for(loop.sock_recv(app, 65536), 10)
            if not chunk:
                break
            out += chunk
        return out
    finally:
        app.close()


async def test_forged_forwarded_source_is_not_trusted(mesh: Mesh) -> None:
    # Honest: sleep's identity, sleep's own address. The pod sees sleep's IP.
    assert await hbone_as_sleep(mesh, mesh.sleep_ip, b"honest") == b"honest"
    assert mesh.echo.peers[-1][0] == mesh.sleep_ip

    # Forged: sleep's identity claiming other's address. Delivered (no policy) but from the node,
    # never from the claimed address, and the destination agent says why.
    assert await hbone_as_sleep(mesh, mesh.other_ip, b"forged") == b"forged"
    assert len(mesh.echo.peers) == 2
    assert mesh.echo.peers[-1][0] not in (mesh.other_ip, mesh.sleep_ip)

    # Policy: only other's IP is allowed. The forger is judged by its real peer address: denied,
    # and the denial records that address, not the claimed one.
    mesh.set_policies(allow_only_from(mesh.other_ip))
    await mesh.wait_applied()
    assert await hbone_as_sleep(mesh, mesh.other_ip, b"no") == b""
    assert len(mesh.echo.peers) == 2
    denied = [r for r in mesh.access_log("node-b") if r["event"] == "connection_denied"]
    assert len(denied) == 1
    assert denied[0]["source_ip"] != mesh.other_ip
    assert denied[0]["source_principal"] == "spiffe://cluster.local/ns/ns1/sa/sleep"

    # The same policy admits the real owner of that address (other, through node-a's capture).
    assert await mesh.roundtrip(mesh.other_ip, "node-a", f"{mesh.vip}:8000", b"ok") == b"ok"
    assert mesh.echo.peers[-1][0] == mesh.other_ip


async def test_policy_recheck_judges_a_forger_by_its_real_address(mesh: Mesh) -> None:
    """Admitted while policy allows everyone, a forged ``for=`` must not keep the tunnel alive when
    the policy narrows to the claimed address: the re-check sees the real peer address, as
    admission did, and cuts it."""
    a = mesh.agents["node-a"]
    sleep = a.store.by_ip(ipaddress.ip_address(mesh.sleep_ip))
    httpbin = a.store.by_ip(ipaddress.ip_address(mesh.httpbin_ip))
    assert sleep is not None and httpbin is not None
    app, inner = socket.socketpair()
    app.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await a.hbone_client.open_tunnel(
            inner,
            source=a.cert_manager.current(sleep.spiffe_id),
            destination=Authority.of(mesh.httpbin_ip, mesh.echo.port),
            agent_address=Authority.of(mesh.httpbin_ip, mesh.hbone_port),
            expected_identities=[httpbin.spiffe_id],
            source_address=Authority.of(mesh.other_ip, 40000),
        )
        await loop.sock_sendall(app, b"before")
        assert await asyncio.wait_for(loop.sock_recv(app, 100), 10) == b"before"

        mesh.set_policies(allow_only_from(mesh.other_ip))
        await mesh.wait_applied()
        closed = False
        for _ in range(50):  # the re-check runs on apply; allow it a few seconds to land
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(app, 100), 0.2)
            except TimeoutError:
                continue
            except ConnectionError:
                closed = True
                break
            if chunk == b"":
                closed = True
                break
        assert closed, "a forger's tunnel survived a policy that admits only the forged address"
    finally:
        app.close()
