"""tunnel/hbone.py: the sans-IO HBONE cores' ``receive_data`` on mutated HTTP/2 frames.

Byte 0 picks the side (even: the server core after a valid client preface and SETTINGS; odd: the
client core after it opened stream 1), byte 1 the read size the rest is cut into (0: one read), so
frames split across reads (the core's own DATA fast path) are exercised. The core is driven as the
asyncio shell drives it: a CONNECT is answered (200, 401 or 503 by stream id), DATA acknowledged
and echoed, END_STREAM answered with END_STREAM, and the output taken after every read.

The only documented failure is :class:`ProtocolViolation` (the peer broke HTTP/2; a GOAWAY is
queued and the shell closes): after it the connection is dropped, as the shell does. Anything else
escaping is a bug, and so is an event that breaks the core's own accounting (DATA for a stream
that is not open, a flow-controlled length shorter than the data).
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors

from tunnel import hbone
from tunnel.hbone import Authority, ClientConnection, ProtocolViolation, ServerConnection, Status

MAX_LEN = 4096  # room for dozens of frames; longer inputs mostly cost time on a shared 2-core box
_DEST = Authority.parse("10.0.0.2:8080")
_HEADERS = {"forwarded": 'for="10.0.0.1:40000"', "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}


def _raw_client() -> h2.connection.H2Connection:
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    raw.initiate_connection()
    return raw


# What every server-side input follows: a real client's preface and SETTINGS.
CLIENT_PREFACE = _raw_client().data_to_send()


def _connect(raw: h2.connection.H2Connection, sid: int, authority: bytes = b"10.0.0.2:8080") -> None:
    headers = [(b":method", b"CONNECT"), (b":authority", authority), (b"forwarded", b'for="1.2.3.4:5"')]
    raw.send_headers(sid, headers)


def _server_seeds() -> list[bytes]:
    out = []
    raw = _raw_client()
    raw.data_to_send()
    _connect(raw, 1)
    raw.send_data(1, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    raw.end_stream(1)
    out.append(raw.data_to_send())
    raw = _raw_client()
    raw.data_to_send()
    _connect(raw, 1)
    _connect(raw, 3, b"[fd00::1]:80")
    raw.send_data(3, b"x" * 3000, pad_length=10)
    raw.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
    raw.ping(b"12345678")
    raw.increment_flow_control_window(1000)
    raw.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
    out.append(raw.data_to_send())
    raw = _raw_client()
    raw.data_to_send()
    get = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"x")]
    raw.send_headers(1, get)
    _connect(raw, 3, b"svc.ns:80")
    _connect(raw, 5, b"10.0.0.2")
    raw.close_connection()
    out.append(raw.data_to_send())
    raw = _raw_client()
    raw.data_to_send()
    for sid in range(1, 40, 2):
        _connect(raw, sid)
        raw.send_data(sid, b"y" * 100, end_stream=True)
    out.append(raw.data_to_send())
    return out


def _new_client() -> ClientConnection:
    c = ClientConnection()
    c.open_stream(_DEST, _HEADERS)
    c.data_to_send()
    return c


def _client_seeds() -> list[bytes]:
    out = []
    for status, body in ((200, b"HTTP/1.1 200 OK\r\n\r\nhello"), (401, b""), (503, b"")):
        c, s = ClientConnection(), ServerConnection()
        c.open_stream(_DEST, _HEADERS)
        s.receive_data(c.data_to_send(), 0.0)
        s.respond(1, status)
        if body:
            s.send_data(1, body)
            s.end_stream(1)
        s.ping(b"pingpong")
        out.append(s.data_to_send())
    c, s = ClientConnection(), ServerConnection()
    c.open_stream(_DEST, _HEADERS)
    s.receive_data(c.data_to_send(), 0.0)
    s.respond(1, 200)
    s.reset_stream(1)
    s.goaway()
    out.append(s.data_to_send())
    return out


SEEDS = [b"\x00\x00" + s for s in _server_seeds()] + [
    b"\x00\x07" + _server_seeds()[1],
    *(b"\x01\x00" + s for s in _client_seeds()),
    b"\x01\x05" + _client_seeds()[0],
]


def _drive(conn: hbone.HboneConnection, events: list[hbone.Event], known: set[int]) -> None:
    """One batch of events, handled in order as the shell does (so a stream answered 401 early in
    a batch may still have DATA later in it: acknowledged, like the shell does for a gone stream)."""
    for ev in events:
        if isinstance(ev, hbone.Data):
            if ev.stream_id not in known:
                raise AssertionError(f"DATA event for stream {ev.stream_id}, which was never accepted")
            if ev.flow_controlled_length < len(ev.data):
                raise AssertionError(f"flow-controlled length {ev.flow_controlled_length} < {len(ev.data)}")
            conn.acknowledge(ev.stream_id, ev.flow_controlled_length)
            if conn.stream_is_open(ev.stream_id):
                conn.send_data(ev.stream_id, bytes(ev.data[:64]))
        elif isinstance(ev, hbone.ConnectRequest) and isinstance(conn, ServerConnection):
            known.add(ev.stream_id)
            status = (Status.OK, Status.UNAUTHORIZED, Status.SERVICE_UNAVAILABLE)[(ev.stream_id // 2) % 3]
            conn.respond(ev.stream_id, status)
            if status == Status.OK:
                conn.send_data(ev.stream_id, b"HTTP/1.1 200 OK\r\n\r\n")
        elif isinstance(ev, hbone.RequestRejected):
            if ev.status not in tuple(Status):
                raise AssertionError(f"rejected with status {ev.status}")
        elif isinstance(ev, hbone.StreamEnded):
            if ev.stream_id not in known:
                raise AssertionError(f"END_STREAM event for stream {ev.stream_id}, never accepted")
            conn.end_stream(ev.stream_id)
        elif isinstance(ev, hbone.WindowOpened) and ev.stream_id and conn.stream_is_open(ev.stream_id):
            conn.send_data(ev.stream_id, b"more")
        elif isinstance(ev, hbone.ConnectResponse) and ev.ok and conn.stream_is_open(ev.stream_id):
            conn.send_data(ev.stream_id, b"GET / HTTP/1.1\r\n\r\n")
    conn.data_to_send_segments()


def fuzz_one(data: bytes) -> None:
    if len(data) < 2:
        return
    server_side, step, body = data[0] % 2 == 0, data[1], data[2:]
    conn: hbone.HboneConnection
    known: set[int] = set()
    if server_side:
        conn = ServerConnection()
        conn.data_to_send()
        _drive(conn, conn.receive_data(CLIENT_PREFACE, 0.0), known)
    else:
        conn = _new_client()
        known.add(1)
    step = step or len(body) or 1
    try:
        for i in range(0, len(body), step):
            _drive(conn, conn.receive_data(body[i : i + step], 0.0), known)
        if isinstance(conn, ClientConnection):
            conn.can_open_stream()
        conn.goaway()
        conn.data_to_send()
    except ProtocolViolation:
        conn.data_to_send()  # the GOAWAY the shell sends before closing
