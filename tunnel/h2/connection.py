"""Sans-IO HTTP/2 connection core for HBONE: client and server roles, no sockets, no clock.

Why not ``h2.connection.H2Connection``: one CONNECT exchange through the h2 library on both ends
(request, response, a little DATA, FIN both ways) cost ~690 µs of CPU on the loaded machine
against ~7 µs with hand-built frames and cached header blocks (issue 13, DESIGN §4).
``bench/h2core_bench.py`` repeats the comparison in one run: on this machine (shared, loaded)
one exchange with ztunnel's request headers cost 48 µs here against 175 µs through a plain
h2 connection and 205 µs through ``tunnel.hbone`` (h2 plus its fast paths), and DATA cost
77 µs/MB (1 MiB frames) against 583 µs/MB. Of the 48 µs, ~11 µs is hpack decoding the
request, which we keep on purpose (below); the rest is Python per frame. h2 runs a generic
state machine per frame and per stream (with a Python-level event object per transition),
validates and normalizes every header, re-encodes them through HPACK with Huffman coding, and
copies DATA payloads several times. HBONE uses a narrow subset of HTTP/2 (CONNECT streams, DATA,
flow control, SETTINGS, PING, GOAWAY, RST_STREAM), so this core implements exactly that subset,
with the stream state machine as an explicit table (:mod:`tunnel.h2.streams`). What is not ours:
HPACK *decoding* of the peer's header blocks is ``hpack.Decoder`` (with a bounded table and
header-list size), because peers use the dynamic table and a decoder bug would be a
security bug.

The shell feeds received bytes with ``receive_data(data, now)`` (``now`` is any monotonic clock in
seconds; only the abuse rate limits use it), acts on the returned events, and writes what
``data_to_send()`` / ``data_to_send_segments()`` return. A :class:`ProtocolViolation` means the
peer broke HTTP/2 or abused it: a GOAWAY is queued; send it and close.

Local SETTINGS are applied to what we accept as soon as they are queued, not when the peer
acknowledges them: each of ours is more permissive than the RFC default except
MAX_CONCURRENT_STREAMS, and a stream over that limit before the ACK is refused (REFUSED_STREAM),
which RFC 9113 §5.1.2 allows.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping
from typing import cast

import hpack
import hpack.exceptions

from tunnel.h2 import frames as fr
from tunnel.h2 import headers as hd
from tunnel.h2.events import (
    AbuseReport,
    ConnectionTerminated,
    ConnectRequest,
    ConnectResponse,
    Data,
    Event,
    PingAcknowledged,
    ProtocolViolation,
    RequestRejected,
    SettingsAcknowledged,
    SettingsChanged,
    StreamEnded,
    StreamRefused,
    StreamReset,
    WindowOpened,
)
from tunnel.h2.frames import (
    FLAG_ACK,
    FLAG_END_HEADERS,
    FLAG_END_STREAM,
    FLAG_PADDED,
    FLAG_PRIORITY,
    ErrorCode,
)
from tunnel.h2.frames import FrameType as FT
from tunnel.h2.streams import (
    CONNECTION,
    RECEIVABLE_DATA,
    RECV_ERRORS,
    SENDABLE_DATA,
    StreamInput,
    StreamState,
    StreamStateError,
    transition,
)
from tunnel.hbone import (
    CLIENT_MAX_STREAMS_PER_CONNECTION,
    CONNECTION_WINDOW,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE,
    SERVER_MAX_CONCURRENT_STREAMS,
    STREAM_WINDOW,
    Authority,
    HboneError,
    Status,
)

log = logging.getLogger("tunnel.h2")

# --- abuse thresholds (per connection) --------------------------------------------------------
# Rapid reset (CVE-2023-44487) and "MadeYouReset" (peer-provoked stream errors): a token bucket
# over streams the peer opened and then reset before we answered, plus streams we had to reset
# because the peer broke a stream rule. nghttp2's incoming-RST limiter
# (nghttp2_option_set_stream_reset_rate_limit, adopted by Node) uses burst 1000, 33/s; Envoy
# closes after 500 streams when over half were reset within 1 s. A well-behaved HBONE client
# resets before the 200 only when its own app aborted during connect, so 1000 then 33/s leaves
# real traffic untouched while an attacker gets at most 1000 free streams.
RESET_BURST = 1000
RESET_RATE = 33.0
# Frames that make us work but carry nothing: SETTINGS and PING (each needs an ACK), PRIORITY,
# unknown extension frames, unsolicited ACKs, RST/WINDOW_UPDATE on closed streams. A real peer
# sends one SETTINGS per connection and a PING every 10 s (ztunnel, us). Burst 1000 is Envoy's
# max_outbound_control_frames default; the refill of 10/s is 100x a keepalive's rate.
IDLE_FRAME_BURST = 1000
IDLE_FRAME_RATE = 10.0
# Control frames we queued (ACKs, RSTs) that the shell has not drained yet: a peer that floods
# while not reading makes this grow. Envoy's max_outbound_control_frames default (1000).
MAX_OUTBOUND_CONTROL_FRAMES = 1000
# Consecutive frames with an empty payload and no END_STREAM (DATA, HEADERS/CONTINUATION
# fragments): Envoy allows 1 (max_consecutive_inbound_frames_with_empty_payload), Helidon 10; 10
# stays clear of legitimate stacks that send an empty DATA now and then.
MAX_CONSECUTIVE_EMPTY_FRAMES = 10
# WINDOW_UPDATE frames the peer may send: Envoy's ratio rule (10 per DATA frame we sent) plus
# one per stream and a base of 100 for windows opened ahead of any data.
WINDOW_UPDATE_BASE = 100
WINDOW_UPDATES_PER_DATA_FRAME = 10
# Streams refused for exceeding MAX_CONCURRENT_STREAMS after the peer acknowledged it. A
# conforming peer never does this (its count of open streams can only lag ours), so 100 is a
# generous allowance for a buggy one before GOAWAY(PROTOCOL_ERROR).
STREAM_LIMIT_REFUSALS = 100
# CONTINUATION frames per header block (CVE-2024-27316, "CONTINUATION flood"): nghttp2 caps
# them at 8; our blocks also stop at MAX_HEADER_LIST_SIZE compressed bytes.
MAX_CONTINUATIONS = 8
MAX_SETTINGS_PER_FRAME = 64  # the RFC defines 6 settings; 64 covers extensions, not a flood
CLOSED_STREAMS_REMEMBERED = 256  # how recent streams closed: decides which late frames are errors
ACK_STEP_FRACTION = 16  # credit goes back in 1/16-window steps: see H2Connection.acknowledge

_LOCAL_RESET, _REMOTE_RESET, _ENDED = 0, 1, 2
# Header blocks decoded with an empty dynamic table, by (block, table size, list limit): _decode.
_DECODED: dict[tuple[bytes, int, int], list[tuple[bytes, bytes]]] = {}
_DECODED_MAX = 512
# The same few pod IP:port targets arrive on every connection; parsing one costs ~2 µs.
_parse_authority = functools.lru_cache(maxsize=4096)(Authority.parse)


@functools.lru_cache(maxsize=4096)
def _request_prefix(authority: Authority) -> bytes:
    """``:method CONNECT`` + ``:authority``: the cached start of every request to a target."""
    return hd.request_block(str(authority))


_S = StreamState
_I = StreamInput


class _ConnectionError(Exception):
    def __init__(self, code: ErrorCode, message: str, abuse: str | None = None) -> None:
        super().__init__(message)
        self.code, self.abuse = code, abuse


class _Bucket:
    """Token bucket over a caller-supplied clock (the core reads no clock itself)."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, burst: int, rate: float) -> None:
        self.burst, self.rate, self.tokens = burst, rate, float(burst)
        self.last: float | None = None

    def take(self, now: float) -> bool:
        if self.last is None:
            self.last = now
        elif now > self.last:
            self.tokens = min(float(self.burst), self.tokens + (now - self.last) * self.rate)
            self.last = now
        self.tokens -= 1.0
        return self.tokens >= 0.0


