"""Helpers for kernel tests: sockets created inside a named network namespace, bounded waits, skips."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")

SOL_IP = 0
IP_TRANSPARENT = 19


def kernel_skip_reason() -> str | None:
    """Why kernel tests cannot run here, or None. CI is root with eBPF: there this is always None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, eBPF, policy routing)"
    if not os.path.exists("/proc/self/ns/net"):
        return "no network namespace support"
    if shutil.which("ip") is None:
        return "iproute2 `ip` not installed (scripts/setup.sh installs it)"
    return None


def bcc_skip_reason() -> str | None:
    reason = kernel_skip_reason()
    if reason:
        return reason
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "BCC python module not importable (scripts/setup.sh links python3-bpfcc into the venv)"
    return None


requires_kernel = pytest.mark.skipif(kernel_skip_reason() is not None, reason=str(kernel_skip_reason()))
requires_bcc = pytest.mark.skipif(bcc_skip_reason() is not None, reason=str(bcc_skip_reason()))


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run fn in a thread that entered netns `name`: sockets made there live in that namespace."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {name}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(30)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    if "value" not in box:
        raise TimeoutError(f"in_netns({name}) did not finish")
    return box["value"]  # type: ignore[return-value]


def socket_in(name: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
    return in_netns(name, lambda: socket.socket(family, type))


def transparent_listener(ns: str, addr: str = "0.0.0.0", port: int = 0) -> socket.socket:
    s = socket_in(ns)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
    s.bind((addr, port))
    s.listen(64)
    return s


def wait_until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def connect_from(ns: str, dst: tuple[str, int], timeout: float = 3.0) -> socket.socket:
    s = socket_in(ns)
    s.settimeout(timeout)
    try:
        s.connect(dst)
    except BaseException:
        s.close()
        raise
    return s


def connect_outcome(ns: str, dst: tuple[str, int], timeout: float = 2.0) -> str:
    """'connected', 'refused', 'timeout' or another errno name: what a client in `ns` sees."""
    try:
        s = connect_from(ns, dst, timeout)
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return os.strerror(e.errno or 0)
    s.close()
    return "connected"


@contextlib.contextmanager
def accepting(
    listener: socket.socket, timeout: float = 5.0
) -> Iterator[list[tuple[socket.socket, tuple[str, int]]]]:
    """Accept connections on `listener` in a thread for the duration; yields the accepted list."""
    accepted: list[tuple[socket.socket, tuple[str, int]]] = []
    stop = threading.Event()
    listener.settimeout(0.1)

    def loop() -> None:
        end = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < end:
            try:
                conn, peer = listener.accept()
            except (TimeoutError, OSError):
                continue
            accepted.append((conn, peer))

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield accepted
    finally:
        stop.set()
        t.join(timeout)
        for conn, _ in accepted:
            conn.close()


class EchoApp:
    """A real TCP app in a pod: echoes each connection until EOF; records client addresses.
    Bounded: it stops accepting after ``max_seconds`` and drops a connection idle ``conn_timeout``."""

    def __init__(self, ns: str, port: int, *, max_seconds: float = 900, conn_timeout: float = 120) -> None:
        self.sock = socket_in(ns)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", port))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.peers: list[str] = []
        self._max_seconds = max_seconds
        self._conn_timeout = conn_timeout
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        end = time.monotonic() + self._max_seconds
        while not self._stop.is_set() and time.monotonic() < end:
            try:
                conn, peer = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.peers.append(peer[0])
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(self._conn_timeout)
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._t.join(5)
        self.sock.close()
