"""A good client's latency while another workload attacks the same HBONE server over HTTP/2.

    PYTHONPATH=$PWD .venv/bin/python -m bench.abuse_bench [--probes 300] [--rounds 2] [--pairs 10000]

One run, three processes: the HBONE server (``tunnel.server.HboneServer`` with real mTLS and
an echo backend, as in an agent), the good client (``tunnel.client.HboneClient`` from another
workload's identity: every probe opens a new CONNECT stream on its pooled connection, sends
1 KB, reads the echo, closes) and the attacker (a third identity, raw HTTP/2 frames over TLS:
``--waves`` x ``--pairs`` HEADERS+RST_STREAM pairs, rapid reset, reconnecting whenever the
server sends GOAWAY, then a stream flood past MAX_CONCURRENT_STREAMS). Rounds alternate
"quiet" and "attacked" probe sets in the same run; the figure that matters is the attacked
p99 over the quiet p99 (target: within 1.5x), with probe timeouts counted.

The attacker's frame builders are also used by tests/tunnel/test_h2_abuse_wire.py, which asserts
the behaviour (GOAWAY, close, one log line per connection), not wall-clock figures.

Measured on the shared 2-core VM (2026-12-04, --probes 200 --rounds 2; each attack: 31
connections, 28 GOAWAYs, ~30 300 streams taken in ~7 s): attacked/quiet p99 1.38x, 2.00x and
1.82x with the loop's TLS transport (the default), 3.18x and 4.44x with ``--tls-on-fd``; p50
unchanged (~1.0 ms both), no probe timeouts. What remains is one block of ~10 ms per attacker
connection: the core handles its ~1000 HEADERS+RST pairs (10 µs each) in one read callback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import socket
import ssl
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import hpack

from identity.bundle import TrustBundleSet
from identity.ca import CertificateAuthority
from identity.keys import build_csr, generate_key
from identity.spiffe import SpiffeId
from identity.svid import WorkloadCredential
from tunnel.authority import Authority

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HDR = struct.Struct(">BHBBL")
HEADERS, RST_STREAM, SETTINGS, GOAWAY = 0x1, 0x3, 0x4, 0x7
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
CANCEL = 0x8


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HDR.pack(n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def connect_block(authority: Authority) -> bytes:
    """A CONNECT header block that never touches the dynamic tables: the same bytes can open
    any number of streams (an attacker does not need a real encoder)."""
    fields = [(b":method", b"CONNECT"), (b":authority", str(authority).encode())]
    return hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(n, v) for n, v in fields], huffman=False)


def rapid_reset_pairs(authority: Authority, pairs: int, first_sid: int = 1) -> Iterator[bytes]:
    """HEADERS (a valid HBONE CONNECT) then RST_STREAM(CANCEL) on the same stream, ``pairs`` times
    (CVE-2023-44487): each costs the server a stream setup and teardown, the attacker nothing."""
    block = connect_block(authority)
    for i in range(pairs):
        sid = first_sid + 2 * i
        yield frame(HEADERS, END_HEADERS, sid, block) + frame(RST_STREAM, 0, sid, struct.pack(">L", CANCEL))


def stream_flood(authority: Authority, streams: int, first_sid: int = 1) -> Iterator[bytes]:
    """CONNECT streams that are never closed, past the server's MAX_CONCURRENT_STREAMS."""
    block = connect_block(authority)
    for i in range(streams):
        yield frame(HEADERS, END_HEADERS, first_sid + 2 * i, block)


