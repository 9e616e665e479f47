"""The small HTTP/1.1 server every role serves its operations endpoints with: admin (JSON,
localhost), Prometheus metrics and readiness. Routes are plain callables; the server holds no
state of its own.

The server is deliberately small: a handful of GET routes on asyncio with ``h11`` doing the
HTTP/1.1 parsing. aiohttp served these before and cost the agent about 10 MB of resident memory
(its client, multidict, yarl and friends are imported whether or not one serves two JSON
routes), a seventh of the per-node budget the agent is measured against (an idle Envoy).
Scrapers and ``curl`` need GET, HEAD, keep-alive and sane limits, which is what is here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import h11

log = logging.getLogger("ztagent.http")

CONTENT_TYPE_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_TEXT = "text/plain; charset=utf-8"
# Request line + headers: h11 refuses (431) a head still incomplete past this many buffered bytes.
# Input is fed to it in slices of this size, so a head that arrived in one large read is held to
# the same limit: heads up to this size always pass, heads over twice it never do.
MAX_REQUEST_HEAD = 8 * 1024
MAX_REQUEST_BODY = 64 * 1024  # GET needs none; a body is read and dropped up to this
# Seconds a client has to deliver a complete request, counted from the connection or from the
# previous response and not extended by trickled bytes (so slow clients cannot hold slots).
REQUEST_TIMEOUT = 10.0
# Connections per listener; a new one beyond this evicts the oldest, so a flood of idle
# connections cannot lock the kubelet's readiness probe or Prometheus out.
MAX_CONNECTIONS = 256
WRITE_HIGH = 256 * 1024  # unread responses buffered per connection before we stop reading
WRITE_LOW = 64 * 1024
SERVER_HEADER = b"ztagent"
# An HTTP/1.x request line (RFC 9112 §3). h11 only looks at a request once its whole head is in,
# so a line without a version (HTTP/0.9's "GET /", which never sends a blank line after it) left
# the client waiting the full REQUEST_TIMEOUT for nothing; it is answered as soon as it is complete.
# Same grammar as h11's request_line, so nothing h11 would accept is refused here.
_REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [\x21-\x7e]+ HTTP/[0-9]\.[0-9]")


@dataclass(frozen=True)
class Response:
    body: bytes
    status: int = 200
    content_type: str = CONTENT_TYPE_TEXT


Handler = Callable[[], Response]
# A POST route gets the query string's parameters (last value wins); the body is not read.
PostHandler = Callable[[Mapping[str, str]], Response]


@dataclass
class HttpApp:
    """GET routes: exact path -> handler; and the few POST routes an operator needs (ztunnel's
    ``POST /logging?level=...``). Handlers run on the event loop and must not block."""

    routes: dict[str, Handler] = field(default_factory=dict)
    post_routes: dict[str, PostHandler] = field(default_factory=dict)

    def add_get(self, path: str, handler: Handler) -> None:
        if not path.startswith("/"):
            raise ValueError(f"route {path!r} must start with /")
        self.routes[path] = handler

    def add_post(self, path: str, handler: PostHandler) -> None:
        if not path.startswith("/"):
            raise ValueError(f"route {path!r} must start with /")
        self.post_routes[path] = handler


def json_response(data: Any, status: int = 200) -> Response:
    body = json.dumps(data, indent=2, default=str) + "\n"
    return Response(body.encode(), status, CONTENT_TYPE_JSON)


class Renderable(Protocol):
    def render(self) -> bytes: ...


def build_metrics_app(metrics: Renderable, *, before_scrape: Callable[[], None] | None = None) -> HttpApp:
    def scrape() -> Response:
        if before_scrape is not None:
            before_scrape()
        # prometheus_client renders synchronously; with a few hundred series this is sub-ms.
        return Response(metrics.render(), 200, CONTENT_TYPE_PROMETHEUS)

    app = HttpApp()
    app.add_get("/metrics", scrape)
    # Istio's path for the merged Prometheus endpoint, so existing scrape configs work.
    app.add_get("/stats/prometheus", scrape)
    return app


def build_readiness_app(ready: Callable[[], tuple[bool, list[str]]]) -> HttpApp:
    """``/healthz/ready``: 200 when ready, else 500 with the reasons (what is not in place yet).

    500, not 503, because ztunnel's readiness server answers 500 while not ready, and probes and
    scripts written for ztunnel check for it."""

    def check() -> Response:
        ok, reasons = ready()
        if ok:
            return Response(b"ready\n")
        return Response(("not ready, pending: " + ", ".join(sorted(reasons)) + "\n").encode(), 500)

    app = HttpApp()
    app.add_get("/healthz/ready", check)
    return app


# --- the HTTP/1.1 server -----------------------------------------------------------------------
class _HttpConnection(asyncio.Protocol):
    """One client connection: requests in order (HTTP/1.1 has no multiplexing), keep-alive,
    an idle timeout, and a 4xx for anything that is not a well-formed GET or HEAD."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self.transport: asyncio.Transport | None = None
        self.request: h11.Request | None = None
        self.body_seen = 0
        self.deadline: asyncio.TimerHandle | None = None
        self.unfed = b""  # input not yet given to h11 (held while the client is not reading)
        self.eof = False  # the client's FIN, given to h11 after the input before it
        self.eof_fed = False
        self.writing_paused = False
        self.line_checked = False  # the current request's first line was seen to be HTTP/1.x

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)
        t.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        conns = self.server.connections
        while len(conns) >= MAX_CONNECTIONS:
            oldest = next(iter(conns))
            conns.pop(oldest)
            oldest.close()
        conns[self] = None
        self._arm_deadline()

    def data_received(self, data: bytes) -> None:
        self.unfed += data
        self._feed()

    def eof_received(self) -> bool:
        self.eof = True
        self._feed()
        return True  # answer what came before the FIN; we close after the last answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.pop(self, None)
        if self.deadline is not None:
            self.deadline.cancel()
        self.transport = None

    # A client that pipelines requests without reading the answers must not make us buffer
    # answers without bound: stop reading (and answering) until it catches up.
    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.transport is not None:
            self.transport.resume_reading()
            self._feed()

    # HTTP
    def _feed(self) -> None:
        # Slices of MAX_REQUEST_HEAD: see its comment.
        while self.unfed and self.transport is not None and not self.writing_paused:
            chunk, self.unfed = self.unfed[:MAX_REQUEST_HEAD], self.unfed[MAX_REQUEST_HEAD:]
            self.conn.receive_data(chunk)
            self._process()
        if not self.unfed and self.transport is not None and not self.writing_paused:
            if self.eof and not self.eof_fed:
                self.eof_fed = True
                self.conn.receive_data(b"")
            self._process()

    def _process(self) -> None:
        while self.transport is not None and not self.writing_paused:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                self._fail(status, f"bad request: {exc}")
                return
            if event is h11.NEED_DATA:
                if not self.line_checked and self.conn.their_state is h11.IDLE:
                    self._check_request_line()
                return
            if event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                names = {name for name, _ in event.headers}
                if b"content-length" in names and b"transfer-encoding" in names:
                    # RFC 9112 §6.3: a request smuggling vector (a proxy in front may frame the body
                    # by the other header); a server MAY reject it and MUST close the connection.
                    self._fail(400, "bad request: both Content-Length and Transfer-Encoding")
                    return
                self.request, self.body_seen = event, 0
            elif isinstance(event, h11.Data):
                self.body_seen += len(event.data)
                if self.body_seen > MAX_REQUEST_BODY:
                    self._fail(413, f"request body over {MAX_REQUEST_BODY} bytes")
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._respond()
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return

    def _check_request_line(self) -> None:
        buf = self.conn.trailing_data[0]
        end = buf.find(b"\n", 0, MAX_REQUEST_HEAD)
        if end < 0:
            return
        self.line_checked = True
        line = buf[:end].rstrip(b"\r")
        if not _REQUEST_LINE.fullmatch(line):
            # Answered in HTTP/1.1 and closed: a 0.9 client shows the text, a 1.x client that sent
            # garbage gets the 400 h11 would give once the head completed, only without the wait.
            self._fail(400, f"bad request: {line[:60]!r} is not an HTTP/1.x request line (no HTTP/0.9)")

    def _respond(self) -> None:
        req, self.request = self.request, None
        assert req is not None
        method = req.method.decode("ascii", "replace")
        path, _, query = req.target.decode("ascii", "replace").partition("?")
        app = self.server.app
        post = app.post_routes.get(path)
        allowed = b"GET, HEAD, POST" if post is not None else b"GET, HEAD"
        if method == "POST" and post is not None:
            extra: list[tuple[bytes, bytes]] = []
            params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
            resp = self._call(path, lambda: post(params))
        elif method not in ("GET", "HEAD"):
            resp = Response(f"method {method} not allowed: {allowed.decode()}\n".encode(), 405)
            extra = [(b"allow", allowed)]
        else:
            extra = []
            handler = app.routes.get(path)
            if handler is None:
                known = ", ".join(sorted(app.routes))
                resp = Response(f"no such endpoint {path}; try one of: {known}\n".encode(), 404)
            else:
                resp = self._call(path, handler)
        self._send(resp, extra, head=method == "HEAD")
        if self.transport is None:
            return
        if self.conn.our_state is h11.MUST_CLOSE:
            self.close()
            return
        try:
            self.conn.start_next_cycle()
        except h11.LocalProtocolError:
            self.close()  # the client did not finish its side (e.g. a body we did not read)
            return
        self.line_checked = False
        self._arm_deadline()  # the next request gets its own REQUEST_TIMEOUT

    @staticmethod
    def _call(path: str, handler: Handler) -> Response:
        try:
            return handler()
        except Exception as exc:
            # A bug in one endpoint must not take the listener (or the agent) down.
            log.exception(f"admin endpoint {path} failed", extra={"event": "admin_error"})
            return Response(f"internal error: {exc!r}\n".encode(), 500)

    def _send(self, resp: Response, extra: list[tuple[bytes, bytes]], *, head: bool = False) -> None:
        headers = [
            (b"content-type", resp.content_type.encode()),
            (b"content-length", str(len(resp.body)).encode()),
            (b"server", SERVER_HEADER),
            *extra,
        ]
        out = self.conn.send(h11.Response(status_code=resp.status, headers=headers)) or b""
        if resp.body and not head:
            out += self.conn.send(h11.Data(data=resp.body)) or b""
        out += self.conn.send(h11.EndOfMessage()) or b""
        if self.transport is not None:
            self.transport.write(out)

    def _fail(self, status: int, why: str) -> None:
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(h11.LocalProtocolError):
                self._send(Response(f"{why}\n".encode(), status), [(b"connection", b"close")])
        self.close()

    def _arm_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline = self.server.loop.call_later(REQUEST_TIMEOUT, self.close)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


@dataclass(eq=False)
class _Server:
    app: HttpApp
    loop: asyncio.AbstractEventLoop
    connections: dict[_HttpConnection, None] = field(default_factory=dict)  # oldest first


@dataclass
class RunningSite:
    server: asyncio.AbstractServer
    state: _Server
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        self.server.close()
        for c in list(self.state.connections):
            c.close()
        await self.server.wait_closed()


async def serve(app: HttpApp, host: str, port: int) -> RunningSite:
    """Start ``app`` on (host, port); port 0 picks a free one, reported in the result."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    loop = asyncio.get_running_loop()
    state = _Server(app, loop)
    server = await loop.create_server(lambda: _HttpConnection(state), sock=sock)
    return RunningSite(server, state, host, sock.getsockname()[1])
