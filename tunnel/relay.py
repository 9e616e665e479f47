"""Byte relay between plain TCP sockets and HBONE streams, plus the HTTP/2 session they share.

One :class:`H2Session` is an asyncio protocol on an mTLS transport running a sans-IO core from
``tunnel.hbone``; each proxied TCP connection is a :class:`TunnelStream` tying one HTTP/2 stream
to one TCP transport. Transports and protocols (not streams) on the hot path: no per-chunk task
switches, and backpressure is explicit.

Flow control and memory (the water marks are named so tests can assert them):

- TCP -> tunnel: bytes are handed to the core as far as the HTTP/2 windows allow; whatever does
  not fit is held and the TCP side stops reading (``pause_reading``) until a WINDOW_UPDATE comes,
  so at most one read chunk is held per stream. When the TLS transport's write buffer passes
  ``TLS_WRITE_HIGH`` every stream on that session pauses reading until it drains below
  ``TLS_WRITE_LOW``.
- tunnel -> TCP: received DATA is written to the TCP transport and its flow-control credit is
  returned only while that transport's buffer is under ``TCP_WRITE_HIGH``; above it the credit is
  withheld (the peer's stream window runs dry and it stops sending) until the buffer drains below
  ``TCP_WRITE_LOW``. Buffered bytes per stream therefore stay under
  ``TCP_WRITE_HIGH + hbone.STREAM_WINDOW`` whatever the local reader does. The connection's
  credit for those bytes keeps flowing until ``SESSION_WITHHOLD_BUDGET`` is held back on the
  connection, so stalled readers do not starve the other tunnels sharing it.

Half-close: a TCP FIN becomes END_STREAM and END_STREAM becomes ``write_eof`` (FIN). Aborts: a
TCP reset becomes RST_STREAM(CONNECT_ERROR) and RST_STREAM becomes a TCP RST (SO_LINGER 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from . import hbone
from .hbone import Authority, ErrorCode

log = logging.getLogger("ztagent.tunnel")

TCP_WRITE_HIGH = 1024 * 1024
TCP_WRITE_LOW = 256 * 1024
TLS_WRITE_HIGH = 1024 * 1024
TLS_WRITE_LOW = 256 * 1024
# Connection-level credit keeps flowing for stalled streams until this much is held back on one
# connection (then it is withheld too): memory per connection stays bounded by this plus the
# connection window, and it takes ~16 stalled readers, not 4, to stall a shared connection.
SESSION_WITHHOLD_BUDGET = 4 * hbone.CONNECTION_WINDOW
# Bound on one TCP side's unsent bytes per stream: the read buffer size of either event loop.
TCP_READ_CHUNK = 256 * 1024

KEEPALIVE_INTERVAL = 10.0  # PING when the connection was silent this long (ztunnel)
KEEPALIVE_TIMEOUT = 20.0  # drop a connection silent this long: half-open peers must not leak
STREAM_IDLE_TIMEOUT = 3600.0  # reset a tunnel with no bytes either way for this long


# --- accounting --------------------------------------------------------------------------------
@dataclass(slots=True)
class TunnelInfo:
    """One proxied TCP connection, as the accounting observer sees it.

    ``bytes_received`` counts source -> destination bytes and ``bytes_sent`` destination -> source
    bytes on both sides, matching Istio's ``istio_tcp_received_bytes_total`` /
    ``istio_tcp_sent_bytes_total``. The counters are live: read them at scrape time.
    """

    direction: str  # "inbound" (server side) or "outbound" (client side)
    source_principal: str
    destination_principal: str
    source: Authority | None  # the client's ``forwarded: for=`` claim when it sent one
    destination: Authority
    connection_security_policy: str = "mutual_tls"
    # The TCP peer of the HBONE connection (server side): unlike ``source``, not a claim.
    peer: Authority | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    opened_at: float = field(default_factory=time.time)
    closed_at: float | None = None
    close_reason: str = ""


class TunnelObserver(Protocol):
    """Implemented by the agent to export metrics; every method must be cheap and not raise."""

    def tunnel_opened(self, info: TunnelInfo) -> None: ...

    def tunnel_closed(self, info: TunnelInfo) -> None: ...

    def rejected(self, kind: str, detail: str) -> None:
        """A connection or request refused for ``kind`` (a stable label for a metric)."""


class NullObserver:
    def tunnel_opened(self, info: TunnelInfo) -> None:
        pass

    def tunnel_closed(self, info: TunnelInfo) -> None:
        pass

    def rejected(self, kind: str, detail: str) -> None:
        pass


def _safe(call: Callable[..., None], *args: Any) -> None:
    try:
        call(*args)
    except Exception:  # an observer bug must never break a tunnel
        log.exception("tunnel observer failed")


_LINGER_RESET = struct.pack("ii", 1, 0)
_LINGER_OFF = struct.pack("ii", 0, 0)


def reset_if_abandoned(sock: Any) -> None:
    """Make ``sock`` end with RST if this process closes it without saying goodbye (a crash, a
    kill): SO_LINGER 0. App-facing sockets get this, so an app can tell an agent that died from a
    normal close. Graceful closes go through :func:`close_gracefully`, which turns it off first.
    Set on a listener, accepted sockets inherit it (no system call per connection)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


