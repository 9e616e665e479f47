"""HTTP/2 abuse from an authenticated workload against the real HBONE server (mTLS, tunnel.h2
under tunnel.relay): rapid reset (3 x 10 000 HEADERS+RST_STREAM) and a stream flood end in
GOAWAY(ENHANCE_YOUR_CALM / PROTOCOL_ERROR) and a closed connection, every refusal is counted,
each attacker connection costs one log line per kind, and a good client on its own connection
keeps working throughout. Latency under attack is measured by bench/abuse_bench.py, not here.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from bench.abuse_bench import (
    GOAWAY,
    RST_STREAM,
    attack_connection,
    client_context,
    rapid_reset_pairs,
    stream_flood,
)
from tunnel.h2 import ErrorCode
from tunnel.h2 import connection as core
from tunnel.server import SERVER_MAX_CONCURRENT_STREAMS

from .conftest import Mesh, issue, running_mesh, wait_for_condition

WARN_LOGGERS = ("tunnel.h2", "ztagent.tunnel")


@pytest.fixture
async def mesh(client_cred, server_cred, bundles):
    async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles) as m:
        yield m


def warnings_about(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith(WARN_LOGGERS) and needle in r.getMessage()
    ]


async def good_roundtrip(mesh: Mesh) -> None:
    r, w = await mesh.connect()
    w.write(b"still here")
    assert await asyncio.wait_for(r.readexactly(10), 10) == b"still here"
    w.close()


async def test_rapid_reset_3x10000_gets_goaway_per_connection(
    mesh: Mesh, ca, bundles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    attacker = issue(ca, "ns3", "mallory")
    ctx = client_context(attacker, bundles)
    await good_roundtrip(mesh)
    results = []
    for _wave in range(3):
        left = 10_000
        while left > core.RESET_BURST:
            r = await attack_connection(mesh.server_addr, ctx, rapid_reset_pairs(mesh.backend, left))
            results.append(r)
            assert r.goaway_code == ErrorCode.ENHANCE_YOUR_CALM, r
            assert r.closed, "the server kept the abusive connection open"
            # The GOAWAY names the last stream taken: near the burst allowance, not 10 000.
            assert r.goaway_last is not None
            taken = (r.goaway_last + 1) // 2
            assert core.RESET_BURST <= taken <= core.RESET_BURST + 400, taken
            left -= taken
        # The rest fits in one connection's burst allowance (a client whose app aborted many
        # connections at once): no GOAWAY for that.
        rest = await attack_connection(
            mesh.server_addr, ctx, rapid_reset_pairs(mesh.backend, left), timeout=1
        )
        assert rest.goaway_code is None and not rest.closed
        await good_roundtrip(mesh)  # the good client's own connection was never touched
    stats = mesh.server.stats
    assert stats["h2-abuse"] == len(results)
    assert mesh.server_obs.kinds().count("h2-abuse") == len(results)
    # One log line per abusive connection, naming the peer and the cause; none per stream.
    lines = warnings_about(caplog, "rapid reset")
    assert len(lines) == len(results), lines[:5]
    assert all("mallory" in line for line in lines)
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == len(results)
    assert len(results) >= 3 * 10_000 // (core.RESET_BURST + 400)
    await wait_for_condition(lambda: mesh.server.open_tunnels == 0)


async def test_stream_flood_gets_goaway_and_refusals_are_logged_once(
    mesh: Mesh, ca, bundles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    attacker = issue(ca, "ns3", "mallory")
    ctx = client_context(attacker, bundles)
    limit = SERVER_MAX_CONCURRENT_STREAMS
    flood = limit + core.STREAM_LIMIT_REFUSALS + 50
    r = await attack_connection(mesh.server_addr, ctx, stream_flood(mesh.backend, flood), batch=50)
    assert r.goaway_code == ErrorCode.PROTOCOL_ERROR, r
    assert r.closed
    refused = [sid for t, _f, sid, p in r.received if t == RST_STREAM and p == b"\x00\x00\x00\x07"]
    # Every stream past the limit was refused (REFUSED_STREAM) until the allowance ran out.
    assert len(refused) == core.STREAM_LIMIT_REFUSALS + 1, len(refused)
    assert min(refused) == 2 * limit + 1  # stream ids 1, 3, ...: the 201st is the first refused
    assert [t for t, *_ in r.received].count(GOAWAY) == 1
    stats = mesh.server.stats
    assert stats["stream-refused"] == core.STREAM_LIMIT_REFUSALS + 1  # each one counted
    assert stats["h2-abuse"] == 1
    # ...and logged once for the connection, plus the one GOAWAY line.
    assert len(warnings_about(caplog, "stream refused")) == 1
    assert len(warnings_about(caplog, "stream limit exceeded")) == 1
    # The streams it had opened were torn down with the connection; a good client still works.
    await wait_for_condition(lambda: mesh.server.open_tunnels == 0, 10)
    await good_roundtrip(mesh)


async def test_a_peer_that_never_acknowledges_our_settings_gets_settings_timeout(
    client_cred, server_cred, bundles, ca
) -> None:
    from bench.abuse_bench import PREFACE, SETTINGS, frame, parse_frames
    from tunnel.server import ServerConfig

    cfg = ServerConfig(settings_ack_timeout=0.3)
    async with running_mesh(
        client_cred=client_cred, server_cred=server_cred, bundles=bundles, server_config=cfg
    ) as mesh:
        ctx = client_context(issue(ca, "ns3", "mallory"), bundles)
        addr = mesh.server_addr
        t0 = asyncio.get_running_loop().time()
        r, w = await asyncio.open_connection(str(addr.ip), addr.port, ssl=ctx, server_hostname="")
        w.write(PREFACE + frame(SETTINGS, 0, 0))  # our SETTINGS, but never an ACK of the server's
        got = await asyncio.wait_for(r.read(-1), 5)  # until the server closes
        elapsed = asyncio.get_running_loop().time() - t0
        w.close()
        goaways = [p for t, _f, _s, p in parse_frames(got) if t == GOAWAY]
        assert len(goaways) == 1 and int.from_bytes(goaways[0][4:8]) == ErrorCode.SETTINGS_TIMEOUT
        assert 0.25 <= elapsed < 3, elapsed
        await wait_for_condition(lambda: mesh.server.stats["settings-timeout"] == 1)
        # A peer that does acknowledge (our own client) is not affected.
        await good_roundtrip(mesh)
        await asyncio.sleep(0.5)  # past the timeout, on the same pooled connection
        await good_roundtrip(mesh)
        assert mesh.server.stats["settings-timeout"] == 1
        assert mesh.server.stats["connections_accepted"] == 2
