"""An upstream that speaks first (SSH/SMTP banner) must not get a DATA frame out before the 200.

The banner backend runs in its own thread with blocking sockets, so the banner is already in the
agent's socket buffer when the upstream connect completes: the event loop (uvloop reads right
after connection_made even when reading was paused there) hands it to the stream before the server
sent its response headers. HTTP/2 forbids DATA before the response HEADERS; the client must see
the 200 and then the banner, on every tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator

from tunnel.hbone import Authority

from .conftest import running_mesh

BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"
TUNNELS = 20


@contextlib.contextmanager
def banner_backend(count: int) -> Iterator[Authority]:
    """Accepts up to ``count`` connections; each gets the banner at once, then its input echoed."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(count)
    lsock.settimeout(10)
    stop = threading.Event()

    def serve_one(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                conn.sendall(BANNER)
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def serve() -> None:
        workers = []
        for _ in range(count):
            if stop.is_set():
                break
            try:
                conn, _ = lsock.accept()
            except OSError:
                break
            t = threading.Thread(target=serve_one, args=(conn,), daemon=True)
            t.start()
            workers.append(t)
        for t in workers:
            t.join(15)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield Authority.of("127.0.0.1", lsock.getsockname()[1])
    finally:
        stop.set()
        lsock.close()
        thread.join(20)


async def test_banner_from_upstream_follows_the_200(client_cred, server_cred, bundles) -> None:
    with banner_backend(TUNNELS) as backend:
        async with running_mesh(client_cred=client_cred, server_cred=server_cred, bundles=bundles) as mesh:
            mesh.destination = backend
            for i in range(TUNNELS):
                r, w = await mesh.connect()
                try:
                    got = await asyncio.wait_for(r.readexactly(len(BANNER)), 5)
                    assert got == BANNER, f"tunnel {i}"
                    w.write(b"reply %d" % i)
                    await w.drain()
                    echo = await asyncio.wait_for(r.readexactly(len(b"reply %d" % i)), 5)
                    assert echo == b"reply %d" % i
                finally:
                    w.close()
            assert mesh.tunnel_errors == []
            assert mesh.client.stats["tunnels_opened"] == TUNNELS
            assert mesh.client.stats["connections_opened"] == 1  # no protocol error broke the pool
