"""Sans-IO HBONE core: HTTP/2 CONNECT tunnels over `h2`, no sockets, no clock.

HBONE (DESIGN.md §4) is one HTTP/2 ``CONNECT`` stream per proxied TCP connection, with
``:authority`` = the original destination ``ip:port`` and neither ``:scheme`` nor ``:path``
(RFC 9113 §8.5). This module builds and validates those requests, maps outcomes to the statuses
ztunnel uses (200 after the upstream connect, 400 malformed/not local, 401 denied, 503 upstream
unreachable) and turns frames into the typed events below. The asyncio shell (``tunnel.server``,
``tunnel.client``) feeds it bytes with :meth:`HboneConnection.receive_data` and writes whatever
:meth:`HboneConnection.data_to_send` returns.

The HTTP/2 settings are ztunnel's: the ``h2`` defaults (64 KiB windows, 16 KiB frames) would cap
a tunnel at a few hundred Mbit/s on a LAN-latency path, so they are set explicitly here.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import hpack
import hyperframe.frame

# --- ztunnel's HTTP/2 settings (DESIGN.md §4) -------------------------------------------------
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME_SIZE = 1024 * 1024
STREAM_ACK_STEP = STREAM_WINDOW // 16
CONNECTION_ACK_STEP = CONNECTION_WINDOW // 16
SERVER_MAX_CONCURRENT_STREAMS = 200
CLIENT_MAX_STREAMS_PER_CONNECTION = 100
# HPACK table and header-list bounds: a CONNECT carries a handful of short headers; anything
# bigger than this is abuse, not a tunnel.
MAX_HEADER_LIST_SIZE = 64 * 1024
_H2_DEFAULT_WINDOW = 65535


class Status(IntEnum):
    """The statuses an HBONE server answers, one per failure class (ztunnel's mapping)."""

    OK = 200
    BAD_REQUEST = 400  # malformed CONNECT, or an authority that is not a local destination
    UNAUTHORIZED = 401  # authorization policy denied the connection
    SERVICE_UNAVAILABLE = 503  # upstream connect failed, or unknown port


class ErrorCode(IntEnum):
    """HTTP/2 error codes used by the tunnel (RFC 9113 §7)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    CONNECT_ERROR = 0xA  # RFC 9113 §8.5: the proxied TCP connection failed or was reset


class HboneError(Exception):
    """A request or response that breaks the HBONE rules. ``status`` is what a server answers."""

    def __init__(self, message: str, status: Status = Status.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


# --- authority --------------------------------------------------------------------------------
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=8192)
def parse_ip(text: str) -> IpAddress:
    """``ipaddress.ip_address`` remembered: the same few pod IPs are parsed on every connection
    (peer, destination, policy input), and parsing was a few percent of a new tunnel's CPU.
    Raises ValueError like ``ip_address`` (errors are not cached)."""
    return ipaddress.ip_address(text)


@dataclass(frozen=True, order=True)
class Authority:
    """A CONNECT target: an IP literal and a port (HBONE never tunnels to a host name)."""

    ip: IpAddress
    port: int

    @classmethod
    def of(cls, ip: str | IpAddress, port: int) -> Authority:
        try:
            addr = parse_ip(ip) if isinstance(ip, str) else ip
        except ValueError as exc:
            raise HboneError(f"authority host {ip!r} is not an IP address") from exc
        if not isinstance(port, int) or not 0 < port < 65536:
            raise HboneError(f"authority port {port!r} is out of range 1..65535")
        return cls(addr, port)

    @classmethod
    def parse(cls, text: str) -> Authority:
        """Parse ``ip:port`` or ``[ipv6]:port`` strictly (no host names, no zone ids, a port)."""
        if not text:
            raise HboneError("empty :authority; HBONE needs ip:port")
        if "%" in text:
            raise HboneError(f"authority {text!r}: zone ids are not allowed")
        if text.startswith("["):
            close = text.find("]")
            if close < 0 or text[close + 1 : close + 2] != ":":
                raise HboneError(f"authority {text!r}: expected [ipv6]:port")
            host, port_text = text[1:close], text[close + 2 :]
            try:
                ip: IpAddress = ipaddress.IPv6Address(host)
            except ValueError as exc:
                raise HboneError(f"authority {text!r}: {host!r} is not an IPv6 address") from exc
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                raise HboneError(f"authority {text!r} has no port; HBONE needs ip:port")
            if ":" in host:
                raise HboneError(f"authority {text!r}: IPv6 addresses must be bracketed, [addr]:port")
            try:
                ip = ipaddress.IPv4Address(host)
            except ValueError as exc:
                raise HboneError(f"authority {text!r}: {host!r} is not an IPv4 address") from exc
        if not port_text.isdigit() or len(port_text) > 5:
            raise HboneError(f"authority {text!r} has no valid port; HBONE needs ip:port")
        port = int(port_text)
        if not 0 < port < 65536:
            raise HboneError(f"authority {text!r}: port {port} is out of range 1..65535")
        return cls(ip, port)

    def __str__(self) -> str:
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"


def format_forwarded(ip: str | IpAddress, port: int) -> str:
    """ztunnel's ``forwarded`` value: ``for="ip:port"`` (RFC 7239, IPv6 bracketed)."""
    return f'for="{Authority.of(ip, port)}"'


def parse_forwarded_for(value: str) -> Authority | None:
    """The ``for=`` address of the first ``forwarded`` element, or None when absent/not ip:port."""
    first = value.split(",", 1)[0]
    for pair in first.split(";"):
        key, sep, raw = pair.strip().partition("=")
        if sep and key.strip().lower() == "for":
            raw = raw.strip().strip('"')
            try:
                return Authority.parse(raw)
            except HboneError:
                return None
    return None


# --- events -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class ConnectRequest(Event):
    """Server side: a valid CONNECT arrived; answer with :meth:`ServerConnection.respond`."""

    stream_id: int
    authority: Authority
    headers: Mapping[str, str]


@dataclass(frozen=True)
class RequestRejected(Event):
    """Server side: a malformed request; the core already answered ``status`` on the stream."""

    stream_id: int
    status: Status
    reason: str


@dataclass(frozen=True)
class StreamRefused(Event):
    """Server side: a stream beyond the concurrency limit (or after GOAWAY) got REFUSED_STREAM."""

    stream_id: int
    reason: str


@dataclass(frozen=True)
class ConnectResponse(Event):
    """Client side: the server's answer. ``ok`` only for 200; anything else ended the stream."""

    stream_id: int
    status: int
    headers: Mapping[str, str]

    @property
    def ok(self) -> bool:
        return self.status == Status.OK


@dataclass(frozen=True)
class Data(Event):
    """Tunnel bytes. Call ``acknowledge(stream_id, flow_controlled_length)`` once consumed."""

    stream_id: int
    data: bytes | memoryview  # DATA payloads are zero-copy slices of what was read
    flow_controlled_length: int


@dataclass(frozen=True)
class StreamEnded(Event):
    """The peer half-closed its direction (END_STREAM): the tunnel equivalent of a TCP FIN."""

    stream_id: int


@dataclass(frozen=True)
class StreamReset(Event):
    """The stream was aborted (RST_STREAM): the tunnel equivalent of a TCP RST."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(frozen=True)
class WindowOpened(Event):
    """Send window grew; ``stream_id`` 0 means the whole connection."""

    stream_id: int


@dataclass(frozen=True)
class PingAcknowledged(Event):
    data: bytes


@dataclass(frozen=True)
class ConnectionTerminated(Event):
    """GOAWAY received: streams above ``last_stream_id`` were not processed; open no new ones."""

    error_code: int
    last_stream_id: int
    additional_data: bytes | None


@dataclass(frozen=True)
class SettingsChanged(Event):
    """Peer's SETTINGS arrived (e.g. a new MAX_CONCURRENT_STREAMS)."""

    max_concurrent_streams: int


class ProtocolViolation(Exception):
    """The peer broke HTTP/2; the core queued a GOAWAY. Send it, then close the connection."""

    def __init__(self, message: str, error_code: int) -> None:
        super().__init__(message)
        self.error_code = error_code


# --- hot-path fix in hyperframe ---------------------------------------------------------------
# h2 logs ``repr(frame)`` for every received frame whether or not tracing is on, and hyperframe's
# DATA repr hex-encodes the whole payload (up to 1 MiB here) only to keep the first 20 hex digits.
# That was over a third of the CPU of a bulk transfer. Same output, computed from 10 bytes.
def _raw_data_repr(data: bytes | None) -> str:
    if not data:
        return "None"
    r = bytes(data[:11]).hex()
    return "<hex:" + (r[:20] + "..." if len(r) > 20 else r) + ">"


hyperframe.frame._raw_data_repr = _raw_data_repr


# --- connection cores -------------------------------------------------------------------------
class _PlainEncoder(hpack.Encoder):
    """HPACK without Huffman coding: pure-Python Huffman cost ~0.1 ms per CONNECT (the random
    traceparent never hits the table) to save a few dozen bytes on loopback-fast links."""

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        return super().encode(headers, huffman=False)


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_RECORD = 16 * 1024  # TLS maximum plaintext record
_UNIQUE_HEADERS = frozenset({"traceparent", "forwarded"})
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# DATA frame header: 24-bit length, type 0, flags, 31-bit stream id.
_DATA_HEADER = struct.Struct(">BHBBL")
_SENDABLE = (h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE)


class GracefulGoawayH2Connection(h2.connection.H2Connection):
    """``h2`` moves the whole connection to CLOSED on any GOAWAY, sent or received, after which
    not even DATA on streams the GOAWAY let through may be sent or received. RFC 9113 §6.8 says
    those streams finish normally; that is what makes a graceful drain possible. So a GOAWAY
    with NO_ERROR is sent/received here without the state change; error GOAWAYs keep h2's
    behaviour. (Also used by the agent's gRPC client: a CA shutting down gracefully.)"""

    def send_graceful_goaway(self, last_stream_id: int, additional_data: bytes | None) -> None:
        frame = hyperframe.frame.GoAwayFrame(
            stream_id=0, last_stream_id=last_stream_id, error_code=0, additional_data=additional_data or b""
        )
        self._prepare_for_sending([frame])

    def _receive_goaway_frame(self, frame: Any) -> Any:
        if frame.error_code != 0:
            return super()._receive_goaway_frame(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors.ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class _H2Connection(GracefulGoawayH2Connection):
    """``h2`` treats one stream beyond MAX_CONCURRENT_STREAMS as a connection error, which would
    tear down every tunnel on the connection. RFC 9113 §5.1.2 allows refusing just that stream,
    so the limit check is moved up into :class:`ServerConnection` (after HPACK decoding, which
    must happen anyway to keep the header table in sync) and answered with REFUSED_STREAM."""

    _skip_inbound_limit = False

    @property
    def open_inbound_streams(self) -> int:
        if self._skip_inbound_limit:
            return 0
        return int(super().open_inbound_streams)

    def _receive_headers_frame(self, frame: Any) -> Any:
        self._skip_inbound_limit = True
        try:
            return super()._receive_headers_frame(frame)
        finally:
            self._skip_inbound_limit = False


def _decode_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("ascii", "replace").lower()
        text = value.decode("latin-1")
        # Repeated headers fold with ", " (RFC 9110 §5.3); pseudo-headers are unique (h2 checks).
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out


@dataclass
class _StreamState:
    remote_closed: bool = False
    local_closed: bool = False


@dataclass
class HboneConnection:
    """Common part of the client and server cores: one HTTP/2 connection carrying HBONE."""

    client_side: bool
    max_concurrent_streams: int
    _h2: _H2Connection = field(init=False, repr=False)
    _streams: dict[int, _StreamState] = field(init=False, default_factory=dict)
    goaway_received: bool = field(init=False, default=False)
    goaway_sent: bool = field(init=False, default=False)
    # DATA fast paths (see receive_data/send_data): our own frame splitter in front of h2 and
    # an output list that keeps DATA payloads as zero-copy segments.
    _rbuf: bytearray = field(init=False, default_factory=bytearray, repr=False)
    _preface_left: int = field(init=False, default=0, repr=False)
    _header_block: int = field(init=False, default=0, repr=False)
    _data_left: int = field(init=False, default=0, repr=False)  # of the DATA frame being streamed
    _data_sid: int = field(init=False, default=0, repr=False)
    _data_end: bool = field(init=False, default=False, repr=False)  # that frame has END_STREAM
    _out: list[bytes | memoryview] = field(init=False, default_factory=list, repr=False)
    _conn_credit: int = field(init=False, default=0, repr=False)
    _stream_credit: dict[int, int] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        config = h2.config.H2Configuration(
            client_side=self.client_side,
            header_encoding=None,
            validate_inbound_headers=True,
            normalize_inbound_headers=True,
            # We build every outbound header block ourselves and check caller-supplied values in
            # build_request; h2's generic re-validation was ~10% of a tunnel's setup cost.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._h2 = _H2Connection(config=config)
        self._h2.encoder = _PlainEncoder()
        self._h2.local_settings = h2.settings.Settings(
            client=self.client_side,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # Replacing local_settings skips what H2Connection.__init__ derives from them.
        self._h2.max_inbound_frame_size = MAX_FRAME_SIZE
        self._h2.incoming_buffer.max_frame_size = MAX_FRAME_SIZE
        self._h2.initiate_connection()
        self._preface_left = 0 if self.client_side else len(_PREFACE)
        # The connection window is not a SETTING: it grows only by WINDOW_UPDATE on stream 0.
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - _H2_DEFAULT_WINDOW)

    # bytes in / bytes out
    def data_to_send(self) -> bytes:
        return b"".join(self.data_to_send_segments())

    def data_to_send_segments(self) -> list[bytes | memoryview]:
        """Pending output as a list of segments, in order; large DATA payloads are not copied.

        A TLS layer turns each segment written into at least one record, so small pieces (frame
        headers, control frames, short payloads) are packed together, topped up to one full
        record from the next large payload: a 1 KB message costs one record, not two."""
        pending = self._h2.data_to_send()
        if not self._out:
            return [pending] if pending else []
        segments = self._out
        self._out = []
        if pending:
            segments.append(pending)
        out: list[bytes | memoryview] = []
        small = bytearray()
        for seg in segments:
            if len(seg) < _RECORD:
                small += seg
                if len(small) >= _RECORD:
                    out.append(bytes(small))
                    small = bytearray()
                continue
            view = memoryview(seg)
            if small:
                take = _RECORD - len(small)
                small += view[:take]
                out.append(bytes(small))
                small = bytearray()
                view = view[take:]
            out.append(view)
        if small:
            out.append(bytes(small))
        return out

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed received bytes; returns the events they caused.

        ``h2`` copies every DATA payload three times on the way in (buffer, slice, ``tobytes``),
        which dominated a bulk transfer. Frames are therefore split here: a plain DATA frame on an
        open stream is checked and accounted by h2's own connection and stream state machines and
        flow-control managers, without the copies; every other frame goes to h2 unchanged."""
        out: list[Event] = []
        try:
            self._receive(data, out)
        except h2.exceptions.ProtocolError as exc:
            code = getattr(exc, "error_code", ErrorCode.PROTOCOL_ERROR)
            if not self.goaway_sent:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self._h2._terminate_connection(h2.errors.ErrorCodes(int(code)))
            self.goaway_sent = True
            raise ProtocolViolation(f"HTTP/2 protocol error from peer: {exc}", int(code)) from exc
        return out

    def _receive(self, data: bytes, out: list[Event]) -> None:
        # DATA payloads are streamed: the part of a frame that arrived in this read is delivered
        # now, as a zero-copy slice of the read, and the rest as it comes. A 1 MiB frame spans
        # several TLS reads; buffering it whole cost a copy of every byte (and a second one to
        # slice it out). Only partial frame headers and non-DATA frames are buffered.
        if self._rbuf:
            self._rbuf += data
            src = bytes(self._rbuf)
            self._rbuf.clear()
        else:
            src = data if type(data) is bytes else bytes(data)  # slices must outlive the caller's buffer
        n = len(src)
        pos = 0
        mv = memoryview(src)
        h2c = self._h2
        if self._preface_left:
            k = min(self._preface_left, n)
            for ev in h2c.receive_data(src[:k]):  # h2 checks the client preface
                self._translate(ev, out)
            self._preface_left -= k
            pos = k
        if self._data_left and pos < n:
            take = min(self._data_left, n - pos)
            self._data_left -= take
            self._data_chunk(mv[pos : pos + take], out)
            pos += take
        while n - pos >= 9:
            length = (src[pos] << 16) | (src[pos + 1] << 8) | src[pos + 2]
            if length > h2c.max_inbound_frame_size:
                raise h2.exceptions.FrameTooLargeError(
                    f"Received overlong frame: length {length}, max {h2c.max_inbound_frame_size}"
                )
            ftype, flags = src[pos + 3], src[pos + 4]
            sid = int.from_bytes(src[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            if (
                ftype == 0  # DATA
                and not flags & 0x8  # not PADDED
                and sid in self._streams
                and sid in h2c.streams
                and not h2c.incoming_buffer._headers_buffer  # not inside a header block
            ):
                # The whole frame is checked and accounted against the connection now (h2's
                # own state machine and window manager); the stream takes each chunk.
                h2c.state_machine.process_input(h2.connection.ConnectionInputs.RECV_DATA)
                h2c._inbound_flow_control_window_manager.window_consumed(length)
                avail = min(length, n - pos - 9)
                self._data_sid, self._data_end = sid, bool(flags & 0x1)
                self._data_left = length - avail
                pos += 9
                self._data_chunk(mv[pos : pos + avail], out)
                pos += avail
                continue
            if n - pos - 9 < length:
                break
            if ftype in (0x1, 0x9):  # HEADERS, CONTINUATION
                # h2 would buffer up to 64 CONTINUATION frames of MAX_FRAME_SIZE (64 MiB) per
                # header block; a CONNECT needs a few hundred bytes.
                self._header_block = length if ftype == 0x1 else self._header_block + length
                if self._header_block > MAX_HEADER_LIST_SIZE:
                    raise h2.exceptions.DenialOfServiceError(
                        f"header block of {self._header_block}+ bytes exceeds {MAX_HEADER_LIST_SIZE}"
                    )
            for ev in h2c.receive_data(src[pos : pos + 9 + length]):
                self._translate(ev, out)
            pos += 9 + length
        if pos < n:
            self._rbuf += mv[pos:]

    def _data_chunk(self, chunk: memoryview, out: list[Event]) -> None:
        """Part (or all) of the DATA frame being streamed; the last part carries its END_STREAM."""
        sid = self._data_sid
        last = not self._data_left
        stream = self._h2.streams.get(sid)
        if sid not in self._streams or stream is None or stream.closed:
            # Reset by us while the frame was arriving: no reader, but the connection window
            # consumed for these bytes must come back.
            self.acknowledge(sid, len(chunk))
            return
        if not chunk and not (last and self._data_end):
            return
        _frames, events = stream.receive_data(chunk, last and self._data_end, len(chunk))  # type: ignore[arg-type]
        for ev in events:
            self._translate(ev, out)

    # flow control
    def acknowledge(
        self, stream_id: int, length: int, *, connection: bool = True, stream: bool = True
    ) -> bool:
        """Give ``length`` bytes of window back (stream and connection) once they were consumed.

        h2's own policy returns credit only once half a window was consumed (2 MiB per stream).
        Between two Python processes the TLS and socket buffers hold about that much, so the
        sender would sit idle until the update crossed them. Credit is returned in
        1/16-window steps instead: a few more WINDOW_UPDATE frames, no stalls.
        Returns whether a WINDOW_UPDATE was queued (i.e. there is something to send)."""
        if length <= 0:
            return False
        queued = False
        if connection:
            self._conn_credit += length
        if connection and self._conn_credit >= CONNECTION_ACK_STEP:
            self._h2.increment_flow_control_window(self._conn_credit)
            self._conn_credit = 0
            queued = True
        if not stream:
            return queued
        if stream_id not in self._streams or stream_id not in self._h2.streams:
            self._stream_credit.pop(stream_id, None)
            return queued
        credit = self._stream_credit.get(stream_id, 0) + length
        if credit >= STREAM_ACK_STEP:
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
                self._h2.increment_flow_control_window(credit, stream_id)
                queued = True
            credit = 0
        self._stream_credit[stream_id] = credit
        return queued

    def send_window(self, stream_id: int) -> int:
        try:
            return self._h2.local_flow_control_window(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            return 0

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Send as much of ``data`` as the windows allow; returns how many bytes were taken.

        The frames go through h2's state machines and window accounting exactly as
        ``H2Connection.send_data`` does, but the payload is queued as a zero-copy segment instead
        of being serialized (h2 copies it four times on the way out).

        A stream h2 already closed takes nothing (0): the shell handles a batch's events after
        the core read all its frames, so a connection-level WINDOW_UPDATE can reach a stream
        whose RST_STREAM sits later in the same read; raising here would kill the connection.
        Likewise a connection an error GOAWAY later in the read closed takes nothing (fuzz)."""
        h2c = self._h2
        stream = h2c.streams.get(stream_id)
        if stream is None or stream.state_machine.state not in _SENDABLE:
            return 0
        if h2c.state_machine.state is h2.connection.ConnectionState.CLOSED:
            return 0
        window = self.send_window(stream_id)
        if window <= 0:
            return 0
        frame_max = h2c.max_outbound_frame_size
        n = min(window, len(data))
        view = memoryview(data)
        pending = h2c.data_to_send()
        if pending:
            self._out.append(pending)  # frames h2 queued earlier go first
        sent = 0
        while sent < n:
            chunk = min(frame_max, n - sent)
            h2c.state_machine.process_input(h2.connection.ConnectionInputs.SEND_DATA)
            stream.state_machine.process_input(h2.stream.StreamInputs.SEND_DATA)
            stream.outbound_flow_control_window -= chunk
            h2c.outbound_flow_control_window -= chunk
            self._out.append(_DATA_HEADER.pack(chunk >> 16, chunk & 0xFFFF, 0, 0, stream_id))
            self._out.append(view[sent : sent + chunk])
            sent += chunk
        return n

    def end_stream(self, stream_id: int) -> None:
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            return
        st.local_closed = True
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._h2.end_stream(stream_id)
        self._maybe_forget(stream_id)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        self._stream_credit.pop(stream_id, None)
        if self._streams.pop(stream_id, None) is None:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._h2.reset_stream(stream_id, error_code)

    def ping(self, opaque: bytes) -> None:
        self._h2.ping(opaque.ljust(8, b"\0")[:8])

    def goaway(self, error_code: int = ErrorCode.NO_ERROR, reason: bytes | None = None) -> None:
        """Send GOAWAY naming the last stream we accepted: those may finish, no new ones start."""
        if self.goaway_sent:
            return
        self.goaway_sent = True
        last = self._h2.highest_inbound_stream_id
        if error_code == ErrorCode.NO_ERROR:
            self._h2.send_graceful_goaway(last, reason)
        else:
            self._h2.close_connection(error_code, additional_data=reason, last_stream_id=last)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def remote_max_concurrent_streams(self) -> int:
        return int(self._h2.remote_settings.max_concurrent_streams)

    def stream_is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def _maybe_forget(self, stream_id: int) -> None:
        st = self._streams.get(stream_id)
        if st is not None and st.local_closed and st.remote_closed:
            del self._streams[stream_id]
            self._stream_credit.pop(stream_id, None)

    def _translate(self, ev: h2.events.Event, out: list[Event]) -> None:
        if isinstance(ev, h2.events.DataReceived):
            sid = ev.stream_id or 0
            if sid in self._streams and ev.data:
                out.append(Data(sid, ev.data, ev.flow_controlled_length or 0))
            else:
                # Data for a stream we already reset: its window must still be returned.
                self.acknowledge(sid, ev.flow_controlled_length or 0)
        elif isinstance(ev, h2.events.StreamEnded):
            sid = ev.stream_id or 0
            st = self._streams.get(sid)
            if st is not None:
                st.remote_closed = True
                out.append(StreamEnded(sid))
                self._maybe_forget(sid)
        elif isinstance(ev, h2.events.StreamReset):
            sid = ev.stream_id or 0
            self._stream_credit.pop(sid, None)
            if self._streams.pop(sid, None) is not None:
                out.append(StreamReset(sid, int(ev.error_code or 0), bool(ev.remote_reset)))
        elif isinstance(ev, h2.events.WindowUpdated):
            out.append(WindowOpened(ev.stream_id or 0))
        elif isinstance(ev, h2.events.PingAckReceived):
            out.append(PingAcknowledged(bytes(ev.ping_data or b"")))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway_received = True
            out.append(
                ConnectionTerminated(int(ev.error_code or 0), int(ev.last_stream_id or 0), ev.additional_data)
            )
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            # A changed initial window opens every stream's window at once.
            out.append(SettingsChanged(self.remote_max_concurrent_streams))
            out.append(WindowOpened(0))
        else:
            self._translate_role(ev, out)

    def _translate_role(self, ev: h2.events.Event, out: list[Event]) -> None:
        pass


@dataclass
class ClientConnection(HboneConnection):
    """Client core: opens CONNECT streams, reports the server's answers."""

    client_side: bool = True
    max_concurrent_streams: int = CLIENT_MAX_STREAMS_PER_CONNECTION
    _awaiting_response: set[int] = field(init=False, default_factory=set)

    @staticmethod
    def build_request(
        authority: Authority, headers: Mapping[str, str] | None = None
    ) -> list[tuple[bytes, bytes]]:
        """HBONE request headers: CONNECT to ip:port, no :scheme or :path (RFC 9113 §8.5)."""
        out = [(b":method", b"CONNECT"), (b":authority", str(authority).encode("ascii"))]
        for name, value in (headers or {}).items():
            lname = name.lower()
            if lname.startswith(":") or lname in {"host", "connection", "transfer-encoding"}:
                raise HboneError(f"header {name!r} may not be set on an HBONE CONNECT")
            if not _TOKEN.fullmatch(lname):
                raise HboneError(f"header name {name!r} is not a valid HTTP token")
            if _BAD_VALUE.search(value) or value != value.strip(" \t"):
                raise HboneError(f"header {name!r} has a value with control characters or edge whitespace")
            pair = (lname.encode("ascii"), value.encode("latin-1"))
            # Per-connection values (a new trace id, the source port) never repeat: keep them out
            # of both HPACK dynamic tables instead of evicting useful entries for them.
            out.append(hpack.NeverIndexedHeaderTuple(*pair) if lname in _UNIQUE_HEADERS else pair)
        return out

    def can_open_stream(self) -> bool:
        if self.goaway_received or self.goaway_sent:
            return False
        limit = min(CLIENT_MAX_STREAMS_PER_CONNECTION, self.remote_max_concurrent_streams)
        return self._h2.open_outbound_streams < limit

    def open_stream(self, authority: Authority, headers: Mapping[str, str] | None = None) -> int:
        if not self.can_open_stream():
            raise HboneError("connection cannot take another stream (full or going away)")
        request = self.build_request(authority, headers)
        sid = self._h2.get_next_available_stream_id()
        self._h2.send_headers(sid, request)
        self._streams[sid] = _StreamState()
        self._awaiting_response.add(sid)
        return sid

    def _translate_role(self, ev: h2.events.Event, out: list[Event]) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            sid = ev.stream_id or 0
            headers = _decode_headers(ev.headers or [])
            self._awaiting_response.discard(sid)
            status_text = headers.get(":status", "")
            # ASCII only: str.isdigit() is also true for e.g. '¹', which int() refuses (fuzz).
            status = int(status_text) if status_text.isascii() and status_text.isdigit() else 0
            out.append(ConnectResponse(sid, status, headers))
            if status != Status.OK and sid in self._streams:
                # A non-2xx answer to CONNECT means no tunnel (RFC 9110 §9.3.6): drop the stream.
                self.reset_stream(sid, ErrorCode.CANCEL)
        elif isinstance(ev, h2.events.InformationalResponseReceived):
            pass


@dataclass
class ServerConnection(HboneConnection):
    """Server core: validates CONNECT requests, answers them, rejects everything else."""

    client_side: bool = False
    max_concurrent_streams: int = SERVER_MAX_CONCURRENT_STREAMS

    @staticmethod
    def validate_request(headers: Mapping[str, str]) -> Authority:
        """Check a request is an HBONE CONNECT and return its target; :class:`HboneError` if not."""
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
        return Authority.parse(authority)

    def respond(
        self,
        stream_id: int,
        status: Status | int,
        *,
        end_stream: bool | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Answer a CONNECT. Non-200 answers end the stream (there is no tunnel behind them).
        ``headers`` go on a 200 only (ztunnel's ``baggage``); names must be lowercase tokens."""
        if stream_id not in self._streams:
            return
        if self._h2.state_machine.state is h2.connection.ConnectionState.CLOSED:
            # An error GOAWAY later in the same read closed the connection: nothing can be sent
            # (h2 raised ProtocolError out of the shell's answer; fuzz finding).
            self._streams.pop(stream_id, None)
            return
        code = int(status)
        done = code != Status.OK if end_stream is None else end_stream
        block = [(b":status", str(code).encode())]
        if code == Status.OK:
            for name, value in headers:
                if not name or name != name.lower() or name.startswith(":"):
                    raise HboneError(f"response header {name!r}: expected a lowercase regular header name")
                block.append((name.encode("ascii"), value.encode("ascii")))
        try:
            self._h2.send_headers(stream_id, block, end_stream=done)
        except h2.exceptions.StreamClosedError:
            self._streams.pop(stream_id, None)
            return
        if done:
            st = self._streams[stream_id]
            st.local_closed = True
            if not st.remote_closed:
                # The client may still be sending; stop it instead of acknowledging bytes forever.
                self.reset_stream(stream_id, ErrorCode.NO_ERROR)
            self._maybe_forget(stream_id)

    def _translate_role(self, ev: h2.events.Event, out: list[Event]) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            sid = ev.stream_id or 0
            headers = _decode_headers(ev.headers or [])
            if self.goaway_sent or len(self._streams) >= self.max_concurrent_streams:
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self._h2.reset_stream(sid, ErrorCode.REFUSED_STREAM)
                why = "draining" if self.goaway_sent else f"limit of {self.max_concurrent_streams} streams"
                out.append(StreamRefused(sid, f"stream refused: {why} on this connection"))
                return
            self._streams[sid] = _StreamState(remote_closed=bool(ev.stream_ended))
            try:
                authority = self.validate_request(headers)
            except HboneError as exc:
                self.respond(sid, exc.status)
                out.append(RequestRejected(sid, exc.status, str(exc)))
                return
            out.append(ConnectRequest(sid, authority, headers))
