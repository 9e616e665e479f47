"""Findings of fuzz/targets/hbone_frames.py in the sans-IO client core: a server's bytes must
produce events or a ProtocolViolation, and the calls the shell makes while handling one read's
events must not raise. In memory, real cores (and a raw h2 server for a malformed answer)."""

from __future__ import annotations

import h2.config
import h2.connection

from tunnel import hbone
from tunnel.hbone import Authority, ClientConnection, ErrorCode, ServerConnection, Status

DEST = Authority.parse("10.0.0.2:8080")


def test_a_status_of_non_ascii_digits_is_a_failed_connect_not_a_value_error() -> None:
    # '¹¹¹' (latin-1 0xB9): str.isdigit() is true, int() raises; it escaped receive_data.
    c = ClientConnection()
    sid = c.open_stream(DEST)
    raw = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None, validate_outbound_headers=False)
    )
    raw.initiate_connection()
    raw.receive_data(c.data_to_send())
    raw.send_headers(sid, [(b":status", "¹¹¹".encode("latin-1"))])
    events = c.receive_data(raw.data_to_send())
    (resp,) = [e for e in events if isinstance(e, hbone.ConnectResponse)]
    assert resp.status == 0 and not resp.ok
    assert not c.stream_is_open(sid)  # no tunnel behind a non-2xx answer


def test_send_data_after_an_error_goaway_in_the_same_read_takes_nothing() -> None:
    # One read carries the 200 and then an error GOAWAY. The shell handles the 200 first and may
    # send the pod's pending bytes: h2 has already closed the connection, and send_data raised
    # h2's ProtocolError ("SEND_DATA in state CLOSED") out of the shell.
    c, s = ClientConnection(), ServerConnection()
    sid = c.open_stream(DEST)
    s.receive_data(c.data_to_send())
    s.respond(sid, Status.OK)
    s.goaway(ErrorCode.PROTOCOL_ERROR)
    events = c.receive_data(s.data_to_send())
    assert [type(e) for e in events if isinstance(e, hbone.ConnectResponse | hbone.ConnectionTerminated)] == [
        hbone.ConnectResponse,
        hbone.ConnectionTerminated,
    ]
    assert c.send_data(sid, b"pending bytes from the pod") == 0
    c.data_to_send()


def test_respond_after_an_error_goaway_in_the_same_read_is_dropped_not_raised() -> None:
    # The server side of the same case: one read carries a CONNECT and then the client's error
    # GOAWAY; the shell answers the CONNECT and h2 raised ProtocolError (SEND_HEADERS in CLOSED).
    c, s = ClientConnection(), ServerConnection()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    sid = c.open_stream(DEST)
    c.goaway(ErrorCode.PROTOCOL_ERROR)
    events = s.receive_data(c.data_to_send())
    (req,) = [e for e in events if isinstance(e, hbone.ConnectRequest)]
    assert any(isinstance(e, hbone.ConnectionTerminated) for e in events)
    s.respond(req.stream_id, Status.OK)
    assert not s.stream_is_open(sid)
    s.data_to_send()
