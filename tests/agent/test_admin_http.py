"""The agent's small HTTP/1.1 server (admin, metrics, readiness) over real sockets.

Clients are the standard library's ``http.client`` (what ``ztagent status`` uses through
urllib) and raw sockets for what a well-behaved client never sends.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
from collections.abc import AsyncIterator

import pytest

from serving.http import HttpApp, Response, RunningSite, json_response, serve


def _boom() -> Response:
    raise RuntimeError("endpoint bug")


@pytest.fixture
async def site() -> AsyncIterator[RunningSite]:
    app = HttpApp()
    calls = {"n": 0}

    def counted() -> Response:
        calls["n"] += 1
        return json_response({"n": calls["n"]})

    app.add_get("/count", counted)
    app.add_get("/boom", _boom)
    s = await serve(app, "127.0.0.1", 0)
    try:
        yield s
    finally:
        await s.close()


def _raw(port: int, data: bytes, *, expect_close: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        if not expect_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


async def test_keep_alive_get_and_head(site: RunningSite) -> None:
    def run() -> list[tuple[int, str, bytes]]:
        c = http.client.HTTPConnection("127.0.0.1", site.port, timeout=5)
        out = []
        socks = set()
        for method in ("GET", "GET", "HEAD"):
            c.request(method, "/count?verbose=1")
            r = c.getresponse()
            out.append((r.status, r.getheader("content-type", ""), r.read()))
            socks.add(id(c.sock))  # http.client opens a new socket if the server closed
        c.close()
        assert len(socks) == 1, "keep-alive: every request on the same connection"
        return out

    got = await asyncio.to_thread(run)
    assert [json.loads(b)["n"] for _, _, b in got[:2]] == [1, 2]  # one connection, two answers
    assert got[0][0] == 200 and got[0][1] == "application/json"
    assert got[2][0] == 200 and got[2][2] == b""  # HEAD: headers only


async def test_unknown_path_and_method_are_refused_with_the_reason(site: RunningSite) -> None:
    def run() -> tuple[http.client.HTTPResponse, bytes, http.client.HTTPResponse, bytes]:
        c = http.client.HTTPConnection("127.0.0.1", site.port, timeout=5)
        c.request("GET", "/nope")
        r1 = c.getresponse()
        b1 = r1.read()
        c.request("POST", "/count", body=b"x" * 10)
        r2 = c.getresponse()
        b2 = r2.read()
        c.close()
        return r1, b1, r2, b2

    r1, b1, r2, b2 = await asyncio.to_thread(run)
    assert r1.status == 404 and b"/count" in b1  # names what exists
    assert r2.status == 405 and r2.getheader("allow") == "GET, HEAD" and b"POST" in b2


async def test_a_failing_endpoint_answers_500_and_the_server_keeps_serving(site: RunningSite) -> None:
    def run() -> list[int]:
        out = []
        for path in ("/boom", "/count"):
            c = http.client.HTTPConnection("127.0.0.1", site.port, timeout=5)
            c.request("GET", path)
            out.append(c.getresponse().status)
            c.close()
        return out

    assert await asyncio.to_thread(run) == [500, 200]


async def test_pipelined_requests_are_answered_in_order(site: RunningSite) -> None:
    req = b"GET /count HTTP/1.1\r\nHost: x\r\n\r\n"
    out = await asyncio.to_thread(
        _raw, site.port, req + req + b"GET /count HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert out.count(b"HTTP/1.1 200") == 3
    bodies = [
        json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"}")[0] + b"}")
        for part in out.split(b"HTTP/1.1 ")[1:]
    ]
    assert [b["n"] for b in bodies] == [1, 2, 3]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
        (b"GET /count HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 without Host
        (b"GET /count HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
        (
            b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"b" * 100000,
            b"413",
        ),
    ],
)
async def test_malformed_requests_get_a_4xx_and_a_close(
    site: RunningSite, request_bytes: bytes, status: bytes
) -> None:
    out = await asyncio.to_thread(_raw, site.port, request_bytes)
    assert out.startswith(b"HTTP/1.1 " + status), out[:80]
    # The listener is unharmed.
    ok = await asyncio.to_thread(
        _raw, site.port, b"GET /count HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert ok.startswith(b"HTTP/1.1 200")


async def test_close_drops_open_keep_alive_connections() -> None:
    app = HttpApp()
    app.add_get("/", lambda: Response(b"hi\n"))
    s = await serve(app, "127.0.0.1", 0)
    r, w = await asyncio.open_connection("127.0.0.1", s.port)
    w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(r.readuntil(b"hi\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    await asyncio.wait_for(s.close(), 5)
    assert await asyncio.wait_for(r.read(), 5) == b""  # the server closed it
    w.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", s.port), timeout=2).close()


def test_routes_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="must start with /"):
        HttpApp().add_get("status", lambda: Response(b""))


async def test_a_client_that_pipelines_without_reading_cannot_make_us_buffer_without_bound() -> None:
    app = HttpApp()
    big = b"m" * 200_000
    rendered = {"n": 0}

    def metrics() -> Response:
        rendered["n"] += 1
        return Response(big)

    app.add_get("/metrics", metrics)
    s = await serve(app, "127.0.0.1", 0)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", s.port)
        w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)  # ~70 KB of requests
        await w.drain()
        await asyncio.sleep(1.0)  # we never read
        # Answers stop once the unread ones fill the socket and our write buffer.
        assert rendered["n"] < 100, rendered
        conn = next(iter(s.state.connections))
        assert conn.transport is not None and conn.transport.get_write_buffer_size() < 2 * 1024 * 1024
        # Reading resumes the answers, in order and complete.
        got = 0
        while got < 5 * len(big):
            chunk = await asyncio.wait_for(r.read(1 << 20), 5)
            assert chunk
            got += len(chunk)
        assert rendered["n"] >= 5
        w.close()
    finally:
        await s.close()


async def test_trickling_bytes_does_not_hold_a_connection_and_the_oldest_is_evicted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import serving.http as admin

    monkeypatch.setattr(admin, "REQUEST_TIMEOUT", 0.5)
    monkeypatch.setattr(admin, "MAX_CONNECTIONS", 3)
    app = HttpApp()
    app.add_get("/healthz/ready", lambda: Response(b"ready\n"))
    s = await serve(app, "127.0.0.1", 0)
    try:
        # A slow client trickles a byte every 0.2 s: the request deadline still closes it.
        r, w = await asyncio.open_connection("127.0.0.1", s.port)
        for b in b"GET /healthz/re":
            w.write(bytes([b]))
            await asyncio.sleep(0.2)
            if r.at_eof():
                break
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        # Three idle connections fill the listener; a fourth (the probe) evicts the oldest.
        idle = [await asyncio.open_connection("127.0.0.1", s.port) for _ in range(3)]
        probe = await asyncio.to_thread(
            _raw, s.port, b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert probe.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(idle[0][0].read(), 5) == b""  # the oldest was closed
        for _, iw in idle:
            iw.close()
    finally:
        await s.close()


def _until_closed(port: int, data: bytes, timeout: float) -> bytes:
    """Send ``data`` and read until the server closes; we never half-close (a waiting client)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):  # socket.timeout (a failure) if the server never answers
            out += chunk
        return out


