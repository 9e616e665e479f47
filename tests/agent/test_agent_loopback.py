"""Two real node agents on loopback with a real CA: HBONE end to end, policy, metrics, admin."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.agent.mesh import Mesh, running_mesh

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def mesh(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with running_mesh(tmp_path) as m:
        yield m


async def test_plaintext_and_same_node(mesh: Mesh) -> None:
    got = await mesh.roundtrip(None, "node-b", f"{mesh.httpbin_ip}:{mesh.echo.port}", b"plain")
    assert got == b"plain"
    got = await mesh.roundtrip(mesh.sleep_ip, "node-a", f"{mesh.ip(41)}:{mesh.legacy.port}", b"legacy")
    assert got == b"legacy"
    got = await mesh.roundtrip(mesh.sleep_ip, "node-a", f"{mesh.ip(11)}:{mesh.local.port}", b"local")
    assert got == b"local"
    print(mesh.local.peers, mesh.echo.peers)
    for n in ("node-a", "node-b"):
        for rec in mesh.access_log(n):
            print(n, rec)
    print(await mesh.metrics_text("node-b"))
    print(await mesh.admin("node-b", "/status"))
