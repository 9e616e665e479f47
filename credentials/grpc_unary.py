"""A unary gRPC client over ``h2`` and asyncio TLS: what the node agent needs to call its CA.

Why not ``grpcio``: the node agent makes one kind of call (``CreateCertificate``, a few times per
workload per certificate lifetime), and grpcio's native core cost it about 12 MB of resident
memory (library pages, its event engine and threads) on every node, most of the gap between
the agent and one idle Envoy, the budget issue 6 holds the agent to. The wire protocol of a
unary call is small and fully specified (gRPC over HTTP/2, "PROTOCOL-HTTP2.md" in grpc/grpc):
a POST with ``content-type: application/grpc`` and ``te: trailers``, one length-prefixed
message each way, the status in trailers. HTTP/2 itself is ``h2`` (as in the tunnel), messages
are still ``protobuf`` (generated ``ca_pb2``), and the CA server keeps grpcio. Interop is tested
against that real grpcio server.

What is deliberately not here: streaming calls, compression (we never advertise
``grpc-accept-encoding``, so a conforming server sends identity-encoded messages; a compressed
one is refused), retries (the certificate manager owns the retry schedule), name resolution
beyond one ``host:port`` or ``unix:/path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import ssl
import struct
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field

import h2.config
import h2.errors
import h2.events
import h2.exceptions

from tunnel.hbone import GracefulGoawayH2Connection

MAX_MESSAGE = 4 * 1024 * 1024  # gRPC's default receive limit
_PREFIX = struct.Struct(">BI")  # compressed flag, message length


class Status(enum.IntEnum):
    """gRPC status codes (grpc/grpc doc/statuscodes.md)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# A response without grpc-status: the HTTP status decides (grpc/grpc doc/http-grpc-status-mapping.md).
_HTTP_TO_GRPC = {
    400: Status.INTERNAL,
    401: Status.UNAUTHENTICATED,
    403: Status.PERMISSION_DENIED,
    404: Status.UNIMPLEMENTED,
    429: Status.UNAVAILABLE,
    502: Status.UNAVAILABLE,
    503: Status.UNAVAILABLE,
    504: Status.UNAVAILABLE,
}


# Where a call failed below gRPC (GrpcError.transport): the caller turns these into a cause an
# operator can act on ("CA unreachable" is not one thing: nothing listens, nothing answers, the
# TLS handshake failed, or the CA refused our certificate).
CONNECT = "connect"  # the TCP/unix connect failed (refused, no route, OS timeout)
TIMEOUT = "timeout"  # no connection, or no answer, within the deadline
TLS = "tls"  # the TLS handshake failed on our side (we do not trust the server, no ALPN h2)
# The server closed the connection after the handshake before sending any HTTP/2 frame: in TLS
# 1.3 the server checks the client certificate after the client has finished its handshake, so
# this is how a server that refuses our certificate looks from here.
CLOSED_BEFORE_HTTP2 = "closed-before-http2"
CLOSED_BEFORE_HTTP2_TEXT = (
    "the server closed the connection right after the TLS handshake, before any HTTP/2 frame "
    "(how a TLS 1.3 server refuses the client's certificate)"
)


