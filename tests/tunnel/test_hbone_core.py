"""The sans-IO HBONE core (``tunnel.h2``, reached through ``tunnel.hbone``'s names): a client
core and a server core wired to each other in memory, and the ``h2`` library as a raw peer.

These are the assertions the h2-based core that preceded ``tunnel.h2`` was held to, moved over
when it was removed; the RFC 9113 conformance table for the new core is test_h2_conformance."""

from __future__ import annotations

import hashlib

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from tests.tunnel.test_h2_support import parse_frames
from tunnel import hbone
from tunnel.hbone import Authority, ClientConnection, HboneError, ServerConnection, Status

NOW = 0.0  # the core reads no clock; only its abuse rate limits look at the time passed in


def pump(a: hbone.H2Connection, b: hbone.H2Connection) -> tuple[list[hbone.Event], list[hbone.Event]]:
    """Move bytes both ways until quiet; returns (events at a, events at b)."""
    ev_a: list[hbone.Event] = []
    ev_b: list[hbone.Event] = []
    for _ in range(100):
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if not out_a and not out_b:
            return ev_a, ev_b
        if out_a:
            ev_b += b.receive_data(out_a, NOW)
        if out_b:
            ev_a += a.receive_data(out_b, NOW)
    raise AssertionError("connection did not go quiet")


def of(events: list[hbone.Event], kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


@pytest.fixture
def pair() -> tuple[ClientConnection, ServerConnection]:
    c, s = ClientConnection(), ServerConnection()
    pump(c, s)
    return c, s


@pytest.mark.parametrize(
    ("text", "ip", "port"),
    [
        ("10.0.0.2:8080", "10.0.0.2", 8080),
        ("[fd00::1]:443", "fd00::1", 443),
        ("[2001:db8::a:1]:1", "2001:db8::a:1", 1),
    ],
)
def test_authority_parse_roundtrip(text: str, ip: str, port: int) -> None:
    a = Authority.parse(text)
    assert (str(a.ip), a.port) == (ip, port)
    assert str(a) == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("10.0.0.2", "no port"),
        ("10.0.0.2:", "no valid port"),
        ("10.0.0.2:0", "out of range"),
        ("10.0.0.2:65536", "out of range"),
        ("10.0.0.2:+80", "no valid port"),
        ("example.com:80", "not an IPv4"),
        ("fd00::1:80", "bracketed"),
        ("[fd00::1]80", r"expected \[ipv6\]:port"),
        ("[10.0.0.1]:80", "not an IPv6"),
        ("[fe80::1%eth0]:80", "zone ids"),
        ("", "empty"),
    ],
)
def test_authority_rejects(text: str, why: str) -> None:
    with pytest.raises(HboneError, match=why) as info:
        Authority.parse(text)
    assert info.value.status == Status.BAD_REQUEST


def test_forwarded_roundtrip() -> None:
    assert hbone.format_forwarded("10.1.2.3", 4000) == 'for="10.1.2.3:4000"'
    assert hbone.format_forwarded("fd00::2", 5) == 'for="[fd00::2]:5"'
    assert hbone.parse_forwarded_for('for="[fd00::2]:5"') == Authority.parse("[fd00::2]:5")
    assert hbone.parse_forwarded_for('proto=http;For="1.2.3.4:9", for="5.6.7.8:1"') == Authority.parse(
        "1.2.3.4:9"
    )
    assert hbone.parse_forwarded_for("for=unknown") is None


def test_settings_are_ztunnels() -> None:
    c, s = ClientConnection(), ServerConnection()
    # What each side announces, read back by hyperframe (an independent parser).
    for side, streams in ((c, 100), (s, 200)):
        (settings,) = [f for f in parse_frames(side.data_to_send()) if f.type == 0x4]
        assert settings.settings[0x3] == streams  # MAX_CONCURRENT_STREAMS
        assert settings.settings[0x4] == 4 * 1024 * 1024  # INITIAL_WINDOW_SIZE
        assert settings.settings[0x5] == 1024 * 1024  # MAX_FRAME_SIZE
        assert settings.settings[0x2] == 0  # ENABLE_PUSH
    c, s = ClientConnection(), ServerConnection()
    pump(c, s)
    for side, streams in ((s, 100), (c, 200)):  # what each side applied from the other's
        assert side.peer_initial_window == 4 * 1024 * 1024
        assert side.peer_max_frame_size == 1024 * 1024
        assert side.peer_max_concurrent_streams == streams
    # connection windows were raised to 16 MiB by WINDOW_UPDATE on stream 0
    assert c.send_windows()[0] == 16 * 1024 * 1024
    assert s.send_windows()[0] == 16 * 1024 * 1024
    assert c.settings_acknowledged and s.settings_acknowledged


