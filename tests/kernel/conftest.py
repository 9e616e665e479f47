"""Fixtures for kernel tests: a two-node namespace mesh with real servers and capture processes."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bpf.capture import DEFAULT_TABLE, Capture
from bpf.pinned import remove_pins
from lab import topology as topo
from tests.kernel.nsutil import socket_in, wait_until

REPO = Path(__file__).resolve().parents[2]
_counter = itertools.count()

# Two nodes; on node a an enrolled client c, an unenrolled client u and a spare pod d; on node b an enrolled
# server s and an unenrolled server v.
NODES = (topo.NodeSpec("a", "10.250.0.1", "10.244.1.0/24"), topo.NodeSpec("b", "10.250.0.2", "10.244.2.0/24"))
PODS = (
    topo.PodSpec("ns1", "c", "a", ("10.244.1.2",)),
    topo.PodSpec("ns1", "u", "a", ("10.244.1.3",)),
    topo.PodSpec("ns1", "d", "a", ("10.244.1.4",)),
    topo.PodSpec("ns2", "s", "b", ("10.244.2.2",)),
    topo.PodSpec("ns2", "v", "b", ("10.244.2.3",)),
)
SERVER_PORT = 8080


class BannerServer:
    """A real TCP server in a pod: answers each connection with 'real <pod> dst=... src=...'."""

    def __init__(self, ns: str, name: str, port: int) -> None:
        self.name = name
        self.sock = socket_in(ns)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", port))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.seen: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        end = time.monotonic() + 300
        while not self._stop.is_set() and time.monotonic() < end:
            try:
                conn, peer = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                self.seen.append(peer)
                local = conn.getsockname()
                conn.sendall(f"real {self.name} dst={local[0]}:{local[1]} src={peer[0]}\n".encode())

    def close(self) -> None:
        self._stop.set()
        self._t.join(5)
        self.sock.close()


def talk(ns: str, dst: tuple[str, int], timeout: float = 2.0, src: str | None = None) -> str:
    """Connect from netns `ns` and return the one-line answer, or 'timeout'/'refused'/<error>."""
    s = socket_in(ns)
    s.settimeout(timeout)
    try:
        if src:
            s.bind((src, 0))
        s.connect(dst)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
        return data.decode().strip() or "closed"
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    except OSError as e:
        return os.strerror(e.errno or 0)
    finally:
        s.close()


@dataclass
class Mesh:
    lab: str
    state: topo.LabState
    root: str
    pin_root: str
    table: int = DEFAULT_TABLE
    servers: dict[str, BannerServer] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    captures: list[Capture] = field(default_factory=list)

    def node_ns(self, node: str) -> str:
        return topo.node_netns(self.lab, node)

    def pod_ns(self, ref: str) -> str:
        return str(self.state.find_pod(ref)["netns"])

    def pod(self, ref: str) -> dict[str, object]:
        return self.state.find_pod(ref)

    def pin_dir(self, node: str) -> str:
        return os.path.join(self.pin_root, node)

    def enroll_arg(self, ref: str) -> str:
        p = self.state.find_pod(ref)
        return ",".join([ref, p["host_ifname"], *p["ips"]])

    def start_agent(self, node: str, enroll: tuple[str, ...] = (), detach_on_term: bool = False,
                    timeout: float = 60) -> subprocess.Popen[bytes]:
        ready = os.path.join(self.root, f"ready-{node}-{next(_counter)}")
        # nsenter (not `ip netns exec`): keeps the host's /sys/fs/bpf visible, as the lab does.
        cmd = ["nsenter", f"--net=/run/netns/{self.node_ns(node)}", sys.executable,
               str(REPO / "tests/kernel/listener_proc.py"), "--pin-dir", self.pin_dir(node),
               "--table", str(self.table), "--ready", ready]
        for ref in enroll:
            cmd += ["--enroll", self.enroll_arg(ref)]
        if detach_on_term:
            cmd.append("--detach-on-term")
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        self.procs.append(proc)

        def ready_or_dead() -> bool:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"agent on {node} exited {proc.returncode}: {err}")
            return os.path.exists(ready) and os.path.getsize(ready) > 0

        wait_until(ready_or_dead, timeout, f"capture agent on node {node}")
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def capture(self, node: str) -> Capture:
        cap = Capture(self.pin_dir(node), table=self.table, netns=self.node_ns(node))
        self.captures.append(cap)
        return cap


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    lab = f"zk{os.getpid()}-{next(_counter)}"
    root = str(tmp_path / "labroot")
    pin_root = f"/sys/fs/bpf/ztagent-test-{lab}"
    state = topo.build(topo.LabSpec(lab, NODES, PODS), root=root)
    m = Mesh(lab=lab, state=state, root=str(tmp_path), pin_root=pin_root)
    try:
        m.servers["s"] = BannerServer(m.pod_ns("ns2/s"), "s", SERVER_PORT)
        m.servers["v"] = BannerServer(m.pod_ns("ns2/v"), "v", SERVER_PORT)
        yield m
    finally:
        for proc in m.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        for srv in m.servers.values():
            srv.close()
        for cap in m.captures:
            cap.close()
        topo.teardown(state)
        for node in NODES:
            remove_pins(m.pin_dir(node.name))
        if os.path.isdir(pin_root):
            shutil.rmtree(pin_root, ignore_errors=True)
