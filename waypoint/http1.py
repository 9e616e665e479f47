"""HTTP/1.1 at the waypoint: h11 on both sides (downstream server, upstream client).

h11 is the well-kept sans-IO HTTP/1.1 parser (already a dependency, the admin server uses it):
framing, keep-alive, pipelining and its request-smuggling defences (conflicting Content-Length /
Transfer-Encoding, bare CR, oversized heads) are its job, not ours. Requests on one connection are
handled in order; each is decided on its head, then its body is streamed upstream and the
response streamed back, with the streams' backpressure (``drain``) both ways. One upstream HBONE
stream per downstream connection, kept while both ends keep the connection alive.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

import h11

from waypoint.decide import HOP_BY_HOP, Outcome, RequestFacts, header, headers_of
from waypoint.proxy import READ_CHUNK, UPSTREAM_FAILED_BODY, StreamContext, Upstream, WaypointProxy

MAX_HEAD: Final = 64 * 1024  # request/response head limit (Envoy's max_request_headers_kb default is 60)


class _Closed(Exception):
    """The peer closed or broke the connection."""


async def _next(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            data = await reader.read(READ_CHUNK)
            conn.receive_data(data)
            continue
        return ev


def _send(conn: h11.Connection, writer: asyncio.StreamWriter, ev: h11.Event) -> None:
    data = conn.send(ev)
    if data:
        writer.write(data)


def _response_headers(pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in pairs if n.lower().decode("latin-1") not in HOP_BY_HOP]


async def _answer(
    down: h11.Connection,
    writer: asyncio.StreamWriter,
    status: int,
    body: str,
    extra: tuple[tuple[str, str], ...] = (),
) -> int:
    data = body.encode()
    hdrs = [("content-type", "text/plain"), ("content-length", str(len(data))), *extra]
    _send(down, writer, h11.Response(status_code=status, headers=hdrs))
    if data:
        _send(down, writer, h11.Data(data=data))
    _send(down, writer, h11.EndOfMessage())
    await writer.drain()
    return len(data)


async def serve(
    proxy: WaypointProxy,
    ctx: StreamContext,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    first: bytes,
) -> None:
    down = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    down.receive_data(first)
    up: Upstream | None = None
    uconn: h11.Connection | None = None
    try:
        while True:
            try:
                ev = await _next(down, reader)
            except h11.RemoteProtocolError as exc:
                if down.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _answer(down, writer, exc.error_status_hint, "Bad Request")
                return
            if not isinstance(ev, h11.Request):
                return  # ConnectionClosed (or a peer that went away mid-message)
            started = time.monotonic()
            method = ev.method.decode("latin-1")
            target = ev.target.decode("latin-1")
            hdrs = headers_of(ev.headers)
            authority = header(hdrs, "host") or str(ctx.destination)
            facts = RequestFacts(
                method,
                target,
                authority,
                hdrs,
                str(ctx.peer),
                str(ctx.source.ip),
                str(ctx.destination.ip),
                ctx.destination.port,
            )
            outcome = await proxy.decide(ctx, facts)
            if not outcome.allowed:
                req_bytes = await _drain_body(down, reader)
                sent = await _answer(down, writer, outcome.status, outcome.body, outcome.response_headers)
                proxy.finished(
                    ctx,
                    protocol="http",
                    method=method,
                    path=target,
                    authority=authority,
                    outcome=outcome,
                    status=outcome.status,
                    started=started,
                    request_bytes=req_bytes,
                    response_bytes=sent,
                    upstream=None,
                )
            else:
                if up is None or uconn is None:
                    up = await proxy.open_upstream(ctx)
                    if up is None:
                        await _drain_body(down, reader)
                        sent = await _answer(down, writer, 503, UPSTREAM_FAILED_BODY)
                        proxy.finished(
                            ctx,
                            protocol="http",
                            method=method,
                            path=target,
                            authority=authority,
                            outcome=outcome,
                            status=503,
                            started=started,
                            request_bytes=0,
                            response_bytes=sent,
                            upstream=None,
                        )
                        return
                    uconn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
                status, req_bytes, resp_bytes, reusable = await _exchange(
                    down, reader, writer, uconn, up, ev, outcome
                )
                proxy.finished(
                    ctx,
                    protocol="http",
                    method=method,
                    path=target,
                    authority=authority,
                    outcome=outcome,
                    status=status,
                    started=started,
                    request_bytes=req_bytes,
                    response_bytes=resp_bytes,
                    upstream=up.workload,
                )
                if reusable:
                    uconn.start_next_cycle()
                else:
                    up.close()
                    up = uconn = None
            if down.our_state is h11.DONE and down.their_state is h11.DONE:
                down.start_next_cycle()
            else:
                return
    except _Closed:
        return
    finally:
        if up is not None:
            up.close()


async def _drain_body(down: h11.Connection, reader: asyncio.StreamReader) -> int:
    """Read (and drop) the body of a request we answer ourselves; bounded by h11's framing."""
    n = 0
    while down.their_state is h11.SEND_BODY:
        ev = await _next(down, reader)
        if isinstance(ev, h11.Data):
            n += len(ev.data)
        elif not isinstance(ev, h11.EndOfMessage):
            raise _Closed()
    return n


