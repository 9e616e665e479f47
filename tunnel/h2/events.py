"""Typed events out of the HTTP/2 core, and the errors that carry their wire code.

Same names and fields as ``tunnel.hbone``'s events so the shell's dispatch carries over.
Events are plain slotted dataclasses, not frozen ones: a frozen dataclass's ``__init__`` goes
through ``object.__setattr__`` per field, which tripled the cost of the several events of every
exchange. Treat them as read-only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tunnel.hbone import Authority, Status


@dataclass(slots=True)
class Event:
    pass


@dataclass(slots=True)
class ConnectRequest(Event):
    """Server: a valid HBONE CONNECT arrived; answer with ``ServerConnection.respond``."""

    stream_id: int
    authority: Authority
    headers: Mapping[str, str]


@dataclass(slots=True)
class RequestRejected(Event):
    """Server: a malformed or non-HBONE request; the core already answered ``status``."""

    stream_id: int
    status: Status
    reason: str


@dataclass(slots=True)
class StreamRefused(Event):
    """Server: a stream over the concurrency limit or after our GOAWAY got REFUSED_STREAM."""

    stream_id: int
    reason: str


@dataclass(slots=True)
class ConnectResponse(Event):
    """Client: the server's final answer. Anything but 200 ended the stream (no tunnel)."""

    stream_id: int
    status: int
    headers: Mapping[str, str]

    @property
    def ok(self) -> bool:
        return self.status == Status.OK


@dataclass(slots=True)
class Data(Event):
    """Tunnel bytes (a zero-copy slice of what was read). Call
    ``acknowledge(stream_id, flow_controlled_length)`` once consumed: that reopens the window."""

    stream_id: int
    data: bytes | memoryview
    flow_controlled_length: int


@dataclass(slots=True)
class StreamEnded(Event):
    """The peer half-closed its direction (END_STREAM): a TCP FIN."""

    stream_id: int


@dataclass(slots=True)
class StreamReset(Event):
    """The stream was aborted (RST_STREAM sent by the peer, or by us on a stream error): a TCP RST."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(slots=True)
class WindowOpened(Event):
    """A send window grew; ``stream_id`` 0 means the connection (every stream may send)."""

    stream_id: int


@dataclass(slots=True)
class PingAcknowledged(Event):
    data: bytes


@dataclass(slots=True)
class SettingsAcknowledged(Event):
    """The peer applied the SETTINGS we sent."""


@dataclass(slots=True)
class ConnectionTerminated(Event):
    """GOAWAY received: streams above ``last_stream_id`` were not processed (the core already
    reported them as StreamReset REFUSED_STREAM); open no new streams."""

    error_code: int
    last_stream_id: int
    additional_data: bytes | None


@dataclass(slots=True)
class SettingsChanged(Event):
    """The peer's SETTINGS arrived and were applied (and ACKed)."""

    max_concurrent_streams: int
    max_frame_size: int = 16_384
    initial_window_size: int = 65_535


@dataclass(frozen=True)
class AbuseReport:
    """Per-connection counts behind an abuse decision: logged once, not once per stream."""

    reason: str
    streams_opened: int
    premature_resets: int
    refused_streams: int
    idle_frames: int
    window_updates: int
    queued_control_frames: int


class ProtocolViolation(Exception):
    """The peer broke HTTP/2 (or abused it): the core queued GOAWAY(``error_code``). Send what
    ``data_to_send`` returns, then close. ``events`` are those the same input caused before the
    violation; ``abuse`` is set when the cause was a flood rather than a malformed frame."""

    def __init__(
        self,
        message: str,
        error_code: int,
        events: list[Event] | None = None,
        abuse: AbuseReport | None = None,
    ) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.events: list[Event] = events if events is not None else []
        self.abuse = abuse
