"""Regression: a connection-level WINDOW_UPDATE and a RST_STREAM arriving in one read.

The shell (tunnel.relay) handles a read's events only after the core consumed all its frames, so
the WindowOpened(0) event reaches a stream whose reset the core has already processed. Offering that
stream's held bytes must take nothing, not raise (which killed the shared TLS connection and
every tunnel on it under connection churn in the benchmark)."""

from __future__ import annotations

from tunnel import hbone
from tunnel.hbone import Authority, ClientConnection, ServerConnection, Status

from .test_hbone_core import NOW, of, pump


def test_window_update_then_reset_in_one_read_does_not_raise() -> None:
    c, s = ClientConnection(), ServerConnection()
    pump(c, s)
    sid = c.open_stream(Authority.parse("10.0.0.9:80"))
    pump(c, s)
    s.respond(sid, Status.OK)
    pump(c, s)
    # The client fills the stream window, so it holds bytes waiting for credit.
    window = c.send_window(sid)
    assert c.send_data(sid, b"x" * (window + 1000)) == window
    ev_s = s.receive_data(c.data_to_send(), NOW)
    consumed = sum(d.flow_controlled_length for d in of(ev_s, hbone.Data))
    # The server returns the credit (stream and connection), then resets the stream: one read
    # for the client.
    assert s.acknowledge(sid, consumed)
    s.reset_stream(sid, hbone.ErrorCode.CANCEL)
    events = c.receive_data(s.data_to_send(), NOW)
    kinds = [type(e) for e in events]
    assert hbone.WindowOpened in kinds and hbone.StreamReset in kinds
    assert kinds.index(hbone.WindowOpened) < kinds.index(hbone.StreamReset)
    # What the shell does for WindowOpened, with the reset already applied in the core: the
    # connection window is open, yet the stream is closed.
    assert c.send_windows()[0] > 0 and not c.stream_is_open(sid)
    assert c.send_data(sid, b"held bytes") == 0
    assert c.data_to_send() == b""  # no DATA frame on a closed stream
    # the connection is still usable
    sid2 = c.open_stream(Authority.parse("10.0.0.9:81"))
    _, ev = pump(c, s)
    assert of(ev, hbone.ConnectRequest)[0].stream_id == sid2


def _open(c: ClientConnection, s: ServerConnection) -> int:
    sid = c.open_stream(Authority.parse("10.0.0.9:80"))
    pump(c, s)
    s.respond(sid, Status.OK)
    pump(c, s)
    return sid


def test_data_frame_is_delivered_as_it_arrives() -> None:
    """A DATA frame split over reads yields its bytes read by read (streamed, not buffered
    whole); END_STREAM comes with the last part only."""
    c, s = ClientConnection(), ServerConnection()
    pump(c, s)
    sid = _open(c, s)
    blob = bytes(range(256)) * 1024  # 256 KiB: one frame
    assert c.send_data(sid, blob) == len(blob)
    c.end_stream(sid)
    wire = c.data_to_send()
    parts = [wire[:5], wire[5:100], wire[100:70000], wire[70000:]]  # header split, then payload
    seen: list[list[hbone.Event]] = [s.receive_data(p, NOW) for p in parts]
    assert of(seen[0], hbone.Data) == []
    assert b"".join(d.data for d in of(seen[1], hbone.Data)) == blob[: 100 - 9]
    assert b"".join(d.data for d in of(seen[2], hbone.Data)) == blob[100 - 9 : 70000 - 9]
    got = b"".join(bytes(d.data) for ev in seen for d in of(ev, hbone.Data))
    assert got == blob
    assert [bool(of(ev, hbone.StreamEnded)) for ev in seen] == [False, False, False, True]
    assert sum(d.flow_controlled_length for ev in seen for d in of(ev, hbone.Data)) == len(blob)


def test_reset_mid_frame_returns_the_connection_window() -> None:
    c, s = ClientConnection(), ServerConnection()
    pump(c, s)
    sid = _open(c, s)
    blob = b"z" * (512 * 1024)
    assert c.send_data(sid, blob) == len(blob)
    wire = c.data_to_send()
    first = of(s.receive_data(wire[:1000], NOW), hbone.Data)  # the frame has started
    assert sum(len(d.data) for d in first) == 1000 - 9
    s.reset_stream(sid, hbone.ErrorCode.CANCEL)
    for d in first:  # what was delivered is acknowledged by its reader, as the relay does
        s.acknowledge(sid, d.flow_controlled_length)
    assert of(s.receive_data(wire[1000:], NOW), hbone.Data) == []  # rest dropped, no error
    # Every byte the client sent is credited back on the connection (a 1/16-window step at a
    # time): send one more step's worth, consume it, and the update covers the dropped bytes too.
    window_before = c.send_windows()[0]
    sid2 = _open(c, s)
    more = b"y" * hbone.CONNECTION_ACK_STEP
    sent = c.send_data(sid2, more)
    ev = s.receive_data(c.data_to_send(), NOW)
    for d in of(ev, hbone.Data):
        s.acknowledge(sid2, d.flow_controlled_length)
    c.receive_data(s.data_to_send(), NOW)
    # the dropped 512 KiB were credited together with the new bytes
    assert sent == len(more)
    assert c.send_windows()[0] == window_before + len(blob)