async def _exchange(
    down: h11.Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    uconn: h11.Connection,
    up: Upstream,
    req: h11.Request,
    outcome: Outcome,
) -> tuple[int, int, int, bool]:
    """Forward one allowed request and relay its response: (status, request bytes, response
    bytes, upstream reusable)."""
    hdrs: list[tuple[str, str]] = list(outcome.upstream_headers)
    chunked = any(n.lower() == b"transfer-encoding" and b"chunked" in v.lower() for n, v in req.headers)
    if chunked and not any(n == "content-length" for n, _ in hdrs):
        hdrs.append(("transfer-encoding", "chunked"))  # hop-by-hop: re-framed for this hop
    _send(
        uconn,
        up.writer,
        h11.Request(method=req.method, target=outcome.upstream_target.encode("latin-1"), headers=hdrs),
    )
    req_bytes = 0
    while down.their_state is h11.SEND_BODY:
        ev = await _next(down, reader)
        if isinstance(ev, h11.Data):
            req_bytes += len(ev.data)
            _send(uconn, up.writer, ev)
            await up.writer.drain()
        elif isinstance(ev, h11.EndOfMessage):
            _send(uconn, up.writer, h11.EndOfMessage())
        else:
            raise _Closed()
    if uconn.our_state is h11.SEND_BODY:
        _send(uconn, up.writer, h11.EndOfMessage())
    await up.writer.drain()
    status = 0
    resp_bytes = 0
    try:
        while True:
            ev = await _next(uconn, up.reader)
            if isinstance(ev, h11.InformationalResponse):
                _send(
                    down,
                    writer,
                    h11.InformationalResponse(
                        status_code=ev.status_code, headers=_response_headers(list(ev.headers))
                    ),
                )
            elif isinstance(ev, h11.Response):
                status = ev.status_code
                _send(
                    down,
                    writer,
                    h11.Response(
                        status_code=ev.status_code,
                        reason=ev.reason,
                        headers=_response_headers(list(ev.headers)),
                    ),
                )
            elif isinstance(ev, h11.Data):
                resp_bytes += len(ev.data)
                _send(down, writer, ev)
                await writer.drain()
            elif isinstance(ev, h11.EndOfMessage):
                _send(down, writer, h11.EndOfMessage())
                await writer.drain()
                break
            else:
                raise h11.RemoteProtocolError("upstream closed before the response ended")
    except h11.RemoteProtocolError:
        if status == 0 and down.our_state is h11.SEND_RESPONSE:
            resp_bytes = await _answer(down, writer, 503, UPSTREAM_FAILED_BODY)
            return 503, req_bytes, resp_bytes, False
        raise _Closed() from None
    reusable = uconn.our_state is h11.DONE and uconn.their_state is h11.DONE
    return status, req_bytes, resp_bytes, reusable


__all__ = ["serve"]