def test_connect_request_shape(pair: tuple[ClientConnection, ServerConnection]) -> None:
    c, s = pair
    sid = c.open_stream(
        Authority.parse("[fd00::5]:9080"), {"forwarded": 'for="[fd00::1]:3"', "baggage": "k=v"}
    )
    _, ev = pump(c, s)
    (req,) = of(ev, hbone.ConnectRequest)
    assert req.stream_id == sid
    assert req.authority == Authority.parse("[fd00::5]:9080")
    assert req.headers[":method"] == "CONNECT"
    assert ":scheme" not in req.headers and ":path" not in req.headers
    assert req.headers["baggage"] == "k=v"


def test_status_and_bytes_both_ways_with_half_close(pair: tuple[ClientConnection, ServerConnection]) -> None:
    c, s = pair
    sid = c.open_stream(Authority.parse("10.0.0.9:80"))
    pump(c, s)
    s.respond(sid, Status.OK)
    ev_c, _ = pump(c, s)
    (resp,) = of(ev_c, hbone.ConnectResponse)
    assert resp.ok and resp.status == 200
    assert c.send_data(sid, b"ping") == 4
    c.end_stream(sid)  # client half-closes: server sees data then END_STREAM
    _, ev_s = pump(c, s)
    assert [e.data for e in of(ev_s, hbone.Data)] == [b"ping"]
    assert of(ev_s, hbone.StreamEnded) == [hbone.StreamEnded(sid)]
    # the other direction still works after the half-close
    assert s.send_data(sid, b"pong") == 4
    s.end_stream(sid)
    ev_c, _ = pump(c, s)
    assert [e.data for e in of(ev_c, hbone.Data)] == [b"pong"]
    assert of(ev_c, hbone.StreamEnded) == [hbone.StreamEnded(sid)]
    assert c.open_streams == 0 and s.open_streams == 0


@pytest.mark.parametrize("status", [Status.BAD_REQUEST, Status.UNAUTHORIZED, Status.SERVICE_UNAVAILABLE])
def test_error_statuses_end_the_stream(
    pair: tuple[ClientConnection, ServerConnection], status: Status
) -> None:
    c, s = pair
    sid = c.open_stream(Authority.parse("10.0.0.9:80"))
    pump(c, s)
    s.respond(sid, status)
    ev_c, _ = pump(c, s)
    (resp,) = of(ev_c, hbone.ConnectResponse)
    assert resp.status == status and not resp.ok
    assert not c.stream_is_open(sid) and not s.stream_is_open(sid)


def raw_client() -> tuple[h2.connection.H2Connection, ServerConnection]:
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    raw.initiate_connection()
    s = ServerConnection()
    s.receive_data(raw.data_to_send(), NOW)
    raw.receive_data(s.data_to_send())
    return raw, s


def response_status(raw: h2.connection.H2Connection, s: ServerConnection, sid: int) -> int:
    for ev in raw.receive_data(s.data_to_send()):
        if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
            return int(dict(ev.headers)[b":status"])
    raise AssertionError("no response")


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        (
            [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"1.2.3.4:80")],
            "not CONNECT",
        ),
        ([(b":method", b"CONNECT"), (b":authority", b"1.2.3.4")], "no port"),
        ([(b":method", b"CONNECT"), (b":authority", b"svc.ns:80")], "not an IPv4"),
        (
            [
                (b":method", b"CONNECT"),
                (b":protocol", b"websocket"),
                (b":scheme", b"https"),
                (b":path", b"/"),
                (b":authority", b"1.2.3.4:80"),
            ],
            ":protocol",
        ),
    ],
)
def test_bad_requests_get_400_and_the_connection_lives(headers: list[tuple[bytes, bytes]], why: str) -> None:
    raw, s = raw_client()
    # We never announce SETTINGS_ENABLE_CONNECT_PROTOCOL; the raw peer sends :protocol anyway.
    raw.local_settings.update({h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1})  # type: ignore[attr-defined]
    raw.remote_settings.update({h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1})
    raw.remote_settings.acknowledge()
    sid = raw.get_next_available_stream_id()
    raw.send_headers(sid, headers)
    ev = s.receive_data(raw.data_to_send(), NOW)
    (rej,) = of(ev, hbone.RequestRejected)
    assert why in rej.reason
    assert response_status(raw, s, sid) == 400
    # a good request on the same connection still works
    sid2 = raw.get_next_available_stream_id()
    raw.send_headers(sid2, [(b":method", b"CONNECT"), (b":authority", b"1.2.3.4:80")])
    assert of(s.receive_data(raw.data_to_send(), NOW), hbone.ConnectRequest)