class Stream:
    """One stream's state (a row of the table in :mod:`tunnel.h2.streams`) and windows."""

    __slots__ = ("announced", "credit", "id", "recv_window", "responded", "send_window", "state")

    def __init__(self, sid: int, send_window: int, recv_window: int) -> None:
        self.id = sid
        self.state: int = _S.IDLE
        self.send_window = send_window
        self.recv_window = recv_window
        self.credit = 0  # consumed bytes not yet returned by WINDOW_UPDATE
        self.announced = False  # the application knows this stream (events are reported)
        self.responded = False  # server: final response sent; client: final response received


class H2Connection:
    """The role-independent part: framing, flow control, SETTINGS, PING, GOAWAY, abuse limits."""

    client: bool = False

    def __init__(
        self,
        *,
        max_concurrent_streams: int,
        stream_window: int = STREAM_WINDOW,
        connection_window: int = CONNECTION_WINDOW,
        max_frame_size: int = MAX_FRAME_SIZE,
        max_header_list_size: int = MAX_HEADER_LIST_SIZE,
    ) -> None:
        if not fr.DEFAULT_MAX_FRAME_SIZE <= max_frame_size <= fr.MAX_MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size {max_frame_size} is outside 16384..16777215")
        if (
            not 0 < stream_window <= fr.MAX_WINDOW
            or not fr.DEFAULT_WINDOW <= connection_window <= fr.MAX_WINDOW
        ):
            raise ValueError("stream_window/connection_window out of range (RFC 9113 §6.9)")
        self._local_max_streams = max_concurrent_streams
        self._local_stream_window = stream_window
        self._stream_ack_step = max(1, stream_window // ACK_STEP_FRACTION)
        self._conn_ack_step = max(1, connection_window // ACK_STEP_FRACTION)
        self._local_max_frame = max_frame_size
        self._max_header_block = max_header_list_size
        self._streams: dict[int, Stream] = {}
        self._closed: dict[int, int] = {}  # recently closed stream id -> how (_LOCAL_RESET, ...)
        self._highest_inbound = 0
        self._next_sid = 1 if self.client else 2
        self._peer_initiated_live = 0
        self._local_initiated_live = 0
        # Peer settings (RFC 9113 §6.5.2 initial values until its SETTINGS arrive).
        self.peer_max_concurrent_streams = 2**31 - 1
        self.peer_initial_window = fr.DEFAULT_WINDOW
        self.peer_max_frame_size = fr.DEFAULT_MAX_FRAME_SIZE
        self.peer_max_header_list_size: int | None = None
        self._send_window = fr.DEFAULT_WINDOW
        self._recv_window = connection_window
        self._conn_credit = 0
        self._settings_unacked = 1
        self._settings_seen = False
        self._preface_left = 0 if self.client else len(fr.PREFACE)
        self._rbuf = b""
        self._data_left = 0  # DATA payload bytes still to come for the frame being streamed
        self._data_sid = 0
        self._data_end = False
        self._hdr_sid = 0  # header block in progress (HEADERS without END_HEADERS)
        self._hdr_parts: list[bytes] = []
        self._hdr_size = 0
        self._hdr_count = 0
        self._hdr_end_stream = False
        self._table_update_due = True
        self._decoder = hpack.Decoder(max_header_list_size=max_header_list_size)
        self._decoder.max_allowed_table_size = fr.DEFAULT_HEADER_TABLE_SIZE
        self._out: list[bytes | memoryview] = []
        self._control_queued = 0
        self.goaway_sent_last: int | None = None
        self.goaway_received_last: int | None = None
        self.closed = False  # a connection error happened or an error GOAWAY was sent/received
        # abuse accounting
        self._resets = _Bucket(RESET_BURST, RESET_RATE)
        self._idle = _Bucket(IDLE_FRAME_BURST, IDLE_FRAME_RATE)
        self._empty_run = 0
        self.streams_opened = 0
        self.premature_resets = 0
        self.refused_streams = 0
        self._refused_after_ack = 0
        self.idle_frames = 0
        self.window_updates = 0
        self.data_frames_sent = 0
        self._abused = False

        settings = {
            fr.SettingCode.ENABLE_PUSH: 0,
            fr.SettingCode.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            fr.SettingCode.INITIAL_WINDOW_SIZE: stream_window,
            fr.SettingCode.MAX_FRAME_SIZE: max_frame_size,
            fr.SettingCode.MAX_HEADER_LIST_SIZE: max_header_list_size,
        }
        if self.client:
            self._out.append(fr.PREFACE)
        self._out.append(fr.settings_frame({int(k): v for k, v in settings.items()}))
        if connection_window > fr.DEFAULT_WINDOW:
            # The connection window is no SETTING: it only grows by WINDOW_UPDATE on stream 0.
            self._out.append(fr.window_update_frame(0, connection_window - fr.DEFAULT_WINDOW))

    # --- output ---------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        """Everything pending, as one bytes object (copies DATA payloads)."""
        out = self._out
        if not out:
            return b""
        self._out = []
        self._control_queued = 0
        return out[0] if len(out) == 1 and type(out[0]) is bytes else b"".join(out)

    def data_to_send_segments(self) -> list[bytes | memoryview]:
        """Everything pending as buffers for one scatter/gather write (``socket.sendmsg``):
        frame headers and control frames are joined, DATA payloads stay zero-copy views."""
        segs = self._out
        self._out = []
        self._control_queued = 0
        out: list[bytes | memoryview] = []
        run: list[bytes | memoryview] = []
        for seg in segs:
            if type(seg) is bytes:
                run.append(seg)
            else:
                if run:
                    out.append(run[0] if len(run) == 1 else b"".join(run))
                    run = []
                out.append(seg)
        if run:
            out.append(run[0] if len(run) == 1 else b"".join(run))
        return out

    def _queue_control(self, frame: bytes) -> None:
        self._out.append(frame)
        self._control_queued += 1

    # --- state queries --------------------------------------------------------------------
    def stream_state(self, stream_id: int) -> StreamState:
        st = self._streams.get(stream_id)
        if st is not None:
            return StreamState(st.state)
        return _S.CLOSED if self._is_past(stream_id) else _S.IDLE

    def stream_is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def send_window(self, stream_id: int) -> int:
        """What ``send_data`` would take now (0 for streams that may not send)."""
        st = self._streams.get(stream_id)
        if st is None or st.state not in SENDABLE_DATA:
            return 0
        return max(0, min(st.send_window, self._send_window))

    def recv_windows(self) -> tuple[int, dict[int, int]]:
        """(connection receive window, {stream id: receive window}): for tests and status."""
        return self._recv_window, {sid: st.recv_window for sid, st in self._streams.items()}

    def send_windows(self) -> tuple[int, dict[int, int]]:
        return self._send_window, {sid: st.send_window for sid, st in self._streams.items()}

    @property
    def settings_acknowledged(self) -> bool:
        return self._settings_unacked == 0

    @property
    def drained(self) -> bool:
        """GOAWAY sent (or received) and no stream left: the shell may close."""
        return (
            self.goaway_sent_last is not None or self.goaway_received_last is not None
        ) and not self._streams

    def abuse_report(self, reason: str) -> AbuseReport:
        return AbuseReport(
            reason,
            self.streams_opened,
            self.premature_resets,
            self.refused_streams,
            self.idle_frames,
            self.window_updates,
            self._control_queued,
        )

    def _is_local_id(self, sid: int) -> bool:
        return (sid & 1) == (1 if self.client else 0)

    def _is_past(self, sid: int) -> bool:
        """An id that is not live and can never be opened again (closed, RFC 9113 §5.1.1)."""
        if self._is_local_id(sid):
            return sid < self._next_sid
        return sid <= self._highest_inbound

    # --- sending --------------------------------------------------------------------------
    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> int:
        """Frame as much of ``data`` as both send windows allow; returns the bytes taken. Frames
        are as large as the peer allows (1 MiB to another ztagent, 16 KiB to Envoy/ztunnel) and
        their payloads are zero-copy views of ``data``. ``end_stream`` sets END_STREAM on the
        last frame only if everything was taken. A stream that may not send takes 0."""
        st = self._streams.get(stream_id)
        if st is None or st.state not in SENDABLE_DATA:
            return 0
        total = len(data)
        n = min(total, st.send_window, self._send_window)
        if n <= 0:
            if end_stream and total == 0:
                self.end_stream(stream_id)
            return 0
        fin = end_stream and n == total
        view = memoryview(data)
        frame_max = self.peer_max_frame_size
        out = self._out
        sent = 0
        while sent < n:
            chunk = min(frame_max, n - sent)
            last = sent + chunk == n
            out.append(fr.data_header(chunk, stream_id, fin and last))
            out.append(view[sent : sent + chunk])
            sent += chunk
            self.data_frames_sent += 1
        st.send_window -= n
        self._send_window -= n
        if fin:
            self._after_send_end(st)
        return n

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction (an empty DATA frame with END_STREAM): a TCP FIN."""
        st = self._streams.get(stream_id)
        if st is None or st.state not in SENDABLE_DATA:
            return
        self._out.append(fr.data_header(0, stream_id, True))
        self._after_send_end(st)

    def _after_send_end(self, st: Stream) -> None:
        st.state = transition(st.state, _I.SEND_END_STREAM)
        if st.state == _S.CLOSED:
            self._forget(st, _ENDED)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        """Abort a stream (RST_STREAM): a TCP RST. No-op on a stream that is not live."""
        st = self._streams.get(stream_id)
        if st is None:
            return
        self._out.append(fr.rst_stream_frame(stream_id, int(error_code)))
        self._forget(st, _LOCAL_RESET)

    def acknowledge(self, stream_id: int, length: int) -> bool:
        """Give ``length`` consumed bytes of window back (stream and connection).

        Credit goes back in 1/16-window steps rather than h2's half window: between two Python
        processes the TLS and socket buffers hold about half a stream window, so the sender would
        idle until the update crossed them (tunnel.hbone measured this). Returns whether a
        WINDOW_UPDATE was queued (there is something to send)."""
        if length <= 0:
            return False
        queued = self._credit_connection(length)
        st = self._streams.get(stream_id)
        if st is None or st.state == _S.HALF_CLOSED_REMOTE:
            return queued  # no more DATA can come on it: its window does not matter
        st.credit += length
        if st.credit >= self._stream_ack_step:
            self._out.append(fr.window_update_frame(stream_id, st.credit))
            st.recv_window += st.credit
            st.credit = 0
            queued = True
        return queued

    def _credit_connection(self, length: int) -> bool:
        self._conn_credit += length
        if self._conn_credit >= self._conn_ack_step:
            self._out.append(fr.window_update_frame(0, self._conn_credit))
            self._recv_window += self._conn_credit
            self._conn_credit = 0
            return True
        return False

    def ping(self, opaque: bytes) -> None:
        self._out.append(fr.ping_frame(opaque.ljust(8, b"\0")[:8]))

    def goaway(
        self, error_code: int = ErrorCode.NO_ERROR, reason: bytes = b"", last_stream_id: int | None = None
    ) -> None:
        """Send GOAWAY. With NO_ERROR it is a graceful drain: streams up to ``last_stream_id``
        (default: the highest the peer opened) finish, newer ones are refused. It may be sent
        again with a lower id (RFC 9113 §6.8's two-step shutdown: first 2^31-1, then the real
        one after a PING round trip); the id never increases. Any other code ends the connection."""
        last = self._highest_inbound if last_stream_id is None else last_stream_id
        if self.goaway_sent_last is not None:
            if last >= self.goaway_sent_last and error_code == ErrorCode.NO_ERROR:
                return
            last = min(last, self.goaway_sent_last)
        self.goaway_sent_last = last
        self._out.append(fr.goaway_frame(last, int(error_code), reason))
        if error_code != ErrorCode.NO_ERROR:
            self.closed = True

    def _send_headers(self, st: Stream, block: bytes, end_stream: bool) -> None:
        if self._table_update_due:
            block = hd.TABLE_SIZE_ZERO + block
            self._table_update_due = False
        st.state = transition(st.state, _I.SEND_HEADERS_END if end_stream else _I.SEND_HEADERS)
        self._out.extend(fr.headers_frames(st.id, block, end_stream, self.peer_max_frame_size))
        if st.state == _S.CLOSED:
            self._forget(st, _ENDED)

    def _forget(self, st: Stream, how: int) -> None:
        st.state = _S.CLOSED
        if self._streams.pop(st.id, None) is None:
            return
        if self._is_local_id(st.id):
            self._local_initiated_live -= 1
        else:
            self._peer_initiated_live -= 1
        closed = self._closed
        closed[st.id] = how
        if len(closed) > CLOSED_STREAMS_REMEMBERED:
            del closed[next(iter(closed))]

    # --- receiving ------------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """Feed bytes read from the peer; returns the events they caused. ``now``: seconds on
        any monotonic clock (rate limits only). Raises :class:`ProtocolViolation` (GOAWAY
        queued) when the peer broke HTTP/2 or abused it; input after that is ignored."""
        out: list[Event] = []
        if self.closed:
            return out
        try:
            self._receive(data, now, out)
            if self._control_queued > MAX_OUTBOUND_CONTROL_FRAMES:
                raise _ConnectionError(
                    ErrorCode.ENHANCE_YOUR_CALM,
                    f"{self._control_queued} control frames queued for a peer that does not read",
                    abuse="outbound control frame flood",
                )
        except _ConnectionError as exc:
            raise self._fail(exc, out) from None
        except StreamStateError as exc:  # a connection-scoped table error that escaped a handler
            raise self._fail(_ConnectionError(exc.error_code, str(exc)), out) from None
        return out

    def _fail(self, exc: _ConnectionError, out: list[Event]) -> ProtocolViolation:
        report = None
        if exc.abuse is not None:
            report = self.abuse_report(exc.abuse)
            if not self._abused:
                self._abused = True
                # The one log line for this connection, whatever the number of streams involved.
                log.warning(
                    "HTTP/2 abuse from peer (%s): GOAWAY %s after %d streams opened, %d reset early, "
                    "%d refused, %d idle control frames, %d WINDOW_UPDATEs",
                    exc.abuse,
                    exc.code.name,
                    report.streams_opened,
                    report.premature_resets,
                    report.refused_streams,
                    report.idle_frames,
                    report.window_updates,
                )
        self._rbuf = b""
        self.goaway(exc.code, str(exc).encode("utf-8", "replace")[:256])
        self.closed = True
        return ProtocolViolation(f"HTTP/2 protocol error from peer: {exc}", int(exc.code), out, report)

    def _receive(self, data: bytes | bytearray | memoryview, now: float, out: list[Event]) -> None:
        if self._rbuf:
            src = self._rbuf + bytes(data)
            self._rbuf = b""
        else:
            # DATA events are slices of this object: it must not be the caller's reusable buffer.
            src = data if type(data) is bytes else bytes(data)
        n = len(src)
        pos = 0
        if self._preface_left:
            done = len(fr.PREFACE) - self._preface_left
            k = min(self._preface_left, n)
            if src[:k] != fr.PREFACE[done : done + k]:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "invalid client connection preface")
            self._preface_left -= k
            pos = k
        mv = memoryview(src)
        if self._data_left and pos < n:
            take = min(self._data_left, n - pos)
            self._data_left -= take
            self._data_chunk(mv[pos : pos + take], out)
            pos += take
        max_frame = self._local_max_frame
        while n - pos >= 9:
            length = (src[pos] << 16) | (src[pos + 1] << 8) | src[pos + 2]
            ftype, flags = src[pos + 3], src[pos + 4]
            sid = ((src[pos + 5] & 0x7F) << 24) | (src[pos + 6] << 16) | (src[pos + 7] << 8) | src[pos + 8]
            if length > max_frame:
                raise _ConnectionError(
                    ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds our maximum {max_frame}"
                )
            if not self._settings_seen:
                if ftype != FT.SETTINGS or flags & FLAG_ACK:
                    raise _ConnectionError(
                        ErrorCode.PROTOCOL_ERROR, "the peer's preface must start with SETTINGS"
                    )
                self._settings_seen = True
            if self._hdr_sid and ftype != FT.CONTINUATION:
                raise _ConnectionError(
                    ErrorCode.PROTOCOL_ERROR,
                    f"frame type {ftype} inside the header block of stream {self._hdr_sid}",
                )
            if ftype == FT.DATA and not flags & FLAG_PADDED:
                # Streamed: the frame is accounted now and its payload delivered as it arrives,
                # as zero-copy slices (a 1 MiB frame spans many reads; buffering it cost a copy).
                pos += 9
                st = self._accept_data(sid, length, bool(flags & FLAG_END_STREAM), now, out)
                avail = min(length, n - pos)
                self._data_sid = sid if st is not None else 0
                self._data_end = bool(flags & FLAG_END_STREAM)
                self._data_left = length - avail
                self._data_chunk(mv[pos : pos + avail], out)
                pos += avail
                continue
            self._check_length(ftype, flags, length)
            if n - pos - 9 < length:
                break
            payload = mv[pos + 9 : pos + 9 + length]
            pos += 9 + length
            self._frame(ftype, flags, sid, payload, now, out)
            if self.closed:
                return
        if pos < n:
            self._rbuf = src[pos:]

    def _check_length(self, ftype: int, flags: int, length: int) -> None:
        """Size rules checked from the frame header, before buffering the payload (RFC 9113 §6)."""
        bad = (
            (ftype == FT.PING and length != 8)
            or (ftype in (FT.RST_STREAM, FT.WINDOW_UPDATE) and length != 4)
            or (ftype == FT.SETTINGS and (length % 6 or (flags & FLAG_ACK and length)))
            or (ftype == FT.GOAWAY and length < 8)
        )
        if bad:
            raise _ConnectionError(
                ErrorCode.FRAME_SIZE_ERROR, f"frame type {ftype} with a payload of {length} bytes"
            )
        if ftype == FT.SETTINGS and length > 6 * MAX_SETTINGS_PER_FRAME:
            raise _ConnectionError(
                ErrorCode.ENHANCE_YOUR_CALM, f"SETTINGS of {length} bytes", abuse="settings size"
            )
        if ftype in (FT.HEADERS, FT.CONTINUATION) and self._hdr_size + length > self._max_header_block:
            raise _ConnectionError(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"header block over {self._max_header_block} bytes",
                abuse="oversized header block",
            )

    def _frame(
        self, ftype: int, flags: int, sid: int, payload: memoryview, now: float, out: list[Event]
    ) -> None:
        if ftype == FT.HEADERS:
            self._on_headers(flags, sid, payload, now, out)
        elif ftype == FT.CONTINUATION:
            self._on_continuation(flags, sid, payload, now, out)
        elif ftype == FT.DATA:  # padded (plain DATA is streamed in _receive)
            self._on_padded_data(flags, sid, payload, now, out)
        elif ftype == FT.WINDOW_UPDATE:
            self._on_window_update(sid, payload, now, out)
        elif ftype == FT.RST_STREAM:
            self._on_rst(sid, payload, now, out)
        elif ftype == FT.SETTINGS:
            self._on_settings(flags, sid, payload, now, out)
        elif ftype == FT.PING:
            if sid:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
            if flags & FLAG_ACK:
                out.append(PingAcknowledged(bytes(payload)))
            else:
                self._idle_frame(now, "PING flood")
                self._queue_control(fr.ping_frame(bytes(payload), ack=True))
        elif ftype == FT.GOAWAY:
            self._on_goaway(sid, payload, out)
        elif ftype == FT.PRIORITY:
            if not sid:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:  # a stream error, not a connection one (RFC 9113 §6.3)
                self._stream_error(sid, ErrorCode.FRAME_SIZE_ERROR, now, out)
                return
            if fr.u32(payload) & 0x7FFFFFFF == sid:
                self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, now, out)
                return
            self._idle_frame(now, "PRIORITY flood")  # priorities are advisory: ignored (RFC 9113 §5.3.2)
        elif ftype == FT.PUSH_PROMISE:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE although push is disabled")
        else:
            self._idle_frame(now, "unknown frame flood")  # unknown types are ignored (RFC 9113 §4.1)

    def _idle_frame(self, now: float, what: str) -> None:
        self.idle_frames += 1
        if not self._idle.take(now):
            raise _ConnectionError(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"{self.idle_frames} control frames with nothing to do",
                abuse=what,
            )

    def _empty_frame(self, empty: bool) -> None:
        if not empty:
            self._empty_run = 0
            return
        self._empty_run += 1
        if self._empty_run > MAX_CONSECUTIVE_EMPTY_FRAMES:
            raise _ConnectionError(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"{self._empty_run} consecutive empty frames",
                abuse="empty frame flood",
            )

    def _peer_stream_error(self, now: float) -> None:
        """A stream the peer made us reset, or reset itself before our answer (rapid reset)."""
        if not self._resets.take(now):
            raise _ConnectionError(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"{self.premature_resets} streams reset before their response",
                abuse="rapid reset",
            )

    def _stream_error(self, sid: int, code: ErrorCode, now: float, out: list[Event]) -> None:
        """RFC 9113 §5.4.2: RST_STREAM(code) and the stream is closed; the connection lives on."""
        self._queue_control(fr.rst_stream_frame(sid, int(code)))
        st = self._streams.get(sid)
        if st is not None:
            self._forget(st, _LOCAL_RESET)
            if st.announced:
                out.append(StreamReset(sid, int(code), False))
        self.premature_resets += 1
        self._peer_stream_error(now)

    # DATA
    def _accept_data(self, sid: int, flow_len: int, end: bool, now: float, out: list[Event]) -> Stream | None:
        """Window and state checks for a whole DATA frame; the stream to deliver to, or None
        (then the caller returns the frame's bytes to the connection window)."""
        if not sid:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        if flow_len > self._recv_window:
            raise _ConnectionError(
                ErrorCode.FLOW_CONTROL_ERROR,
                f"DATA of {flow_len} bytes exceeds the connection window of {self._recv_window}",
            )
        self._recv_window -= flow_len
        self._empty_frame(flow_len == 0 and not end)
        st = self._streams.get(sid)
        if st is None:
            self._late_frame(sid, _I.RECV_END_STREAM if end else _I.RECV_DATA, now, out)
            return None
        if st.state not in RECEIVABLE_DATA:  # half-closed (remote): STREAM_CLOSED
            self._stream_error(sid, ErrorCode.STREAM_CLOSED, now, out)
            return None
        if flow_len > st.recv_window:
            self._stream_error(sid, ErrorCode.FLOW_CONTROL_ERROR, now, out)
            return None
        if self.client and not st.responded:
            # DATA before the response HEADERS: a malformed response (RFC 9113 §8.1).
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, now, out)
            return None
        st.recv_window -= flow_len
        return st

    def _data_chunk(self, chunk: memoryview, out: list[Event]) -> None:
        sid = self._data_sid
        st = self._streams.get(sid) if sid else None
        if st is None:
            if chunk:
                self._credit_connection(len(chunk))  # a stream that went away: window comes back
            return
        if chunk:
            if st.announced:
                out.append(Data(sid, chunk, len(chunk)))
            else:
                self.acknowledge(sid, len(chunk))
        if not self._data_left and self._data_end:
            self._recv_end(st, out)

    def _recv_end(self, st: Stream, out: list[Event]) -> None:
        st.state = transition(st.state, _I.RECV_END_STREAM)
        if st.announced:
            out.append(StreamEnded(st.id))
        if st.state == _S.CLOSED:
            self._forget(st, _ENDED)

    def _on_padded_data(
        self, flags: int, sid: int, payload: memoryview, now: float, out: list[Event]
    ) -> None:
        if not payload or payload[0] >= len(payload):
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "DATA padding covers the whole frame")
        end = bool(flags & FLAG_END_STREAM)
        st = self._accept_data(sid, len(payload), end, now, out)
        if st is None:
            self._credit_connection(len(payload))
            return
        body = payload[1 : len(payload) - payload[0]]
        if body and st.announced:
            out.append(Data(sid, body, len(payload)))
        else:
            self.acknowledge(sid, len(payload))
        if end:
            self._recv_end(st, out)

    def _late_frame(self, sid: int, inp: StreamInput, now: float, out: list[Event]) -> None:
        """A frame for a stream that is not live: idle (never opened) or closed."""
        if not self._is_past(sid):
            # RFC 9113 §5.1 idle: only HEADERS and PRIORITY are allowed (the table says how).
            code, _scope = RECV_ERRORS[(_S.IDLE, inp)]
            raise _ConnectionError(code, f"{inp.name} on idle stream {sid}")
        how = self._closed.get(sid)
        if how == _LOCAL_RESET or inp in (_I.RECV_WINDOW_UPDATE, _I.RECV_RST):
            # We reset it (the peer's frames were in flight: ignore, §5.1) or a late WINDOW_UPDATE
            # / RST_STREAM after END_STREAM. DATA in flight after our RST is normal, not a flood.
            if inp not in (_I.RECV_DATA, _I.RECV_END_STREAM):
                self._idle_frame(now, "frames on closed streams")
            return
        if how == _ENDED:
            transition(_S.CLOSED, inp)  # connection error STREAM_CLOSED (frames after END_STREAM)
        # The peer reset it, or we no longer remember how it closed: stream error STREAM_CLOSED.
        self._stream_error(sid, ErrorCode.STREAM_CLOSED, now, out)

    # HEADERS / CONTINUATION
    def _on_headers(self, flags: int, sid: int, payload: memoryview, now: float, out: list[Event]) -> None:
        if not sid:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        start, end = 0, len(payload)
        if flags & FLAG_PADDED:
            if not payload or payload[0] >= len(payload):
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "HEADERS padding covers the whole frame")
            start, end = 1, len(payload) - payload[0]
        if flags & FLAG_PRIORITY:
            if end - start < 5:
                raise _ConnectionError(
                    ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for its priority fields"
                )
            depends_on_self = fr.u32(payload, start) & 0x7FFFFFFF == sid
            start += 5
        else:
            depends_on_self = False
        fragment = bytes(payload[start:end])
        self._empty_frame(not fragment and not flags & FLAG_END_STREAM)
        if flags & FLAG_END_HEADERS:
            self._header_block(sid, fragment, bool(flags & FLAG_END_STREAM), depends_on_self, now, out)
            return
        self._hdr_sid, self._hdr_parts, self._hdr_size, self._hdr_count = sid, [fragment], len(fragment), 0
        self._hdr_end_stream = bool(flags & FLAG_END_STREAM)
        self._hdr_self_dep = depends_on_self

    def _on_continuation(
        self, flags: int, sid: int, payload: memoryview, now: float, out: list[Event]
    ) -> None:
        if not self._hdr_sid or sid != self._hdr_sid:
            raise _ConnectionError(
                ErrorCode.PROTOCOL_ERROR, f"CONTINUATION on stream {sid} without a header block"
            )
        self._hdr_count += 1
        if self._hdr_count > MAX_CONTINUATIONS:
            raise _ConnectionError(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"more than {MAX_CONTINUATIONS} CONTINUATION frames in one header block",
                abuse="CONTINUATION flood",
            )
        self._empty_frame(not payload and not flags & FLAG_END_HEADERS)
        self._hdr_parts.append(bytes(payload))
        self._hdr_size += len(payload)
        if flags & FLAG_END_HEADERS:
            block = b"".join(self._hdr_parts)
            self._hdr_sid, self._hdr_parts, self._hdr_size = 0, [], 0
            self._header_block(sid, block, self._hdr_end_stream, self._hdr_self_dep, now, out)

    _hdr_self_dep = False

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        # Decoding is a pure function of (block, dynamic table, table size limit). While the
        # table is empty, which it stays with peers that never index (another ztagent: every
        # `:status 200` block is the byte 0x88), the real decoder's earlier answer for the same
        # bytes is reused: ~5 µs of the client's side of an exchange. A block that leaves
        # anything in the table, or changes its size, is never cached.
        table = self._decoder.header_table
        key = None
        if not table.dynamic_entries:
            key = (block, table.maxsize, self._decoder.max_header_list_size)
            hit = _DECODED.get(key)
            if hit is not None:
                return hit
        try:
            fields = cast(list[tuple[bytes, bytes]], list(self._decoder.decode(block, raw=True)))
            if key is not None and not table.dynamic_entries and table.maxsize == key[1]:
                if len(_DECODED) >= _DECODED_MAX:
                    _DECODED.clear()
                _DECODED[key] = fields
            return fields
        except hpack.exceptions.OversizedHeaderListError as exc:
            raise _ConnectionError(
                ErrorCode.ENHANCE_YOUR_CALM, f"header list too large: {exc}", abuse="oversized header list"
            ) from None
        except (hpack.exceptions.HPACKError, IndexError, ValueError, UnicodeError) as exc:
            raise _ConnectionError(ErrorCode.COMPRESSION_ERROR, f"HPACK decoding failed: {exc}") from None

    def _header_block(
        self, sid: int, block: bytes, end: bool, self_dep: bool, now: float, out: list[Event]
    ) -> None:
        # Decode first, whatever happens to the stream: the HPACK table must stay in sync.
        fields = self._decode(block)
        st = self._streams.get(sid)
        if st is None:
            if self._is_local_id(sid) or self._is_past(sid):
                if not self._is_past(sid) or sid not in self._closed:
                    # An id the peer may not open, or one below its highest (never opened, so
                    # implicitly closed: "unexpected stream identifier", RFC 9113 §5.1.1).
                    raise _ConnectionError(
                        ErrorCode.PROTOCOL_ERROR, f"HEADERS on stream {sid}, which the peer may not open"
                    )
                self._late_frame(sid, _I.RECV_HEADERS_END if end else _I.RECV_HEADERS, now, out)
                return
            self._open_remote(sid, fields, end, self_dep, now, out)
            return
        if self_dep:
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, now, out)
            return
        try:
            nxt = transition(st.state, _I.RECV_HEADERS_END if end else _I.RECV_HEADERS)
        except StreamStateError as exc:
            if exc.scope == CONNECTION:
                raise _ConnectionError(exc.error_code, str(exc)) from None
            self._stream_error(sid, exc.error_code, now, out)
            return
        self._headers_on_stream(st, fields, end, nxt, now, out)

    def _headers_on_stream(
        self,
        st: Stream,
        fields: list[tuple[bytes, bytes]],
        end: bool,
        nxt: StreamState,
        now: float,
        out: list[Event],
    ) -> None:
        # A second header block on a stream is trailers: it must end the stream (RFC 9113 §8.1).
        if not end:
            self._stream_error(st.id, ErrorCode.PROTOCOL_ERROR, now, out)
            return
        try:
            hd.check_trailers(fields)
        except hd.MalformedHeaders:
            self._stream_error(st.id, ErrorCode.PROTOCOL_ERROR, now, out)
            return
        self._recv_end(st, out)

    def _open_remote(
        self,
        sid: int,
        fields: list[tuple[bytes, bytes]],
        end: bool,
        self_dep: bool,
        now: float,
        out: list[Event],
    ) -> None:
        raise _ConnectionError(
            ErrorCode.PROTOCOL_ERROR, f"HEADERS opening stream {sid}: the server opens no streams"
        )

    def _new_stream(self, sid: int) -> Stream:
        st = Stream(sid, self.peer_initial_window, self._local_stream_window)
        self._streams[sid] = st
        self.streams_opened += 1
        if self._is_local_id(sid):
            self._local_initiated_live += 1
        else:
            self._peer_initiated_live += 1
        return st

    # control frames
    def _on_window_update(self, sid: int, payload: memoryview, now: float, out: list[Event]) -> None:
        inc = fr.u32(payload) & 0x7FFFFFFF
        self.window_updates += 1
        budget = (
            WINDOW_UPDATE_BASE + self.streams_opened + WINDOW_UPDATES_PER_DATA_FRAME * self.data_frames_sent
        )
        if self.window_updates > budget:
            raise _ConnectionError(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"{self.window_updates} WINDOW_UPDATEs for {self.data_frames_sent} DATA frames sent",
                abuse="WINDOW_UPDATE flood",
            )
        if not sid:
            if not inc:
                raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self._send_window += inc
            if self._send_window > fr.MAX_WINDOW:
                raise _ConnectionError(ErrorCode.FLOW_CONTROL_ERROR, "connection send window above 2^31-1")
            out.append(WindowOpened(0))
            return
        st = self._streams.get(sid)
        if st is None:
            self._late_frame(sid, _I.RECV_WINDOW_UPDATE, now, out)
            return
        if not inc:
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, now, out)
            return
        st.send_window += inc
        if st.send_window > fr.MAX_WINDOW:
            self._stream_error(sid, ErrorCode.FLOW_CONTROL_ERROR, now, out)
            return
        if st.announced and st.state in SENDABLE_DATA:
            out.append(WindowOpened(sid))

    def _on_rst(self, sid: int, payload: memoryview, now: float, out: list[Event]) -> None:
        if not sid:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        st = self._streams.get(sid)
        if st is None:
            self._late_frame(sid, _I.RECV_RST, now, out)
            return
        code = fr.u32(payload)
        self._forget(st, _REMOTE_RESET)
        if st.announced:
            out.append(StreamReset(sid, code, True))
        if not self._is_local_id(sid) and not st.responded:
            self.premature_resets += 1
            self._peer_stream_error(now)

    def _on_settings(self, flags: int, sid: int, payload: memoryview, now: float, out: list[Event]) -> None:
        if sid:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & FLAG_ACK:
            if self._settings_unacked:
                self._settings_unacked -= 1
                out.append(SettingsAcknowledged())
            else:
                self._idle_frame(now, "unsolicited SETTINGS ACK")
            return
        self._idle_frame(now, "SETTINGS flood")
        old_window = self.peer_initial_window
        for code, value in fr.parse_settings(payload):
            if code == fr.SettingCode.ENABLE_PUSH:
                if value > 1 or (self.client and value == 1):
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH={value}")
            elif code == fr.SettingCode.MAX_CONCURRENT_STREAMS:
                self.peer_max_concurrent_streams = value
            elif code == fr.SettingCode.INITIAL_WINDOW_SIZE:
                if value > fr.MAX_WINDOW:
                    raise _ConnectionError(
                        ErrorCode.FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE={value}"
                    )
                self.peer_initial_window = value
            elif code == fr.SettingCode.MAX_FRAME_SIZE:
                if not fr.DEFAULT_MAX_FRAME_SIZE <= value <= fr.MAX_MAX_FRAME_SIZE:
                    raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE={value}")
                self.peer_max_frame_size = value
            elif code == fr.SettingCode.MAX_HEADER_LIST_SIZE:
                self.peer_max_header_list_size = value
            # HEADER_TABLE_SIZE: our blocks never index (table size 0 was announced); unknown: ignored.
        delta = self.peer_initial_window - old_window
        if delta:
            # RFC 9113 §6.9.2: the change applies to every open stream's window (may go negative).
            for st in self._streams.values():
                st.send_window += delta
                if st.send_window > fr.MAX_WINDOW:
                    raise _ConnectionError(
                        ErrorCode.FLOW_CONTROL_ERROR, f"stream {st.id} window above 2^31-1"
                    )
        self._queue_control(fr.SETTINGS_ACK)
        out.append(
            SettingsChanged(
                self.peer_max_concurrent_streams, self.peer_max_frame_size, self.peer_initial_window
            )
        )
        if delta > 0:
            out.append(WindowOpened(0))

    def _on_goaway(self, sid: int, payload: memoryview, out: list[Event]) -> None:
        if sid:
            raise _ConnectionError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        last = fr.u32(payload) & 0x7FFFFFFF
        code = fr.u32(payload, 4)
        debug = bytes(payload[8:]) or None
        if self.goaway_received_last is not None:
            last = min(last, self.goaway_received_last)  # the id may only go down (RFC 9113 §6.8)
        self.goaway_received_last = last
        out.append(ConnectionTerminated(code, last, debug))
        # Streams we opened above ``last`` were never processed: safe to retry elsewhere.
        for st in [st for st in self._streams.values() if self._is_local_id(st.id) and st.id > last]:
            self._forget(st, _REMOTE_RESET)
            if st.announced:
                out.append(StreamReset(st.id, ErrorCode.REFUSED_STREAM, True))
        if code != ErrorCode.NO_ERROR:
            self.closed = True


