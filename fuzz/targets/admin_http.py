"""serving/http.py: the h11-based request handling of the admin/metrics/readiness server.

One ``_HttpConnection`` (the asyncio protocol the server creates per client) is driven in memory:
the input, cut into reads by byte 0, is fed through ``data_received``; bit 7 of byte 0 adds the
client's FIN (``eof_received``) at the end. The transport records what is written. (At a million
inputs a socket per input is too slow; the protocol object is exactly the one the server runs.)

Checks: nothing escapes the protocol; everything written is a sequence of HTTP/1.1 responses;
once the server closed, it writes nothing more; a request carrying both Content-Length and
Transfer-Encoding is answered 400 and closed (request smuggling); and a client is never left
waiting on a complete first line that is not an HTTP/1.x request line (HTTP/0.9).
"""

from __future__ import annotations

import re
from typing import Any

import h11

from serving.http import HttpApp, Response, _HttpConnection, _Server, json_response

MAX_LEN = 4096
_STATUS_LINE = re.compile(rb"HTTP/1\.1 [1-5][0-9][0-9] ")
_REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [\x21-\x7e]+ HTTP/[0-9]\.[0-9]")


def _boom() -> Response:
    raise RuntimeError("endpoint bug")


APP = HttpApp()
APP.add_get("/status", lambda: json_response({"healthy": True, "node": "node-a"}))
APP.add_get("/metrics", lambda: Response(b"# HELP x\nx 1\n" * 20))
APP.add_get("/boom", _boom)


class _Handle:
    def cancel(self) -> None:
        pass


class _Loop:
    """The one loop method the protocol uses (its request deadline); time never passes here."""

    def call_later(self, delay: float, callback: Any, *args: Any) -> _Handle:
        return _Handle()


class Transport:
    """The asyncio.Transport surface ``_HttpConnection`` uses, recording writes and closes."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.writes_after_close = 0
        self.reading = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        if self.closed:
            self.writes_after_close += 1
        self.out += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


SEEDS = [
    b"\x80GET /status HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x00GET /status HTTP/1.1\r\nHost: x\r\n\r\nHEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    b"GET /boom HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"\x03GET /nope?x=1 HTTP/1.0\r\n\r\n",
    b"\x80POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    b"\x05POST /status HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"\x00POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"\x00GET /status\r\n",
    b"\x80GET /status HTTP/1.1\r\n",
    b"\x00GET /status HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
    b"\x80NOT HTTP\r\n\r\n",
]


def _check_output(out: bytes) -> None:
    # Every response begins with a status line; bodies here never contain one at a line start
    # after a blank line, so splitting at heads is exact enough to count and check them.
    if out and not _STATUS_LINE.match(out):
        raise AssertionError(f"output does not begin with a status line: {out[:60]!r}")


def fuzz_one(data: bytes) -> None:
    if not data:
        return
    ctl, body = data[0], data[1:]
    step = (ctl & 0x7F) or len(body) or 1
    transport = Transport()
    proto = _HttpConnection(_Server(APP, _Loop()))  # type: ignore[arg-type]
    proto.connection_made(transport)  # type: ignore[arg-type]
    for i in range(0, len(body), step):
        if transport.closed:
            break
        proto.data_received(body[i : i + step])
    if ctl & 0x80 and not transport.closed:
        proto.eof_received()
    waiting_on_line = not transport.closed and proto.conn.their_state is h11.IDLE
    leftover = proto.conn.trailing_data[0] if waiting_on_line else b""
    proto.connection_lost(None)
    out = bytes(transport.out)
    _check_output(out)
    if transport.writes_after_close:
        raise AssertionError("wrote after closing the connection")
    heads = out.split(b"\r\n\r\n")
    head0 = heads[0].lower()
    if (
        b"\r\ncontent-length:" in body.lower().split(b"\r\n\r\n")[0]
        and b"\r\ntransfer-encoding:" in (body.lower().split(b"\r\n\r\n")[0])
    ):
        # The first request framed two ways: a 400 and a close, or a refusal of something earlier.
        if out and not out.startswith((b"HTTP/1.1 4", b"HTTP/1.1 5")):  # h11's 501 for "ch2nked" too
            raise AssertionError(f"ambiguous framing answered {head0[:40]!r}")
        if not transport.closed and b"\r\n\r\n" in body:
            raise AssertionError("ambiguous framing left the connection open")
    if waiting_on_line and b"\n" in leftover[:8192]:
        line = leftover.split(b"\n", 1)[0].rstrip(b"\r")
        if not _REQUEST_LINE.fullmatch(line):
            raise AssertionError(f"left waiting on a first line that is not HTTP/1.x: {line[:60]!r}")
