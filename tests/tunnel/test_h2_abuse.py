"""HTTP/2 abuse from an authenticated peer, against tunnel/h2's server core.

The attacker is the ``h2`` library (rapid reset is legal HTTP/2 frame by frame, so h2 sends it
happily) or raw frames where h2 refuses to misbehave. Each abuse must end in GOAWAY and a
closed connection with one log line for the connection; the same traffic paced like a real
client must not.
"""

from __future__ import annotations

import logging
import struct

import h2.events
import pytest

from tests.tunnel.test_h2_support import CONNECT, Pair, block, parse_frames, raw_frame, server_pair
from tunnel.h2 import (
    ConnectRequest,
    ErrorCode,
    ProtocolViolation,
    ServerConnection,
    StreamRefused,
    StreamReset,
)
from tunnel.h2 import connection as core
from tunnel.h2.frames import FLAG_END_HEADERS


def h2_logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("tunnel.h2")]


def attack(p: Pair, frames: list[bytes], batch: int, dt: float) -> int:
    """Feed ``frames`` in batches (one read each), ``dt`` seconds apart; returns how many frames
    were fed before the core gave up (all of them if it never did)."""
    for i in range(0, len(frames), batch):
        p.now += dt
        p.feed(b"".join(frames[i : i + batch]))
        if p.violation is not None:
            return i + batch
    return len(frames)


def rapid_reset_frames(p: Pair, pairs: int) -> list[bytes]:
    """HEADERS + RST_STREAM(CANCEL) pairs, built and sent by the h2 client."""
    out = []
    for _ in range(pairs):
        sid = p.peer.get_next_available_stream_id()
        p.peer.send_headers(sid, CONNECT)
        p.peer.reset_stream(sid, 8)
        out.append(p.peer.data_to_send())
    return out


def test_rapid_reset_10000_pairs_gets_goaway(caplog: pytest.LogCaptureFixture) -> None:
    p = server_pair()
    caplog.set_level(logging.DEBUG, logger="tunnel.h2")
    frames = rapid_reset_frames(p, 10_000)
    fed = attack(p, frames, batch=50, dt=0.001)
    v = p.violation
    assert v is not None and v.error_code == ErrorCode.ENHANCE_YOUR_CALM
    assert v.abuse is not None and v.abuse.reason == "rapid reset"
    # Stopped around the burst (1000 tokens) plus what 33/s refilled meanwhile, not at 10 000.
    assert core.RESET_BURST <= fed <= core.RESET_BURST + 100, fed
    # The h2 client reads a GOAWAY naming ENHANCE_YOUR_CALM; nothing more is accepted.
    events = p.peer.receive_data(p.ours.data_to_send())
    (term,) = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert term.error_code == ErrorCode.ENHANCE_YOUR_CALM
    assert p.ours.closed and p.ours.receive_data(b"".join(frames[fed : fed + 10]), p.now) == []
    # One log line for the connection, whatever the number of streams.
    logs = h2_logs(caplog)
    assert len(logs) == 1 and "rapid reset" in logs[0].getMessage(), [r.getMessage() for r in logs]


def test_resets_at_a_real_clients_pace_are_fine(caplog: pytest.LogCaptureFixture) -> None:
    # 3000 streams cancelled before their answer, 30 per second (under the 33/s refill): an app
    # that keeps aborting connections during connect, not an attack.
    p = server_pair()
    caplog.set_level(logging.DEBUG, logger="tunnel.h2")
    frames = rapid_reset_frames(p, 3000)
    assert attack(p, frames, batch=1, dt=1 / 30) == 3000
    assert p.violation is None and not h2_logs(caplog)
    assert len([e for e in p.ours_events if isinstance(e, StreamReset)]) == 3000


def test_resets_after_the_answer_are_not_rapid_reset() -> None:
    # Tunnels that the client resets after the 200 (a TCP RST from the app) cost us a full
    # CONNECT each: they are bounded by the stream limit and our own work, not counted.
    p = server_pair()
    for _ in range(1500):
        sid = p.peer.get_next_available_stream_id()
        p.peer.send_headers(sid, CONNECT)
        p.pump()
        p.ours.respond(sid, 200)  # type: ignore[attr-defined]
        p.pump()
        p.peer.reset_stream(sid, 8)
        p.pump()
    assert p.violation is None and p.ours.premature_resets == 0


def test_stream_limit_excess_refused_then_goaway(caplog: pytest.LogCaptureFixture) -> None:
    p = server_pair(max_concurrent_streams=10)
    caplog.set_level(logging.DEBUG, logger="tunnel.h2")
    sid = 1
    for _ in range(10):
        p.feed(raw_frame(0x1, FLAG_END_HEADERS, sid, block(CONNECT)))
        sid += 2
    assert len([e for e in p.ours_events if isinstance(e, ConnectRequest)]) == 10
    # Beyond the limit: REFUSED_STREAM, the connection and its 10 tunnels live on...
    for _ in range(core.STREAM_LIMIT_REFUSALS):
        p.feed(raw_frame(0x1, FLAG_END_HEADERS, sid, block(CONNECT)))
        sid += 2
    assert p.violation is None
    frames = parse_frames(p.ours.data_to_send())
    assert {f.error_code for f in frames} == {ErrorCode.REFUSED_STREAM} and len(
        frames
    ) == core.STREAM_LIMIT_REFUSALS
    assert len([e for e in p.ours_events if isinstance(e, StreamRefused)]) == core.STREAM_LIMIT_REFUSALS
    assert not h2_logs(caplog)
    # ...but a peer that keeps doing it after acknowledging the limit gets GOAWAY.
    p.feed(raw_frame(0x1, FLAG_END_HEADERS, sid, block(CONNECT)))
    assert p.violation is not None and p.violation.error_code == ErrorCode.PROTOCOL_ERROR
    assert (
        p.violation.abuse is not None and p.violation.abuse.refused_streams == core.STREAM_LIMIT_REFUSALS + 1
    )
    assert [f.error_code for f in parse_frames(p.ours.data_to_send()) if f.type == 0x7] == [
        ErrorCode.PROTOCOL_ERROR
    ]
    assert len(h2_logs(caplog)) == 1


