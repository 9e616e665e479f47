"""TLS on the socket's own file descriptor, as an asyncio transport for the HBONE session.

uvloop's (and asyncio's) SSL transport runs OpenSSL on memory BIOs: every byte is read from the
socket into Python, copied into the input BIO, decrypted into an output buffer and copied out
again, and the same twice more on the way out. The profile put 62-71% of the agents' bulk CPU
in that path (README, "Where the misses come from"); the design note's prototypes measured TLS
on the fd at 0.82-0.99x the Envoy pair's bulk throughput against 0.54-0.68x (DESIGN §4). Here
OpenSSL reads and writes the socket itself (``ssl.SSLSocket`` in non-blocking mode), driven by
the event loop's reader/writer callbacks:

* reads: on readability, ``recv`` until OpenSSL wants more bytes from the socket, at most
  ``MAX_READS_PER_EVENT`` times per callback (fairness between connections), each chunk handed
  to ``protocol.data_received``. While reading is paused, decrypted bytes OpenSSL still holds
  (``pending()``) are read as soon as reading resumes, without waiting for the socket.
* writes: the segments of one ``writelines`` (the HBONE session gathers a loop iteration's
  frames into one call) are joined into one buffer and written with one ``SSL_write`` (one TLS
  record run, few syscalls) at once when the socket takes it, else when it becomes writable.
  ``SSL_write`` is all-or-nothing on a non-blocking socket (no partial-write mode), so a chunk
  that got ``SSLWantWriteError`` is retried as is.
* the handshake is driven the same way and never blocks the loop; it has a deadline.

Measured (``bench/ab.py`` against the same checkout on uvloop's transport, 3 alternating runs,
on a shared and heavily loaded VM): new connections/s 0.35x, keep-alive req/s at 16 connections
0.69x, p50 at 1 connection 0.62x, bulk 0.84x. As an ``asyncio.Transport`` in Python under the
protocol layering, each read and write event costs more Python than uvloop's Cython SSL
transport saves in copies, and the handshake's readiness waits cost more per connection. The
design note's faster prototype had one pump that reads, frames and writes in the same loop;
this transport is the TLS half of that, so it stays off by default (``tls_on_fd``) until the
pump around the new HTTP/2 core (``tunnel/h2``) uses it directly, and is tested on its own
(``tests/tunnel/test_fdtls.py``). Open: a server on this transport with a client on uvloop's
failed one handshake in a heavily loaded full-suite run (the client closed mid-handshake,
UNEXPECTED_EOF); 24 repeated runs did not reproduce it.

The protocol sees the usual transport API (write, writelines, pause/resume_reading, buffer
limits with pause_writing/resume_writing, close, abort, get_extra_info("ssl_object"/"socket"/
"peername"/"sockname")), so the HBONE session code is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

READ_SIZE = 256 * 1024  # one recv; OpenSSL decrypts up to this much from its records
MAX_READS_PER_EVENT = 4  # then yield to other connections
COALESCE_LIMIT = 256 * 1024  # small writes are joined into one SSL_write up to this size
DEFAULT_HIGH = 1024 * 1024
DEFAULT_LOW = 256 * 1024


class FdTlsTransport(asyncio.Transport):
    """An established TLS connection on a non-blocking ``ssl.SSLSocket``."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sslsock: ssl.SSLSocket, protocol: asyncio.Protocol
    ) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sslsock
        self._fd = sslsock.fileno()
        self._protocol = protocol
        self._out: deque[bytes | bytearray | memoryview] = deque()
        self._out_size = 0
        self._retry: bytes | bytearray | memoryview | None = None  # a chunk OpenSSL must see again
        self._flush_scheduled = False
        self._writer_registered = False
        self._reading = True
        self._reader_registered = False
        self._closing = False
        self._closed = False
        self._eof = False
        self._high, self._low = DEFAULT_HIGH, DEFAULT_LOW
        self._protocol_paused = False
        self._extra = {
            "ssl_object": sslsock,
            "socket": sslsock,
            "sslcontext": sslsock.context,
            "peername": _quiet(sslsock.getpeername),
            "sockname": _quiet(sslsock.getsockname),
        }

    # -- start ----------------------------------------------------------------------------------

    def _start(self) -> None:
        self._protocol.connection_made(self)
        if self._closed:
            return
        self._add_reader()
        # The handshake may have pulled application data into OpenSSL's buffer already.
        if self._sock.pending():
            self._loop.call_soon(self._on_readable)

    # -- reading --------------------------------------------------------------------------------

    def _add_reader(self) -> None:
        if not self._reader_registered and not self._closed:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reader_registered = True

    def _remove_reader(self) -> None:
        if self._reader_registered:
            self._loop.remove_reader(self._fd)
            self._reader_registered = False

    def _on_readable(self) -> None:
        if self._closed or not self._reading:
            return
        for _ in range(MAX_READS_PER_EVENT):
            try:
                data = self._sock.recv(READ_SIZE)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:
                self._ensure_writer()  # OpenSSL must write (e.g. a KeyUpdate answer) to go on
                return
            except (BlockingIOError, InterruptedError):
                return
            except ssl.SSLZeroReturnError:
                data = b""  # close_notify
            except (OSError, ssl.SSLError) as exc:
                self._fatal(exc)
                return
            if not data:
                self._on_eof()
                return
            self._protocol.data_received(data)
            if self._closed or not self._reading:
                return
            if not self._sock.pending() and len(data) < READ_SIZE:
                return  # the socket is most likely drained: wait for the next readiness
        # Fairness cap reached with more to read: continue on the next loop iteration.
        self._loop.call_soon(self._on_readable)

    def _on_eof(self) -> None:
        self._eof = True
        self._remove_reader()
        keep_open = False
        try:
            keep_open = bool(self._protocol.eof_received())
        except Exception as exc:
            self._fatal(exc)
            return
        if not keep_open:
            self.close()

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._remove_reader()

    def resume_reading(self) -> None:
        if not self._reading and not self._closed:
            self._reading = True
            if not self._eof:
                self._add_reader()
                # Bytes OpenSSL already decrypted would not make the socket readable again.
                self._loop.call_soon(self._on_readable)

    def is_reading(self) -> bool:
        return self._reading and not self._closed

    # -- writing --------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._closed or not data:
            return
        self._out.append(data)
        self._out_size += len(data)
        self._schedule_flush()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        if self._closing or self._closed:
            return
        for data in list_of_data:
            if data:
                self._out.append(data)
                self._out_size += len(data)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # The HBONE session already gathers a loop iteration's frames into one writelines call
        # (H2Session.request_flush), so write at once: waiting another iteration would only add
        # latency. While the socket is full, the writer callback flushes everything buffered.
        if not self._writer_registered and not self._flush_scheduled:
            self._flush()
        self._check_high()

    def _next_chunk(self) -> bytes | bytearray | memoryview | None:
        if self._retry is not None:
            return self._retry
        if not self._out:
            return None
        first = self._out.popleft()
        if not self._out or len(first) >= COALESCE_LIMIT:
            return first
        # Join small segments (frame headers, window updates, short DATA) into one record run.
        buf = bytearray(first)
        while self._out and len(buf) < COALESCE_LIMIT:
            nxt = self._out[0]
            if len(buf) + len(nxt) > COALESCE_LIMIT and len(nxt) >= COALESCE_LIMIT // 4:
                break
            buf += self._out.popleft()
        return buf

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._closed:
            return
        while True:
            chunk = self._next_chunk()
            if chunk is None:
                break
            try:
                self._sock.send(chunk)
            except ssl.SSLWantWriteError:
                self._retry = chunk
                self._ensure_writer()
                return
            except ssl.SSLWantReadError:
                # Only during renegotiation, which TLS 1.3 does not have: wait for input.
                self._retry = chunk
                return
            except (BlockingIOError, InterruptedError):
                self._retry = chunk
                self._ensure_writer()
                return
            except (OSError, ssl.SSLError) as exc:
                self._fatal(exc)
                return
            self._retry = None
            self._out_size -= len(chunk)
        self._out_size = 0
        if self._writer_registered:
            self._loop.remove_writer(self._fd)
            self._writer_registered = False
        self._check_low()
        if self._closing:
            self._finish_close()

    def _ensure_writer(self) -> None:
        if not self._writer_registered and not self._closed:
            self._loop.add_writer(self._fd, self._flush)
            self._writer_registered = True
        self._check_high()

    def _check_high(self) -> None:
        if not self._protocol_paused and self._out_size > self._high:
            self._protocol_paused = True
            try:
                self._protocol.pause_writing()
            except Exception as exc:
                self._fatal(exc)

    def _check_low(self) -> None:
        if self._protocol_paused and self._out_size <= self._low:
            self._protocol_paused = False
            try:
                self._protocol.resume_writing()
            except Exception as exc:
                self._fatal(exc)

    def get_write_buffer_size(self) -> int:
        return self._out_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = DEFAULT_HIGH if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._check_high()

    def can_write_eof(self) -> bool:
        return False  # TLS has no half-close of its own; HTTP/2 ends streams itself

    def write_eof(self) -> None:
        raise NotImplementedError("TLS transports cannot half-close")

    # -- closing --------------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing or self._closed

    def close(self) -> None:
        """Flush what is buffered, send close_notify, close the socket."""
        if self._closing or self._closed:
            return
        self._closing = True
        self._remove_reader()
        if self._out_size == 0 and self._retry is None:
            self._finish_close()
        elif not self._writer_registered and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _finish_close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(OSError, ValueError, ssl.SSLError):
            self._sock.unwrap()  # sends close_notify; the peer's answer is not waited for
        self._teardown(None)

    def abort(self) -> None:
        self._teardown(None)

    def _fatal(self, exc: BaseException) -> None:
        self._teardown(exc if isinstance(exc, Exception) else None)

    def _teardown(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = self._closing = True
        self._remove_reader()
        if self._writer_registered:
            self._loop.remove_writer(self._fd)
            self._writer_registered = False
        self._out.clear()
        self._out_size = 0
        self._retry = None
        with contextlib.suppress(OSError):
            self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)

    # -- the rest of the transport API ----------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol


