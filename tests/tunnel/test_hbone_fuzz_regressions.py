"""Findings of fuzz/targets/hbone_frames.py in the sans-IO client core: a server's bytes must
produce events or a ProtocolViolation, never another exception. In memory, real cores (and a raw
h2 server for a malformed answer). Two more findings were in the h2-library core that
tunnel/h2 replaced (calls after an error GOAWAY in the same read raised h2's ProtocolError);
the new core accepts them, as RFC 9113 §6.8 lets a stream below the last-stream-id finish, and
the shell closes the connection on the GOAWAY."""

from __future__ import annotations

import h2.config
import h2.connection

from tunnel import hbone
from tunnel.hbone import Authority, ClientConnection, ServerConnection, Status

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
    events = c.receive_data(raw.data_to_send(), 0.0)  # must not raise
    ok = [e for e in events if isinstance(e, hbone.ConnectResponse) and e.ok]
    assert not ok  # never a tunnel behind a malformed answer
    assert any(isinstance(e, (hbone.ConnectResponse, hbone.StreamReset)) for e in events), events
    assert not c.stream_is_open(sid)


def test_a_connect_authority_port_of_non_ascii_digits_is_a_400_not_a_value_error() -> None:
    # fuzz/targets/h2_frames.py: ':authority: 10.0.0.2:8³' passed str.isdigit() and int() raised
    # out of receive_data. It is a malformed request (400), the connection lives.
    s = ServerConnection()
    raw = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False)
    )
    raw.initiate_connection()
    raw.send_headers(1, [(b":method", b"CONNECT"), (b":authority", "10.0.0.2:8³".encode())])
    events = s.receive_data(raw.data_to_send(), 0.0)  # must not raise
    assert not [e for e in events if isinstance(e, hbone.ConnectRequest)]
    (rej,) = [e for e in events if isinstance(e, hbone.RequestRejected)]
    assert rej.status == Status.BAD_REQUEST


def test_authority_parse_refuses_non_ascii_digits() -> None:
    import pytest

    for text in ("10.0.0.2:8³", "10.0.0.2:٨٠", "[fd00::1]:¹"):
        with pytest.raises(hbone.HboneError):
            Authority.parse(text)