# TCP keepalive for sockets without an HTTP/2 PING of their own (app-facing ones) and under the
# HBONE connections: a peer that vanished (node lost, cable cut) is found in about two minutes of
# silence (60 s idle, then 4 probes 15 s apart), so half-open connections don't leak.
KEEPALIVE_IDLE_S = 60
KEEPALIVE_PROBE_INTERVAL_S = 15
KEEPALIVE_PROBES = 4


def set_keepalive(sock: Any) -> None:
    """Enable TCP keepalive on ``sock`` (a listener passes it on to every accepted socket)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_PROBE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


def close_gracefully(transport: asyncio.BaseTransport | None) -> None:
    """Flush and close with FIN (undoing :func:`reset_if_abandoned`)."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
    transport.close()


def abort_with_rst(transport: asyncio.Transport | None) -> None:
    """Close a TCP transport with RST instead of FIN (SO_LINGER 0), to carry an abort across."""
    if transport is None or transport.is_closing():
        if transport is not None:
            transport.abort()
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


async def connect_numeric(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, address: tuple[str, int]
) -> None:
    """Connect a non-blocking socket to an IP address (never a name).

    Deliberately not ``loop.sock_connect``: uvloop's resolves every address with getaddrinfo in
    libuv's thread pool first, IP literals included, which cost each upstream connection a
    thread hand-off, two futex calls and an extra loop wake-up. The wait for the connect is
    the same as its own: writability, then SO_ERROR. A name is refused: resolving it here would
    block the loop."""
    hbone.parse_ip(address[0])  # ValueError for anything but an IP literal
    try:
        sock.connect(address)
        return
    except BlockingIOError:
        pass  # EINPROGRESS
    fd = sock.fileno()
    writable = loop.create_future()

    def on_writable() -> None:
        if not writable.done():
            writable.set_result(None)

    loop.add_writer(fd, on_writable)
    try:
        await writable
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        # OSError picks the subclass from the errno (ConnectionRefusedError, TimeoutError...).
        raise OSError(err, f"connect to {address[0]}:{address[1]}: {os.strerror(err)}")


