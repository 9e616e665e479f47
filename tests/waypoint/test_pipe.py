"""tunnel.relay.PipeTransport: the in-process hand-off the waypoint uses instead of a socketpair."""

from __future__ import annotations

import asyncio

from tunnel.relay import PIPE_WRITE_HIGH, pipe


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.eof = False
        self.lost: list[Exception | None] = []
        self.paused = 0
        self.resumed = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1


async def _pair() -> tuple[Recorder, Recorder]:
    a_t, b_t = pipe(asyncio.get_running_loop())
    a, b = Recorder(), Recorder()
    a_t.set_protocol(a)
    b_t.set_protocol(b)
    a.connection_made(a_t)
    b.connection_made(b_t)
    return a, b


async def _tick(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_bytes_half_close_and_close_flow_in_order() -> None:
    a, b = await _pair()
    assert a.transport is not None and b.transport is not None
    a.transport.write(b"hello ")
    a.transport.write(b"world")
    assert b.data == b""  # never re-entrant: delivered on the next loop iteration
    a.transport.write_eof()
    await _tick()
    assert (b.data, b.eof, b.lost) == (b"hello world", True, [])
    b.transport.write(b"answer")  # the other direction stays open after a half-close
    b.transport.close()
    await _tick()
    assert a.data == b"answer" and a.eof
    assert a.lost == [None] and b.lost == [None]


async def test_a_paused_reader_holds_bytes_and_backpressures_the_writer() -> None:
    a, b = await _pair()
    assert a.transport is not None and b.transport is not None
    b.transport.pause_reading()
    chunk = b"x" * 65536
    for _ in range(PIPE_WRITE_HIGH // len(chunk) + 1):
        a.transport.write(chunk)
    await _tick()
    assert b.data == b"" and a.paused == 1 and a.transport.get_write_buffer_size() > PIPE_WRITE_HIGH
    b.transport.resume_reading()
    await _tick()
    assert len(b.data) == (PIPE_WRITE_HIGH // len(chunk) + 1) * len(chunk) and a.resumed == 1


async def test_abort_is_a_reset_for_the_other_end() -> None:
    a, b = await _pair()
    assert a.transport is not None
    a.transport.write(b"dropped")
    a.transport.abort()
    await _tick()
    assert b.data == b"" and isinstance(b.lost[0], ConnectionResetError) and a.lost == [None]