async def test_content_length_with_transfer_encoding_is_refused_and_closed(site: RunningSite) -> None:
    # RFC 9112 §6.3: a request smuggling vector. The chunked body is empty, so a server that
    # frames by Transfer-Encoding sees the GET after it as a second request; we answer 400 and
    # close, so nothing after the ambiguous request is ever read.
    smuggle = (
        b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /count HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    out = await asyncio.to_thread(_until_closed, site.port, smuggle, 5)
    assert out.startswith(b"HTTP/1.1 400") and b"Transfer-Encoding" in out, out[:200]
    assert out.count(b"HTTP/1.1 ") == 1 and b"connection: close" in out.lower()


async def test_an_http09_request_is_answered_at_once_not_left_waiting(site: RunningSite) -> None:
    # "GET /" with no version and no blank line after it: h11 waits for a head that never comes,
    # which left the client hanging for REQUEST_TIMEOUT (10 s). Now: 400 and close, promptly.
    loop = asyncio.get_running_loop()
    started = loop.time()
    out = await asyncio.to_thread(_until_closed, site.port, b"GET /count\r\n", 3)
    assert loop.time() - started < 2
    assert out.startswith(b"HTTP/1.1 400") and b"HTTP/0.9" in out, out[:200]
    # A request line that is fine on its own is still given the time to send its headers.
    with socket.create_connection(("127.0.0.1", site.port), timeout=5) as s:
        s.sendall(b"GET /count HTTP/1.1\r\n")
        await asyncio.sleep(0.3)
        s.sendall(b"Host: x\r\nConnection: close\r\n\r\n")
        got = await asyncio.to_thread(s.recv, 65536)
    assert got.startswith(b"HTTP/1.1 200"), got[:80]