def set_nodelay(sock: socket.socket) -> None:
    """Tunnels carry request/response traffic: never let Nagle hold a small write back."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --- one tunnel --------------------------------------------------------------------------------
class _TcpSide(asyncio.Protocol):
    """Protocol on the plain TCP socket; forwards everything to its TunnelStream."""

    __slots__ = ("stream",)

    def __init__(self, stream: TunnelStream) -> None:
        self.stream = stream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.stream._tcp_attached(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.stream._tcp_data(data)

    def eof_received(self) -> bool:
        self.stream._tcp_eof()
        return True  # keep our write side open: TCP half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.stream._tcp_lost(exc)

    def pause_writing(self) -> None:
        self.stream._tcp_write_paused = True

    def resume_writing(self) -> None:
        self.stream._tcp_write_paused = False
        self.stream._return_credit()


class HeldConnection(asyncio.Protocol):
    """An accepted TCP connection held paused until its carrier exists, then handed over whole.

    A proxy accepting a connection must decide where it goes (and open a tunnel) before it can
    relay; meanwhile reading is paused and what still arrives (uvloop reads once more after
    ``pause_reading()`` in ``connection_made``: a request that raced the decision, or a FIN) is
    kept, then replayed in order to the carrier's protocol by :meth:`hand_over`. Used by the
    client's listener protocol and by the agent's 15001/15006 listeners. Subclasses extend
    ``connection_made`` to start deciding."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._early: list[bytes] = []
        self._early_eof = False
        self.lost = False  # closed before the hand-over (a reset is only seen once reading resumes)
        self.handed_over = False  # from then on the transport belongs to its carrier

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self._early.append(data)
        if self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._early_eof = True
        return True  # keep our side open: the peer half-closed, the answer may still come

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    @property
    def usable(self) -> bool:
        return (
            not self.lost
            and not self.handed_over
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def reset(self) -> None:
        """Refuse the connection with a TCP RST (ztunnel resets rather than FINs)."""
        if not self.handed_over:
            abort_with_rst(self.transport)
            self.lost = True

    def hand_over(self, protocol: asyncio.Protocol) -> None:
        """Make ``protocol`` the connection's protocol: ``connection_made``, then the bytes and
        FIN that arrived while held, then reading resumes unless the protocol paused it.
        Raises ConnectionError if the connection is gone, RuntimeError if handed over already."""
        if self.handed_over:
            raise RuntimeError("the connection was already handed over")
        transport = self.transport
        if transport is None or not self.usable:
            raise ConnectionError("the connection closed before it was handed over")
        self.handed_over = True
        transport.set_protocol(protocol)
        early, self._early = self._early, []
        if not self._early_eof:
            # Resume first: reads are only delivered from the next loop iteration, after the
            # replay below, and a pause_reading() during the replay still wins.
            transport.resume_reading()
        protocol.connection_made(transport)
        for data in early:
            protocol.data_received(data)
        if self._early_eof and not protocol.eof_received():
            close_gracefully(transport)


# --- in-process hand-off ------------------------------------------------------------------------
PIPE_WRITE_HIGH = 256 * 1024
PIPE_WRITE_LOW = 64 * 1024


class PipeTransport(asyncio.Transport):
    """One end of an in-process byte pipe: what this end's protocol writes reaches the other
    end's protocol, on the next loop iteration (never re-entrantly, like a socket transport).

    It exists so a tunnel stream can carry bytes to in-process code (the waypoint's HTTP
    parser) without a socketpair: two kernel copies and two extra descriptors per stream.
    Backpressure is asyncio's: bytes the reader has paused for are held in the writer's buffer,
    and above ``PIPE_WRITE_HIGH`` the writer's protocol gets ``pause_writing()`` (then
    ``resume_writing()`` below ``PIPE_WRITE_LOW``), so held bytes stay bounded by the high mark
    plus one write. ``write_eof`` is a half-close (the peer's ``eof_received``); ``abort`` is a
    reset (the peer's ``connection_lost`` with ConnectionResetError)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, extra: dict[str, Any] | None = None) -> None:
        super().__init__(extra)
        self._loop = loop
        self._protocol: asyncio.BaseProtocol | None = None
        self.peer: PipeTransport | None = None
        self._buffer = bytearray()  # written here, not yet taken by the peer's protocol
        self._eof_pending = False  # write_eof() called; delivered after the buffer
        self._eof_sent = False
        self._closing = False
        self._lost = False
        self._reading = True  # our protocol accepts data (pause_reading/resume_reading)
        self._write_paused = False
        self._flush_scheduled = False
        self._high, self._low = PIPE_WRITE_HIGH, PIPE_WRITE_LOW

    # -- BaseTransport
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Flush, FIN, then both ends are lost (a graceful close)."""
        if self._closing or self._lost:
            return
        self._closing = True
        self._eof_pending = True
        self._schedule()

    def abort(self) -> None:
        if self._lost:
            return
        self._buffer.clear()
        peer = self.peer
        self._lose(None)
        if peer is not None:
            peer._buffer.clear()
            peer._lose(ConnectionResetError("the other end of the in-process pipe was reset"))

    # -- ReadTransport (about what our protocol receives)
    def is_reading(self) -> bool:
        return self._reading and not self._lost

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading:
            self._reading = True
            if self.peer is not None:
                self.peer._schedule()

    # -- WriteTransport
    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = PIPE_WRITE_HIGH if high is None else high
        self._low = min(self._high, self._high // 4 if low is None else low)

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_pending or self._lost:
            return  # like a closed socket transport: silently dropped
        if not data:
            return
        self._buffer += data
        self._schedule()
        if not self._write_paused and len(self._buffer) > self._high and self._protocol is not None:
            self._write_paused = True
            cast(asyncio.Protocol, self._protocol).pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        for d in list_of_data:
            self.write(d)

    def write_eof(self) -> None:
        if self._eof_pending or self._lost:
            return
        self._eof_pending = True
        self._schedule()

    def can_write_eof(self) -> bool:
        return True

    # -- the pipe
    def _schedule(self) -> None:
        if not self._flush_scheduled and not self._lost:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        peer = self.peer
        if self._lost or peer is None:
            return
        if peer._lost:
            self._buffer.clear()
            self._lose(None)
            return
        if self._buffer and peer._reading and peer._protocol is not None:
            data, self._buffer = bytes(self._buffer), bytearray()
            cast(asyncio.Protocol, peer._protocol).data_received(data)
        if self._write_paused and len(self._buffer) <= self._low and self._protocol is not None:
            self._write_paused = False
            cast(asyncio.Protocol, self._protocol).resume_writing()
        if self._buffer or not self._eof_pending or self._eof_sent:
            return
        self._eof_sent = True
        keep_open = cast(asyncio.Protocol, peer._protocol).eof_received() if peer._protocol else False
        if not keep_open:
            peer.close()  # the protocol asked for it, as asyncio's transports do
        if self._closing:
            self._lose(None)
        if peer._eof_sent:
            peer._lose(None)  # both directions are finished

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        proto = self._protocol
        if proto is not None:
            self._loop.call_soon(proto.connection_lost, exc)


def pipe(
    loop: asyncio.AbstractEventLoop,
    extra_a: dict[str, Any] | None = None,
    extra_b: dict[str, Any] | None = None,
) -> tuple[PipeTransport, PipeTransport]:
    """Two connected :class:`PipeTransport` ends (give each a protocol, then call its
    ``connection_made``)."""
    a, b = PipeTransport(loop, extra_a), PipeTransport(loop, extra_b)
    a.peer, b.peer = b, a
    return a, b


class TunnelStream:
    """Relays one HTTP/2 stream to one TCP transport, both directions."""

    # One per open tunnel: slots keep ten thousand idle tunnels ~1 KB each lighter.
    __slots__ = (
        "_close_after_attach",
        "_early_eof",
        "_early_in",
        "_idle_watched",
        "_last_activity",
        "_may_send",
        "_pending_out",
        "_tcp_eof_pending",
        "_tcp_reading",
        "_tcp_write_paused",
        "_unacked",
        "_unacked_conn",
        "closed",
        "done",
        "info",
        "local_done",
        "outbound",
        "remote_done",
        "session",
        "stream_id",
        "tcp",
    )  # fmt: skip

    def __init__(self, session: H2Session, stream_id: int, info: TunnelInfo, *, outbound: bool) -> None:
        self.session = session
        self.stream_id = stream_id
        self.info = info
        self.outbound = outbound  # client side: TCP bytes are source -> destination
        self.tcp: asyncio.Transport | None = None
        self._pending_out = b""  # TCP bytes the h2 window could not take yet (<= one read chunk)
        self._early_in: list[tuple[bytes | memoryview, int]] = []  # tunnel bytes before the TCP side attached
        self._early_eof = False
        self._close_after_attach = False
        self._unacked = 0  # stream credit withheld while the TCP writer is above high water
        self._unacked_conn = 0  # connection credit withheld too (session budget exhausted)
        self._tcp_write_paused = False
        self._tcp_reading = True
        self._tcp_eof_pending = False  # TCP FIN seen, END_STREAM not yet sent (data pending)
        # False on the server between the upstream connect and the 200: nothing may be sent on the
        # stream before its response headers, so the TCP side is attached paused.
        self._may_send = True
        self.local_done = False  # our direction to the tunnel ended (END_STREAM sent) or aborted
        self.remote_done = False  # tunnel -> TCP finished (FIN written) or aborted
        self.closed = False
        self._last_activity = session.loop.time()
        self._idle_watched = False  # the session's idle sweep looks at this stream
        self.done: asyncio.Future[TunnelInfo] = session.loop.create_future()

    # -- attach ----------------------------------------------------------------------------------
    async def attach(self, sock: socket.socket) -> None:
        """Start relaying on a connected socket (the stream owns it from now on)."""
        sock.setblocking(False)
        set_nodelay(sock)
        try:
            # create_connection(sock=...) works for accepted and for connected sockets alike.
            await self.session.loop.create_connection(lambda: _TcpSide(self), sock=sock)
        except (OSError, RuntimeError) as exc:
            sock.close()
            self.abort(ErrorCode.CONNECT_ERROR, f"cannot attach TCP socket: {exc!r}")

    async def connect(self, authority: Authority) -> None:
        """Connect upstream and attach in one step (half the cost of connect-then-attach). Held
        paused until :meth:`start_sending`; raises OSError when the connect fails."""
        self._may_send = False
        await self.session.loop.create_connection(lambda: _TcpSide(self), str(authority.ip), authority.port)

    def tcp_protocol(self) -> asyncio.Protocol:
        """The protocol of this stream's TCP side, for a transport the caller already holds (an
        accepted connection kept paused while the tunnel opened): ``transport.set_protocol(p)``,
        then ``p.connection_made(transport)``. Cheaper than :meth:`attach`, which builds a new
        transport from a socket."""
        return _TcpSide(self)

    def attach_protocol(
        self, protocol: asyncio.Protocol, extra: dict[str, Any] | None = None
    ) -> PipeTransport:
        """Relay this stream to an in-process protocol instead of a socket (no socketpair, no
        kernel copies): ``protocol`` gets ``connection_made(transport)`` with a
        :class:`PipeTransport` whose writes go into the stream and whose ``pause_reading`` /
        ``pause_writing`` carry backpressure both ways, exactly as a TCP transport would (an
        ``asyncio.StreamReaderProtocol`` works as is). ``extra`` is what the protocol's
        ``get_extra_info`` answers (e.g. ``peername``). On the server, call before the 200
        with :meth:`hold` so nothing is sent on the stream before its response headers.
        Returns the protocol's transport."""
        ours, theirs = pipe(self.session.loop, None, extra)
        side = _TcpSide(self)
        ours.set_protocol(side)
        theirs.set_protocol(protocol)
        side.connection_made(ours)
        protocol.connection_made(theirs)
        return theirs

    def hold(self) -> None:
        """Keep bytes from the local side out of the stream until :meth:`start_sending`."""
        self._may_send = False

    def start_sending(self) -> None:
        """The response headers are out: let TCP bytes flow into the stream."""
        if self._may_send or self.closed:
            return
        self._may_send = True
        # Push what the upstream said before the 200 (a banner), then the FIN or resume reading.
        self.on_window()

    def _tcp_attached(self, transport: asyncio.Transport) -> None:
        if self.closed:
            abort_with_rst(transport)
            return
        self.tcp = transport
        transport.set_write_buffer_limits(high=TCP_WRITE_HIGH, low=TCP_WRITE_LOW)
        if not self._may_send:
            self._pause_tcp()
        if not self.session.loop_sets_nodelay:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                set_nodelay(sock)
        for data, fc in self._early_in:
            self._deliver(data, fc)
        self._early_in.clear()
        if self._early_eof:
            self._remote_end()
        if self._close_after_attach:
            close_gracefully(transport)
            self._finish("peer ended the stream after its END_STREAM (RST_STREAM NO_ERROR)")
            return
        if self.session.writes_paused:
            self._pause_tcp()
        self._arm_idle()

    # -- tunnel -> TCP ----------------------------------------------------------------------------
    def on_data(self, data: bytes | memoryview, flow_controlled_length: int) -> None:
        if self.tcp is None:
            self._early_in.append((data, flow_controlled_length))
            return
        self._deliver(data, flow_controlled_length)

    def _deliver(self, data: bytes | memoryview, fc: int) -> None:
        tcp = self.tcp
        assert tcp is not None
        self._last_activity = self.session.loop.time()
        if data:
            if self.outbound:
                self.info.bytes_sent += len(data)
            else:
                self.info.bytes_received += len(data)
            tcp.write(data)
        if self._tcp_write_paused:
            # Withhold this stream's credit (its sender stops); keep the connection's flowing
            # while the session's withheld total is within budget, so a few stalled readers
            # cannot freeze every other tunnel sharing the connection.
            self._unacked += fc
            session = self.session
            session.withheld += fc
            if session.withheld <= SESSION_WITHHOLD_BUDGET:
                if session.core.acknowledge(self.stream_id, fc, stream=False):
                    session.request_flush()
            else:
                self._unacked_conn += fc
        elif self.session.core.acknowledge(self.stream_id, fc):
            self.session.request_flush()

    def _return_credit(self) -> None:
        if self._unacked and not self.closed:
            n, self._unacked = self._unacked, 0
            c, self._unacked_conn = self._unacked_conn, 0
            session = self.session
            session.withheld -= n
            queued = session.core.acknowledge(self.stream_id, n, connection=False)
            if c:
                queued = session.core.acknowledge(self.stream_id, c, stream=False) or queued
            if queued:
                session.request_flush()

    def on_end(self) -> None:
        if self.tcp is None:
            self._early_eof = True
            return
        self._remote_end()

    def _remote_end(self) -> None:
        tcp = self.tcp
        assert tcp is not None
        if tcp.can_write_eof():
            tcp.write_eof()  # flushes buffered bytes first, then FIN
        self.remote_done = True
        self._maybe_finished()

    def on_reset(self, error_code: int, remote: bool) -> None:
        if remote and error_code == ErrorCode.NO_ERROR and (self.remote_done or self._early_eof):
            if self.tcp is None:
                self._close_after_attach = True  # deliver the early bytes and FIN first
                return
            # RST_STREAM(NO_ERROR) after a complete response means "stop sending, all is well"
            # (RFC 9113 §8.1; Envoy's CONNECT terminator does this when its upstream FINs first).
            # The FIN is already queued to the local socket: close gracefully so the bytes before
            # it are not destroyed by a TCP RST.
            if self.tcp is not None:
                close_gracefully(self.tcp)
            self._finish("peer ended the stream after its END_STREAM (RST_STREAM NO_ERROR)")
            return
        self._finish_abort(f"stream reset by {'peer' if remote else 'us'} (HTTP/2 error {error_code})")

    # -- TCP -> tunnel ----------------------------------------------------------------------------
    def _tcp_data(self, data: bytes) -> None:
        self._last_activity = self.session.loop.time()
        if self.outbound:
            self.info.bytes_received += len(data)
        else:
            self.info.bytes_sent += len(data)
        if self._pending_out or not self._may_send:
            # Also before our response headers: uvloop may deliver a read after pause_reading()
            # in connection_made (an upstream that speaks first), and a DATA frame before the 200
            # is an HTTP/2 protocol error that kills the whole connection. Reading is paused
            # below, so this holds at most one read chunk until start_sending() flushes it.
            self._pending_out += data
            if not self._may_send and self.tcp is not None:
                # Pause again even if we think we already did: the loop read anyway once.
                self._tcp_reading = False
                self.tcp.pause_reading()
        else:
            core = self.session.core
            taken = core.send_data(self.stream_id, data)
            if taken < len(data):
                self._pending_out = data[taken:]
            self.session.request_flush()
        if self._pending_out:
            self._pause_tcp()

    def on_window(self) -> None:
        """Send window opened (stream or connection): push held bytes, maybe resume reading."""
        if self.closed or self.local_done or not self._may_send:
            return  # before the response headers: start_sending() flushes
        if self._pending_out:
            taken = self.session.core.send_data(self.stream_id, self._pending_out)
            self._pending_out = self._pending_out[taken:]
            if taken:
                self.session.request_flush()
        if not self._pending_out:
            if self._tcp_eof_pending:
                self._tcp_eof_pending = False
                self._local_end()
            elif not self.session.writes_paused:
                self._resume_tcp()

    def _tcp_eof(self) -> None:
        if self._pending_out or not self._may_send:
            self._tcp_eof_pending = True
        else:
            self._local_end()

    def _local_end(self) -> None:
        if self.local_done:
            return
        self.local_done = True
        self.session.core.end_stream(self.stream_id)
        self.session.request_flush()
        self._maybe_finished()

    def _tcp_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        if exc is not None:
            # Reset or error on the TCP side: carry the abort across (RFC 9113 §8.5).
            self.session.core.reset_stream(self.stream_id, ErrorCode.CONNECT_ERROR)
            self.session.request_flush()
            self._finish(f"TCP side aborted: {exc}")
            return
        # A clean close: whatever we did not send yet is finished too.
        if not self.local_done and not self._pending_out and self._may_send:
            self._local_end()
        if not self.remote_done:
            # The local socket is gone; nothing can receive the rest: stop the peer.
            self.session.core.reset_stream(self.stream_id, ErrorCode.CANCEL)
            self.session.request_flush()
            self._finish("TCP side closed before the tunnel ended")
        else:
            self._finish("closed")

    def _pause_tcp(self) -> None:
        if self._tcp_reading and self.tcp is not None:
            self._tcp_reading = False
            self.tcp.pause_reading()

    def _resume_tcp(self) -> None:
        if (
            not self._tcp_reading
            and self.tcp is not None
            and not self._pending_out
            and not self.closed
            and self._may_send
        ):
            self._tcp_reading = True
            self.tcp.resume_reading()

    # session-wide backpressure (TLS write buffer)
    def on_session_paused(self) -> None:
        self._pause_tcp()

    def on_session_resumed(self) -> None:
        if not self._pending_out:
            self._resume_tcp()

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def buffered_bytes(self) -> int:
        """Bytes this tunnel holds in user space: unsent TCP input plus the TCP write buffer."""
        held = len(self._pending_out) + sum(len(d) for d, _ in self._early_in)
        if self.tcp is not None and not self.tcp.is_closing():
            held += self.tcp.get_write_buffer_size()
        return held

    def _maybe_finished(self) -> None:
        if self.local_done and self.remote_done and not self.closed:
            if self.tcp is not None:
                close_gracefully(self.tcp)  # flushes what is buffered, then closes
            self._finish("closed")

    def abort(self, code: int = ErrorCode.CANCEL, reason: str = "aborted") -> None:
        if self.closed:
            return
        self.session.core.reset_stream(self.stream_id, code)
        self.session.request_flush()
        self._finish_abort(reason)

    def _finish_abort(self, reason: str) -> None:
        if self.closed:
            return
        abort_with_rst(self.tcp)
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.local_done = self.remote_done = True
        self._pending_out = b""
        self._early_in.clear()
        if self._unacked:
            # Return withheld connection credit so a dead stream does not leak the window.
            self.session.withheld -= self._unacked
            if self._unacked_conn:
                self.session.core.acknowledge(self.stream_id, self._unacked_conn, stream=False)
            self._unacked = self._unacked_conn = 0
            self.session.request_flush()
        self.info.closed_at = time.time()
        self.info.close_reason = reason
        self.session.stream_finished(self)
        if not self.done.done():
            self.done.set_result(self.info)

    def _arm_idle(self) -> None:
        if self.session.stream_idle_timeout > 0 and not self.closed:
            self._idle_watched = True
            self.session.watch_idle()


# --- one HTTP/2 connection ---------------------------------------------------------------------
class H2Session(asyncio.Protocol):
    """asyncio protocol on an mTLS transport, driving a sans-IO HBONE core. Subclassed by the
    server and client connections, which decide what to do with requests and responses."""

    def __init__(
        self,
        core: hbone.HboneConnection,
        loop: asyncio.AbstractEventLoop,
        *,
        keepalive_interval: float = KEEPALIVE_INTERVAL,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        stream_idle_timeout: float = STREAM_IDLE_TIMEOUT,
    ) -> None:
        self.core = core
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, TunnelStream] = {}
        self.writes_paused = False
        self.is_closed = False
        self.closed_future: asyncio.Future[None] = loop.create_future()
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.stream_idle_timeout = stream_idle_timeout
        self._last_rx = loop.time()
        self._keepalive_handle: asyncio.TimerHandle | None = None
        # One idle sweep per connection instead of a timer per stream: a uvloop timer costs
        # about 0.5 KB, which was a twentieth of an open tunnel's memory.
        self._idle_sweep: asyncio.TimerHandle | None = None
        self._ping_outstanding = False
        self._flush_pending = False
        self.withheld = 0  # stream credit held back by stalled local readers (bytes)
        # uvloop sets TCP_NODELAY on every TCP transport itself; asyncio not on all of them.
        self.loop_sets_nodelay = type(loop).__module__.startswith("uvloop")

    # -- transport callbacks ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        assert self.transport is not None
        self.transport.set_write_buffer_limits(high=TLS_WRITE_HIGH, low=TLS_WRITE_LOW)
        self._last_rx = self.loop.time()
        self.flush()
        if self.keepalive_interval > 0:
            self._keepalive_handle = self.loop.call_later(self.keepalive_interval, self._keepalive)

    def data_received(self, data: bytes) -> None:
        self._last_rx = self.loop.time()
        try:
            events = self.core.receive_data(data)
        except hbone.ProtocolViolation as exc:
            self.protocol_error(str(exc))
            return
        for ev in events:
            self.handle_event(ev)
        self.flush()

    def eof_received(self) -> bool:
        self.close(f"peer closed the connection ({len(self.streams)} streams open)")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._teardown(f"connection lost: {exc}" if exc else "connection closed")

    def pause_writing(self) -> None:
        self.writes_paused = True
        for st in self.streams.values():
            st.on_session_paused()

    def resume_writing(self) -> None:
        self.writes_paused = False
        for st in list(self.streams.values()):
            st.on_session_resumed()

    # -- events -----------------------------------------------------------------------------------
    def handle_event(self, ev: hbone.Event) -> None:
        if isinstance(ev, hbone.Data):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.on_data(ev.data, ev.flow_controlled_length)
            else:
                self.core.acknowledge(ev.stream_id, ev.flow_controlled_length)
        elif isinstance(ev, hbone.WindowOpened):
            if ev.stream_id == 0:
                for st in list(self.streams.values()):
                    st.on_window()
            else:
                st = self.streams.get(ev.stream_id)
                if st is not None:
                    st.on_window()
        elif isinstance(ev, hbone.StreamEnded):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.on_end()
            else:
                self.stream_ended_early(ev.stream_id)
        elif isinstance(ev, hbone.StreamReset):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.on_reset(ev.error_code, ev.remote)
            else:
                self.stream_reset_early(ev.stream_id, ev.error_code)
        elif isinstance(ev, hbone.PingAcknowledged):
            self._ping_outstanding = False
        elif isinstance(ev, hbone.ConnectionTerminated):
            self.goaway_received(ev)
        else:
            self.handle_role_event(ev)

    def handle_role_event(self, ev: hbone.Event) -> None:
        pass

    def stream_ended_early(self, stream_id: int) -> None:
        pass

    def stream_reset_early(self, stream_id: int, error_code: int) -> None:
        pass

    def goaway_received(self, ev: hbone.ConnectionTerminated) -> None:
        # Streams the peer did not process will never complete: fail them now.
        for sid, st in list(self.streams.items()):
            if sid > ev.last_stream_id:
                st.on_reset(ErrorCode.REFUSED_STREAM, True)
        if not self.streams:
            self.close("peer sent GOAWAY")

    def stream_finished(self, stream: TunnelStream) -> None:
        self.streams.pop(stream.stream_id, None)

    # -- output -----------------------------------------------------------------------------------
    def request_flush(self) -> None:
        """Flush at the end of this loop iteration: writes from many streams (and a stream's data
        plus its window update) leave in one TLS write instead of one each."""
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_pending = False
        if self.transport is None or self.transport.is_closing():
            return
        segments = self.core.data_to_send_segments()
        if len(segments) == 1:
            self.transport.write(segments[0])
        elif segments:
            # DATA payloads stay zero-copy memoryviews until the TLS layer encrypts them.
            self.transport.writelines(segments)

    def protocol_error(self, reason: str) -> None:
        log.warning("HBONE connection error: %s", reason)
        self.flush()  # the core queued a GOAWAY naming the error
        self.close(reason)

    def close(self, reason: str = "closed") -> None:
        if self.transport is not None:
            self.core.goaway()
            self.flush()
            self.transport.close()
        self._teardown(reason)

    def abort(self, reason: str) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._teardown(reason)

    def _teardown(self, reason: str) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
        if self._idle_sweep is not None:
            self._idle_sweep.cancel()
        for st in list(self.streams.values()):
            st._finish_abort(f"HBONE connection ended: {reason}")
        self.streams.clear()
        self.session_closed(reason)
        if not self.closed_future.done():
            self.closed_future.set_result(None)

    def session_closed(self, reason: str) -> None:
        pass

    # -- keepalive --------------------------------------------------------------------------------
    def _keepalive(self) -> None:
        if self.is_closed:
            return
        silent = self.loop.time() - self._last_rx
        if silent >= self.keepalive_timeout:
            self.abort(f"peer silent for {silent:.1f}s (keepalive timeout {self.keepalive_timeout:g}s)")
            return
        if silent >= self.keepalive_interval and not self._ping_outstanding:
            self._ping_outstanding = True
            self.core.ping(struct.pack(">d", self.loop.time()))
            self.flush()
        self.keepalive_tick()
        if not self.is_closed:
            self._keepalive_handle = self.loop.call_later(
                min(self.keepalive_interval, max(0.05, self.keepalive_timeout - silent)), self._keepalive
            )

    def keepalive_tick(self) -> None:
        pass

    # -- stream idle timeout ----------------------------------------------------------------------
    def watch_idle(self) -> None:
        """Make sure the idle sweep runs while streams are open. A stream is reset once it has
        been idle for ``stream_idle_timeout``, noticed within a quarter of that (at most 60 s)."""
        if self._idle_sweep is None and not self.is_closed and self.stream_idle_timeout > 0:
            period = min(60.0, max(0.05, self.stream_idle_timeout / 4))
            self._idle_sweep = self.loop.call_later(period, self._sweep_idle)

    def _sweep_idle(self) -> None:
        self._idle_sweep = None
        timeout = self.stream_idle_timeout
        now = self.loop.time()
        for st in list(self.streams.values()):
            idle = now - st._last_activity
            if st._idle_watched and not st.closed and idle >= timeout:
                st.abort(ErrorCode.CANCEL, f"idle for {idle:.0f}s (limit {timeout:.0f}s)")
        if self.streams:
            self.watch_idle()