class ClientConnection(H2Connection):
    """HBONE client core: opens CONNECT streams and reports the server's answers."""

    client = True

    def __init__(self, *, max_concurrent_streams: int = CLIENT_MAX_STREAMS_PER_CONNECTION, **kw: int) -> None:
        # Our MAX_CONCURRENT_STREAMS bounds what the server may open: it may open none (no push),
        # but the setting also caps our own use of the connection (min with the server's).
        self.max_streams_per_connection = max_concurrent_streams
        super().__init__(max_concurrent_streams=max_concurrent_streams, **kw)

    def can_open_stream(self) -> bool:
        if self.closed or self.goaway_received_last is not None or self.goaway_sent_last is not None:
            return False
        if self._next_sid > fr.MAX_WINDOW:  # stream ids are exhausted at 2^31-1
            return False
        limit = min(self.max_streams_per_connection, self.peer_max_concurrent_streams)
        return self._local_initiated_live < limit

    def open_stream(self, authority: Authority, headers: Mapping[str, str] | None = None) -> int:
        """Send a CONNECT for ``authority``; returns the stream id. HboneError when the
        connection cannot take a stream (full, going away) or a header is not allowed."""
        if not self.can_open_stream():
            raise HboneError("connection cannot take another stream (full or going away)")
        try:
            fields = hd.check_outbound(headers) if headers else []
        except ValueError as exc:
            raise HboneError(str(exc)) from None
        sid = self._next_sid
        self._next_sid += 2
        st = self._new_stream(sid)
        st.announced = True
        block = _request_prefix(authority)
        if fields:
            block += hd.literal_fields(fields)
        self._send_headers(st, block, end_stream=False)
        return sid

    def _headers_on_stream(
        self,
        st: Stream,
        fields: list[tuple[bytes, bytes]],
        end: bool,
        nxt: StreamState,
        now: float,
        out: list[Event],
    ) -> None:
        if st.responded:
            super()._headers_on_stream(st, fields, end, nxt, now, out)
            return
        try:
            status, headers = hd.check_response(fields)
        except hd.MalformedHeaders:
            self._stream_error(st.id, ErrorCode.PROTOCOL_ERROR, now, out)
            return
        if status < 200:
            if end:  # an interim response cannot end the stream (RFC 9113 §8.1)
                self._stream_error(st.id, ErrorCode.PROTOCOL_ERROR, now, out)
            return  # 1xx: informational, nothing for a tunnel
        st.responded = True
        out.append(ConnectResponse(st.id, status, headers))
        if end:
            self._recv_end(st, out)
        if status != Status.OK and st.id in self._streams:
            # A non-2xx answer to CONNECT means no tunnel (RFC 9110 §9.3.6): drop the stream.
            self.reset_stream(st.id, ErrorCode.CANCEL)