def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of every complete frame in ``data``."""
    out, pos = [], 0
    while pos + 9 <= len(data):
        hi, lo, ftype, flags, sid = _HDR.unpack_from(data, pos)
        n = (hi << 16) | lo
        if pos + 9 + n > len(data):
            break
        out.append((ftype, flags, sid & 0x7FFFFFFF, data[pos + 9 : pos + 9 + n]))
        pos += 9 + n
    return out


@dataclass
class AttackResult:
    frames_sent: int  # pairs or streams written (buffered) before the server closed
    goaway_code: int | None  # error code of the GOAWAY the server sent, None when it sent none
    goaway_last: int | None  # its last stream id: how far the server got before it gave up
    closed: bool  # the server closed the connection
    received: list[tuple[int, int, int, bytes]] = field(default_factory=list)


async def attack_connection(
    addr: Authority, ctx: ssl.SSLContext, units: Iterator[bytes], *, batch: int = 200, timeout: float = 10.0
) -> AttackResult:
    """Open one HTTP/2 connection, ACK the server's SETTINGS, write ``units`` in batches while
    reading whatever comes back; stop once the server has sent GOAWAY or closed."""
    reader, writer = await asyncio.open_connection(str(addr.ip), addr.port, ssl=ctx, server_hostname="")
    got = bytearray()
    eof = asyncio.Event()

    async def read() -> None:
        try:
            while chunk := await reader.read(1 << 16):
                got.extend(chunk)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            eof.set()

    task = asyncio.create_task(read())
    sent = 0
    try:
        writer.write(PREFACE + frame(SETTINGS, 0, 0))
        deadline = time.monotonic() + timeout
        while not any(t == SETTINGS and not f & ACK for t, f, _s, _p in parse_frames(bytes(got))):
            if eof.is_set() or time.monotonic() > deadline:
                raise ConnectionError("the server sent no SETTINGS")
            await asyncio.sleep(0.001)
        writer.write(frame(SETTINGS, ACK, 0))
        chunk: list[bytes] = []
        for unit in units:
            chunk.append(unit)
            if len(chunk) < batch:
                continue
            if eof.is_set() or _has_goaway(got):
                break
            writer.write(b"".join(chunk))
            sent += len(chunk)
            chunk = []
            await writer.drain()
        else:
            if chunk and not eof.is_set():
                writer.write(b"".join(chunk))
                sent += len(chunk)
                await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(eof.wait(), timeout)
    closed = eof.is_set()
    task.cancel()
    writer.close()
    frames = parse_frames(bytes(got))
    goaways = [struct.unpack(">LL", p[:8]) for t, _f, _s, p in frames if t == GOAWAY]
    code, last = (goaways[0][1], goaways[0][0] & 0x7FFFFFFF) if goaways else (None, None)
    return AttackResult(sent, code, last, closed, frames)


def _has_goaway(got: bytearray) -> bool:
    return any(t == GOAWAY for t, _f, _s, _p in parse_frames(bytes(got)))


# --- the measurement --------------------------------------------------------------------------
NOW = dt.datetime.now(dt.UTC)
TD = "cluster.local"


def _issue(ca: CertificateAuthority, ns: str, sa: str) -> WorkloadCredential:
    key = generate_key()
    sid = SpiffeId.for_workload(ca.trust_domain, ns, sa)
    issued = ca.sign_csr(build_csr(key, sid), allowed=lambda _i: True, ttl=dt.timedelta(hours=1), now=NOW)
    return WorkloadCredential(sid, key, issued.chain)


def client_context(cred: WorkloadCredential, bundles: TrustBundleSet) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=bundles.all_roots_pem().decode())
    ctx.set_alpn_protocols(["h2"])
    fd = os.memfd_create("abuse-bench")
    os.write(fd, cred.chain_pem() + cred.key_pem())
    ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    os.close(fd)
    return ctx


def _server_main(
    ca_pem: bytes, cred_pem: tuple[bytes, bytes], tls_on_fd: bool, ready: mp.connection.Connection
) -> None:
    """The server process: HboneServer on uvloop with an echo backend, until killed."""
    import uvloop
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from identity.bundle import TrustBundle
    from tunnel.server import AuthzDecision, AuthzRequest, HboneServer, ServerConfig

    chain = x509.load_pem_x509_certificates(cred_pem[0])
    key = serialization.load_pem_private_key(cred_pem[1], None)
    cred = WorkloadCredential.from_chain(key, chain)  # type: ignore[arg-type]
    bundles = TrustBundleSet.of(TrustBundle.from_pem(TD, ca_pem))

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
        w.close()

    async def allow(_req: AuthzRequest) -> AuthzDecision:
        return AuthzDecision(True, "bench")

    async def main() -> None:
        backend = await asyncio.start_server(echo, "127.0.0.1", 0)
        server = HboneServer(
            credentials=lambda _ip: cred,
            bundles=lambda: bundles,
            authorize=allow,
            config=ServerConfig(tls_on_fd=tls_on_fd),
        )
        addr = await server.start("127.0.0.1", 0)
        ready.send((str(addr), "{}:{}".format(*backend.sockets[0].getsockname()[:2])))
        while True:
            await asyncio.sleep(3600)

    uvloop.run(main())


def _attacker_main(
    addr: str,
    backend: str,
    ca_pem: bytes,
    cred_pem: bytes,
    waves: int,
    pairs: int,
    out: mp.connection.Connection,
) -> None:
    """The attacker process: ``waves`` x ``pairs`` rapid-reset pairs, reconnecting after every
    GOAWAY, then one stream flood. Reports what the server did to each connection."""
    from identity.bundle import TrustBundle

    bundles = TrustBundleSet.of(TrustBundle.from_pem(TD, ca_pem))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=bundles.all_roots_pem().decode())
    ctx.set_alpn_protocols(["h2"])
    fd = os.memfd_create("abuse-attacker")
    os.write(fd, cred_pem)
    ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    os.close(fd)
    server, target = Authority.parse(addr), Authority.parse(backend)

    async def main() -> dict[str, object]:
        conns: list[dict[str, object]] = []
        t0 = time.monotonic()
        for _ in range(waves):
            left = pairs
            while left > 0:
                # A last connection under the burst allowance gets no GOAWAY: stop waiting soon.
                r = await attack_connection(server, ctx, rapid_reset_pairs(target, left), timeout=2)
                done = (r.goaway_last + 1) // 2 if r.goaway_last else r.frames_sent
                conns.append(
                    {"kind": "rapid-reset", "streams": done, "goaway": r.goaway_code, "closed": r.closed}
                )
                left -= max(done, 1)
        r = await attack_connection(server, ctx, stream_flood(target, 1000), timeout=2)
        done = (r.goaway_last + 1) // 2 if r.goaway_last else r.frames_sent
        conns.append({"kind": "stream-flood", "streams": done, "goaway": r.goaway_code, "closed": r.closed})
        return {"seconds": time.monotonic() - t0, "connections": conns}

    out.send(asyncio.run(main()))


async def _probe_set(client: object, target: object, n: int, timeout: float) -> tuple[list[float], int]:
    """``n`` probes one after another: new CONNECT stream, 1 KB echo, close. (latencies, timeouts)."""
    from tunnel.client import HboneClient, OutboundTarget

    assert isinstance(client, HboneClient) and isinstance(target, OutboundTarget)
    lat: list[float] = []
    timeouts = 0
    payload = b"x" * 1024
    for _ in range(n):
        a, b = socket.socketpair()
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                stream = await client.establish(target, lambda: None)
                r, w = await asyncio.open_connection(sock=a)
                loop = asyncio.get_running_loop()
                transport, _proto = await loop.connect_accepted_socket(stream.tcp_protocol, sock=b)
                w.write(payload)
                await r.readexactly(len(payload))
                lat.append(time.perf_counter() - t0)
                w.close()
                transport.close()
        except TimeoutError:
            timeouts += 1
            a.close()
            b.close()
    return lat, timeouts


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probes", type=int, default=300, help="probes per set")
    ap.add_argument("--rounds", type=int, default=2, help="quiet/attacked pairs of probe sets")
    ap.add_argument("--waves", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--timeout", type=float, default=2.0, help="a probe slower than this counts as a timeout")
    ap.add_argument("--json", default="", help="write the figures here too")
    ap.add_argument("--tls-on-fd", action="store_true", help="the server uses tunnel.fdtls")
    args = ap.parse_args()

    import uvloop

    from tunnel.client import HboneClient, OutboundTarget

    ca = CertificateAuthority.create_root(TD, NOW - dt.timedelta(minutes=5))
    bundles = TrustBundleSet.of(ca.bundle)
    server_cred, good_cred, bad_cred = (
        _issue(ca, "ns2", "httpbin"),
        _issue(ca, "ns1", "sleep"),
        _issue(ca, "ns3", "mallory"),
    )
    ca_pem = ca.bundle.to_pem()
    mpc = mp.get_context("spawn")
    ready_r, ready_w = mpc.Pipe(duplex=False)
    srv = mpc.Process(
        target=_server_main,
        args=(ca_pem, (server_cred.chain_pem(), server_cred.key_pem()), args.tls_on_fd, ready_w),
        daemon=True,
    )
    srv.start()
    try:
        if not ready_r.poll(30):
            raise SystemExit("the HBONE server process did not start")
        addr, backend = ready_r.recv()
        quiet_sets: list[tuple[list[float], int]] = []
        attacked_sets: list[tuple[list[float], int]] = []
        attacks: list[dict[str, Any]] = []

        async def run() -> None:
            client = HboneClient(bundles=lambda: bundles)
            target = OutboundTarget(
                good_cred, Authority.parse(backend), Authority.parse(addr), (server_cred.spiffe_id,)
            )
            await _probe_set(client, target, 20, args.timeout)  # warm-up: the pooled connection
            for _ in range(args.rounds):
                lat, to = await _probe_set(client, target, args.probes, args.timeout)
                quiet_sets.append((lat, to))
                out_r, out_w = mpc.Pipe(duplex=False)
                att = mpc.Process(
                    target=_attacker_main,
                    args=(
                        addr,
                        backend,
                        ca_pem,
                        bad_cred.chain_pem() + bad_cred.key_pem(),
                        args.waves,
                        args.pairs,
                        out_w,
                    ),
                    daemon=True,
                )
                att.start()
                await asyncio.sleep(0.3)  # the attacker process is importing; start probing once it attacks
                lat, to = [], 0  # probes for as long as the attack runs
                deadline = time.monotonic() + 120
                while (att.is_alive() or not lat) and time.monotonic() < deadline:
                    part, t = await _probe_set(client, target, 10, args.timeout)
                    lat += part
                    to += t
                # Never block this loop: a client that stops answering PINGs is rightly dropped.
                await asyncio.get_running_loop().run_in_executor(None, att.join, 60)
                attacked_sets.append((lat, to))
                attacks.append(out_r.recv() if out_r.poll(5) else {"error": "no report"})
            await client.close()

        uvloop.run(run())
    finally:
        srv.kill()
        srv.join(5)

    quiet = [x for lat, _t in quiet_sets for x in lat]
    hit = [x for lat, _t in attacked_sets for x in lat]
    q99, a99 = _pct(quiet, 0.99), _pct(hit, 0.99)
    ratio = a99 / q99
    summary: dict[str, Any] = {
        "quiet_probes": len(quiet),
        "attacked_probes": len(hit),
        "quiet_p50_ms": _pct(quiet, 0.5) * 1e3,
        "quiet_p99_ms": q99 * 1e3,
        "attacked_p50_ms": _pct(hit, 0.5) * 1e3,
        "attacked_p99_ms": a99 * 1e3,
        "p99_ratio": ratio,
        "quiet_timeouts": sum(t for _lat, t in quiet_sets),
        "attacked_timeouts": sum(t for _lat, t in attacked_sets),
        "attacks": attacks,
    }
    for k, v in summary.items():
        if k != "attacks":
            print(f"{k:20} {v:.3f}" if isinstance(v, float) else f"{k:20} {v}")
    for i, att in enumerate(attacks):
        conns = att.get("connections", [])
        goaways = sum(1 for c in conns if c["goaway"] is not None)
        closed = sum(1 for c in conns if c["closed"])
        taken = sum(c["streams"] for c in conns)
        codes = sorted({c["goaway"] for c in conns}, key=str)
        print(
            f"attack {i + 1}: {len(conns)} connections, {taken} streams the server took, "
            f"{goaways} GOAWAYs (codes {codes}), {closed} closed, {att.get('seconds', 0):.2f}s"
        )
    verdict = "met" if ratio <= 1.5 else "NOT met"
    print(f"target: attacked p99 <= 1.5x quiet p99: {verdict} ({ratio:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
