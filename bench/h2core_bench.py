"""CPU cost of the HTTP/2 core: tunnel/h2 against the h2 library, in the same run, in memory.

    PYTHONPATH=$PWD .venv/bin/python -m bench.h2core_bench [--quick]

Rows (CPU time via time.process_time, both ends counted, median of alternating rounds):

* ``exchange``: one HBONE CONNECT stream on an established connection, both ends: CONNECT with
  ztunnel's request headers, 200, 1 KB each way, FIN both ways, window updates.
  ``tunnel/h2`` = this core; ``tunnel.hbone`` = today's core (h2 underneath, with the project's
  fast paths); ``h2`` = the plain h2 library connection object.
* ``data``: CPU per MB of DATA through one stream (frame, send, parse, acknowledge), toward a
  peer allowing 1 MiB frames (ztagent) and one allowing 16 KiB (Envoy, ztunnel).
* ``frames`` / ``headers``: the micro-measurements behind tunnel/h2's choices: hand-built frame
  bytes vs hyperframe objects, our literal header blocks vs ``hpack.Encoder``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import hyperframe.frame as hf

from tunnel import hbone
from tunnel.h2 import ClientConnection, ConnectRequest, Data, ServerConnection
from tunnel.h2 import frames as fr
from tunnel.h2 import headers as hd

DST = hbone.Authority.parse("10.0.2.7:8080")
HEADERS = {
    "baggage": "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=sleep,"
    "service.name=sleep,service.version=v1",
    "forwarded": 'for="10.0.1.5:43512"',
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
}
KB = b"k" * 1024
MiB = 1024 * 1024


def cpu(fn: Callable[[], None], n: int) -> float:
    """CPU seconds per call of ``fn`` over ``n`` calls."""
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n


# --- exchange: this core ------------------------------------------------------------------
def ours_pair(max_frame: int = fr.DEFAULT_MAX_FRAME_SIZE * 64) -> tuple[ClientConnection, ServerConnection]:
    c = ClientConnection(max_frame_size=max_frame)
    s = ServerConnection(max_frame_size=max_frame)
    for _ in range(3):
        s.receive_data(c.data_to_send(), 0.0)
        c.receive_data(s.data_to_send(), 0.0)
    return c, s


def ours_exchange(c: ClientConnection, s: ServerConnection) -> None:
    sid = c.open_stream(DST, HEADERS)
    for ev in s.receive_data(c.data_to_send(), 0.0):
        if isinstance(ev, ConnectRequest):
            s.respond(ev.stream_id, 200)
    c.receive_data(s.data_to_send(), 0.0)
    c.send_data(sid, KB, end_stream=True)
    for ev in s.receive_data(c.data_to_send(), 0.0):
        if isinstance(ev, Data):
            s.acknowledge(sid, ev.flow_controlled_length)
    s.send_data(sid, KB, end_stream=True)
    for ev in c.receive_data(s.data_to_send(), 0.0):
        if isinstance(ev, Data):
            c.acknowledge(sid, ev.flow_controlled_length)
    s.receive_data(c.data_to_send(), 0.0)


# --- exchange: today's tunnel.hbone core (h2 underneath) -----------------------------------
def hbone_pair() -> tuple[hbone.ClientConnection, hbone.ServerConnection]:
    c, s = hbone.ClientConnection(), hbone.ServerConnection()
    for _ in range(3):
        s.receive_data(c.data_to_send())
        c.receive_data(s.data_to_send())
    return c, s


def hbone_exchange(c: hbone.ClientConnection, s: hbone.ServerConnection) -> None:
    sid = c.open_stream(DST, HEADERS)
    for ev in s.receive_data(c.data_to_send()):
        if isinstance(ev, hbone.ConnectRequest):
            s.respond(ev.stream_id, 200)
    c.receive_data(s.data_to_send())
    c.send_data(sid, KB)
    c.end_stream(sid)
    for ev in s.receive_data(c.data_to_send()):
        if isinstance(ev, hbone.Data):
            s.acknowledge(sid, ev.flow_controlled_length)
    s.send_data(sid, KB)
    s.end_stream(sid)
    for ev in c.receive_data(s.data_to_send()):
        if isinstance(ev, hbone.Data):
            c.acknowledge(sid, ev.flow_controlled_length)
    s.receive_data(c.data_to_send())


# --- exchange: the plain h2 library ---------------------------------------------------------
def h2_pair(max_frame: int = MiB) -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    def make(client: bool) -> h2.connection.H2Connection:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client, header_encoding=None))
        conn.local_settings = h2.settings.Settings(
            client=client,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 4 * MiB,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        conn.max_inbound_frame_size = max_frame
        conn.incoming_buffer.max_frame_size = max_frame
        conn.initiate_connection()
        conn.increment_flow_control_window(16 * MiB - 65535)
        return conn

    c, s = make(True), make(False)
    for _ in range(3):
        s.receive_data(c.data_to_send())
        c.receive_data(s.data_to_send())
    return c, s


H2_REQUEST = [(b":method", b"CONNECT"), (b":authority", str(DST).encode())] + [
    (k.encode(), v.encode()) for k, v in HEADERS.items()
]


def h2_exchange(c: h2.connection.H2Connection, s: h2.connection.H2Connection) -> None:
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, H2_REQUEST)
    for ev in s.receive_data(c.data_to_send()):
        if isinstance(ev, h2.events.RequestReceived):
            s.send_headers(sid, [(b":status", b"200")])
    c.receive_data(s.data_to_send())
    c.send_data(sid, KB, end_stream=True)
    for ev in s.receive_data(c.data_to_send()):
        if isinstance(ev, h2.events.DataReceived):
            s.acknowledge_received_data(ev.flow_controlled_length, sid)
    s.send_data(sid, KB, end_stream=True)
    for ev in c.receive_data(s.data_to_send()):
        if isinstance(ev, h2.events.DataReceived):
            c.acknowledge_received_data(ev.flow_controlled_length, sid)
    s.receive_data(c.data_to_send())


# --- DATA per MB ----------------------------------------------------------------------------
def ours_bulk(total: int, peer_frame: int) -> float:
    c = ClientConnection(max_frame_size=MiB)
    s = ServerConnection(max_frame_size=peer_frame)  # the receiver advertises peer_frame
    for _ in range(3):
        s.receive_data(c.data_to_send(), 0.0)
        c.receive_data(s.data_to_send(), 0.0)
    sid = c.open_stream(DST)
    s.receive_data(c.data_to_send(), 0.0)
    s.respond(sid, 200)
    c.receive_data(s.data_to_send(), 0.0)
    payload = b"d" * MiB
    t0 = time.process_time()
    sent = 0
    while sent < total:
        sent += c.send_data(sid, payload)
        for seg in c.data_to_send_segments():  # the scatter/gather path the shell uses
            for ev in s.receive_data(seg, 0.0):
                if isinstance(ev, Data):
                    s.acknowledge(sid, ev.flow_controlled_length)
        back = s.data_to_send()
        if back:
            c.receive_data(back, 0.0)
    return (time.process_time() - t0) / (total / MiB)


def h2_bulk(total: int, peer_frame: int) -> float:
    c, s = h2_pair(max_frame=peer_frame)
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, H2_REQUEST)
    s.receive_data(c.data_to_send())
    s.send_headers(sid, [(b":status", b"200")])
    c.receive_data(s.data_to_send())
    chunk = b"d" * peer_frame
    t0 = time.process_time()
    sent = 0
    while sent < total:
        n = min(c.local_flow_control_window(sid), len(chunk), c.max_outbound_frame_size)
        if n > 0:
            c.send_data(sid, chunk[:n])
            sent += n
        for ev in s.receive_data(c.data_to_send()):
            if isinstance(ev, h2.events.DataReceived):
                s.acknowledge_received_data(ev.flow_controlled_length, sid)
        back = s.data_to_send()
        if back:
            c.receive_data(back)
    return (time.process_time() - t0) / (total / MiB)


# --- micro: frames and header blocks ---------------------------------------------------------
def micro(n: int) -> list[tuple[str, float, float]]:
    rows = []
    wire = hf.DataFrame(1, data=b"x" * 100).serialize()

    def hf_data() -> None:
        hf.DataFrame(1, data=b"x" * 100).serialize()

    def our_data() -> None:
        _ = fr.data_header(100, 1) + b"x" * 100

    rows.append(("frames: DATA serialize", cpu(our_data, n), cpu(hf_data, n)))

    def hf_wu() -> None:
        hf.WindowUpdateFrame(1, window_increment=262144).serialize()

    our_wu = cpu(lambda: fr.window_update_frame(1, 262144), n)
    rows.append(("frames: WINDOW_UPDATE serialize", our_wu, cpu(hf_wu, n)))
    mv = memoryview(wire)

    def hf_parse() -> None:
        frame, length = hf.Frame.parse_frame_header(mv[:9])
        frame.parse_body(mv[9 : 9 + length])

    rows.append(("frames: DATA parse", cpu(lambda: fr.parse_header(wire, 0), n), cpu(hf_parse, n)))
    fields = hd.check_outbound(HEADERS)
    enc = hpack.Encoder()
    req = [(b":method", b"CONNECT"), (b":authority", str(DST).encode()), *fields]

    def hpack_encode() -> None:
        enc.encode(req, huffman=False)

    our_req = cpu(lambda: hd.request_block(str(DST), fields), n)
    rows.append(("headers: CONNECT block encode", our_req, cpu(hpack_encode, n)))
    our_200 = cpu(lambda: hd.response_block(200), n)
    rows.append(("headers: :status 200 block", our_200, cpu(lambda: enc.encode([(b":status", b"200")]), n)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    n_ex = 300 if args.quick else 2000
    n_mb = 16 if args.quick else 64
    n_micro = 2000 if args.quick else 20000

    results: dict[str, list[float]] = {}

    def rec(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)

    for _ in range(args.rounds):  # alternate implementations inside each round
        c, s = ours_pair()
        rec("exchange tunnel/h2", cpu(lambda c=c, s=s: ours_exchange(c, s), n_ex))  # type: ignore[misc]
        hc, hs = hbone_pair()
        rec("exchange tunnel.hbone", cpu(lambda c=hc, s=hs: hbone_exchange(c, s), n_ex // 4))  # type: ignore[misc]
        pc, ps = h2_pair()
        rec("exchange h2", cpu(lambda c=pc, s=ps: h2_exchange(c, s), n_ex // 4))  # type: ignore[misc]
        for frame in (MiB, 16384):
            rec(f"data/MB {frame // 1024}KiB frames tunnel/h2", ours_bulk(n_mb * MiB, frame))
            rec(f"data/MB {frame // 1024}KiB frames h2", h2_bulk(n_mb * MiB // 4, frame))

    def med(key: str) -> float:
        return statistics.median(results[key])

    print(f"# tunnel/h2 vs the h2 library, CPU per operation, median of {args.rounds} alternating rounds")
    print(f"{'operation':44} {'tunnel/h2':>12} {'h2 library':>12} {'ratio':>7}")
    ex = med("exchange tunnel/h2")
    for other in ("h2", "tunnel.hbone"):
        o = med(f"exchange {other}")
        label = "CONNECT exchange, both ends vs " + other
        print(f"{label:44} {ex * 1e6:10.1f}µs {o * 1e6:10.1f}µs {o / ex:6.1f}x")
    for frame in (1024, 16):
        a, b = med(f"data/MB {frame}KiB frames tunnel/h2"), med(f"data/MB {frame}KiB frames h2")
        label = f"DATA per MB, {frame} KiB frames, both ends"
        print(f"{label:44} {a * 1e6:10.1f}µs {b * 1e6:10.1f}µs {b / a:6.1f}x")
    print(f"{'micro (ours = hand-built, other = hyperframe/hpack)':44}")
    for name, ours_t, lib_t in micro(n_micro):
        print(f"{'  ' + name:44} {ours_t * 1e6:10.2f}µs {lib_t * 1e6:10.2f}µs {lib_t / ours_t:6.1f}x")


if __name__ == "__main__":
    main()
