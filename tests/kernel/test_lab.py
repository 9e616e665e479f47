"""`ztagent lab` as a user runs it (real CLI processes, examples/lab.yaml, real servers and curl).

Every lab here has a unique name and its own state root, and is removed in a finally block; each
test then checks that nothing it made is left (namespaces, pins, processes, state).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import topology as topo
from lab.runner import http_get_in, in_netns
from tests.kernel.nsutil import requires_bcc, requires_kernel, wait_until

pytestmark = [pytest.mark.kernel]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = str(REPO / "examples/lab.yaml")
ZTAGENT = [sys.executable, "-m", "cli.main"]
_n = iter(range(1000))


class Lab:
    def __init__(self, root: Path) -> None:
        self.name = f"zl{os.getpid() % 100000}-{next(_n)}"
        self.root = str(root / "labs")
        self.env = {**os.environ, "ZTAGENT_LAB_ROOT": self.root, "PYTHONPATH": str(REPO)}
        self.bg: list[subprocess.Popen[bytes]] = []

    def cli(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*ZTAGENT, "lab", *args], env=self.env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            cmd = " ".join(args)
            raise AssertionError(f"ztagent lab {cmd} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def exec(self, pod: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.cli("exec", "--name", self.name, pod, "--", *cmd, timeout=timeout, check=False)

    def background(self, pod: str, *cmd: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([*ZTAGENT, "lab", "exec", "--name", self.name, pod, "--", *cmd], env=self.env,
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.bg.append(p)
        return p

    def state(self) -> topo.LabState:
        return topo.LabState.load(self.name, self.root)

    def leftovers(self) -> list[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        left = [f"netns {ln.split()[0]}" for ln in out.splitlines() if ln.startswith(self.name + "-")]
        pins = f"/sys/fs/bpf/ztagent-lab-{self.name}"
        if os.path.exists(pins):
            left.append(f"pins {pins}")
        if os.path.exists(os.path.join(self.root, self.name)):
            left.append(f"state {self.root}/{self.name}")
        return left

    def cleanup(self) -> None:
        self.cli("down", "--name", self.name, check=False)
        for p in self.bg:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
            if p.stderr:
                p.stderr.close()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lb = Lab(tmp_path)
    try:
        yield lb
    finally:
        lb.cleanup()
        assert lb.leftovers() == []


def http_server(lab: Lab, pod: str, ip: str, port: int) -> subprocess.Popen[bytes]:
    srv = lab.background(pod, sys.executable, "-m", "http.server", str(port), "--bind", "0.0.0.0")
    ns = str(lab.state().find_pod(pod)["netns"])

    def up() -> bool:
        try:
            return http_get_in(ns, ip, port, "/", timeout=1)[0] == 200
        except OSError:
            return False

    wait_until(up, 20, f"http server in {pod}")
    return srv


@requires_kernel
def test_topology_without_agents_carries_http_across_nodes_and_down_leaves_nothing(lab: Lab) -> None:
    out = lab.cli("up", "--config", EXAMPLE, "--name", lab.name, "--no-agents", "--detach").stdout
    assert "frontend/sleep" in out and "10.244.2.2" in out
    http_server(lab, "backend/httpbin", "10.244.2.2", 8080)
    # Pod on node-a -> pod on node-b: routed through both nodes, no capture without agents.
    got = lab.exec("frontend/sleep", "curl", "-sS", "-m", "5", "http://10.244.2.2:8080/")
    assert got.returncode == 0 and "Directory listing" in got.stdout, got.stderr
    assert lab.exec("sleep", "ip", "-4", "-o", "addr", "show", "eth0").stdout.count("10.244.1.2/32") == 1
    bad = lab.cli("exec", "--name", lab.name, "nope", "--", "true", check=False)
    assert bad.returncode == 1 and "no pod 'nope'" in bad.stderr
    removed = lab.cli("down", "--name", lab.name).stdout
    assert f"netns {lab.name}-net" in removed
    assert lab.leftovers() == []


@requires_kernel
def test_down_after_a_crashed_up_removes_everything(lab: Lab) -> None:
    up = subprocess.Popen([*ZTAGENT, "lab", "up", "--config", EXAMPLE, "--name", lab.name, "--no-agents"],
                          env=lab.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: os.path.exists(os.path.join(lab.root, lab.name, "state.json"))
                   and len(lab.state().pods) == 4, 60, "lab up to build the topology")
        wait_until(lambda: any(ln.startswith(f"{lab.name}-pod-backend-reviews")
                               for ln in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                        text=True).stdout.splitlines()), 30, "last pod netns")
        up.send_signal(signal.SIGKILL)  # a crash: no teardown ran
        up.wait(10)
        assert lab.leftovers() != []
        lab.cli("down", "--name", lab.name)
        assert lab.leftovers() == []
    finally:
        if up.poll() is None:
            up.kill()
        up.communicate(timeout=10)


@requires_kernel
def test_bad_config_is_refused_naming_the_field(lab: Lab, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(EXAMPLE).read_text().replace("ips: [10.244.2.2]", "ips: [10.244.2.999]"))
    got = lab.cli("up", "--config", str(bad), "--name", lab.name, "--no-agents", "--detach", check=False)
    assert got.returncode == 2 and "workloads[2].ips[0]" in got.stderr, got.stderr
    assert lab.leftovers() == []


def _sniff_payloads(ns: str, iface: str, stop: threading.Event, out: list[bytes]) -> threading.Thread:
    """Capture TCP payloads on `iface` inside netns `ns` with scapy until `stop` is set."""
    from scapy.arch.linux import L2ListenSocket
    from scapy.automaton import select_objects
    from scapy.layers.inet import TCP
    from scapy.packet import Raw

    sock = in_netns(ns, lambda: L2ListenSocket(iface=iface))

    def loop() -> None:
        deadline = time.monotonic() + 120
        try:
            while not stop.is_set() and time.monotonic() < deadline:
                if not select_objects([sock], 0.1):
                    continue
                pkt = sock.recv()
                if pkt is not None and pkt.haslayer(TCP) and pkt.haslayer(Raw):
                    out.append(bytes(pkt[Raw].load))
        finally:
            sock.close()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@requires_bcc
def test_request_crosses_both_agents_in_hbone_and_fails_closed_without_them(lab: Lab) -> None:
    lab.cli("up", "--config", EXAMPLE, "--name", lab.name, "--detach", "--ready-timeout", "90", timeout=240)
    state = lab.state()
    srv = http_server(lab, "backend/httpbin", "10.244.2.2", 8080)
    marker = f"ztmarker{os.getpid()}x{time.monotonic_ns()}"
    stop, payloads = threading.Event(), []  # type: ignore[var-annotated]
    sniffer = _sniff_payloads(f"{lab.name}-net", "br0", stop, payloads)
    try:
        # Through the service VIP and straight to the pod IP: both steered, both through HBONE.
        for url in (f"http://10.96.0.10:8000/?{marker}", f"http://10.244.2.2:8080/?{marker}"):
            got = lab.exec("frontend/sleep", "curl", "-sS", "-m", "10", "-o", "/dev/null",
                           "-w", "%{http_code}", url)
            assert got.stdout == "200", (url, got.stdout, got.stderr)
    finally:
        time.sleep(0.3)
        stop.set()
        sniffer.join(10)
    wire = b"".join(payloads)
    assert len(wire) > 1000, "the sniffer saw no TLS traffic on the node link"
    assert marker.encode() not in wire, "application bytes crossed the node link in clear"
    # Counters on both agents, and the identity the destination saw.
    metrics_a = http_get_in(state.nodes["node-a"]["netns"], "127.0.0.1", 15020, "/metrics")[1]
    metrics_b = http_get_in(state.nodes["node-b"]["netns"], "127.0.0.1", 15020, "/metrics")[1]
    assert _metric(metrics_a, "istio_tcp_connections_opened_total", reporter="source") >= 2
    assert _metric(metrics_b, "istio_tcp_connections_opened_total", reporter="destination",
                   source_principal="spiffe://cluster.local/ns/frontend/sa/sleep") >= 2
    # The unenrolled legacy pod is not captured at its node, and the policy at node-b refuses it.
    legacy = lab.exec("frontend/legacy", "curl", "-sS", "-m", "5", "http://10.244.2.2:8080/")
    assert legacy.returncode != 0
    # Kill node-a's agent: sleep's connections fail instead of leaking to httpbin in plaintext.
    agent_a = next(p for p in state.processes if p.role == "agent-node-a")
    os.kill(agent_a.pid, signal.SIGKILL)
    wait_until(lambda: not topo.proc_alive(agent_a), 10, "agent node-a to die")
    dead = lab.exec("frontend/sleep", "curl", "-sS", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}",
                    "http://10.244.2.2:8080/")
    assert dead.returncode != 0 and dead.stdout in ("", "000"), dead.stdout
    assert re.search(r"timed out|reset|refused|Couldn't connect", dead.stderr), dead.stderr
    assert "Directory listing" not in dead.stdout
    # Restart: the new agent picks up the pinned capture and the same request works again.
    assert "restarted" in lab.cli("restart", "--name", lab.name, "node-a").stdout
    again = lab.exec("frontend/sleep", "curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}",
                     "http://10.96.0.10:8000/")
    assert again.stdout == "200", again.stderr
    # A real bulk client through the mesh as well (on 8080: the only port the policy allows).
    srv.kill()
    srv.wait(10)
    lab.background("backend/httpbin", "iperf3", "-s", "-1", "-p", "8080")
    wait_until(lambda: lab.exec("backend/httpbin", "sh", "-c", "ss -ltn | grep -q :8080").returncode == 0,
               15, "iperf3 server")
    bulk = lab.exec("frontend/sleep", "iperf3", "-c", "10.244.2.2", "-p", "8080", "-t", "1", "-J", timeout=60)
    assert bulk.returncode == 0, bulk.stdout[-500:] + bulk.stderr
    import json

    assert json.loads(bulk.stdout)["end"]["sum_received"]["bytes"] > 0
    removed = lab.cli("down", "--name", lab.name).stdout
    assert "process" in removed and f"pins /sys/fs/bpf/ztagent-lab-{lab.name}" in removed
    assert lab.leftovers() == []
