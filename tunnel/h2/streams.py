"""The HTTP/2 stream state machine as an explicit table (RFC 9113 §5.1, Figure 2).

Each stream is in one :class:`StreamState`; every frame sent or received on it is one
:class:`StreamInput`. :data:`TRANSITIONS` lists every legal (state, input) pair and the state it
leads to; a pair missing from it is illegal. For inputs that come from the peer, :data:`RECV_ERRORS`
says which error the RFC prescribes and whether it ends the stream or the whole connection.
Sending an illegal input is a bug in the caller (:class:`StreamStateError`).

The reserved states exist only with server push, which HBONE disables (SETTINGS_ENABLE_PUSH=0 and
PUSH_PROMISE is a connection error), so they have no transitions. "Closed" streams are forgotten
by the connection after a while (it keeps a bounded record of how recent ones closed).
"""

from __future__ import annotations

from enum import IntEnum

from tunnel.h2.frames import ErrorCode


class StreamState(IntEnum):
    IDLE = 0
    RESERVED_LOCAL = 1  # push only: unused
    RESERVED_REMOTE = 2  # push only: unused
    OPEN = 3
    HALF_CLOSED_LOCAL = 4
    HALF_CLOSED_REMOTE = 5
    CLOSED = 6


class StreamInput(IntEnum):
    SEND_HEADERS = 0
    SEND_HEADERS_END = 1  # HEADERS with END_STREAM
    RECV_HEADERS = 2
    RECV_HEADERS_END = 3
    SEND_DATA = 4
    SEND_END_STREAM = 5  # DATA with END_STREAM (possibly empty)
    RECV_DATA = 6
    RECV_END_STREAM = 7
    SEND_RST = 8
    RECV_RST = 9
    SEND_WINDOW_UPDATE = 10
    RECV_WINDOW_UPDATE = 11


S, In = StreamState, StreamInput

TRANSITIONS: dict[tuple[int, int], StreamState] = {
    # idle: HEADERS opens (or half-closes at once); RST on idle is not allowed either way.
    (S.IDLE, In.SEND_HEADERS): S.OPEN,
    (S.IDLE, In.SEND_HEADERS_END): S.HALF_CLOSED_LOCAL,
    (S.IDLE, In.RECV_HEADERS): S.OPEN,
    (S.IDLE, In.RECV_HEADERS_END): S.HALF_CLOSED_REMOTE,
    # open: anything; END_STREAM half-closes the direction it travels in.
    (S.OPEN, In.SEND_HEADERS): S.OPEN,
    (S.OPEN, In.SEND_HEADERS_END): S.HALF_CLOSED_LOCAL,
    (S.OPEN, In.RECV_HEADERS): S.OPEN,
    (S.OPEN, In.RECV_HEADERS_END): S.HALF_CLOSED_REMOTE,
    (S.OPEN, In.SEND_DATA): S.OPEN,
    (S.OPEN, In.SEND_END_STREAM): S.HALF_CLOSED_LOCAL,
    (S.OPEN, In.RECV_DATA): S.OPEN,
    (S.OPEN, In.RECV_END_STREAM): S.HALF_CLOSED_REMOTE,
    (S.OPEN, In.SEND_RST): S.CLOSED,
    (S.OPEN, In.RECV_RST): S.CLOSED,
    (S.OPEN, In.SEND_WINDOW_UPDATE): S.OPEN,
    (S.OPEN, In.RECV_WINDOW_UPDATE): S.OPEN,
    # half-closed (local): we may not send DATA/HEADERS; the peer may.
    (S.HALF_CLOSED_LOCAL, In.RECV_HEADERS): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, In.RECV_HEADERS_END): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, In.RECV_DATA): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, In.RECV_END_STREAM): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, In.SEND_RST): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, In.RECV_RST): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, In.SEND_WINDOW_UPDATE): S.HALF_CLOSED_LOCAL,
    (S.HALF_CLOSED_LOCAL, In.RECV_WINDOW_UPDATE): S.HALF_CLOSED_LOCAL,
    # half-closed (remote): the mirror image.
    (S.HALF_CLOSED_REMOTE, In.SEND_HEADERS): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, In.SEND_HEADERS_END): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, In.SEND_DATA): S.HALF_CLOSED_REMOTE,
    (S.HALF_CLOSED_REMOTE, In.SEND_END_STREAM): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, In.SEND_RST): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, In.RECV_RST): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, In.RECV_WINDOW_UPDATE): S.HALF_CLOSED_REMOTE,
    # closed: WINDOW_UPDATE / RST_STREAM may still arrive briefly after our END_STREAM (§5.1).
    (S.CLOSED, In.RECV_WINDOW_UPDATE): S.CLOSED,
    (S.CLOSED, In.RECV_RST): S.CLOSED,
}

CONNECTION, STREAM = "connection", "stream"

# What receiving an illegal input costs (RFC 9113 §5.1): (error code, scope).
RECV_ERRORS: dict[tuple[int, int], tuple[ErrorCode, str]] = {}
for _inp in (In.RECV_DATA, In.RECV_END_STREAM, In.RECV_RST, In.RECV_WINDOW_UPDATE):
    # idle: "Receiving any frame other than HEADERS or PRIORITY ... is a connection error PROTOCOL_ERROR"
    RECV_ERRORS[(S.IDLE, _inp)] = (ErrorCode.PROTOCOL_ERROR, CONNECTION)
for _inp in (In.RECV_DATA, In.RECV_END_STREAM, In.RECV_HEADERS, In.RECV_HEADERS_END):
    # half-closed (remote): "frames other than WINDOW_UPDATE, PRIORITY, or RST_STREAM ... stream
    # error of type STREAM_CLOSED"; closed after END_STREAM: connection error STREAM_CLOSED.
    RECV_ERRORS[(S.HALF_CLOSED_REMOTE, _inp)] = (ErrorCode.STREAM_CLOSED, STREAM)
    RECV_ERRORS[(S.CLOSED, _inp)] = (ErrorCode.STREAM_CLOSED, CONNECTION)

SENDABLE_DATA = frozenset(s for (s, i) in TRANSITIONS if i == In.SEND_DATA)
RECEIVABLE_DATA = frozenset(s for (s, i) in TRANSITIONS if i == In.RECV_DATA)
LIVE = frozenset({S.OPEN, S.HALF_CLOSED_LOCAL, S.HALF_CLOSED_REMOTE})


class StreamStateError(Exception):
    """An input the table does not allow. ``error_code``/``scope`` say what the RFC prescribes
    when the input came from the peer; for a local input it is a caller bug."""

    def __init__(self, state: StreamState, inp: StreamInput, error_code: ErrorCode, scope: str) -> None:
        super().__init__(f"{inp.name} is not allowed on a stream in state {state.name}")
        self.state, self.input, self.error_code, self.scope = state, inp, error_code, scope


def transition(state: int, inp: int) -> StreamState:
    """The state after ``inp``; :class:`StreamStateError` when the table does not allow it."""
    nxt = TRANSITIONS.get((state, inp))
    if nxt is None:
        code, scope = RECV_ERRORS.get((state, inp), (ErrorCode.PROTOCOL_ERROR, CONNECTION))
        raise StreamStateError(StreamState(state), StreamInput(inp), code, scope)
    return nxt
