"""Regression: a connection-level WINDOW_UPDATE and a RST_STREAM arriving in one read.

The shell (tunnel.relay) handles a read's events only after the core consumed all its frames, so
the WindowOpened(0) event reaches a stream whose reset h2 has already processed. Offering that
stream's held bytes must take nothing, not raise (which killed the shared TLS connection and
every tunnel on it under connection churn in the benchmark)."""

from __future__ import annotations

from tunnel import hbone
from tunnel.hbone import Authority, ClientConnection, ServerConnection, Status

from .test_hbone_core import of, pump


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
    ev_s = s.receive_data(c.data_to_send())
    consumed = sum(d.flow_controlled_length for d in of(ev_s, hbone.Data))
    # The server returns the credit (stream and connection), then resets the stream: one read
    # for the client.
    assert s.acknowledge(sid, consumed)
    s.reset_stream(sid, hbone.ErrorCode.CANCEL)
    events = c.receive_data(s.data_to_send())
    kinds = [type(e) for e in events]
    assert hbone.WindowOpened in kinds and hbone.StreamReset in kinds
    assert kinds.index(hbone.WindowOpened) < kinds.index(hbone.StreamReset)
    # What the shell does for WindowOpened, with the reset already applied inside h2: the window
    # h2 reports is open, yet the stream is closed.
    assert c._h2.local_flow_control_window(sid) > 0
    assert c.send_data(sid, b"held bytes") == 0
    assert c.data_to_send() == b""  # no DATA frame on a closed stream
    # the connection is still usable
    sid2 = c.open_stream(Authority.parse("10.0.0.9:81"))
    _, ev = pump(c, s)
    assert of(ev, hbone.ConnectRequest)[0].stream_id == sid2
