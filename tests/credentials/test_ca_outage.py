"""A CA outage longer than the certificate TTL heals by itself (issue 12, item 1).

Real components on loopback (tests/agent/mesh.py): a real CaServer (gRPC over mTLS), two real
node agents with real HBONE mTLS between them, a TCP echo app behind node-b. The workload TTL is
6 s (the agents ask for it; the node identity is renewed with it too), the CA is stopped for
2 x TTL and started again on the same address, and nothing else is done: traffic must flow
again, and while it is down the agents must say why (CA unreachable, then the renewable node
credential expired) in /status (what `ztagent status` shows) and in their metrics.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.supervisor import StartupError
from credentials.files import read_renewed
from identity.svid import WorkloadCredential
from tests.agent.mesh import Mesh, running_mesh

TTL = dt.timedelta(seconds=6)
PAYLOAD = b"through the mesh " * 64


def sample(text: str, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll ``check`` (bounded); returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if await check():
            return time.monotonic() - start
        await asyncio.sleep(0.25)
    raise AssertionError(f"not within {timeout:g}s: {what}")


async def problems(mesh: Mesh, node: str) -> str:
    return "\n".join((await mesh.admin(node, "/status"))["problems"])


async def traffic_flows(mesh: Mesh) -> bool:
    return await mesh.roundtrip(mesh.sleep_ip, "node-a", f"{mesh.vip}:8000", PAYLOAD) == PAYLOAD


def bootstrap_files(mesh: Mesh, node: str) -> dict[str, bytes]:
    d = mesh.tmp / f"cred-{node}"
    return {n: (d / n).read_bytes() for n in ("key.pem", "cert-chain.pem", "root-cert.pem")}


def persisted_renewal(mesh: Mesh, node: str) -> WorkloadCredential | None:
    pems = read_renewed(mesh.tmp / f"cred-{node}")
    return WorkloadCredential.from_pem(pems[1], pems[0]) if pems else None


@pytest.mark.timeout(180)
async def test_ca_down_for_two_ttls_then_back_heals_without_any_command(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, cert_ttl=TTL) as mesh:
        before = {n: bootstrap_files(mesh, n) for n in ("node-a", "node-b")}
        assert await traffic_flows(mesh)
        # The node identity renews like a workload's, beside the bootstrap credential.
        await wait_until(
            lambda: asyncio.sleep(0, persisted_renewal(mesh, "node-a") is not None), 10, "a renewal persisted"
        )

        await mesh.stop_ca()
        down_at = time.monotonic()

        # First the CA is named as unreachable: in status and in the metric's reason label ...
        async def unreachable_named() -> bool:
            texts = [await problems(mesh, n) for n in ("node-a", "node-b")]
            return all("CA unreachable" in t for t in texts)

        await wait_until(unreachable_named, 2 * TTL.total_seconds(), "status names 'CA unreachable'")
        for node in ("node-a", "node-b"):
            m = await mesh.metrics_text(node)
            assert sample(m, "ztagent_cert_fetch_failures_total", reason="ca_unreachable") >= 1
            assert sample(m, "ztagent_cert_fetch_failures_total", reason="node_credential_expired") == 0

        # ... then, once the renewable node credential has expired, that too (the client falls
        # back to the bootstrap credential, which the status says).
        async def node_expiry_named() -> bool:
            text = await problems(mesh, "node-a")
            return "node credential expired: renewable node credential" in text

        await wait_until(node_expiry_named, 2 * TTL.total_seconds(), "status names the node credential")
        text = await problems(mesh, "node-a")
        assert "authenticating to the CA with the bootstrap credential" in text
        m = await mesh.metrics_text("node-a")
        assert sample(m, "ztagent_node_credential_valid", credential="renewed") == 0
        assert sample(m, "ztagent_node_credential_in_use", credential="bootstrap") == 1
        assert sample(m, "ztagent_node_credential_valid", credential="bootstrap") == 1
        # The workload certificates are gone too (fail closed), each naming the cause.
        certs = {c["identity"]: c for c in await mesh.admin("node-a", "/certs")}
        sleep = certs["spiffe://cluster.local/ns/ns1/sa/sleep"]
        assert sleep.get("expiresInSeconds", -1) < 0 or "serial" not in sleep
        assert sleep["lastError"].startswith("CA unreachable: ")
        assert "connect" in sleep["lastError"]  # what the transport saw: the connect was refused

        # Down for 2 x TTL in all, then back on the same address; nobody touches the agents.
        await asyncio.sleep(max(0.0, down_at + 2 * TTL.total_seconds() - time.monotonic()))
        assert not await traffic_flows(mesh)  # still down: no certificate, no traffic
        outage = time.monotonic() - down_at
        await mesh.start_ca()
        recovery = await wait_until(lambda: traffic_flows(mesh), 45, "traffic flows after the CA is back")

        async def healthy() -> bool:
            states = [await mesh.admin(n, "/status") for n in ("node-a", "node-b")]
            return all(s["healthy"] for s in states)

        await wait_until(healthy, 15, "both agents healthy again")
        m = await mesh.metrics_text("node-a")
        assert sample(m, "ztagent_node_credential_in_use", credential="renewed") == 1
        assert {n: bootstrap_files(mesh, n) for n in before} == before  # never overwritten
        ttl = TTL.total_seconds()
        print(f"outage {outage:.1f}s (TTL {ttl:g}s); traffic {recovery:.1f}s after the CA is back")


@pytest.mark.timeout(180)
async def test_agent_restarted_while_the_ca_is_down_starts_once_it_is_back(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, cert_ttl=TTL) as mesh:
        assert await traffic_flows(mesh)
        await wait_until(
            lambda: asyncio.sleep(0, persisted_renewal(mesh, "node-a") is not None), 10, "a renewal persisted"
        )
        await mesh.stop_ca()

        async def renewed_expired() -> bool:
            cred = persisted_renewal(mesh, "node-a")
            return cred is not None and cred.not_after < dt.datetime.now(dt.UTC)

        await wait_until(renewed_expired, 3 * TTL.total_seconds(), "the persisted renewal expired")
        await mesh.stop_agent("node-a")

        # CA still down: the start fails, naming the cause (not the node credential: the
        # bootstrap one is valid).
        with pytest.raises(StartupError) as ei:
            await mesh.start_agent("node-a")
        msg = str(ei.value)
        assert "CA unreachable" in msg and "node credential expired" not in msg, msg

        # CA back: the same start works, on the bootstrap credential, and traffic flows.
        await mesh.start_ca()
        await mesh.start_agent("node-a")
        await wait_until(lambda: traffic_flows(mesh), 45, "traffic flows after the restart")
        st = mesh.agents["node-a"]._ca_client
        assert st is not None and st.node_credential_status().problem == ""