class GrpcError(Exception):
    def __init__(self, code: Status, details: str, *, transport: str | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.transport = transport  # one of the transport causes above, or None (a gRPC status)


def encode_message(payload: bytes) -> bytes:
    return _PREFIX.pack(0, len(payload)) + payload


def decode_message(body: bytes, limit: int = MAX_MESSAGE) -> bytes:
    """The single message of a unary response body (length-prefixed, uncompressed)."""
    if len(body) < _PREFIX.size:
        raise GrpcError(Status.INTERNAL, f"response body of {len(body)} bytes holds no message")
    flag, length = _PREFIX.unpack_from(body)
    if flag != 0:
        raise GrpcError(Status.INTERNAL, "compressed response, but no compression was offered")
    if length > limit:
        raise GrpcError(Status.RESOURCE_EXHAUSTED, f"response message of {length} bytes (limit {limit})")
    if len(body) != _PREFIX.size + length:
        raise GrpcError(
            Status.INTERNAL, f"response body is {len(body)} bytes, its message says {_PREFIX.size + length}"
        )
    return body[_PREFIX.size :]


def grpc_timeout(seconds: float) -> str:
    """The ``grpc-timeout`` header: at most 8 digits and a unit."""
    ms = max(1, math.ceil(seconds * 1000))
    return f"{ms}m" if ms < 10**8 else f"{min(math.ceil(seconds), 10**8 - 1)}S"


@dataclass
class _Call:
    future: asyncio.Future[bytes]
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)

    def finish(self, trailers: dict[str, str]) -> None:
        if self.future.done():
            return
        merged = {**self.headers, **trailers}
        if "grpc-status" not in merged:
            code = _HTTP_TO_GRPC.get(self.status or 0, Status.UNKNOWN)
            self.fail(code, f"HTTP status {self.status} without a gRPC status")
            return
        try:
            code = Status(int(merged["grpc-status"]))
        except ValueError:
            self.fail(Status.UNKNOWN, f"unknown grpc-status {merged['grpc-status']!r}")
            return
        if code is not Status.OK:
            self.fail(code, urllib.parse.unquote(merged.get("grpc-message", "")))
            return
        if not (merged.get("content-type", "")).startswith("application/grpc"):
            self.fail(Status.UNKNOWN, f"content-type {merged.get('content-type')!r} is not gRPC")
            return
        try:
            self.future.set_result(decode_message(bytes(self.body)))
        except GrpcError as exc:
            self.future.set_exception(exc)

    def fail(self, code: Status, details: str, transport: str | None = None) -> None:
        if not self.future.done():
            self.future.set_exception(GrpcError(code, details, transport=transport))


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection carrying any number of concurrent unary calls."""

    def __init__(self, authority: str) -> None:
        self.authority = authority
        # A CA that restarts sends GOAWAY(NO_ERROR) and finishes the calls it already has: plain
        # h2 would turn their remaining frames into protocol errors.
        self.h2 = GracefulGoawayH2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, _Call] = {}
        self.usable = True
        self.heard = False  # any bytes from the server yet (its SETTINGS come first)
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.heard = True
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._flush()
            self._lost(Status.INTERNAL, f"HTTP/2 protocol error from the server: {exc}")
            return
        for ev in events:
            self._event(ev)
        self._flush()
        if not self.usable and not self.calls and self.transport is not None:
            self.close()  # drained after a GOAWAY or a channel close

    def _event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            call = self.calls.get(ev.stream_id)
            if call is not None:
                hdrs = {str(k): str(v) for k, v in ev.headers}
                call.status = int(hdrs.get(":status", "0"))
                call.headers = hdrs
        elif isinstance(ev, h2.events.DataReceived):
            self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            call = self.calls.get(ev.stream_id)
            if call is not None and ev.data:
                call.body += ev.data
                if len(call.body) > _PREFIX.size + MAX_MESSAGE:
                    call.fail(Status.RESOURCE_EXHAUSTED, f"response over {MAX_MESSAGE} bytes")
                    self._reset(ev.stream_id)
        elif isinstance(ev, h2.events.TrailersReceived):
            call = self.calls.pop(ev.stream_id, None)
            if call is not None:
                call.finish({str(k): str(v) for k, v in ev.headers})
        elif isinstance(ev, h2.events.StreamEnded):
            call = self.calls.pop(ev.stream_id, None)
            if call is not None:  # trailers-only response: the status is in the headers
                call.finish({})
        elif isinstance(ev, h2.events.StreamReset):
            call = self.calls.pop(ev.stream_id, None)
            if call is not None:
                code = {
                    h2.errors.ErrorCodes.REFUSED_STREAM: Status.UNAVAILABLE,
                    h2.errors.ErrorCodes.CANCEL: Status.CANCELLED,
                }.get(ev.error_code, Status.INTERNAL)  # type: ignore[call-overload]
                call.fail(code, f"stream reset by the server (HTTP/2 error {ev.error_code})")
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.usable = False
            last = ev.last_stream_id if ev.last_stream_id is not None else 0
            for sid in [s for s in self.calls if s > last]:
                self.calls.pop(sid).fail(Status.UNAVAILABLE, "server sent GOAWAY before handling the call")
            if ev.error_code:
                why = f"server ended the connection (HTTP/2 error {ev.error_code})"
                for call in self.calls.values():
                    call.fail(Status.UNAVAILABLE, why)
                self.calls.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.heard:
            why = CLOSED_BEFORE_HTTP2_TEXT + (f": {exc!r}" if exc else "")
            self._lost(Status.UNAVAILABLE, why, CLOSED_BEFORE_HTTP2)
            return
        self._lost(
            Status.UNAVAILABLE, f"connection lost: {exc!r}" if exc else "connection closed by the server"
        )

    def eof_received(self) -> bool:
        return False

    def _lost(self, code: Status, why: str, transport: str | None = None) -> None:
        self.usable = False
        for call in self.calls.values():
            call.fail(code, why, transport)
        self.calls.clear()
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _reset(self, stream_id: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        self.calls.pop(stream_id, None)
        self._flush()

    def start(
        self, path: str, message: bytes, timeout: float, metadata: Sequence[tuple[str, str]] = ()
    ) -> tuple[int, asyncio.Future[bytes]]:
        if not self.usable or self.transport is None:
            if not self.heard:
                raise GrpcError(Status.UNAVAILABLE, CLOSED_BEFORE_HTTP2_TEXT, transport=CLOSED_BEFORE_HTTP2)
            raise GrpcError(Status.UNAVAILABLE, "connection is closing")
        sid = self.h2.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", path),
            (":authority", self.authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-timeout", grpc_timeout(timeout)),
            ("user-agent", "ztagent-grpc-unary"),
            # Custom metadata are plain lowercase headers (PROTOCOL-HTTP2.md "Custom-Metadata"),
            # e.g. ("authorization", "Bearer <token>") as istio-agent sends its token.
            *((k.lower(), v) for k, v in metadata),
        ]
        call = _Call(asyncio.get_running_loop().create_future())
        self.calls[sid] = call
        self.h2.send_headers(sid, headers)
        body = encode_message(message)
        # A CSR is ~0.5 KB; the default 64 KiB stream window always takes it in one go.
        if len(body) > min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size):
            self.calls.pop(sid)
            raise GrpcError(
                Status.RESOURCE_EXHAUSTED, f"request of {len(body)} bytes exceeds the send window"
            )
        self.h2.send_data(sid, body, end_stream=True)
        self._flush()
        return sid, call.future

    def cancel(self, sid: int) -> None:
        if sid in self.calls:
            self._reset(sid)

    def close(self) -> None:
        self.usable = False
        if self.transport is not None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection()
            self._flush()
            self.transport.close()


class UnaryChannel:
    """Unary calls to one address over one reused TLS connection (redialled when it dies)."""

    def __init__(self, address: str, ssl_context: ssl.SSLContext, server_name: str) -> None:
        self.address = address
        self._ssl = ssl_context
        self._server_name = server_name
        self._conn: _Connection | None = None
        self._dialing: asyncio.Future[_Connection] | None = None
        self._generation = 0  # bumped by close(): a dial that started before is not kept

    async def _connection(self, timeout: float) -> _Connection:
        if self._conn is not None and self._conn.usable and self._conn.transport is not None:
            return self._conn
        if self._dialing is None:
            self._dialing = asyncio.ensure_future(self._dial())
            # Every caller may have given up (deadline) before the dial ends: its outcome is then
            # read here, not left to be reported as "never retrieved" at garbage collection.
            self._dialing.add_done_callback(lambda f: f.cancelled() or f.exception())
        dialing = self._dialing
        try:
            conn = await asyncio.wait_for(asyncio.shield(dialing), timeout)
        except TimeoutError:
            raise GrpcError(
                Status.DEADLINE_EXCEEDED,
                f"no connection to {self.address} within {timeout:g}s",
                transport=TIMEOUT,
            ) from None
        finally:
            if dialing.done() and self._dialing is dialing:
                self._dialing = None
        return conn

    async def _dial(self) -> _Connection:
        generation = self._generation
        loop = asyncio.get_running_loop()
        factory = lambda: _Connection(self._server_name)  # noqa: E731
        try:
            if self.address.startswith("unix:"):
                _, proto = await loop.create_unix_connection(
                    factory, self.address[len("unix:") :], ssl=self._ssl, server_hostname=self._server_name
                )
            else:
                host, _, port = self.address.rpartition(":")
                _, proto = await loop.create_connection(
                    factory, host.strip("[]"), int(port), ssl=self._ssl, server_hostname=self._server_name
                )
        except ssl.SSLError as exc:
            raise GrpcError(
                Status.UNAVAILABLE, f"TLS handshake with {self.address} failed: {exc}", transport=TLS
            ) from None
        except TimeoutError as exc:  # the kernel's connect timeout (an OSError, but a distinct cause)
            raise GrpcError(
                Status.UNAVAILABLE, f"cannot connect to {self.address}: {exc}", transport=TIMEOUT
            ) from None
        except OSError as exc:
            raise GrpcError(
                Status.UNAVAILABLE, f"cannot connect to {self.address}: {exc}", transport=CONNECT
            ) from None
        ssl_obj = proto.transport.get_extra_info("ssl_object") if proto.transport else None
        if ssl_obj is None or ssl_obj.selected_alpn_protocol() != "h2":
            proto.close()
            raise GrpcError(
                Status.UNAVAILABLE, f"{self.address} did not negotiate HTTP/2 (ALPN h2)", transport=TLS
            )
        if generation != self._generation:
            proto.close()
            raise GrpcError(Status.UNAVAILABLE, f"channel to {self.address} was closed while dialling")
        self._conn = proto
        return proto

    async def call(
        self, path: str, request: bytes, *, timeout: float, metadata: Sequence[tuple[str, str]] = ()
    ) -> bytes:
        """Send one request message (with ``metadata`` as request headers) and return the
        response message, or raise GrpcError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn = await self._connection(timeout)
        remaining = max(0.001, deadline - loop.time())
        sid, future = conn.start(path, request, remaining, metadata)
        try:
            return await asyncio.wait_for(future, remaining)
        except TimeoutError:
            conn.cancel(sid)
            raise GrpcError(
                Status.DEADLINE_EXCEEDED,
                f"no answer from {self.address} within {timeout:g}s",
                transport=TIMEOUT,
            ) from None
        except asyncio.CancelledError:
            conn.cancel(sid)
            raise

    async def close(self, grace: float = 0.0, *, cancel_dial: bool = False) -> None:
        """Stop using the connection; calls in flight get ``grace`` seconds to finish. A dial in
        progress is not cancelled (other calls may be waiting on it: they get UNAVAILABLE when it
        ends) unless ``cancel_dial``, for a final shutdown."""
        self._generation += 1
        conn, self._conn = self._conn, None
        dialing, self._dialing = self._dialing, None
        if dialing is not None and cancel_dial:
            dialing.cancel()
        if conn is None:
            return
        conn.usable = False
        if grace > 0 and conn.calls:
            waits = [c.future for c in conn.calls.values()]
            await asyncio.wait(waits, timeout=grace)
        conn.close()
