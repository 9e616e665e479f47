"""Python ssl / raw h2 probes against the HBONE server: what must be refused, and that refusing
one bad peer leaves every other tunnel running (each test keeps a live tunnel across the probe)."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl

import h2.config
import h2.connection
import h2.events
import pytest

from identity.bundle import TrustBundleSet
from identity.svid import WorkloadCredential
from tunnel import tls
from tunnel.hbone import Authority

from .conftest import Mesh, issue, running_mesh, wait_for_condition


def _ctx(
    cred: WorkloadCredential | None, bundles: TrustBundleSet, alpn: list[str] | None, tls12: bool
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=bundles.all_roots_pem().decode())
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if cred is not None:
        fd = os.memfd_create("probe")
        os.write(fd, cred.chain_pem() + cred.key_pem())
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        os.close(fd)
    return ctx


def tls_connect(
    addr: Authority,
    cred: WorkloadCredential | None,
    bundles: TrustBundleSet,
    *,
    alpn: list[str] | None = None,
    tls12: bool = False,
) -> ssl.SSLSocket:
    raw = socket.create_connection((str(addr.ip), addr.port), timeout=5)
    return _ctx(cred, bundles, alpn if alpn is not None else ["h2"], tls12).wrap_socket(raw)


def probe_peer_leaf(addr: Authority, cred: WorkloadCredential, bundles: TrustBundleSet):
    from cryptography import x509

    with tls_connect(addr, cred, bundles) as s:
        return x509.load_der_x509_certificate(s.getpeercert(binary_form=True))


def expect_refused(addr: Authority, **kwargs) -> BaseException:
    """The handshake fails, or (TLS 1.3 client auth) the first read sees the server's alert/EOF."""
    try:
        s = tls_connect(addr, **kwargs)
    except (ssl.SSLError, ConnectionError) as exc:
        return exc
    with s:
        try:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            data = s.recv(1024)
        except (ssl.SSLError, ConnectionError) as exc:
            return exc
        assert data == b"", f"server answered a refused peer: {data!r}"
        return EOFError("closed")


async def live_tunnel(mesh: Mesh) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await mesh.connect()
    w.write(b"hold")
    assert await asyncio.wait_for(r.readexactly(4), 5) == b"hold"
    return r, w


async def still_live(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.write(b"alive")
    assert await asyncio.wait_for(r.readexactly(5), 5) == b"alive"


@pytest.fixture
async def mesh(client_cred, server_cred, bundles):
    async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles) as m:
        yield m


async def test_no_client_cert_refused(mesh: Mesh, bundles) -> None:
    r, w = await live_tunnel(mesh)
    exc = await asyncio.to_thread(expect_refused, mesh.server_addr, cred=None, bundles=bundles)
    # The alert, or (the server closes right after it, with our preface unread) an EOF/reset
    # that reaches the client first: both are a refusal, which the counter below pins.
    assert "CERTIFICATE_REQUIRED" in str(exc).upper() or isinstance(
        exc, EOFError | ConnectionError | ssl.SSLEOFError
    )
    await wait_for_condition(lambda: mesh.server.stats["tls-handshake"] == 1)
    await still_live(r, w)


async def test_tls12_refused(mesh: Mesh, client_cred, bundles) -> None:
    r, w = await live_tunnel(mesh)
    exc = await asyncio.to_thread(
        expect_refused, mesh.server_addr, cred=client_cred, bundles=bundles, tls12=True
    )
    assert isinstance(exc, ssl.SSLError)
    await wait_for_condition(lambda: mesh.server.stats["tls-handshake"] == 1)
    assert "UNSUPPORTED_PROTOCOL" in mesh.server_obs.rejections[-1][1]
    await still_live(r, w)


async def test_cert_from_another_ca_refused(mesh: Mesh, other_ca, bundles) -> None:
    r, w = await live_tunnel(mesh)
    stranger = issue(other_ca, "ns1", "sleep")  # same trust domain name, different root
    exc = await asyncio.to_thread(expect_refused, mesh.server_addr, cred=stranger, bundles=bundles)
    assert exc is not None
    await wait_for_condition(lambda: mesh.server.stats["tls-handshake"] == 1)
    await still_live(r, w)


async def test_no_alpn_h2_refused(mesh: Mesh, client_cred, bundles) -> None:
    r, w = await live_tunnel(mesh)
    await asyncio.to_thread(
        expect_refused, mesh.server_addr, cred=client_cred, bundles=bundles, alpn=["http/1.1"]
    )
    await wait_for_condition(lambda: mesh.server.stats["alpn"] == 1)
    assert "requires 'h2'" in mesh.server_obs.rejections[-1][1]
    await still_live(r, w)


