"""HTTP/2 (gRPC included) at the waypoint: the ``h2`` library on both sides.

The node agent hand-builds its HTTP/2 frames because its HBONE path is hot (DESIGN §4: one
CONNECT exchange through h2 cost ~690 µs of CPU against ~7 µs hand-built). Here every request
is parsed, authenticated and authorized anyway, and correctness of a general HTTP/2 server and
client (HPACK, stream states, trailers, flow control, SETTINGS) matters more than those
microseconds: the well-kept ``h2`` state machine does it (the project's own ``tunnel/h2/`` core
is another helper's, and only speaks CONNECT).

One downstream h2 connection (server side) is bridged to one upstream h2 connection (client
side, prior knowledge: the endpoint speaks h2c behind its node agent) over one HBONE stream to
one endpoint. Each downstream stream is decided on its headers; an allowed one becomes an
upstream stream, a denied one gets ``403`` with ``RBAC: access denied`` (gRPC clients read it
as PERMISSION_DENIED, as with Envoy). DATA is queued per stream in order with headers and
trailers, sent as the peer's windows allow, and its flow-control credit is returned to the
sender only once it was sent on: a slow reader on either side stalls only its own stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from waypoint.decide import HOP_BY_HOP, Outcome, RequestFacts, headers_of
from waypoint.proxy import READ_CHUNK, UPSTREAM_FAILED_BODY, StreamContext, Upstream, WaypointProxy

WINDOW: Final = 1 << 20  # per-stream receive window we advertise on both sides
MAX_BUFFERED: Final = 4 << 20  # queued bytes per direction before reading from that side pauses

# An item queued for one stream on one connection: ("headers", list, end) | ("end",) |
# ("data", bytes, credit, source stream id) | ("reset", error code)
Item = tuple[Any, ...]


@dataclass
class _Side:
    """One h2 connection of the bridge and what waits to be sent on it."""

    name: str
    conn: h2.connection.H2Connection
    writer: asyncio.StreamWriter
    queues: dict[int, list[Item]] = field(default_factory=dict)
    buffered: int = 0
    closed: bool = False


@dataclass
class _Exchange:
    """One request: its downstream stream, and the upstream stream once allowed."""

    down_sid: int
    method: str
    path: str
    authority: str
    started: float
    up_sid: int | None = None
    decided: bool = False
    denied: bool = False
    early: list[Item] = field(default_factory=list)  # request DATA/trailers/end before the decision
    outcome: Outcome | None = None
    status: int = 0
    grpc_status: str | None = None
    request_bytes: int = 0
    response_bytes: int = 0
    done: bool = False


class Bridge:
    def __init__(
        self,
        proxy: WaypointProxy,
        ctx: StreamContext,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.proxy, self.ctx, self.reader = proxy, ctx, reader
        cfg = h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=True
        )
        self.down = _Side("downstream", h2.connection.H2Connection(cfg), writer)
        self.up: _Side | None = None
        self.upstream: Upstream | None = None
        self._up_ready: asyncio.Future[bool] | None = None
        self.by_down: dict[int, _Exchange] = {}
        self.by_up: dict[int, _Exchange] = {}
        self.tasks: set[asyncio.Task[Any]] = set()

    # -- plumbing --------------------------------------------------------------------------------
    def _write(self, side: _Side) -> None:
        data = side.conn.data_to_send()
        if data and not side.writer.is_closing():
            side.writer.write(data)

    def _flush(self, side: _Side) -> None:
        """Send what the windows allow, in order per stream; return credit for what was sent."""
        conn = side.conn
        for sid in list(side.queues):
            q = side.queues[sid]
            while q:
                item = q[0]
                try:
                    if item[0] == "headers":
                        conn.send_headers(sid, item[1], end_stream=item[2])
                    elif item[0] == "end":
                        conn.end_stream(sid)
                    elif item[0] == "reset":
                        conn.reset_stream(sid, item[1])
                    else:
                        data: bytes = item[1]
                        window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                        if window <= 0:
                            break
                        chunk, rest = data[:window], data[window:]
                        conn.send_data(sid, chunk)
                        side.buffered -= len(chunk)
                        if rest:
                            q[0] = ("data", rest, item[2], item[3])
                            continue
                        self._credit(side, item[2], item[3])
                except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
                    for it in q:
                        if it[0] == "data":
                            side.buffered -= len(it[1])
                            self._credit(side, it[2], it[3])
                    q.clear()
                    break
                q.pop(0)
            if not q:
                del side.queues[sid]
        self._write(side)

    def _credit(self, to: _Side, credit: int, src_sid: int) -> None:
        """Data from the other side was sent on ``to``: let its sender send that much more."""
        other = self.up if to is self.down else self.down
        if other is None or not credit or other.closed:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            other.conn.acknowledge_received_data(credit, src_sid)
        self._write(other)

    def _queue(self, side: _Side, sid: int, item: Item) -> None:
        side.queues.setdefault(sid, []).append(item)
        if item[0] == "data":
            side.buffered += len(item[1])

    # -- downstream ------------------------------------------------------------------------------
    async def run(self, first: bytes) -> None:
        down = self.down
        down.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100,
            },
        )
        down.conn.initiate_connection()
        down.conn.increment_flow_control_window(WINDOW * 4)
        self._write(down)
        data = first
        try:
            while data:
                try:
                    events = down.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    self._write(down)
                    return
                for ev in events:
                    self._down_event(ev)
                self._flush(down)
                if self.up is not None:
                    self._flush(self.up)
                await down.writer.drain()
                if self.up is not None and self.up.buffered > MAX_BUFFERED and self.upstream is not None:
                    await self.upstream.writer.drain()
                data = await self.reader.read(READ_CHUNK)
        finally:
            down.closed = True
            for t in list(self.tasks):
                t.cancel()
            for ex in list(self.by_down.values()):
                self._finish(ex, ex.status or 499)
            if self.upstream is not None:
                self.upstream.close()

    def _down_event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            self._request(ev)
        elif isinstance(ev, h2.events.DataReceived):
            ex = self.by_down.get(ev.stream_id)
            if ex is None:
                self.down.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                return
            ex.request_bytes += len(ev.data)
            self._to_up(ex, ("data", bytes(ev.data), ev.flow_controlled_length, ev.stream_id))
        elif isinstance(ev, h2.events.TrailersReceived):
            ex = self.by_down.get(ev.stream_id)
            if ex is not None:
                self._to_up(ex, ("headers", list(ev.headers), True))
        elif isinstance(ev, h2.events.StreamEnded):
            ex = self.by_down.get(ev.stream_id)
            if ex is not None and not _ends(ex.early):
                self._to_up(ex, ("end",))
        elif isinstance(ev, h2.events.StreamReset):
            ex = self.by_down.pop(ev.stream_id, None)
            if ex is not None and ex.up_sid is not None and self.up is not None:
                self._queue(self.up, ex.up_sid, ("reset", h2.errors.ErrorCodes.CANCEL))
                self._finish(ex, ex.status or 499)

    def _to_up(self, ex: _Exchange, item: Item) -> None:
        if ex.denied:
            if item[0] == "data":
                self.down.conn.acknowledge_received_data(item[2], ex.down_sid)
            return
        if ex.up_sid is None or self.up is None:
            ex.early.append(item)
            return
        if item[0] == "headers" and item[2]:
            item = ("headers", item[1], True)
        self._queue(self.up, ex.up_sid, item)

    def _request(self, ev: h2.events.RequestReceived) -> None:
        hdrs = headers_of(ev.headers)
        pseudo = {n: v for n, v in hdrs if n.startswith(":")}
        method, path = pseudo.get(":method", ""), pseudo.get(":path", "")
        authority = pseudo.get(":authority") or next(
            (v for n, v in hdrs if n == "host"), str(self.ctx.destination)
        )
        ex = _Exchange(ev.stream_id, method, path, authority, time.monotonic())
        self.by_down[ev.stream_id] = ex
        if ev.stream_ended is not None:
            ex.early.append(("end",))
        ctx = self.ctx
        plain = tuple((n, v) for n, v in hdrs if not n.startswith(":"))
        facts = RequestFacts(
            method,
            path,
            authority,
            plain,
            str(ctx.peer),
            str(ctx.source.ip),
            str(ctx.destination.ip),
            ctx.destination.port,
        )
        task = asyncio.get_running_loop().create_task(self._decide(ex, facts, pseudo))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _decide(self, ex: _Exchange, facts: RequestFacts, pseudo: dict[str, str]) -> None:
        outcome = await self.proxy.decide(self.ctx, facts)
        ex.outcome = outcome
        ex.decided = True
        if ex.down_sid not in self.by_down or self.down.closed:
            return
        if not outcome.allowed:
            ex.denied = True
            for it in ex.early:
                if it[0] == "data":
                    self.down.conn.acknowledge_received_data(it[2], ex.down_sid)
            ex.early.clear()
            self._answer(ex, outcome.status, outcome.body, outcome.response_headers)
            return
        up = await self._upstream()
        if up is None or ex.down_sid not in self.by_down:
            if ex.down_sid in self.by_down:
                ex.denied = True
                self._answer(ex, 503, UPSTREAM_FAILED_BODY)
            return
        sid = up.conn.get_next_available_stream_id()
        ex.up_sid = sid
        self.by_up[sid] = ex
        req = [
            (":method", ex.method),
            (":scheme", pseudo.get(":scheme", "http")),
            (":authority", ex.authority),
            (":path", outcome.upstream_target or ex.path),
        ]
        req += [(n, v) for n, v in outcome.upstream_headers if n != "host"]
        if any(n == "te" and v.strip().lower() == "trailers" for n, v in facts.headers):
            # The one TE value HTTP/2 allows (RFC 9113 §8.2.2); gRPC servers require it.
            req.append(("te", "trailers"))
        end_now = bool(ex.early) and ex.early == [("end",)]
        self._queue(up, sid, ("headers", req, end_now))
        for it in [] if end_now else ex.early:
            self._queue(up, sid, it)
        ex.early.clear()
        self._flush(up)

    def _answer(self, ex: _Exchange, status: int, body: str, extra: tuple[tuple[str, str], ...] = ()) -> None:
        data = body.encode()
        hdrs = [
            (":status", str(status)),
            ("content-type", "text/plain"),
            ("content-length", str(len(data))),
            *extra,
        ]
        self._queue(self.down, ex.down_sid, ("headers", hdrs, not data))
        if data:
            self._queue(self.down, ex.down_sid, ("data", data, 0, 0))
            self._queue(self.down, ex.down_sid, ("end",))
        ex.status = status
        ex.response_bytes = len(data)
        self._flush(self.down)
        self._finish(ex, status)

    # -- upstream ----------------------------------------------------------------------------------
    async def _upstream(self) -> _Side | None:
        if self.up is not None:
            return None if self.up.closed else self.up
        if self._up_ready is not None:
            await asyncio.shield(self._up_ready)
            return self.up if self.up is not None and not self.up.closed else None
        self._up_ready = asyncio.get_running_loop().create_future()
        try:
            upstream = await self.proxy.open_upstream(self.ctx)
            if upstream is None:
                return None
            self.upstream = upstream
            cfg = h2.config.H2Configuration(client_side=True, header_encoding=None)
            conn = h2.connection.H2Connection(cfg)
            conn.local_settings = h2.settings.Settings(
                client=True,
                initial_values={
                    h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                    h2.settings.SettingCodes.ENABLE_PUSH: 0,
                },
            )
            conn.initiate_connection()
            conn.increment_flow_control_window(WINDOW * 4)
            side = _Side("upstream", conn, upstream.writer)
            self.up = side
            self._write(side)
            task = asyncio.get_running_loop().create_task(self._read_up(side, upstream))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return side
        finally:
            self._up_ready.set_result(True)

    async def _read_up(self, side: _Side, upstream: Upstream) -> None:
        try:
            while data := await upstream.reader.read(READ_CHUNK):
                try:
                    events = side.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for ev in events:
                    self._up_event(ev)
                self._flush(side)
                self._flush(self.down)
                await upstream.writer.drain()
                if self.down.buffered > MAX_BUFFERED:
                    await self.down.writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            side.closed = True
            for ex in list(self.by_up.values()):
                if not ex.done and ex.down_sid in self.by_down:
                    if ex.status == 0:
                        self._answer(ex, 503, UPSTREAM_FAILED_BODY)
                    else:
                        self._queue(self.down, ex.down_sid, ("reset", h2.errors.ErrorCodes.INTERNAL_ERROR))
                        self._flush(self.down)
                        self._finish(ex, ex.status)
            self._write(self.down)

    def _up_event(self, ev: h2.events.Event) -> None:
        sid = getattr(ev, "stream_id", None)
        ex = self.by_up.get(sid) if sid is not None else None
        if isinstance(ev, h2.events.ResponseReceived) and ex is not None:
            hdrs = [(n, v) for n, v in headers_of(ev.headers) if n not in HOP_BY_HOP]
            ex.status = int(next((v for n, v in hdrs if n == ":status"), "0") or 0)
            ex.grpc_status = next((v for n, v in hdrs if n == "grpc-status"), ex.grpc_status)
            self._queue(self.down, ex.down_sid, ("headers", hdrs, ev.stream_ended is not None))
            if ev.stream_ended is not None:
                self._finish(ex, ex.status)
        elif isinstance(ev, h2.events.InformationalResponseReceived) and ex is not None:
            self._queue(self.down, ex.down_sid, ("headers", list(headers_of(ev.headers)), False))
        elif isinstance(ev, h2.events.DataReceived):
            if ex is None:
                self._ack_up(ev)
                return
            ex.response_bytes += len(ev.data)
            self._queue(
                self.down, ex.down_sid, ("data", bytes(ev.data), ev.flow_controlled_length, ev.stream_id)
            )
        elif isinstance(ev, h2.events.TrailersReceived) and ex is not None:
            hdrs = list(headers_of(ev.headers))
            ex.grpc_status = next((v for n, v in hdrs if n == "grpc-status"), ex.grpc_status)
            self._queue(self.down, ex.down_sid, ("headers", hdrs, True))
            self._finish(ex, ex.status)
        elif isinstance(ev, h2.events.StreamEnded) and ex is not None:
            if not ex.done:
                self._queue(self.down, ex.down_sid, ("end",))
                self._finish(ex, ex.status)
        elif isinstance(ev, h2.events.StreamReset) and ex is not None:
            self._queue(self.down, ex.down_sid, ("reset", ev.error_code))
            self._finish(ex, ex.status or 503)

    def _ack_up(self, ev: h2.events.DataReceived) -> None:
        if self.up is not None:
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
                self.up.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)

    def _finish(self, ex: _Exchange, status: int) -> None:
        if ex.done:
            return
        ex.done = True
        self.by_down.pop(ex.down_sid, None)
        if ex.up_sid is not None:
            self.by_up.pop(ex.up_sid, None)
        self.proxy.finished(
            self.ctx,
            protocol="grpc" if ex.grpc_status is not None else "http",
            method=ex.method,
            path=ex.path,
            authority=ex.authority,
            outcome=ex.outcome,
            status=status,
            started=ex.started,
            request_bytes=ex.request_bytes,
            response_bytes=ex.response_bytes,
            upstream=self.upstream.workload if self.upstream is not None and ex.up_sid is not None else None,
            grpc_status=ex.grpc_status,
        )


def _ends(items: list[Item]) -> bool:
    return any(it[0] == "end" or (it[0] == "headers" and it[2]) for it in items)


async def serve(
    proxy: WaypointProxy,
    ctx: StreamContext,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    first: bytes,
) -> None:
    await Bridge(proxy, ctx, reader, writer).run(first)


__all__ = ["Bridge", "serve"]
