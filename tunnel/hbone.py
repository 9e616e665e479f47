"""HBONE's public names, where the rest of the code has always found them.

HBONE (DESIGN.md §4) is one HTTP/2 ``CONNECT`` stream per proxied TCP connection, with
``:authority`` = the original destination ``ip:port`` and neither ``:scheme`` nor ``:path``
(RFC 9113 §8.5); the server answers 200 after the upstream connect, 400 malformed/not local,
401 denied, 503 upstream unreachable. The pieces live below this module:

- :mod:`tunnel.authority`: ``Authority``, ``parse_ip``, ``Status``, ``HboneError``, the
  ``forwarded`` header and ztunnel's HTTP/2 settings (pure, imported by the core);
- :mod:`tunnel.h2`: the sans-IO HTTP/2 core (``ClientConnection``/``ServerConnection``, typed
  events, ``ErrorCode``, ``ProtocolViolation``) that the shell (``tunnel.relay``) drives.

The h2-library-based connection core that used to live here is gone: ``tunnel.h2`` replaced it
on the data path (48 µs against 205 µs of CPU per CONNECT exchange for both ends,
``bench/h2core_bench.py``) and its tests moved to the new core. What stays is
:class:`GracefulGoawayH2Connection`, a small fix to the ``h2`` library's GOAWAY handling that
the CA's gRPC client (``credentials.grpc_unary``) and the conformance tests' ``h2`` peer use.
"""

from __future__ import annotations

from typing import Any

import h2.connection
import h2.errors
import h2.events
import hyperframe.frame

from tunnel.authority import (
    CLIENT_MAX_STREAMS_PER_CONNECTION,
    CONNECTION_ACK_STEP,
    CONNECTION_WINDOW,
    MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE,
    SERVER_MAX_CONCURRENT_STREAMS,
    STREAM_ACK_STEP,
    STREAM_WINDOW,
    Authority,
    HboneError,
    IpAddress,
    Status,
    format_forwarded,
    parse_forwarded_for,
    parse_ip,
)
from tunnel.h2 import (
    ClientConnection,
    ConnectionTerminated,
    ConnectRequest,
    ConnectResponse,
    Data,
    ErrorCode,
    Event,
    H2Connection,
    PingAcknowledged,
    ProtocolViolation,
    RequestRejected,
    ServerConnection,
    SettingsAcknowledged,
    SettingsChanged,
    StreamEnded,
    StreamRefused,
    StreamReset,
    WindowOpened,
)

__all__ = [
    "CLIENT_MAX_STREAMS_PER_CONNECTION",
    "CONNECTION_ACK_STEP",
    "CONNECTION_WINDOW",
    "MAX_FRAME_SIZE",
    "MAX_HEADER_LIST_SIZE",
    "SERVER_MAX_CONCURRENT_STREAMS",
    "STREAM_ACK_STEP",
    "STREAM_WINDOW",
    "Authority",
    "ClientConnection",
    "ConnectRequest",
    "ConnectResponse",
    "ConnectionTerminated",
    "Data",
    "ErrorCode",
    "Event",
    "GracefulGoawayH2Connection",
    "H2Connection",
    "HboneError",
    "IpAddress",
    "PingAcknowledged",
    "ProtocolViolation",
    "RequestRejected",
    "ServerConnection",
    "SettingsAcknowledged",
    "SettingsChanged",
    "Status",
    "StreamEnded",
    "StreamRefused",
    "StreamReset",
    "WindowOpened",
    "format_forwarded",
    "parse_forwarded_for",
    "parse_ip",
]


class GracefulGoawayH2Connection(h2.connection.H2Connection):
    """``h2`` moves the whole connection to CLOSED on any GOAWAY, sent or received, after which
    not even DATA on streams the GOAWAY let through may be sent or received. RFC 9113 §6.8 says
    those streams finish normally; that is what makes a graceful drain possible. So a GOAWAY
    with NO_ERROR is sent/received here without the state change; error GOAWAYs keep h2's
    behaviour. (Used by the agent's gRPC client: a CA shutting down gracefully.)"""

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