def test_stream_limit_before_settings_ack_only_refuses() -> None:
    # A client may open streams before it has seen our SETTINGS (RFC 9113 §5.1.2 lets us refuse
    # them): no GOAWAY for that.
    s = ServerConnection(max_concurrent_streams=1)
    s.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + raw_frame(0x4, 0, 0, b""), 0.0)
    wire = b"".join(raw_frame(0x1, FLAG_END_HEADERS, 2 * i + 1, block(CONNECT)) for i in range(300))
    events = s.receive_data(wire, 0.0)
    assert len([e for e in events if isinstance(e, StreamRefused)]) == 299 and not s.closed


@pytest.mark.parametrize(
    ("name", "frame"),
    [
        ("PING", raw_frame(0x6, 0, 0, b"flooding")),
        ("SETTINGS", raw_frame(0x4, 0, 0, b"")),
        ("PRIORITY", raw_frame(0x2, 0, 3, struct.pack(">LB", 0, 16))),
        ("unknown", raw_frame(0x42, 0, 0, b"x")),
        ("SETTINGS ACK unsolicited", raw_frame(0x4, 1, 0, b"")),
    ],
)
def test_control_frame_flood_gets_goaway(name: str, frame: bytes, caplog: pytest.LogCaptureFixture) -> None:
    p = server_pair()
    caplog.set_level(logging.DEBUG, logger="tunnel.h2")
    fed = attack(p, [frame] * 5000, batch=100, dt=0.001)
    assert p.violation is not None and p.violation.error_code == ErrorCode.ENHANCE_YOUR_CALM, name
    assert fed <= core.IDLE_FRAME_BURST + 100
    assert [f.error_code for f in parse_frames(p.ours.data_to_send()) if f.type == 0x7] == [
        ErrorCode.ENHANCE_YOUR_CALM
    ]
    assert len(h2_logs(caplog)) == 1


def test_keepalive_pings_are_fine() -> None:
    # A PING every 10 s for a day (ztunnel's keepalive), and one every 0.2 s for a while.
    p = server_pair()
    for _ in range(8640):
        p.now += 10
        p.feed(raw_frame(0x6, 0, 0, b"keepaliv"))
        p.ours.data_to_send()
    for _ in range(3000):
        p.now += 0.2
        p.feed(raw_frame(0x6, 0, 0, b"fastping"))
        p.ours.data_to_send()
    assert p.violation is None


def test_peer_that_does_not_read_our_acks() -> None:
    # Paced PINGs (the rate limit never trips) but the shell cannot drain our output: the queue of
    # PING ACKs is bounded.
    p = server_pair()
    for _ in range(core.MAX_OUTBOUND_CONTROL_FRAMES + 10):
        p.now += 1.0
        p.feed(raw_frame(0x6, 0, 0, b"noreader"))
        if p.violation:
            break
    assert p.violation is not None and p.violation.abuse is not None
    assert p.violation.abuse.reason == "outbound control frame flood"


def test_empty_data_frames_flood() -> None:
    p = server_pair()
    p.feed(raw_frame(0x1, FLAG_END_HEADERS, 1, block(CONNECT)))
    p.ours.respond(1, 200)  # type: ignore[attr-defined]
    empties = [raw_frame(0x0, 0, 1, b"")] * (core.MAX_CONSECUTIVE_EMPTY_FRAMES + 1)
    p.feed(b"".join(empties[:-1]) + raw_frame(0x0, 0, 1, b"data"))  # 10 empties, then data: fine
    assert p.violation is None
    p.feed(b"".join(empties))
    assert p.violation is not None and p.violation.error_code == ErrorCode.ENHANCE_YOUR_CALM


def test_window_update_flood() -> None:
    p = server_pair()
    p.feed(b"".join(raw_frame(0x8, 0, 0, struct.pack(">L", 1)) for _ in range(core.WINDOW_UPDATE_BASE)))
    assert p.violation is None
    p.feed(raw_frame(0x8, 0, 0, struct.pack(">L", 1)) * 5)
    assert p.violation is not None and p.violation.abuse is not None
    assert p.violation.abuse.reason == "WINDOW_UPDATE flood"


def test_made_you_reset_counts_too() -> None:
    # Streams the peer forces us to reset (here: WINDOW_UPDATE of 0, a stream error) draw on the
    # same budget as its own resets ("MadeYouReset", 2025).
    p = server_pair()
    wire = []
    for i in range(core.RESET_BURST + 5):
        sid = 2 * i + 1
        wire.append(
            raw_frame(0x1, FLAG_END_HEADERS, sid, block(CONNECT)) + raw_frame(0x8, 0, sid, b"\0\0\0\0")
        )
    attack(p, wire, batch=10, dt=0.0)
    assert isinstance(p.violation, ProtocolViolation) and p.violation.abuse is not None
    assert p.violation.abuse.reason == "rapid reset"
