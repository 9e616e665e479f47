"""Fuzz target: tunnel/h2's frame parser and connection receive path (server role).

``fuzz_one(data)`` feeds ``data`` to a fresh ServerConnection that already got a valid client
preface and SETTINGS. Expected protocol errors (ProtocolViolation) are caught; anything else
raised is a bug. Two oracles beyond "no crash":

* differential: the same bytes fed whole and in 7-byte pieces must produce the same events
  (DATA merged per stream) and the same verdict, since frames may be split anywhere by TCP/TLS;
* our output is always well-formed HTTP/2 framing, and no receive window goes negative.

``SEEDS`` are valid frame sequences (built with hyperframe + hpack, independently of the core).
"""

from __future__ import annotations

import struct

import hpack
import hyperframe.frame as hf

from tunnel.h2 import Data, Event, ProtocolViolation, ServerConnection

# The core logs one warning per abusive connection; the fuzz runner silences logging in its own
# process (fuzz/runner.py). Importing a target must not: the test suite imports this one too.

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + hf.SettingsFrame(0).serialize()
_PIECE = 7


def _canonical(events: list[Event]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for ev in events:
        if isinstance(ev, Data):
            if out and out[-1][0] == "Data" and out[-1][1] == ev.stream_id:
                out[-1] = ("Data", ev.stream_id, out[-1][2] + bytes(ev.data))  # type: ignore[operator]
            else:
                out.append(("Data", ev.stream_id, bytes(ev.data)))
        else:
            out.append((type(ev).__name__, repr(ev)))
    return out


def _check_output(conn: ServerConnection) -> None:
    out = conn.data_to_send()
    pos = 0
    while pos < len(out):
        if len(out) - pos < 9:
            raise AssertionError("our output ends in a partial frame header")
        length = int.from_bytes(out[pos : pos + 3], "big")
        if out[pos + 3] > 0x9:
            raise AssertionError(f"we wrote an unknown frame type {out[pos + 3]}")
        pos += 9 + length
    if pos != len(out):
        raise AssertionError("our output ends in a partial frame")
    conn_window, streams = conn.recv_windows()
    if conn_window < 0 or any(w < 0 for w in streams.values()):
        raise AssertionError(f"negative receive window: {conn_window} {streams}")


def _run(data: bytes, piece: int | None) -> tuple[list[tuple[object, ...]], int | None]:
    conn = ServerConnection()
    conn.receive_data(PREFACE, 0.0)
    conn.data_to_send()
    events: list[Event] = []
    verdict: int | None = None
    chunks = [data] if piece is None else [data[i : i + piece] for i in range(0, len(data), piece)]
    for i, chunk in enumerate(chunks):
        try:
            events += conn.receive_data(chunk, 0.0)
        except ProtocolViolation as exc:
            events += exc.events
            verdict = exc.error_code
            break
        if i % 64 == 0:
            _check_output(conn)
    _check_output(conn)
    return _canonical(events), verdict


def fuzz_one(data: bytes) -> None:
    whole = _run(data, None)
    pieces = _run(data, _PIECE)
    if whole != pieces:
        raise AssertionError(f"fed whole vs in {_PIECE}-byte pieces differ:\n{whole}\n{pieces}")


def _block(headers: list[tuple[bytes, bytes]]) -> bytes:
    return hpack.Encoder().encode(headers, huffman=False)


_CONNECT = _block(
    [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80"), (b"forwarded", b'for="1.2.3.4:5"')]
)


def _seeds() -> list[bytes]:
    def headers(sid: int, block: bytes, *flags: str) -> bytes:
        f = hf.HeadersFrame(sid, data=block)
        f.flags.add("END_HEADERS")
        for flag in flags:
            f.flags.add(flag)
        return f.serialize()

    def data(sid: int, payload: bytes, *flags: str, pad: int = 0) -> bytes:
        f = hf.DataFrame(sid, data=payload)
        for flag in flags:
            f.flags.add(flag)
        if pad:
            f.flags.add("PADDED")
            f.pad_length = pad
        return f.serialize()

    cont_head = hf.HeadersFrame(3, data=_CONNECT[:5]).serialize()
    cont_tail = hf.ContinuationFrame(3, data=_CONNECT[5:])
    cont_tail.flags.add("END_HEADERS")
    ping = hf.PingFrame(0, opaque_data=b"12345678").serialize()
    wu = hf.WindowUpdateFrame(0, window_increment=1 << 20).serialize()
    rst = hf.RstStreamFrame(1, error_code=8).serialize()
    goaway = hf.GoAwayFrame(0, last_stream_id=1, error_code=0).serialize()
    settings = hf.SettingsFrame(0, settings={4: 1 << 20, 5: 1 << 20}).serialize()
    prio = hf.PriorityFrame(5, depends_on=0, stream_weight=16).serialize()
    return [
        headers(1, _CONNECT) + data(1, b"hello") + data(1, b"", "END_STREAM"),
        headers(1, _CONNECT, "END_STREAM") + ping + wu,
        headers(1, _CONNECT) + data(1, b"x" * 300, pad=20) + rst,
        cont_head + cont_tail.serialize() + data(3, b"abc", "END_STREAM"),
        settings + headers(1, _CONNECT) + hf.WindowUpdateFrame(1, window_increment=100).serialize() + goaway,
        prio + headers(1, _CONNECT) + headers(3, _CONNECT) + data(3, b"y" * 100) + data(1, b"z" * 50),
        headers(1, _block([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https")])),
        struct.pack(">BHBBL", 0, 4, 0xFA, 0, 0) + b"ext!" + ping,
    ]


SEEDS: list[bytes] = _seeds()
