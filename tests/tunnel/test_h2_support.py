"""Test helpers: our HTTP/2 core wired in memory to the ``h2`` library as an independent peer.

Frames the h2 peer would never send (protocol violations) are built with ``hyperframe`` or by
hand and injected as raw bytes; our output is read back either by h2 (legal exchanges) or by
``hyperframe`` (to see exactly which frames and error codes we wrote).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import hpack
import hyperframe.frame as hf

from tunnel.h2 import ClientConnection, Event, H2Connection, ProtocolViolation, ServerConnection
from tunnel.hbone import GracefulGoawayH2Connection


def h2_peer(client_side: bool, settings: dict[int, int] | None = None) -> h2.connection.H2Connection:
    config = h2.config.H2Configuration(client_side=client_side, header_encoding=None)
    peer = GracefulGoawayH2Connection(config=config)
    peer.initiate_connection()
    if settings:
        peer.update_settings(settings)
    return peer


def raw_frame(ftype: int, flags: int, sid: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack(">BHBBL", n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def parse_frames(data: bytes) -> list[Any]:
    """Frames in ``data`` (our output), parsed by hyperframe; a client preface is skipped."""
    if data.startswith(b"PRI * HTTP/2.0"):
        data = data[24:]
    out = []
    mv = memoryview(data)
    pos = 0
    while pos + 9 <= len(data):
        frame, length = hf.Frame.parse_frame_header(mv[pos : pos + 9])
        frame.parse_body(mv[pos + 9 : pos + 9 + length])
        out.append(frame)
        pos += 9 + length
    assert pos == len(data), "trailing partial frame in our output"
    return out


def block(headers: list[tuple[bytes, bytes]]) -> bytes:
    """A header block from a fresh encoder that never indexes: safe to inject next to h2's own
    blocks without desynchronizing the receiver's dynamic table."""
    return hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(n, v) for n, v in headers], huffman=False)


CONNECT = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")]


@dataclass
class Pair:
    """``ours`` (a ClientConnection or ServerConnection) and ``peer`` (h2), bytes moved in memory."""

    ours: H2Connection
    peer: h2.connection.H2Connection
    ours_events: list[Event] = field(default_factory=list)
    peer_events: list[h2.events.Event] = field(default_factory=list)
    violation: ProtocolViolation | None = None
    now: float = 0.0
    wire_from_us: list[bytes] = field(default_factory=list)

    def pump(self, rounds: int = 200) -> None:
        for _ in range(rounds):
            a = self.ours.data_to_send()
            b = self.peer.data_to_send()
            if not a and not b:
                return
            if a:
                self.wire_from_us.append(a)
                self.peer_events += self.peer.receive_data(a)
            if b:
                self.feed(b)
        raise AssertionError("connection did not go quiet")

    def feed(self, data: bytes) -> list[Event]:
        try:
            evs = self.ours.receive_data(data, self.now)
        except ProtocolViolation as exc:
            self.violation = exc
            self.ours_events += exc.events
            return exc.events
        self.ours_events += evs
        return evs

    def inject(self, data: bytes) -> list[Any]:
        """Raw bytes to us, as if from the peer; returns the frames we wrote back (hyperframe)."""
        self.feed(data)
        return parse_frames(self.ours.data_to_send())

    def events(self, kind: type) -> list[Any]:
        return [e for e in self.ours_events if isinstance(e, kind)]

    def peer_of(self, kind: type) -> list[Any]:
        return [e for e in self.peer_events if isinstance(e, kind)]

    def clear(self) -> None:
        self.ours_events.clear()
        self.peer_events.clear()


def client_pair(settings: dict[int, int] | None = None, **kw: int) -> Pair:
    """Our client, h2 server."""
    p = Pair(ClientConnection(**kw), h2_peer(False, settings))
    p.pump()
    p.clear()
    return p


def server_pair(settings: dict[int, int] | None = None, **kw: int) -> Pair:
    """h2 client, our server."""
    p = Pair(ServerConnection(**kw), h2_peer(True, settings))
    p.pump()
    p.clear()
    return p


def goaway_codes(frames: list[Any]) -> list[int]:
    return [f.error_code for f in frames if isinstance(f, hf.GoAwayFrame)]


def rst_codes(frames: list[Any], sid: int | None = None) -> list[int]:
    return [
        f.error_code
        for f in frames
        if isinstance(f, hf.RstStreamFrame) and (sid is None or f.stream_id == sid)
    ]
