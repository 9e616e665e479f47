"""Sans-IO HTTP/2 core for HBONE (RFC 9113 subset): see :mod:`tunnel.h2.connection`."""

from tunnel.h2.connection import ClientConnection, H2Connection, ServerConnection
from tunnel.h2.events import (
    AbuseReport,
    ConnectionTerminated,
    ConnectRequest,
    ConnectResponse,
    Data,
    Event,
    PingAcknowledged,
    ProtocolViolation,
    RequestRejected,
    SettingsAcknowledged,
    SettingsChanged,
    StreamEnded,
    StreamRefused,
    StreamReset,
    WindowOpened,
)
from tunnel.h2.frames import ErrorCode
from tunnel.h2.streams import StreamState

__all__ = [
    "AbuseReport",
    "ClientConnection",
    "ConnectRequest",
    "ConnectResponse",
    "ConnectionTerminated",
    "Data",
    "ErrorCode",
    "Event",
    "H2Connection",
    "PingAcknowledged",
    "ProtocolViolation",
    "RequestRejected",
    "ServerConnection",
    "SettingsAcknowledged",
    "SettingsChanged",
    "StreamEnded",
    "StreamRefused",
    "StreamReset",
    "StreamState",
    "WindowOpened",
]