class ServerConnection(H2Connection):
    """HBONE server core: validates CONNECT requests, answers them, refuses everything else."""

    client = False

    def __init__(self, *, max_concurrent_streams: int = SERVER_MAX_CONCURRENT_STREAMS, **kw: int) -> None:
        super().__init__(max_concurrent_streams=max_concurrent_streams, **kw)

    @staticmethod
    def validate_request(headers: Mapping[str, str]) -> Authority:
        """The HBONE rules over a well-formed request: CONNECT to ``ip:port``, nothing else."""
        method = headers.get(":method")
        if method != "CONNECT":
            raise HboneError(f"method {method!r} is not CONNECT; this port only carries HBONE tunnels")
        if ":protocol" in headers:
            raise HboneError("extended CONNECT (:protocol) is not HBONE")
        if ":scheme" in headers or ":path" in headers:
            raise HboneError("CONNECT must not carry :scheme or :path (RFC 9113 §8.5)")
        authority = headers.get(":authority")
        if authority is None:
            raise HboneError("CONNECT without :authority; HBONE needs ip:port")
        return _parse_authority(authority)

    def respond(
        self,
        stream_id: int,
        status: Status | int,
        headers: Mapping[str, str] | None = None,
        *,
        end_stream: bool | None = None,
    ) -> None:
        """Answer a CONNECT (a cached header block for the HBONE statuses). Non-200 answers end
        the stream: there is no tunnel behind them, and a client still sending is reset."""
        st = self._streams.get(stream_id)
        if st is None or st.responded or st.state not in (_S.OPEN, _S.HALF_CLOSED_REMOTE):
            return
        code = int(status)
        done = code != Status.OK if end_stream is None else end_stream
        fields = hd.check_outbound(headers) if headers else ()
        self._answer(st, code, fields, done, ErrorCode.NO_ERROR)

    def _answer(
        self,
        st: Stream,
        status: int,
        fields: Iterable[tuple[bytes, bytes]],
        done: bool,
        reset_code: ErrorCode,
    ) -> None:
        st.responded = True
        self._send_headers(st, hd.response_block(status, fields), done)
        if done and st.id in self._streams:
            # The client may still be sending: stop it rather than acknowledging bytes forever.
            self.reset_stream(st.id, reset_code)

    def _reject(self, st: Stream, status: Status, code: ErrorCode, reason: str, out: list[Event]) -> None:
        self._answer(st, status, (), True, code)
        out.append(RequestRejected(st.id, status, reason))

    def _open_remote(
        self,
        sid: int,
        fields: list[tuple[bytes, bytes]],
        end: bool,
        self_dep: bool,
        now: float,
        out: list[Event],
    ) -> None:
        # RFC 9113 §5.1.1: a new id must exceed every id the peer used; lower idle ids are closed.
        self._highest_inbound = sid
        if self.goaway_sent_last is not None and sid > self.goaway_sent_last:
            self._refuse(sid, "draining", out)
            return
        if self._peer_initiated_live >= self._local_max_streams:
            self._refuse(sid, f"limit of {self._local_max_streams} streams", out)
            if self.settings_acknowledged:
                self._refused_after_ack += 1
                if self._refused_after_ack > STREAM_LIMIT_REFUSALS:
                    raise _ConnectionError(
                        ErrorCode.PROTOCOL_ERROR,
                        f"{self._refused_after_ack} streams over the acknowledged limit "
                        f"of {self._local_max_streams}",
                        abuse="stream limit exceeded",
                    )
            return
        st = self._new_stream(sid)
        st.state = transition(_S.IDLE, _I.RECV_HEADERS_END if end else _I.RECV_HEADERS)
        if self_dep:
            self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, now, out)
            return
        try:
            headers = hd.check_request(fields)
        except hd.MalformedHeaders as exc:
            self._reject(st, Status.BAD_REQUEST, ErrorCode.PROTOCOL_ERROR, f"malformed request: {exc}", out)
            self.premature_resets += 1
            self._peer_stream_error(now)
            return
        try:
            authority = self.validate_request(headers)
        except HboneError as exc:
            self._reject(st, exc.status, ErrorCode.NO_ERROR, str(exc), out)
            return
        st.announced = True
        out.append(ConnectRequest(sid, authority, headers))
        if end:
            out.append(StreamEnded(sid))

    def _refuse(self, sid: int, why: str, out: list[Event]) -> None:
        self.refused_streams += 1
        self._queue_control(fr.rst_stream_frame(sid, ErrorCode.REFUSED_STREAM))
        self._closed[sid] = _LOCAL_RESET
        if len(self._closed) > CLOSED_STREAMS_REMEMBERED:
            del self._closed[next(iter(self._closed))]
        out.append(StreamRefused(sid, f"stream refused: {why} on this connection"))