def test_stream_flood_refuses_only_the_excess() -> None:
    raw, s = raw_client()
    ids = []
    for _ in range(hbone.SERVER_MAX_CONCURRENT_STREAMS + 5):
        sid = raw.get_next_available_stream_id()
        # the raw client ignores the advertised limit on purpose
        raw._h2_local_limit = None  # type: ignore[attr-defined]
        raw.remote_settings._settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = [1000]  # type: ignore[attr-defined]
        raw.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"1.2.3.4:80")])
        ids.append(sid)
    ev = s.receive_data(raw.data_to_send(), NOW)
    assert len(of(ev, hbone.ConnectRequest)) == hbone.SERVER_MAX_CONCURRENT_STREAMS
    refused = of(ev, hbone.StreamRefused)
    assert [r.stream_id for r in refused] == ids[-5:]
    resets = [e for e in raw.receive_data(s.data_to_send()) if isinstance(e, h2.events.StreamReset)]
    assert sorted(e.stream_id for e in resets) == ids[-5:]
    assert all(e.error_code == hbone.ErrorCode.REFUSED_STREAM for e in resets)
    # the admitted streams still work
    s.respond(ids[0], Status.OK)
    assert response_status(raw, s, ids[0]) == 200


def test_flow_control_window_limits_and_acknowledge(pair: tuple[ClientConnection, ServerConnection]) -> None:
    c, s = pair
    sid = c.open_stream(Authority.parse("10.0.0.9:80"))
    pump(c, s)
    s.respond(sid, Status.OK)
    pump(c, s)
    blob = bytes(range(256)) * (24 * 1024)  # 6 MiB > the 4 MiB stream window
    taken = c.send_data(sid, blob)
    assert taken == hbone.STREAM_WINDOW
    _, ev = pump(c, s)
    got = b"".join(e.data for e in of(ev, hbone.Data))
    assert len(got) == taken
    assert max(len(e.data) for e in of(ev, hbone.Data)) <= hbone.MAX_FRAME_SIZE
    assert c.send_data(sid, blob[taken:]) == 0  # window exhausted until acknowledged
    for e in of(ev, hbone.Data):
        s.acknowledge(sid, e.flow_controlled_length)
    ev_c, _ = pump(c, s)
    assert of(ev_c, hbone.WindowOpened)
    rest = c.send_data(sid, blob[taken:])
    assert rest == len(blob) - taken
    c.end_stream(sid)
    _, ev = pump(c, s)
    got += b"".join(e.data for e in of(ev, hbone.Data))
    assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()


def test_reset_and_goaway(pair: tuple[ClientConnection, ServerConnection]) -> None:
    c, s = pair
    a = c.open_stream(Authority.parse("10.0.0.9:80"))
    b = c.open_stream(Authority.parse("10.0.0.9:81"))
    pump(c, s)
    c.reset_stream(a, hbone.ErrorCode.CONNECT_ERROR)
    _, ev = pump(c, s)
    assert of(ev, hbone.StreamReset) == [hbone.StreamReset(a, hbone.ErrorCode.CONNECT_ERROR, True)]
    s.goaway()
    ev_c, _ = pump(c, s)
    (term,) = of(ev_c, hbone.ConnectionTerminated)
    assert term.last_stream_id == b
    assert not c.can_open_stream()
    with pytest.raises(HboneError, match="going away"):
        c.open_stream(Authority.parse("10.0.0.9:80"))
    # stream b still completes after GOAWAY
    s.respond(b, Status.OK)
    ev_c, _ = pump(c, s)
    assert of(ev_c, hbone.ConnectResponse)[0].ok


def test_garbage_is_a_protocol_violation() -> None:
    s = ServerConnection()
    with pytest.raises(hbone.ProtocolViolation):
        s.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", NOW)


def test_client_header_rules(pair: tuple[ClientConnection, ServerConnection]) -> None:
    c, _ = pair
    with pytest.raises(HboneError, match="may not be set"):
        c.open_stream(Authority.parse("1.2.3.4:5"), {":path": "/"})
    assert c.open_streams == 0 and c.data_to_send() == b""  # nothing was sent