async def test_non_tls_bytes_refused(mesh: Mesh) -> None:
    r, w = await live_tunnel(mesh)

    def plain() -> bytes:
        with socket.create_connection((str(mesh.server_addr.ip), mesh.server_addr.port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                return s.recv(100)
            except ConnectionResetError:
                return b""

    assert await asyncio.to_thread(plain) == b""
    await wait_for_condition(lambda: mesh.server.stats["tls-handshake"] == 1)
    await still_live(r, w)


def h2_exchange(
    addr: Authority, cred, bundles, requests: list[list[tuple[bytes, bytes]]], *, ignore_limit: bool = False
):
    """Send raw HTTP/2 requests over real mTLS; return {stream_id: status or 'reset:<code>'}."""
    with tls_connect(addr, cred, bundles) as s:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        results: dict[int, str] = {}
        # wait for the server SETTINGS before sending (so the limit is known, then ignored on purpose)
        while conn.remote_settings.max_concurrent_streams > 10**6:
            for _ev in conn.receive_data(s.recv(65536)):
                pass
            s.sendall(conn.data_to_send())
        if ignore_limit:
            conn.remote_settings._settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = [10**6]
        ids = []
        for req in requests:
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, req)
            ids.append(sid)
        s.sendall(conn.data_to_send())
        while len(results) < len(ids):
            data = s.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    results[ev.stream_id] = dict(ev.headers)[b":status"].decode()
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id not in results:
                    results[ev.stream_id] = f"reset:{int(ev.error_code)}"
            s.sendall(conn.data_to_send())
        return [results.get(i) for i in ids]


import h2.settings  # noqa: E402


async def test_non_connect_and_bad_authority_get_400(mesh: Mesh, client_cred, bundles) -> None:
    r, w = await live_tunnel(mesh)
    reqs = [
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"127.0.0.1:80")],
        [(b":method", b"CONNECT"), (b":authority", b"127.0.0.1")],
        [(b":method", b"CONNECT"), (b":authority", b"localhost:80")],
    ]
    statuses = await asyncio.to_thread(h2_exchange, mesh.server_addr, client_cred, bundles, reqs)
    assert statuses == ["400", "400", "400"]
    assert mesh.server.stats["bad-request"] == 3
    details = [d for k, d in mesh.server_obs.rejections if k == "bad-request"]
    assert "not CONNECT" in details[0] and "no port" in details[1] and "not an IPv4" in details[2]
    await still_live(r, w)


async def test_stream_flood_beyond_limit(mesh: Mesh, client_cred, bundles) -> None:
    r, w = await live_tunnel(mesh)
    # 210 CONNECTs to a port nobody answers slowly: an authorizer that parks them keeps them open
    gate = asyncio.Event()

    async def parked(_req):
        await gate.wait()
        from tunnel.server import AuthzDecision

        return AuthzDecision(False, "parked")

    mesh.server.authorize = parked
    req = [(b":method", b"CONNECT"), (b":authority", f"127.0.0.1:{mesh.backend.port}".encode())]
    task = asyncio.create_task(
        asyncio.to_thread(h2_exchange, mesh.server_addr, client_cred, bundles, [req] * 210, ignore_limit=True)
    )
    await wait_for_condition(lambda: mesh.server.stats["stream-refused"] == 10)
    gate.set()
    statuses = await asyncio.wait_for(task, 10)
    assert statuses.count("401") == 200
    assert statuses.count("reset:7") == 10  # REFUSED_STREAM, the connection itself survives
    await still_live(r, w)


async def test_client_sends_no_sni_and_negotiates_aes_gcm_tls13(client_cred, server_cred, bundles) -> None:
    seen: dict[str, object] = {}
    ctx = tls.build_server_context(server_cred, bundles)

    def sni(sslobj, name, _ctx) -> None:
        seen["sni"] = name

    ctx.sni_callback = sni
    cctx = tls.build_client_context(client_cred, bundles)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    class P(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            obj = transport.get_extra_info("ssl_object")
            seen["cipher"] = obj.cipher()
            seen["peer"] = tls.verify_peer(
                obj, bundles, __import__("datetime").datetime.now(__import__("datetime").UTC)
            )
            seen["session_reused"] = obj.session_reused
            done.set_result(None)

    srv = await loop.create_server(P, "127.0.0.1", 0, ssl=ctx)
    port = srv.sockets[0].getsockname()[1]
    t, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port, ssl=cctx, server_hostname="")
    await asyncio.wait_for(done, 5)
    t.close()
    srv.close()
    assert seen["sni"] is None
    name, version, _bits = seen["cipher"]  # type: ignore[misc]
    assert version == "TLSv1.3" and name in {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"}
    assert seen["peer"] == client_cred.spiffe_id
    assert seen["session_reused"] is False
    tls13 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"}
    assert tls13 == {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"}
    assert ctx.num_tickets == 0


def test_chacha_only_client_refused_by_openssl_s_client(server_cred, bundles, tmp_path) -> None:
    """The server offers only AES-GCM: a ChaCha20-only TLS 1.3 client cannot connect."""
    import subprocess
    import threading

    ctx = tls.build_server_context(server_cred, bundles)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    errors: list[str] = []

    def serve() -> None:
        conn, _ = lsock.accept()
        try:
            ctx.wrap_socket(conn, server_side=True)
        except ssl.SSLError as exc:
            errors.append(str(exc))
        finally:
            conn.close()

    th = threading.Thread(target=serve)
    th.start()
    out = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-tls1_3",
            "-ciphersuites",
            "TLS_CHACHA20_POLY1305_SHA256",
        ],
        input=b"",
        capture_output=True,
        timeout=10,
    )
    th.join(10)
    lsock.close()
    assert out.returncode != 0
    assert errors and "NO_SHARED_CIPHER" in errors[0].upper()
