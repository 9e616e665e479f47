"""A real backend app for waypoint tests: HTTP/1.1 (h11) and h2c prior knowledge (h2) on one port,
answering every request with JSON of what it received (method, path, headers, body size, peer),
and optionally a gRPC server (grpcio, generic handler: ``/test.Echo/Say`` echoes the request
bytes, prefixed with ``hello ``, and sends the caller's x-forwarded-client-cert back as metadata).

Run in a pod namespace: ``python -m tests.waypoint.backend --port 8080 [--grpc-port 9090]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import h2.config
import h2.connection
import h2.events
import h11

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _answer(method: str, path: str, headers: list[tuple[str, str]], size: int, peer: Any) -> bytes:
    return json.dumps(
        {"method": method, "path": path, "headers": headers, "body_bytes": size, "peer": list(peer or ())}
    ).encode()


async def _h1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(first)
    peer = writer.get_extra_info("peername")
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
            continue
        if not isinstance(ev, h11.Request):
            return
        size = 0
        while True:
            b = conn.next_event()
            if b is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
                continue
            if isinstance(b, h11.Data):
                size += len(b.data)
            elif isinstance(b, h11.EndOfMessage):
                break
            else:
                return
        hs = [(n.decode(), v.decode()) for n, v in ev.headers]
        body = _answer(ev.method.decode(), ev.target.decode(), hs, size, peer)
        rh = [("content-type", "application/json"), ("content-length", str(len(body)))]
        writer.write(conn.send(h11.Response(status_code=200, headers=rh)) or b"")
        writer.write(conn.send(h11.Data(data=body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        if conn.our_state is h11.MUST_CLOSE:
            return
        conn.start_next_cycle()


async def _h2(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    peer = writer.get_extra_info("peername")
    reqs: dict[int, tuple[list[tuple[str, str]], int]] = {}
    data = first
    while data:
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                reqs[ev.stream_id] = (list(ev.headers), 0)  # type: ignore[arg-type]
            elif isinstance(ev, h2.events.DataReceived):
                hs, n = reqs.get(ev.stream_id, ([], 0))
                reqs[ev.stream_id] = (hs, n + len(ev.data))
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if isinstance(ev, h2.events.StreamEnded):
                hs, n = reqs.pop(ev.stream_id, ([], 0))
                p = dict(hs)
                plain = [(k, v) for k, v in hs if not k.startswith(":")]
                body = _answer(p.get(":method", ""), p.get(":path", ""), plain, n, peer)
                conn.send_headers(ev.stream_id, [(":status", "200"), ("content-type", "application/json"),
                                                 ("content-length", str(len(body)))])
                conn.send_data(ev.stream_id, body, end_stream=True)
        writer.write(conn.data_to_send())
        await writer.drain()
        data = await reader.read(65536)


async def _conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        first = await reader.read(65536)
        while first and len(first) < len(PREFACE) and PREFACE.startswith(first):
            first += await reader.read(65536)
        if first.startswith(PREFACE):
            await _h2(reader, writer, first)
        elif first:
            await _h1(reader, writer, first)
    except (ConnectionError, h11.RemoteProtocolError, h2.exceptions.ProtocolError):
        pass
    finally:
        writer.close()


async def start_http(host: str, port: int) -> asyncio.Server:
    return await asyncio.start_server(_conn, host, port)


def start_grpc(host: str, port: int) -> Any:
    from concurrent import futures

    import grpc

    def say(request: bytes, context: Any) -> bytes:
        md = dict(context.invocation_metadata())
        context.set_trailing_metadata((("seen-xfcc", md.get("x-forwarded-client-cert", "")),))
        return b"hello " + request

    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    server.bound_port = bound
    return server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--grpc-port", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=900.0, help="exit after this long (tests clean up)")
    args = ap.parse_args()
    # Keep the server object: grpcio stops a server that is garbage collected.
    grpc_server = start_grpc(args.host, args.grpc_port) if args.grpc_port else None

    async def run() -> None:
        srv = await start_http(args.host, args.port)
        print("ready", flush=True)
        async with srv:
            await asyncio.sleep(args.seconds)

    asyncio.run(run())
    if grpc_server is not None:
        grpc_server.stop(0)


if __name__ == "__main__":
    main()
