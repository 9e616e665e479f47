"""Conformance table: the RFC 9113 cases HBONE relies on, each run against the ``h2`` library.

Every row names its RFC section, which side of ours is under test ("client": our
ClientConnection against an h2 server; "server": an h2 client against our ServerConnection) and
what must happen. Legal exchanges are produced and checked by h2 itself; violations h2 would
never send are injected as raw frames and our answer is read back frame by frame.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import h2.events
import h2.settings
import hyperframe.frame as hf
import pytest

from tests.tunnel.test_h2_support import (
    CONNECT,
    Pair,
    block,
    client_pair,
    goaway_codes,
    parse_frames,
    raw_frame,
    rst_codes,
    server_pair,
)
from tunnel.h2 import (
    ConnectionTerminated,
    ConnectRequest,
    ConnectResponse,
    Data,
    ErrorCode,
    PingAcknowledged,
    RequestRejected,
    SettingsAcknowledged,
    StreamEnded,
    StreamRefused,
    StreamReset,
    StreamState,
    WindowOpened,
)
from tunnel.h2.frames import FLAG_END_HEADERS, FLAG_PADDED, FLAG_PRIORITY
from tunnel.hbone import Authority, HboneError

SC = h2.settings.SettingCodes
DST = Authority.parse("10.0.0.1:80")
MiB = 1024 * 1024


# --- helpers over a pair ------------------------------------------------------------------
def open_tunnel_client(p: Pair, status: int = 200) -> int:
    """Our client opens a CONNECT; the h2 server answers ``status``."""
    sid = p.ours.open_stream(DST, {"forwarded": 'for="10.0.0.9:4000"'})  # type: ignore[attr-defined]
    p.pump()
    assert len(p.peer_of(h2.events.RequestReceived)) == 1
    p.peer.send_headers(sid, [(b":status", str(status).encode())], end_stream=status != 200)
    p.pump()
    return sid


def open_tunnel_server(p: Pair, headers: list[tuple[bytes, bytes]] | None = None) -> int:
    """The h2 client opens a CONNECT; our server answers 200."""
    sid = p.peer.get_next_available_stream_id()
    p.peer.send_headers(sid, headers or CONNECT)
    p.pump()
    assert [e.stream_id for e in p.events(ConnectRequest)][-1:] == [sid]
    p.ours.respond(sid, 200)  # type: ignore[attr-defined]
    p.pump()
    return sid


def violation(p: Pair, data: bytes) -> int:
    """Inject; we must raise ProtocolViolation and write a GOAWAY with its code (returned)."""
    frames = p.inject(data)
    assert p.violation is not None, "expected a connection error"
    codes = goaway_codes(frames)
    assert codes == [p.violation.error_code], (codes, p.violation)
    assert p.ours.closed
    return codes[0]


def hdr(sid: int, headers: list[tuple[bytes, bytes]], flags: int = FLAG_END_HEADERS) -> bytes:
    return raw_frame(0x1, flags, sid, block(headers))


# --- the cases ----------------------------------------------------------------------------
def c_preface_settings(p: Pair) -> None:
    # §3.4 + §6.5.3: the preface and SETTINGS exchange, both acknowledged, our values applied.
    fresh = client_pair() if p.ours.client else server_pair()
    assert fresh.ours.settings_acknowledged
    rs = fresh.peer.remote_settings
    assert rs.initial_window_size == 4 * MiB and rs.max_frame_size == MiB
    assert rs.max_concurrent_streams == (100 if p.ours.client else 200)
    assert rs[SC.ENABLE_PUSH] == 0
    # §6.9: the connection window is raised to 16 MiB by WINDOW_UPDATE on stream 0.
    assert fresh.peer.outbound_flow_control_window == 16 * MiB


def c_connect_ok(p: Pair) -> None:
    # §8.5: CONNECT carries :method and :authority only; 200 opens the tunnel.
    if p.ours.client:
        sid = p.ours.open_stream(DST)  # type: ignore[attr-defined]
        p.pump()
        (req,) = p.peer_of(h2.events.RequestReceived)
        names = [n for n, _ in req.headers]
        assert names[:2] == [b":method", b":authority"] and b":scheme" not in names and b":path" not in names
        assert dict(req.headers)[b":authority"] == b"10.0.0.1:80"
        p.peer.send_headers(sid, [(b":status", b"200")])
        p.pump()
        (resp,) = p.events(ConnectResponse)
        assert resp.ok and p.ours.stream_state(sid) == StreamState.OPEN
    else:
        sid = open_tunnel_server(p)
        (resp,) = p.peer_of(h2.events.ResponseReceived)
        assert dict(resp.headers)[b":status"] == b"200"
        assert p.ours.stream_state(sid) == StreamState.OPEN


def c_connect_refused_status(p: Pair, status: int = 401) -> None:
    # HBONE statuses (DESIGN §4): anything but 200 ends the stream; there is no tunnel.
    if p.ours.client:
        sid = open_tunnel_client(p, status)
        (resp,) = p.events(ConnectResponse)
        assert resp.status == status and not resp.ok
        assert p.ours.stream_state(sid) == StreamState.CLOSED
    else:
        sid = p.peer.get_next_available_stream_id()
        p.peer.send_headers(sid, CONNECT)
        p.pump()
        p.ours.respond(sid, status)  # type: ignore[attr-defined]
        p.pump()
        (resp,) = p.peer_of(h2.events.ResponseReceived)
        assert dict(resp.headers)[b":status"] == str(status).encode()
        assert p.peer_of(h2.events.StreamEnded) and p.ours.stream_state(sid) == StreamState.CLOSED


def c_data_frame_size_16k_peer(p: Pair) -> None:
    # §4.2 / §6.5.2: toward a peer that kept the 16 KiB default, DATA frames stay <= 16384.
    p2 = client_pair({SC.INITIAL_WINDOW_SIZE: 4 * MiB}) if p.ours.client else server_pair()
    if not p.ours.client:
        p2.peer.update_settings({SC.INITIAL_WINDOW_SIZE: 4 * MiB})
        p2.pump()
    sid = open_tunnel_client(p2) if p.ours.client else open_tunnel_server(p2)
    p2.peer.increment_flow_control_window(1 * MiB)
    p2.pump()
    p2.wire_from_us.clear()
    assert p2.ours.send_data(sid, b"z" * 100_000) == 100_000
    p2.pump()
    got = p2.peer_of(h2.events.DataReceived)
    assert sum(len(e.data) for e in got) == 100_000
    frames = [f for f in parse_frames(b"".join(p2.wire_from_us)) if isinstance(f, hf.DataFrame)]
    assert max(len(f.data) for f in frames) == 16384 and len(frames) == 7


def c_data_frame_size_large_peer(p: Pair) -> None:
    # §6.5.2: a peer that allows 1 MiB frames (another ztagent) gets 1 MiB frames.
    settings = {SC.MAX_FRAME_SIZE: MiB, SC.INITIAL_WINDOW_SIZE: 4 * MiB}
    p2 = client_pair(settings) if p.ours.client else server_pair(settings)
    sid = open_tunnel_client(p2) if p.ours.client else open_tunnel_server(p2)
    p2.peer.increment_flow_control_window(4 * MiB)
    p2.pump()
    p2.wire_from_us.clear()
    assert p2.ours.send_data(sid, b"z" * (2 * MiB + 5)) == 2 * MiB + 5
    p2.pump()
    frames = [f for f in parse_frames(b"".join(p2.wire_from_us)) if isinstance(f, hf.DataFrame)]
    assert [len(f.data) for f in frames] == [MiB, MiB, 5]
    assert sum(len(e.data) for e in p2.peer_of(h2.events.DataReceived)) == 2 * MiB + 5


def c_frame_too_large(p: Pair) -> None:
    # §4.2: a frame over our SETTINGS_MAX_FRAME_SIZE (1 MiB) is FRAME_SIZE_ERROR.
    assert violation(p, raw_frame(0x0, 0, 1, b"", length=MiB + 1)) == ErrorCode.FRAME_SIZE_ERROR


def c_send_window_respected(p: Pair) -> None:
    # §6.9.1: we never send past the peer's windows; its WINDOW_UPDATE lets more through.
    sid = open_tunnel_client(p) if p.ours.client else open_tunnel_server(p)
    assert p.ours.send_window(sid) == 65535
    assert p.ours.send_data(sid, b"a" * 200_000) == 65535
    assert p.ours.send_data(sid, b"a") == 0
    p.pump()
    got = sum(len(e.data) for e in p.peer_of(h2.events.DataReceived))
    assert got == 65535
    p.peer.acknowledge_received_data(got, sid)
    p.pump()
    assert p.events(WindowOpened)
    assert p.ours.send_data(sid, b"a" * 200_000) > 0


def c_recv_window_enforced_stream(p: Pair) -> None:
    # §6.9.1: DATA beyond the stream window we advertised is FLOW_CONTROL_ERROR on that stream.
    p2 = client_pair(stream_window=65535) if p.ours.client else server_pair(stream_window=65535)
    sid = open_tunnel_client(p2) if p.ours.client else open_tunnel_server(p2)
    frames = p2.inject(raw_frame(0x0, 0, sid, b"x" * 65535) + raw_frame(0x0, 0, sid, b"x"))
    assert rst_codes(frames, sid) == [ErrorCode.FLOW_CONTROL_ERROR] and p2.violation is None
    assert p2.ours.stream_state(sid) == StreamState.CLOSED


def c_recv_window_enforced_connection(p: Pair) -> None:
    # §6.9.1: DATA beyond the connection window is a connection error FLOW_CONTROL_ERROR.
    kw = {"connection_window": 65535, "stream_window": 1 << 20}
    p2 = client_pair(**kw) if p.ours.client else server_pair(**kw)
    sid = open_tunnel_client(p2) if p.ours.client else open_tunnel_server(p2)
    assert violation(p2, raw_frame(0x0, 0, sid, b"x" * 65536)) == ErrorCode.FLOW_CONTROL_ERROR


def c_window_update_after_ack(p: Pair) -> None:
    # §6.9: WINDOW_UPDATE goes out once the application acknowledged consumed bytes.
    sid = open_tunnel_client(p) if p.ours.client else open_tunnel_server(p)
    p.peer.increment_flow_control_window(8 * MiB)  # not needed by us, keeps h2 quiet
    p.pump()
    before = p.peer.local_flow_control_window(sid)
    p.peer.send_data(sid, b"d" * MiB)
    p.peer.send_data(sid, b"d" * MiB)
    p.pump()
    data = p.events(Data)
    assert sum(len(e.data) for e in data) == 2 * MiB
    assert p.peer.local_flow_control_window(sid) == before - 2 * MiB  # nothing returned yet
    for e in data:
        p.ours.acknowledge(sid, e.flow_controlled_length)
    p.pump()
    assert p.peer.local_flow_control_window(sid) == before
    assert p.peer.outbound_flow_control_window >= 16 * MiB - 2 * MiB


def c_window_update_zero(p: Pair) -> None:
    # §6.9: an increment of 0 is a stream error on a stream, a connection error on stream 0.
    sid = open_tunnel_client(p) if p.ours.client else open_tunnel_server(p)
    frames = p.inject(raw_frame(0x8, 0, sid, struct.pack(">L", 0)))
    assert rst_codes(frames, sid) == [ErrorCode.PROTOCOL_ERROR] and p.violation is None
    assert violation(p, raw_frame(0x8, 0, 0, struct.pack(">L", 0))) == ErrorCode.PROTOCOL_ERROR


def c_window_overflow(p: Pair) -> None:
    # §6.9.1: a window above 2^31-1 is FLOW_CONTROL_ERROR (stream error / connection error).
    sid = open_tunnel_client(p) if p.ours.client else open_tunnel_server(p)
    frames = p.inject(raw_frame(0x8, 0, sid, struct.pack(">L", 2**31 - 1)))
    assert rst_codes(frames, sid) == [ErrorCode.FLOW_CONTROL_ERROR]
    assert violation(p, raw_frame(0x8, 0, 0, struct.pack(">L", 2**31 - 1))) == ErrorCode.FLOW_CONTROL_ERROR


def c_window_update_frame_size(p: Pair) -> None:
    # §6.9: WINDOW_UPDATE is exactly 4 bytes.
    assert violation(p, raw_frame(0x8, 0, 0, b"\0\0\1")) == ErrorCode.FRAME_SIZE_ERROR


def c_initial_window_change(p: Pair) -> None:
    # §6.9.2: a new SETTINGS_INITIAL_WINDOW_SIZE shifts every open stream's send window.
    sid = open_tunnel_client(p) if p.ours.client else open_tunnel_server(p)
    p.ours.send_data(sid, b"q" * 1000)
    p.pump()
    p.peer.update_settings({SC.INITIAL_WINDOW_SIZE: 1_065_535})
    p.pump()
    _conn, streams = p.ours.send_windows()
    assert streams[sid] == 1_065_535 - 1000
    p.peer.update_settings({SC.INITIAL_WINDOW_SIZE: 0})
    p.pump()
    assert p.ours.send_windows()[1][sid] == -1000 and p.ours.send_data(sid, b"q") == 0


def c_settings_invalid(p: Pair) -> None:
    # §6.5.2: out-of-range values and malformed SETTINGS frames are connection errors.
    cases = [
        (raw_frame(0x4, 0, 0, struct.pack(">HL", 2, 2)), ErrorCode.PROTOCOL_ERROR),  # ENABLE_PUSH=2
        (raw_frame(0x4, 0, 0, struct.pack(">HL", 4, 2**31)), ErrorCode.FLOW_CONTROL_ERROR),
        (raw_frame(0x4, 0, 0, struct.pack(">HL", 5, 16383)), ErrorCode.PROTOCOL_ERROR),
        (raw_frame(0x4, 0, 0, struct.pack(">HL", 5, 1 << 24)), ErrorCode.PROTOCOL_ERROR),
        (raw_frame(0x4, 0, 0, b"\0\1\0\0\0"), ErrorCode.FRAME_SIZE_ERROR),  # not a multiple of 6
        (raw_frame(0x4, 0x1, 0, struct.pack(">HL", 1, 0)), ErrorCode.FRAME_SIZE_ERROR),  # ACK with payload
        (raw_frame(0x4, 0, 1, b""), ErrorCode.PROTOCOL_ERROR),  # on a stream
    ]
    if p.ours.client:
        cases.append(
            (raw_frame(0x4, 0, 0, struct.pack(">HL", 2, 1)), ErrorCode.PROTOCOL_ERROR)
        )  # push from server
    for data, code in cases:
        fresh = client_pair() if p.ours.client else server_pair()
        assert violation(fresh, data) == code, data


def c_settings_ack_and_unknown(p: Pair) -> None:
    # §6.5.3: every SETTINGS gets exactly one ACK; unknown settings are ignored (§6.5.2).
    p.peer.update_settings({SC.MAX_CONCURRENT_STREAMS: 7})
    p.pump()
    assert p.peer_of(h2.events.SettingsAcknowledged)
    assert p.ours.peer_max_concurrent_streams == 7
    frames = p.inject(raw_frame(0x4, 0, 0, struct.pack(">HL", 0x99, 5)))
    assert [f.flags for f in frames if isinstance(f, hf.SettingsFrame)] == [{"ACK"}] and p.violation is None


def c_ping(p: Pair) -> None:
    # §6.7: we answer a PING with the same 8 bytes and report the peer's answer to ours.
    p.peer.ping(b"12345678")
    p.pump()
    assert [e.ping_data for e in p.peer_of(h2.events.PingAckReceived)] == [b"12345678"]
    p.ours.ping(b"abcdefgh")
    p.pump()
    assert p.events(PingAcknowledged) == [PingAcknowledged(b"abcdefgh")]
    assert violation(p, raw_frame(0x6, 0, 0, b"1234567")) == ErrorCode.FRAME_SIZE_ERROR
    fresh = client_pair() if p.ours.client else server_pair()
    assert violation(fresh, raw_frame(0x6, 0, 1, b"12345678")) == ErrorCode.PROTOCOL_ERROR


def c_goaway_graceful_sent(p: Pair) -> None:
    # §6.8: GOAWAY(NO_ERROR, last) from us: streams <= last finish, newer ones are refused.
    sid = open_tunnel_server(p)
    p.ours.goaway()
    p.pump()
    (term,) = p.peer_of(h2.events.ConnectionTerminated)
    assert term.error_code == 0 and term.last_stream_id == sid
    frames = p.inject(hdr(sid + 2, CONNECT))
    assert rst_codes(frames, sid + 2) == [ErrorCode.REFUSED_STREAM]
    assert [e.stream_id for e in p.events(StreamRefused)] == [sid + 2]
    # the old stream still carries data both ways and closes normally
    assert p.ours.send_data(sid, b"bye", end_stream=True) == 3
    p.peer.send_data(sid, b"ok", end_stream=True)
    p.pump()
    assert [bytes(e.data) for e in p.events(Data)] == [b"ok"] and p.ours.drained


def c_goaway_two_step(p: Pair) -> None:
    # §6.8: a second GOAWAY may lower last-stream-id, never raise it.
    p.ours.goaway(last_stream_id=2**31 - 1)
    p.ours.goaway()
    p.ours.goaway(last_stream_id=99)
    frames = parse_frames(p.ours.data_to_send())
    assert [f.last_stream_id for f in frames if isinstance(f, hf.GoAwayFrame)] == [2**31 - 1, 0]


def c_goaway_received(p: Pair) -> None:
    # §6.8: the peer's GOAWAY: our streams above last were not processed (refused, retryable),
    # those at or below it go on; no new streams.
    s1 = open_tunnel_client(p)
    s3 = p.ours.open_stream(DST)  # type: ignore[attr-defined]
    p.pump()
    p.peer.send_graceful_goaway(s1, None)  # type: ignore[attr-defined]
    p.pump()
    (term,) = p.events(ConnectionTerminated)
    assert term.last_stream_id == s1 and term.error_code == 0
    assert [(e.stream_id, e.error_code) for e in p.events(StreamReset)] == [(s3, ErrorCode.REFUSED_STREAM)]
    assert not p.ours.can_open_stream()  # type: ignore[attr-defined]
    with pytest.raises(HboneError):
        p.ours.open_stream(DST)  # type: ignore[attr-defined]
    assert p.ours.send_data(s1, b"still", end_stream=True) == 5
    p.pump()
    assert b"still" in b"".join(e.data for e in p.peer_of(h2.events.DataReceived))


def c_goaway_malformed(p: Pair) -> None:
    # §6.8: GOAWAY only on stream 0 and at least 8 bytes long.
    assert violation(p, raw_frame(0x7, 0, 1, b"\0" * 8)) == ErrorCode.PROTOCOL_ERROR
    fresh = client_pair() if p.ours.client else server_pair()
    assert violation(fresh, raw_frame(0x7, 0, 0, b"\0" * 7)) == ErrorCode.FRAME_SIZE_ERROR


def c_continuation_sent(p: Pair) -> None:
    # §6.10: a header block over the peer's max frame size goes out as HEADERS + CONTINUATION.
    big = "v" * 40_000
    sid = p.ours.open_stream(DST, {"x-big": big})  # type: ignore[attr-defined]
    p.pump()
    (req,) = p.peer_of(h2.events.RequestReceived)
    assert dict(req.headers)[b"x-big"] == big.encode() and req.stream_id == sid
    frames = parse_frames(b"".join(p.wire_from_us))
    kinds = [type(f).__name__ for f in frames if isinstance(f, hf.HeadersFrame | hf.ContinuationFrame)]
    assert kinds == ["HeadersFrame", "ContinuationFrame", "ContinuationFrame"]


def c_continuation_received(p: Pair) -> None:
    # §6.10: a block split over HEADERS + CONTINUATION is reassembled.
    blk = block([*CONNECT, (b"x-pad", b"p" * 3000)])
    data = (
        raw_frame(0x1, 0, 1, blk[:1000])
        + raw_frame(0x9, 0, 1, blk[1000:2000])
        + raw_frame(0x9, 4, 1, blk[2000:])
    )
    p.inject(data)
    (req,) = p.events(ConnectRequest)
    assert req.headers["x-pad"] == "p" * 3000


def c_continuation_violations(p: Pair) -> None:
    # §6.10: only CONTINUATION of the same stream may follow a HEADERS without END_HEADERS;
    # CONTINUATION out of a block is PROTOCOL_ERROR; a flood of them is refused (CVE-2024-27316).
    blk = block(CONNECT)
    assert (
        violation(p, raw_frame(0x1, 0, 1, blk) + raw_frame(0x6, 0, 0, b"\0" * 8)) == ErrorCode.PROTOCOL_ERROR
    )
    p2 = server_pair()
    assert violation(p2, raw_frame(0x1, 0, 1, blk) + raw_frame(0x9, 4, 3, b"")) == ErrorCode.PROTOCOL_ERROR
    p3 = server_pair()
    assert violation(p3, raw_frame(0x9, 4, 1, blk)) == ErrorCode.PROTOCOL_ERROR
    p4 = server_pair()
    flood = raw_frame(0x1, 0, 1, blk[:1]) + b"".join(raw_frame(0x9, 0, 1, b"") for _ in range(20))
    assert violation(p4, flood) == ErrorCode.ENHANCE_YOUR_CALM


def c_padding(p: Pair) -> None:
    # §6.1/§6.2: padding is stripped but counted by flow control; padding >= payload is an error.
    sid = open_tunnel_server(p)
    p.peer.send_data(sid, b"hello", pad_length=100)
    p.pump()
    (d,) = p.events(Data)
    assert bytes(d.data) == b"hello" and d.flow_controlled_length == 5 + 100 + 1
    padded_headers = raw_frame(
        0x1, FLAG_END_HEADERS | FLAG_PADDED, sid + 2, b"\x03" + block(CONNECT) + b"\0\0\0"
    )
    p.inject(padded_headers)
    assert [e.stream_id for e in p.events(ConnectRequest)][-1] == sid + 2
    assert violation(p, raw_frame(0x0, FLAG_PADDED, sid, b"\x05abc")) == ErrorCode.PROTOCOL_ERROR


def c_bad_preface(p: Pair) -> None:
    # §3.4: a server that does not get the client preface (e.g. HTTP/1.1) closes with PROTOCOL_ERROR;
    # either side's first frame must be SETTINGS.
    from tunnel.h2 import ClientConnection, ServerConnection

    s = ServerConnection()
    with pytest.raises(Exception) as exc_info:
        s.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0.0)
    assert exc_info.value.error_code == ErrorCode.PROTOCOL_ERROR  # type: ignore[attr-defined]
    assert goaway_codes(parse_frames(s.data_to_send())) == [ErrorCode.PROTOCOL_ERROR]
    s2 = ServerConnection()
    with pytest.raises(Exception) as exc_info:
        s2.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + raw_frame(0x6, 0, 0, b"\0" * 8), 0.0)
    assert exc_info.value.error_code == ErrorCode.PROTOCOL_ERROR  # type: ignore[attr-defined]
    c = ClientConnection()
    with pytest.raises(Exception) as exc_info:
        c.receive_data(raw_frame(0x8, 0, 0, struct.pack(">L", 1)), 0.0)
    assert exc_info.value.error_code == ErrorCode.PROTOCOL_ERROR  # type: ignore[attr-defined]
    # the preface may arrive byte by byte
    s3 = ServerConnection()
    for b in b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n":
        assert s3.receive_data(bytes([b]), 0.0) == []


def c_stream_ids(p: Pair) -> None:
    # §5.1.1: client streams are odd and increasing; stream 0 carries no HEADERS/DATA;
    # frames on idle streams (other than HEADERS/PRIORITY) are PROTOCOL_ERROR.
    cases = [
        hdr(2, CONNECT),  # even id from a client
        hdr(0, CONNECT),
        raw_frame(0x0, 0, 0, b"x"),
        raw_frame(0x0, 0, 5, b"x"),  # DATA on an idle stream
        raw_frame(0x3, 0, 5, struct.pack(">L", 8)),  # RST_STREAM on an idle stream
        raw_frame(0x8, 0, 5, struct.pack(">L", 1)),  # WINDOW_UPDATE on an idle stream
        hdr(5, CONNECT) + hdr(3, CONNECT),  # ids going backwards
        raw_frame(0x5, 4, 1, b"\0\0\0\2" + block([(b":status", b"200")])),  # PUSH_PROMISE
    ]
    for data in cases:
        fresh = server_pair()
        assert violation(fresh, data) == ErrorCode.PROTOCOL_ERROR, data
    assert p.ours.stream_state(5) == StreamState.IDLE


def c_client_stream_ids(p: Pair) -> None:
    # §5.1.1 / §8.4: the server opens no streams (push is off): HEADERS on an even id, or on an
    # odd id we never opened, is PROTOCOL_ERROR; our own ids are odd and increasing.
    ids = [p.ours.open_stream(DST) for _ in range(3)]  # type: ignore[attr-defined]
    assert ids == [1, 3, 5]
    p.pump()
    for data in (hdr(2, [(b":status", b"200")]), hdr(9, [(b":status", b"200")])):
        fresh = client_pair()
        assert violation(fresh, data) == ErrorCode.PROTOCOL_ERROR
    fresh = client_pair()
    push = raw_frame(0x5, 4, 1, b"\0\0\0\2" + block([(b":status", b"200")]))
    fresh.ours.open_stream(DST)  # type: ignore[attr-defined]
    assert violation(fresh, push) == ErrorCode.PROTOCOL_ERROR


def c_stream_states(p: Pair) -> None:
    # §5.1: DATA after the peer's END_STREAM is STREAM_CLOSED (stream error while we can still
    # send, connection error once closed); frames after our RST_STREAM are ignored; half-close
    # keeps the other direction open.
    sid = open_tunnel_server(p)
    p.peer.end_stream(sid)
    p.pump()
    assert p.events(StreamEnded) and p.ours.stream_state(sid) == StreamState.HALF_CLOSED_REMOTE
    assert p.ours.send_data(sid, b"after-fin") == 9  # half-closed (remote): we still send
    p.pump()
    frames = p.inject(raw_frame(0x0, 0, sid, b"late"))
    assert rst_codes(frames, sid) == [ErrorCode.STREAM_CLOSED]
    # a stream closed by END_STREAM both ways: more DATA is a connection error
    s2 = p.peer.get_next_available_stream_id()
    p.peer.send_headers(s2, CONNECT, end_stream=True)
    p.pump()
    p.ours.respond(s2, 200, end_stream=True)  # type: ignore[attr-defined]
    p.pump()
    assert p.ours.stream_state(s2) == StreamState.CLOSED
    p3 = server_pair()
    s3 = open_tunnel_server(p3)
    p3.ours.reset_stream(s3)
    p3.pump()
    frames = p3.inject(raw_frame(0x0, 0, s3, b"in flight") + raw_frame(0x3, 0, s3, struct.pack(">L", 8)))
    assert frames == [] and p3.violation is None  # ignored after our RST
    assert violation(p, raw_frame(0x0, 0, s2, b"zombie")) == ErrorCode.STREAM_CLOSED


def c_rst_from_peer(p: Pair) -> None:
    # §6.4: RST_STREAM closes the stream at once; its length is exactly 4.
    sid = open_tunnel_client(p) if p.ours.client else open_tunnel_server(p)
    p.peer.reset_stream(sid, 8)
    p.pump()
    assert p.events(StreamReset) == [StreamReset(sid, 8, True)]
    assert p.ours.stream_state(sid) == StreamState.CLOSED and p.ours.send_data(sid, b"x") == 0
    assert violation(p, raw_frame(0x3, 0, sid, b"\0\0\0")) == ErrorCode.FRAME_SIZE_ERROR


def c_reset_by_us(p: Pair) -> None:
    # §6.4: our RST_STREAM reaches h2 with its code (CONNECT_ERROR: the TCP side failed, §8.5).
    sid = open_tunnel_client(p) if p.ours.client else open_tunnel_server(p)
    p.ours.reset_stream(sid, ErrorCode.CONNECT_ERROR)
    p.pump()
    (rst,) = p.peer_of(h2.events.StreamReset)
    assert rst.stream_id == sid and rst.error_code == ErrorCode.CONNECT_ERROR


def c_priority_and_unknown(p: Pair) -> None:
    # §5.3.2 / §5.5: PRIORITY and unknown frame types are ignored; a bad PRIORITY length is a
    # stream error FRAME_SIZE_ERROR; a stream depending on itself is PROTOCOL_ERROR.
    sid = open_tunnel_server(p)
    frames = p.inject(raw_frame(0x2, 0, 7, b"\0\0\0\1\x10") + raw_frame(0xFA, 0xFF, 0, b"whatever"))
    assert frames == [] and p.violation is None
    assert p.ours.stream_state(7) == StreamState.IDLE  # PRIORITY does not open a stream
    frames = p.inject(raw_frame(0x2, 0, sid, b"\0\0\0\1"))
    assert rst_codes(frames, sid) == [ErrorCode.FRAME_SIZE_ERROR]
    prio = b"\0\0\0\x09\x10"  # depends on stream 9 itself
    frames = p.inject(raw_frame(0x1, FLAG_END_HEADERS | FLAG_PRIORITY, 9, prio + block(CONNECT)))
    assert rst_codes(frames, 9) == [ErrorCode.PROTOCOL_ERROR]
    frames = p.inject(raw_frame(0x1, FLAG_END_HEADERS | FLAG_PRIORITY, 11, b"\0\0\0\1\x10" + block(CONNECT)))
    assert [e.stream_id for e in p.events(ConnectRequest)][-1] == 11


def c_concurrency_limit_server(p: Pair) -> None:
    # §5.1.2: a stream beyond our MAX_CONCURRENT_STREAMS is refused, the others live on.
    p2 = server_pair(max_concurrent_streams=3)
    sids = [open_tunnel_server(p2) for _ in range(3)]
    frames = p2.inject(hdr(7, CONNECT))
    assert rst_codes(frames, 7) == [ErrorCode.REFUSED_STREAM] and p2.violation is None
    assert [e.stream_id for e in p2.events(StreamRefused)] == [7]
    assert all(p2.ours.stream_is_open(s) for s in sids)
    p2.peer.reset_stream(sids[0], 8)
    p2.pump()
    p2.inject(hdr(9, CONNECT))
    assert [e.stream_id for e in p2.events(ConnectRequest)][-1] == 9


def c_concurrency_limit_client(p: Pair) -> None:
    # §5.1.2: we never open more streams than the server allows.
    p2 = client_pair({SC.MAX_CONCURRENT_STREAMS: 2})
    p2.ours.open_stream(DST)  # type: ignore[attr-defined]
    p2.ours.open_stream(DST)  # type: ignore[attr-defined]
    assert not p2.ours.can_open_stream()  # type: ignore[attr-defined]
    with pytest.raises(HboneError):
        p2.ours.open_stream(DST)  # type: ignore[attr-defined]


def c_request_header_validation(p: Pair) -> None:
    # §8.2 / §8.3 / §8.5: malformed requests get 400 (+ RST PROTOCOL_ERROR); well-formed but
    # non-HBONE requests get 400; the connection lives on.
    malformed = [
        [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80"), (b"X-Up", b"1")],  # uppercase name
        [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80"), (b"connection", b"close")],
        [(b":method", b"CONNECT"), (b"x", b"1"), (b":authority", b"10.0.0.1:80")],  # pseudo after regular
        [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80"), (b":authority", b"10.0.0.2:80")],
        [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80"), (b":status", b"200")],
        [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80"), (b"x", b"a\0b")],
        [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80"), (b"te", b"gzip")],
        [(b":method", b"GET"), (b":authority", b"10.0.0.1:80")],  # no :scheme/:path
    ]
    not_hbone = [
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"x")],
        [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80"), (b":scheme", b"https"), (b":path", b"/")],
        [(b":method", b"CONNECT")],
        [(b":method", b"CONNECT"), (b":authority", b"example.com:80")],
        [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1")],
        [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80"), (b":protocol", b"websocket")],
    ]
    sid = 1
    for headers, code in [(h, ErrorCode.PROTOCOL_ERROR) for h in malformed] + [
        (h, ErrorCode.NO_ERROR) for h in not_hbone
    ]:
        frames = p.inject(hdr(sid, headers))
        assert p.violation is None, headers
        (rej,) = [e for e in p.events(RequestRejected) if e.stream_id == sid]
        assert rej.status == 400, headers
        assert any(isinstance(f, hf.HeadersFrame) and f.stream_id == sid for f in frames)
        assert rst_codes(frames, sid) == [code], headers
        sid += 2
    assert not p.events(ConnectRequest)
    p.inject(hdr(sid, CONNECT))  # the connection is still usable
    assert [e.stream_id for e in p.events(ConnectRequest)] == [sid]


def c_response_validation(p: Pair) -> None:
    # §8.3.2 / §8.1: a malformed response is a stream error PROTOCOL_ERROR; 1xx is skipped.
    from tunnel.h2.frames import FLAG_END_HEADERS as EH

    sid = p.ours.open_stream(DST)  # type: ignore[attr-defined]
    p.pump()
    frames = p.inject(raw_frame(0x1, EH, sid, block([(b":status", b"2000")])))
    assert rst_codes(frames, sid) == [ErrorCode.PROTOCOL_ERROR]
    assert p.events(StreamReset) == [StreamReset(sid, ErrorCode.PROTOCOL_ERROR, False)]
    s2 = p.ours.open_stream(DST)  # type: ignore[attr-defined]
    p.pump()
    p.inject(raw_frame(0x1, EH, s2, block([(b":status", b"100")])))
    p.inject(raw_frame(0x1, EH, s2, block([(b":status", b"200"), (b"baggage", b"k=v")])))
    (resp,) = p.events(ConnectResponse)
    assert resp.ok and resp.headers["baggage"] == "k=v"
    s3 = p.ours.open_stream(DST)  # type: ignore[attr-defined]
    p.pump()
    frames = p.inject(raw_frame(0x1, EH, s3, block([(b":status", b"200"), (b":path", b"/")])))
    assert rst_codes(frames, s3) == [ErrorCode.PROTOCOL_ERROR]


def c_end_stream_on_request(p: Pair) -> None:
    # §8.1: HEADERS with END_STREAM half-closes at once; the tunnel still gets its answer.
    sid = p.peer.get_next_available_stream_id()
    p.peer.send_headers(sid, CONNECT, end_stream=True)
    p.pump()
    assert [type(e).__name__ for e in p.ours_events] == ["ConnectRequest", "StreamEnded"]
    assert p.ours.stream_state(sid) == StreamState.HALF_CLOSED_REMOTE
    p.ours.respond(sid, 200)  # type: ignore[attr-defined]
    p.ours.send_data(sid, b"only-down", end_stream=True)
    p.pump()
    assert b"".join(e.data for e in p.peer_of(h2.events.DataReceived)) == b"only-down"
    assert p.ours.stream_state(sid) == StreamState.CLOSED


def c_trailers(p: Pair) -> None:
    # §8.1: a second header block must carry END_STREAM (trailers), without pseudo-headers.
    sid = open_tunnel_server(p)
    p.peer.send_headers(sid, [(b"x-trailer", b"1")], end_stream=True)
    p.pump()
    assert p.events(StreamEnded) == [StreamEnded(sid)]
    s2 = open_tunnel_server(p)
    frames = p.inject(hdr(s2, [(b"x-trailer", b"1")]))  # no END_STREAM
    assert rst_codes(frames, s2) == [ErrorCode.PROTOCOL_ERROR]


def c_hpack_errors(p: Pair) -> None:
    # RFC 7541 / §4.3: an undecodable block is COMPRESSION_ERROR; an oversized header list
    # is refused before it is decoded (ENHANCE_YOUR_CALM).
    bad = raw_frame(0x1, FLAG_END_HEADERS, 1, b"\xff\xff\xff\xff\xff")  # index far past the tables
    assert violation(p, bad) == ErrorCode.COMPRESSION_ERROR
    p2 = server_pair()
    huge = raw_frame(0x1, FLAG_END_HEADERS, 1, block([*CONNECT, (b"x", b"y" * 70_000)]))
    assert violation(p2, huge) == ErrorCode.ENHANCE_YOUR_CALM


def c_big_transfer_both_ways(p: Pair) -> None:
    # §6.9: a transfer several windows long, acknowledged by the application as it reads.
    sid = open_tunnel_client(p) if p.ours.client else open_tunnel_server(p)
    payload = bytes(range(256)) * 40_000  # ~10 MiB, over the 65 KiB default windows of h2
    sent = 0
    got = bytearray()
    for _ in range(10_000):
        if sent < len(payload):
            sent += p.ours.send_data(sid, memoryview(payload)[sent:], end_stream=False)
        out = p.ours.data_to_send()
        if out:
            for ev in p.peer.receive_data(out):
                if isinstance(ev, h2.events.DataReceived):
                    got += ev.data
                    p.peer.acknowledge_received_data(ev.flow_controlled_length, sid)
        back = p.peer.data_to_send()
        if back:
            p.feed(back)
        if len(got) == len(payload):
            break
    assert bytes(got) == payload


def c_data_before_response(p: Pair) -> None:
    # §8.1: a response starts with HEADERS; DATA first is malformed (stream error).
    sid = p.ours.open_stream(DST)  # type: ignore[attr-defined]
    p.pump()
    frames = p.inject(raw_frame(0x0, 0, sid, b"early"))
    assert rst_codes(frames, sid) == [ErrorCode.PROTOCOL_ERROR] and not p.events(Data)


def c_small_windows_do_not_stall(p: Pair) -> None:
    # §6.9: with windows smaller than the defaults, acknowledged credit still comes back.
    kw = {"stream_window": 70_000, "connection_window": 100_000}
    p2 = client_pair(**kw) if p.ours.client else server_pair(**kw)
    sid = open_tunnel_client(p2) if p.ours.client else open_tunnel_server(p2)
    total = 0
    for _ in range(200):
        n = min(p2.peer.local_flow_control_window(sid), 16384)
        if n:
            p2.peer.send_data(sid, b"s" * n)
        p2.pump()
        for e in p2.events(Data):
            p2.ours.acknowledge(sid, e.flow_controlled_length)
            total += len(e.data)
        p2.clear()
        if total >= 1_000_000:
            break
    assert total >= 1_000_000


@dataclass(frozen=True)
class Case:
    name: str
    section: str
    roles: tuple[str, ...]
    run: Callable[[Pair], None]


TABLE = [
    Case("preface and SETTINGS exchange", "3.4, 6.5.3, 6.9", ("client", "server"), c_preface_settings),
    Case("CONNECT with :authority only, 200", "8.5", ("client", "server"), c_connect_ok),
    Case("non-200 answer ends the stream", "8.5, DESIGN 4", ("client", "server"), c_connect_refused_status),
    Case(
        "16 KiB DATA frames to a default peer", "4.2, 6.5.2", ("client", "server"), c_data_frame_size_16k_peer
    ),
    Case(
        "1 MiB DATA frames to a peer allowing them",
        "6.5.2",
        ("client", "server"),
        c_data_frame_size_large_peer,
    ),
    Case("frame over our max size", "4.2", ("client", "server"), c_frame_too_large),
    Case("send windows respected", "6.9.1", ("client", "server"), c_send_window_respected),
    Case("stream receive window enforced", "6.9.1", ("client", "server"), c_recv_window_enforced_stream),
    Case(
        "connection receive window enforced", "6.9.1", ("client", "server"), c_recv_window_enforced_connection
    ),
    Case("WINDOW_UPDATE after acknowledge", "6.9", ("client", "server"), c_window_update_after_ack),
    Case("WINDOW_UPDATE of 0", "6.9", ("client", "server"), c_window_update_zero),
    Case("window above 2^31-1", "6.9.1", ("client", "server"), c_window_overflow),
    Case("WINDOW_UPDATE frame size", "6.9", ("client", "server"), c_window_update_frame_size),
    Case("INITIAL_WINDOW_SIZE change shifts windows", "6.9.2", ("client", "server"), c_initial_window_change),
    Case("invalid SETTINGS", "6.5, 6.5.2", ("client", "server"), c_settings_invalid),
    Case(
        "SETTINGS ACK, unknown settings ignored",
        "6.5.2, 6.5.3",
        ("client", "server"),
        c_settings_ack_and_unknown,
    ),
    Case("PING and PING ACK", "6.7", ("client", "server"), c_ping),
    Case("graceful GOAWAY sent: drain, refuse new", "6.8", ("server",), c_goaway_graceful_sent),
    Case("two-step GOAWAY, id never increases", "6.8", ("client", "server"), c_goaway_two_step),
    Case("GOAWAY received: unprocessed streams refused", "6.8", ("client",), c_goaway_received),
    Case("malformed GOAWAY", "6.8", ("client", "server"), c_goaway_malformed),
    Case("HEADERS + CONTINUATION sent", "6.10", ("client",), c_continuation_sent),
    Case("HEADERS + CONTINUATION received", "6.10", ("server",), c_continuation_received),
    Case("CONTINUATION rules and flood", "6.10", ("server",), c_continuation_violations),
    Case("padding on DATA and HEADERS", "6.1, 6.2", ("server",), c_padding),
    Case("bad preface / first frame not SETTINGS", "3.4", ("server",), c_bad_preface),
    Case("stream id rules (server side)", "5.1.1, 5.1", ("server",), c_stream_ids),
    Case("stream id rules (client side)", "5.1.1, 8.4", ("client",), c_client_stream_ids),
    Case("stream states: half-closed, closed, after RST", "5.1", ("server",), c_stream_states),
    Case("RST_STREAM from the peer", "6.4", ("client", "server"), c_rst_from_peer),
    Case("RST_STREAM from us with CONNECT_ERROR", "6.4, 8.5", ("client", "server"), c_reset_by_us),
    Case("PRIORITY and unknown frames ignored", "5.3.2, 5.5, 6.3", ("server",), c_priority_and_unknown),
    Case("stream limit: REFUSED_STREAM (server)", "5.1.2", ("server",), c_concurrency_limit_server),
    Case("stream limit respected (client)", "5.1.2", ("client",), c_concurrency_limit_client),
    Case("request header validation", "8.2, 8.3, 8.5", ("server",), c_request_header_validation),
    Case("response header validation, 1xx skipped", "8.1, 8.3.2", ("client",), c_response_validation),
    Case("END_STREAM on the CONNECT request", "8.1", ("server",), c_end_stream_on_request),
    Case("trailers", "8.1", ("server",), c_trailers),
    Case("HPACK errors and header-list size", "4.3, RFC 7541", ("server",), c_hpack_errors),
    Case("10 MiB through h2's 64 KiB windows", "6.9", ("client", "server"), c_big_transfer_both_ways),
    Case("DATA before the response", "8.1", ("client",), c_data_before_response),
    Case("small receive windows do not stall", "6.9", ("client", "server"), c_small_windows_do_not_stall),
]


@pytest.mark.parametrize(
    ("case", "role"),
    [pytest.param(c, r, id=f"{r}-{c.section}-{c.name}") for c in TABLE for r in c.roles],
)
def test_conformance(case: Case, role: str) -> None:
    pair = client_pair() if role == "client" else server_pair()
    case.run(pair)


@pytest.mark.parametrize("status", [400, 401, 503])
@pytest.mark.parametrize("role", ["client", "server"])
def test_every_hbone_status(status: int, role: str) -> None:
    c_connect_refused_status(client_pair() if role == "client" else server_pair(), status)


def test_table_covers_the_brief() -> None:
    sections = " ".join(c.section for c in TABLE)
    for needed in ("4.2", "6.9", "5.1", "6.8", "6.5.3", "6.7", "6.10", "6.1", "3.4", "5.1.1", "8.2"):
        assert needed in sections, needed
    assert len({c.name for c in TABLE}) == len(TABLE)


def test_data_and_window_events_from_h2_client() -> None:
    p = server_pair()
    sid = open_tunnel_server(p)
    p.peer.send_data(sid, b"up", end_stream=True)
    p.pump()
    assert [type(e) for e in p.ours_events[-2:]] == [Data, StreamEnded]
    p.ours.send_data(sid, b"x" * 70_000)
    assert p.ours.send_window(sid) == 0
    p.pump()
    got = sum(len(e.data) for e in p.peer_of(h2.events.DataReceived))
    p.peer.acknowledge_received_data(got, sid)
    p.pump()
    assert WindowOpened(sid) in p.ours_events and SettingsAcknowledged() not in p.ours_events
