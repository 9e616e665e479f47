"""Interop with nghttp2 (``nghttp``, ``h2load``), a second independent HTTP/2 implementation,
against our HBONE server (tunnel.h2 under tunnel.relay, real mTLS).

What nghttp2's tools can and cannot do here:

- Neither can send an HBONE request: both always send ``:scheme`` and ``:path``, even with
  ``-H ':method: CONNECT'`` (RFC 9113 §8.5 forbids them on CONNECT). So our server must answer
  each such request 400 on its stream and keep the connection, which these tests check, along
  with everything below the request: preface, SETTINGS both ways and their ACKs, nghttp2's
  PRIORITY frames, HPACK with Huffman coding and nghttp2's dynamic table over many requests,
  our response blocks decoded by nghttp2, flow-control windows, GOAWAY at the end.
- ``nghttp`` presents a client certificate (``--cert``/``--key``), so it speaks to the server
  directly. ``h2load`` has no client-certificate option, and our server requires an SVID; it
  runs through a small TLS-originating relay on loopback that presents one (TCP bytes copied
  as they are: the HTTP/2 on the wire is h2load's own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from identity.bundle import TrustBundleSet
from identity.svid import WorkloadCredential
from tunnel.hbone import Authority

from .conftest import Mesh, running_mesh
from .test_tls_probes import _ctx

pytestmark = pytest.mark.skipif(
    not (shutil.which("nghttp") and shutil.which("h2load")), reason="nghttp2-client not installed"
)


@pytest.fixture
async def mesh(client_cred, server_cred, bundles):
    async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles) as m:
        yield m


def pem_files(tmp_path: Path, cred: WorkloadCredential) -> tuple[Path, Path]:
    crt, key = tmp_path / "client.crt", tmp_path / "client.key"
    crt.write_bytes(cred.chain_pem())
    key.write_bytes(cred.key_pem())
    key.chmod(0o600)
    return crt, key


async def run(*argv: str, timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return int(proc.returncode or 0), out.decode("utf-8", "replace")


async def still_tunnels(mesh: Mesh) -> None:
    r, w = await mesh.connect()
    w.write(b"after nghttp2")
    assert await asyncio.wait_for(r.readexactly(13), 10) == b"after nghttp2"
    w.close()


async def test_nghttp_connect_gets_400_per_stream_over_one_connection(
    mesh: Mesh, client_cred, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    crt, key = pem_files(tmp_path, client_cred)
    addr, backend = mesh.server_addr, mesh.backend
    rc, out = await run(
        "nghttp", "-nv", "-m", "5", "--cert", str(crt), "--key", str(key),
        "-H", ":method: CONNECT", "-H", f":authority: {backend}", f"https://{addr}/",
    )  # fmt: skip
    assert rc == 0, out
    # Our SETTINGS and connection window as nghttp2 decoded them (DESIGN §4's numbers).
    assert "[SETTINGS_MAX_CONCURRENT_STREAMS(0x03):200]" in out
    assert "[SETTINGS_INITIAL_WINDOW_SIZE(0x04):4194304]" in out
    assert "[SETTINGS_MAX_FRAME_SIZE(0x05):1048576]" in out
    assert "[SETTINGS_ENABLE_PUSH(0x02):0]" in out
    assert "window_size_increment=16711681" in out  # 64 KiB - 1 -> 16 MiB
    assert re.search(r"recv SETTINGS frame <length=0, flags=0x01", out), "our ACK of nghttp's SETTINGS"
    # Five requests on five streams of one connection, each answered 400 (it carried :path).
    assert out.count("recv (stream_id=") == 5 and out.count(":status: 400") == 5, out
    assert out.count("Connected") == 1
    stats = mesh.server.stats
    assert stats["bad-request"] == 5 and stats["connections_accepted"] == 1
    assert stats["protocol-error"] == 0 and stats["h2-abuse"] == 0
    # Refusals are counted per stream, logged once for the connection.
    lines = [r.getMessage() for r in caplog.records if "bad-request" in r.getMessage()]
    assert len(lines) == 1 and ":scheme or :path" in lines[0], lines
    await still_tunnels(mesh)


async def test_nghttp_get_is_refused_as_not_connect(mesh: Mesh, client_cred, tmp_path: Path) -> None:
    crt, key = pem_files(tmp_path, client_cred)
    rc, out = await run(
        "nghttp", "-nv", "--cert", str(crt), "--key", str(key), f"https://{mesh.server_addr}/"
    )
    assert rc == 0, out
    assert ":status: 400" in out
    assert mesh.server.stats["bad-request"] == 1


async def test_nghttp_without_a_client_certificate_is_refused(mesh: Mesh) -> None:
    _rc, out = await run("nghttp", "-nv", f"https://{mesh.server_addr}/")
    # TLS 1.3 lets the client send its request before the server has judged its (missing)
    # certificate; the server's alert then ends the connection (nghttp still exits 0).
    assert ":status" not in out and "requests were not processed" in out, out
    assert mesh.server.stats["tls-handshake"] == 1
    await still_tunnels(mesh)


@contextlib.asynccontextmanager
async def tls_origination(
    target: Authority, cred: WorkloadCredential, bundles: TrustBundleSet
) -> AsyncIterator[Authority]:
    """Plain TCP in, TLS (with ``cred``'s SVID, ALPN h2) out: bytes are copied unchanged."""
    ctx: ssl.SSLContext = _ctx(cred, bundles, ["h2"], False)
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
        with contextlib.suppress(Exception):
            w.close()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(str(target.ip), target.port, ssl=ctx, server_hostname="")
        await asyncio.gather(pipe(cr, sw), pipe(sr, cw))

    def spawn(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        t = asyncio.get_running_loop().create_task(handle(cr, cw))
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    srv = await asyncio.start_server(spawn, "127.0.0.1", 0)
    try:
        host, port = srv.sockets[0].getsockname()[:2]
        yield Authority.of(host, port)
    finally:
        srv.close()
        for t in list(tasks):
            t.cancel()


async def test_h2load_many_concurrent_streams(mesh: Mesh, client_cred, bundles) -> None:
    async with tls_origination(mesh.server_addr, client_cred, bundles) as front:
        rc, out = await run(
            "h2load", "-n", "2000", "-c", "4", "-m", "50",
            "-H", ":method: CONNECT", "-H", f":authority: {mesh.backend}", f"http://{front}/",
        )  # fmt: skip
    assert rc == 0, out
    # h2load speaks h2c prior knowledge into the relay: HTTP/2 from its first byte.
    assert "Application protocol: h2c" in out, out
    # h2load counts a 4xx as "failed"; "errored" would be a stream or connection error.
    done = "requests: 2000 total, 2000 started, 2000 done, 0 succeeded, 2000 failed, 0 errored, 0 timeout"
    assert done in out, out
    assert "status codes: 0 2xx, 0 3xx, 2000 4xx, 0 5xx" in out, out
    stats = mesh.server.stats
    assert stats["bad-request"] == 2000 and stats["connections_accepted"] == 4
    assert stats["protocol-error"] == 0 and stats["h2-abuse"] == 0 and stats["stream-refused"] == 0
    await still_tunnels(mesh)


@pytest.mark.skipif(not shutil.which("nghttpd"), reason="nghttp2-server not installed")
async def test_our_client_against_nghttpd(client_cred, server_cred, bundles, tmp_path: Path) -> None:
    """nghttp2's server as the peer of our client: SETTINGS and ACKs both ways, our PINGs
    answered, our CONNECT decoded (nghttpd -v prints it). nghttpd answers a request only after
    its END_STREAM, which a CONNECT tunnel never sends before the 200, so the CONNECT gets no
    answer: our client must give up on that stream alone (response timeout) and keep the
    connection alive on PINGs, although nghttpd sends none of its own."""
    from tunnel.client import ClientConfig, HboneClient, OutboundTarget, TunnelError

    crt, key = tmp_path / "server.crt", tmp_path / "server.key"
    crt.write_bytes(server_cred.chain_pem())
    key.write_bytes(server_cred.key_pem())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        "nghttpd", "-v", "-a", "127.0.0.1", str(port), str(key), str(crt),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    cfg = ClientConfig(response_timeout=1.0, keepalive_interval=0.25, keepalive_timeout=0.5)
    client = HboneClient(bundles=lambda: bundles, config=cfg)
    target = OutboundTarget(
        client_cred, Authority.parse("10.0.0.1:80"), Authority.of("127.0.0.1", port), (server_cred.spiffe_id,)
    )
    try:
        for _ in range(50):  # nghttpd is starting
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            await asyncio.sleep(0.05)
        resets = []
        with pytest.raises(TunnelError) as info:
            await client.establish(target, lambda: resets.append(1))
        assert info.value.kind == "response-timeout" and resets == [1]
        # 1 s of waiting and 1.5 s more: three keepalive timeouts; the connection lived on PINGs.
        await asyncio.sleep(1.5)
        assert client.connections == 1
        assert client.stats["connection-lost"] == 0
    finally:
        await client.close()
        await asyncio.sleep(0.3)  # nghttpd reads our GOAWAY
        proc.terminate()
        out = (await proc.communicate())[0].decode("utf-8", "replace")
    assert "[SETTINGS_INITIAL_WINDOW_SIZE(0x04):4194304]" in out
    assert "[SETTINGS_MAX_FRAME_SIZE(0x05):1048576]" in out
    assert "recv (stream_id=1) :method: CONNECT" in out
    assert "recv (stream_id=1) :authority: 10.0.0.1:80" in out
    assert ":path" not in out.split("recv (stream_id=1) :method: CONNECT", 1)[1].split("HEADERS frame")[0]
    assert out.count("send PING frame") >= 4, out  # nghttpd's ACKs to our PINGs
    assert "RST_STREAM frame" in out and "error_code=CANCEL" in out  # the timed-out stream, alone
    assert "GOAWAY" in out  # our close