def _quiet(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except OSError:
        return None


async def _handshake(loop: asyncio.AbstractEventLoop, sslsock: ssl.SSLSocket, timeout: float) -> None:
    fd = sslsock.fileno()
    deadline = loop.time() + timeout
    while True:
        try:
            sslsock.do_handshake()
            return
        except ssl.SSLWantReadError:
            want_write = False
        except ssl.SSLWantWriteError:
            want_write = True
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"TLS handshake did not finish within {timeout:g}s")
        ready: asyncio.Future[None] = loop.create_future()

        def wake(fut: asyncio.Future[None] = ready) -> None:
            if not fut.done():
                fut.set_result(None)

        if want_write:
            loop.add_writer(fd, wake)
        else:
            loop.add_reader(fd, wake)
        try:
            await asyncio.wait_for(ready, remaining)
        finally:
            if want_write:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)


async def start_tls(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    context: ssl.SSLContext,
    protocol_factory: Callable[[], asyncio.Protocol],
    *,
    server_side: bool,
    timeout: float,
) -> FdTlsTransport:
    """Handshake on the connected non-blocking ``sock`` (which the transport then owns), then
    connect the protocol. Raises ssl.SSLError / OSError / TimeoutError, closing the socket."""
    sock.setblocking(False)
    try:
        # server_hostname=None on the client: no SNI, as ztunnel sends none.
        sslsock = context.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        await _handshake(loop, sslsock, timeout)
    except BaseException:
        with contextlib.suppress(OSError):
            sslsock.close()
        raise
    transport = FdTlsTransport(loop, sslsock, protocol_factory())
    transport._start()
    return transport


__all__ = ["FdTlsTransport", "start_tls"]