def test_padded_data_and_data_after_reset() -> None:
    raw, s = raw_client()
    sid = raw.get_next_available_stream_id()
    raw.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"1.2.3.4:80")])
    s.receive_data(raw.data_to_send(), NOW)
    s.respond(sid, Status.OK)
    raw.receive_data(s.data_to_send())
    raw.send_data(sid, b"padded payload", pad_length=7)
    ev = s.receive_data(raw.data_to_send(), NOW)
    (d,) = of(ev, hbone.Data)
    assert d.data == b"padded payload" and d.flow_controlled_length == len(b"padded payload") + 8
    s.acknowledge(sid, d.flow_controlled_length)
    # after we reset the stream, late DATA is dropped but its connection credit comes back
    s.reset_stream(sid, hbone.ErrorCode.CANCEL)
    raw.receive_data(s.data_to_send())
    before = s.recv_windows()[0] + s._conn_credit
    frame = b"\x00\x10\x00" + b"\x00\x00" + sid.to_bytes(4, "big") + b"x" * 4096  # raw DATA, 4 KiB
    assert of(s.receive_data(frame, NOW), hbone.Data) == []
    after = s.recv_windows()[0] + s._conn_credit
    assert after == before  # not leaked: the 4 KiB are credited back (sent with the next step)
    # the connection is still usable
    sid2 = raw.get_next_available_stream_id()
    raw.send_headers(sid2, [(b":method", b"CONNECT"), (b":authority", b"1.2.3.4:81")])
    assert of(s.receive_data(raw.data_to_send(), NOW), hbone.ConnectRequest)


def test_data_split_across_reads_reassembles() -> None:
    c, s = ClientConnection(), ServerConnection()
    pump(c, s)
    sid = c.open_stream(Authority.parse("10.0.0.9:80"))
    pump(c, s)
    s.respond(sid, Status.OK)
    pump(c, s)
    blob = bytes(range(256)) * 4096  # 1 MiB in one frame
    assert c.send_data(sid, blob) == len(blob)
    wire = c.data_to_send()
    got = b""
    for i in range(0, len(wire), 7777):  # arbitrary read boundaries, mid-header included
        got += b"".join(e.data for e in of(s.receive_data(wire[i : i + 7777], NOW), hbone.Data))
    assert got == blob


def test_oversized_frame_is_a_protocol_violation() -> None:
    s = ServerConnection()
    s.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", NOW)
    too_big = (hbone.MAX_FRAME_SIZE + 1).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
    with pytest.raises(hbone.ProtocolViolation, match="exceeds our maximum") as info:
        s.receive_data(too_big, NOW)
    assert info.value.error_code == hbone.ErrorCode.FRAME_SIZE_ERROR
    (goaway,) = [f for f in parse_frames(s.data_to_send()) if f.type == 0x7]
    assert goaway.error_code == hbone.ErrorCode.FRAME_SIZE_ERROR


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({"bad name": "x"}, "valid HTTP token"),
        ({"baggage": "a\r\nx-injected: 1"}, "control characters"),
        ({"baggage": " padded"}, "edge whitespace"),
        ({"x": "nul\x00"}, "control characters"),
    ],
)
def test_client_rejects_unsafe_header_values(
    pair: tuple[ClientConnection, ServerConnection], headers: dict[str, str], why: str
) -> None:
    c, _ = pair
    with pytest.raises(HboneError, match=why):
        c.open_stream(Authority.parse("1.2.3.4:5"), headers)
    assert c.open_streams == 0


def test_output_segments_keep_payloads_zero_copy(
    pair: tuple[ClientConnection, ServerConnection],
) -> None:
    """Frame headers and control frames are joined into bytes runs; DATA payloads stay views of
    the caller's buffer. (The old core also packed runs into 16 KiB TLS records: the fd TLS
    transport now joins a ``writelines`` into one SSL_write itself, tunnel.fdtls.)"""
    c, s = pair
    sid = c.open_stream(Authority.parse("10.0.0.9:80"))
    pump(c, s)
    s.respond(sid, Status.OK)
    pump(c, s)
    big = bytes(range(256)) * 1024  # 256 KiB: one frame
    c.send_data(sid, b"small")
    c.send_data(sid, big)
    segs = c.data_to_send_segments()
    views = [x for x in segs if isinstance(x, memoryview)]
    assert any(v.obj is big for v in views)  # the big payload is not copied
    assert all(isinstance(x, bytes) for x in segs if not isinstance(x, memoryview))
    events = s.receive_data(b"".join(bytes(x) for x in segs), NOW)
    assert b"".join(e.data for e in of(events, hbone.Data)) == b"small" + big


def test_oversized_header_block_via_continuations_is_refused() -> None:
    s = ServerConnection()
    s.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", NOW)
    # HEADERS without END_HEADERS, then CONTINUATIONs that never end: refused past 64 KiB
    chunk = 32 * 1024
    frames = chunk.to_bytes(3, "big") + b"\x01\x00" + (1).to_bytes(4, "big") + b"\x00" * chunk
    for _ in range(3):
        frames += chunk.to_bytes(3, "big") + b"\x09\x00" + (1).to_bytes(4, "big") + b"\x00" * chunk
    with pytest.raises(hbone.ProtocolViolation, match="header block over 65536") as info:
        s.receive_data(frames, NOW)
    assert info.value.error_code == hbone.ErrorCode.ENHANCE_YOUR_CALM
