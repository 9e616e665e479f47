# ruff: noqa: E501
"""The node agent in the lab (issues 4 and 5 "done when"): real eBPF capture, real `ztagent run`
processes in node namespaces, a real CA, pods as namespaces with real TCP apps.

One lab for the module (bringing it up costs seconds); each test sets the policies it needs by
rewriting the config file the agents and the CA watch, and waits until both agents serve it.

    node-a: frontend/sleep (enrolled), frontend/other (enrolled), frontend/legacy (NOT enrolled)
    node-b: backend/httpbin (enrolled), an echo app on :8080
    service backend/httpbin: VIP 10.96.0.10:8000 -> 8080
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab import topology as topo
from lab.runner import UpOptions, http_get_in, pin_root, up, ztagent_argv
from tests.kernel.nsutil import EchoApp, requires_bcc, socket_in, wait_until

pytestmark = [pytest.mark.kernel, requires_bcc, pytest.mark.timeout(600)]

VIP = ("10.96.0.10", 8000)
HTTPBIN = ("10.244.2.2", 8080)
SLEEP, OTHER, LEGACY = "frontend/sleep", "frontend/other", "frontend/legacy"
P_SLEEP = "spiffe://cluster.local/ns/frontend/sa/sleep"
P_OTHER = "spiffe://cluster.local/ns/frontend/sa/other"

CONFIG = """\
apiVersion: ztagent.io/v1alpha1
kind: MeshConfig
trustDomain: cluster.local
nodes:
  - {name: node-a, address: 10.250.0.1, podCIDR: 10.244.1.0/24}
  - {name: node-b, address: 10.250.0.2, podCIDR: 10.244.2.0/24}
workloads:
  - {name: sleep, namespace: frontend, serviceAccount: sleep, node: node-a, ips: [10.244.1.2], labels: {app: sleep}}
  - {name: other, namespace: frontend, serviceAccount: other, node: node-a, ips: [10.244.1.4], labels: {app: other}}
  - {name: legacy, namespace: frontend, serviceAccount: legacy, node: node-a, ips: [10.244.1.3], enrolled: false}
  - {name: httpbin, namespace: backend, serviceAccount: httpbin, node: node-b, ips: [10.244.2.2],
     labels: {app: httpbin}}
services:
  - {name: httpbin, namespace: backend, vips: [10.96.0.10], ports: [{port: 8000, targetPort: 8080}],
     selector: {app: httpbin}}
"""
ALLOW_NOTHING = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: backend}
spec: {}
"""
ALLOW_SLEEP = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: backend}
spec:
  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/frontend/sa/sleep"]}}]}]
"""
DENY_ALL = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: backend}
spec: {action: DENY, rules: [{}]}
"""
STRICT = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: backend}
spec: {mtls: {mode: STRICT}}
"""


@dataclass
class Lab:
    state: topo.LabState
    config: Path
    app: EchoApp
    policies: list[str] = field(default_factory=list)

    def ns(self, ref: str) -> str:
        return str(self.state.find_pod(ref)["netns"])

    def node_ns(self, node: str) -> str:
        return str(self.state.nodes[node]["netns"])

    def set_policies(self, *docs: str) -> None:
        self.set_config(CONFIG + "".join("---\n" + d for d in docs))

    def set_config(self, text: str) -> None:
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config)
        want = hashlib.sha256(text.encode()).hexdigest()
        for node in ("node-a", "node-b"):
            wait_until(
                lambda n=node: self.status(n)["config"]["digest"] == want, 20, f"{node} to apply config"
            )

    def ztagent_in(self, node: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.node_ns(node)}", *ztagent_argv(), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def status(self, node: str) -> dict:  # type: ignore[type-arg]
        p = self.ztagent_in(node, "status", "-o", "json")
        assert p.returncode in (0, 1), p.stderr
        return json.loads(p.stdout)  # type: ignore[no-any-return]

    def metrics(self, node: str, name: str, **labels: str) -> float:
        status, body = http_get_in(
            self.node_ns(node), self.state.nodes[node]["address"], 15020, "/metrics", 5
        )
        assert status == 200
        total = 0.0
        for fam in text_string_to_metric_families(body):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def roundtrip(
        self, ref: str, dst: tuple[str, int], payload: bytes = b"ping\n", timeout: float = 3.0
    ) -> str:
        """What a client in pod ``ref`` gets back: the echo, or 'timeout'/'reset'/'closed'/..."""
        s = socket_in(self.ns(ref))
        s.settimeout(timeout)
        try:
            s.connect(dst)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data.decode() if data else "closed"
        except TimeoutError:
            return "timeout"
        except ConnectionRefusedError:
            return "refused"
        except ConnectionResetError:
            return "reset"
        except OSError as e:
            if e.errno in (errno.ENOTCONN, errno.EPIPE):
                # A reset that arrived before our send or shutdown: the kernel reports it there.
                return "reset"
            return os.strerror(e.errno or 0)
        finally:
            s.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("lab")
    cfg = tmp / "lab.yaml"
    cfg.write_text(CONFIG)
    name = f"zta{os.getpid() % 100000}"
    state = up(UpOptions(config=str(cfg), name=name, root=str(tmp / "labroot"), ready_timeout=180))
    app = None
    try:
        app = EchoApp(str(state.find_pod("backend/httpbin")["netns"]), HTTPBIN[1])
        yield Lab(state, cfg, app)
    finally:
        if app is not None:
            app.close()
        topo.teardown(topo.LabState.load(state.lab, str(tmp / "labroot")))
    assert not [n for n in _netns_names() if n.startswith(name + "-")], "lab namespaces left behind"


def _netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# Tests run in file order on one lab.


def test_default_allow_cross_node_hbone_with_identity(lab: Lab) -> None:
    lab.set_policies()
    before = len(lab.app.peers)
    assert lab.roundtrip(SLEEP, VIP, b"via service\n") == "via service\n"
    assert lab.roundtrip(SLEEP, HTTPBIN, b"via pod ip\n") == "via pod ip\n"
    assert len(lab.app.peers) == before + 2
    # The destination agent saw sleep's verified identity over mTLS; the source agent reported too.
    dest = {
        "reporter": "destination",
        "source_principal": P_SLEEP,
        "destination_workload": "httpbin",
        "connection_security_policy": "mutual_tls",
    }
    assert lab.metrics("node-b", "istio_tcp_connections_opened_total", **dest) >= 2
    assert (
        lab.metrics(
            "node-a",
            "istio_tcp_connections_opened_total",
            reporter="source",
            source_workload="sleep",
            destination_service="httpbin.backend.svc.cluster.local",
        )
        >= 1
    )
    st = lab.status("node-b")
    assert st["healthy"] and st["capture"]["state"] == "attached"
    assert [w["spiffeId"] for w in st["workloads"]] == ["spiffe://cluster.local/ns/backend/sa/httpbin"]


class WhoAmIServer:
    """A real HTTP server in a pod: answers every GET with the client address it sees."""

    def __init__(self, ns: str, port: int) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = self.client_address[0].encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler, bind_and_activate=False)
        self.server.socket.close()
        self.server.socket = socket_in(ns)
        self.server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.server_bind()
        self.server.server_activate()
        self._t = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._t.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._t.join(5)


def test_hbone_keeps_the_source_pod_ip(lab: Lab) -> None:
    """ztunnel's behaviour: the destination agent binds its upstream socket to the source from
    the peer's `forwarded: for=` (IP_TRANSPARENT), and the capture's routing (every TCP packet
    from an enrolled pod's veth is local) brings the pod's replies back to that socket."""
    lab.set_policies()
    server = WhoAmIServer(lab.ns("backend/httpbin"), 8081)
    try:
        opened = lab.metrics(
            "node-b", "istio_tcp_connections_opened_total", reporter="destination", source_principal=P_SLEEP
        )
        for _ in range(2):  # a second request reuses the pooled HBONE connection
            assert http_get_in(lab.ns(SLEEP), HTTPBIN[0], 8081, "/whoami", 5) == (200, "10.244.1.2")
        assert http_get_in(lab.ns(OTHER), HTTPBIN[0], 8081, "/whoami", 5) == (200, "10.244.1.4")
        # It went over HBONE (the destination agent counted it as mTLS from sleep's identity) ...
        assert (
            lab.metrics(
                "node-b",
                "istio_tcp_connections_opened_total",
                reporter="destination",
                source_principal=P_SLEEP,
                connection_security_policy="mutual_tls",
            )
            >= opened + 2
        )
        # ... and the destination agent did not fall back to its own address.
        log = Path(lab.state.dir, "logs", "agent-node-b.log").read_text()
        assert "source_ip_not_preserved" not in log
    finally:
        server.close()
    assert lab.roundtrip(SLEEP, HTTPBIN, b"echo\n") == "echo\n"
    assert lab.app.peers[-1] == "10.244.1.2"


def test_lab_exec_ztagent_status_on_a_node(lab: Lab) -> None:
    """The documented way to see a node's health: `ztagent lab exec --node N -- ztagent status`,
    also when the venv's ztagent is not on PATH (lab exec runs the lab's own ztagent)."""
    root = str(Path(lab.state.dir).parent)
    env = {**os.environ, "ZTAGENT_LAB_ROOT": root, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    base = [*ztagent_argv(), "lab", "exec", "--name", lab.state.lab, "--node"]
    p = subprocess.run([*base, "node-b", "--", "ztagent", "status"], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("HEALTHY  node node-b"), p.stdout
    assert "backend/httpbin" in p.stdout and "spiffe://cluster.local/ns/backend/sa/httpbin" in p.stdout
    p = subprocess.run(
        [*base, "node-a", "--", "ztagent", "status", "-o", "json"], capture_output=True, text=True, timeout=60, env=env
    )
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    assert st["node"] == "node-a" and st["healthy"] and st["capture"]["state"] == "attached"


def test_same_node_traffic_is_authorized_locally_and_keeps_the_source_ip(lab: Lab) -> None:
    lab.set_policies()
    app = EchoApp(lab.ns(OTHER), 8080)
    try:
        assert lab.roundtrip(SLEEP, ("10.244.1.4", 8080), b"neighbour\n") == "neighbour\n"
        assert app.peers == ["10.244.1.2"]
        assert (
            lab.metrics(
                "node-a",
                "istio_tcp_connections_opened_total",
                reporter="destination",
                source_principal=P_SLEEP,
                destination_workload="other",
            )
            == 1
        )
    finally:
        app.close()


def test_unenrolled_pod_is_untouched_and_counted_as_plaintext(lab: Lab) -> None:
    lab.set_policies()
    plain_before = lab.metrics("node-b", "ztagent_plaintext_connections_total", namespace="backend")
    assert lab.roundtrip(LEGACY, HTTPBIN, b"legacy\n") == "legacy\n"
    # Not captured at its own node (no outbound series from legacy at node-a) ...
    assert lab.metrics("node-a", "istio_tcp_connections_opened_total", source_workload="legacy") == 0
    # ... but its plaintext arrival at an enrolled pod is captured inbound and counted (PERMISSIVE),
    # and the app sees legacy's own address (the agent keeps the source IP).
    assert (
        lab.metrics("node-b", "ztagent_plaintext_connections_total", namespace="backend") == plain_before + 1
    )
    assert lab.app.peers[-1] == "10.244.1.3"


def test_default_deny_plus_principal_allow_admits_exactly_the_caller(lab: Lab) -> None:
    lab.set_policies(ALLOW_NOTHING, ALLOW_SLEEP)
    assert lab.roundtrip(SLEEP, VIP, b"allowed\n") == "allowed\n"
    assert lab.roundtrip(OTHER, VIP, b"denied\n") in ("closed", "reset")
    assert lab.roundtrip(LEGACY, HTTPBIN, b"denied\n") in ("closed", "reset")
    st = lab.status("node-b")
    denials = st["recentDenials"][-2:]
    assert [d.get("source_principal") for d in denials] == [P_OTHER, None]
    assert denials[1]["source_ip"] == "10.244.1.3"
    assert all(d["decision"] == "DENY" and d["code"] == "no-allow-matched" for d in denials)
    assert (
        lab.metrics("node-b", "ztagent_policy_decisions_total", action="deny", reason="no-allow-matched") >= 2
    )
    table = lab.ztagent_in("node-b", "status")
    assert table.returncode == 0 and "Recent denials" in table.stdout and "backend/allow-" in table.stdout


def test_strict_refuses_plaintext_while_mtls_still_flows(lab: Lab) -> None:
    lab.set_policies(STRICT)
    plain_before = lab.metrics("node-b", "ztagent_plaintext_connections_total", namespace="backend")
    assert lab.roundtrip(LEGACY, HTTPBIN, b"plain\n") in ("closed", "reset")
    assert lab.roundtrip(SLEEP, HTTPBIN, b"mtls\n") == "mtls\n"
    assert lab.metrics("node-b", "ztagent_policy_decisions_total", action="deny", reason="mtls-required") >= 1
    assert lab.metrics("node-b", "ztagent_plaintext_connections_total", namespace="backend") == plain_before


def test_live_policy_change_cuts_an_open_connection(lab: Lab) -> None:
    lab.set_policies()
    s = socket_in(lab.ns(SLEEP))
    s.settimeout(5)
    try:
        s.connect(HTTPBIN)
        s.sendall(b"before\n")
        assert s.recv(100) == b"before\n"
        lab.set_policies(DENY_ALL)
        outcome = "open"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                s.sendall(b"after\n")
                if s.recv(100) == b"":
                    outcome = "closed"
                    break
            except (ConnectionResetError, BrokenPipeError):
                outcome = "reset"
                break
            time.sleep(0.1)
        assert outcome in ("closed", "reset")
    finally:
        s.close()
    assert lab.metrics("node-b", "ztagent_connections_closed_by_policy_total", namespace="backend") >= 1
    assert lab.roundtrip(SLEEP, HTTPBIN) in ("closed", "reset")


def test_unenroll_and_reenroll_a_pod_at_runtime(lab: Lab) -> None:
    lab.set_policies()
    plain = lab.metrics("node-b", "ztagent_plaintext_connections_total", namespace="backend")
    sleep_line = "node: node-a, ips: [10.244.1.2], labels: {app: sleep}}"
    unenrolled = CONFIG.replace(sleep_line, sleep_line[:-1] + ", enrolled: false}")
    assert unenrolled != CONFIG
    lab.set_config(unenrolled)
    wait_until(lambda: "frontend/sleep" not in lab.status("node-a")["capture"]["enrolled"], 20, "unenroll")
    # No longer captured at node-a: it reaches node-b in plaintext (PERMISSIVE) with its own IP.
    assert lab.roundtrip(SLEEP, HTTPBIN, b"plain now\n") == "plain now\n"
    assert lab.app.peers[-1] == "10.244.1.2"
    assert lab.metrics("node-b", "ztagent_plaintext_connections_total", namespace="backend") == plain + 1
    lab.set_config(CONFIG)
    wait_until(lambda: "frontend/sleep" in lab.status("node-a")["capture"]["enrolled"], 20, "re-enroll")
    mtls = {
        "reporter": "destination",
        "source_principal": P_SLEEP,
        "connection_security_policy": "mutual_tls",
    }
    before = lab.metrics("node-b", "istio_tcp_connections_opened_total", **mtls)
    assert lab.roundtrip(SLEEP, HTTPBIN, b"mtls again\n") == "mtls again\n"
    assert lab.metrics("node-b", "istio_tcp_connections_opened_total", **mtls) == before + 1


def _held_connection(lab: Lab, ref: str, dst: tuple[str, int]) -> socket.socket:
    """An open, echoing connection through the mesh."""
    s = socket_in(lab.ns(ref))
    s.settimeout(5)
    s.connect(dst)
    s.sendall(b"hold\n")
    assert s.recv(64) == b"hold\n"
    return s


def _ends_with(s: socket.socket) -> str:
    """How an open connection ended: 'reset' (RST) or 'closed' (a clean FIN)."""
    s.settimeout(5)
    try:
        return "closed" if s.recv(64) == b"" else "data"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"
    finally:
        s.close()


def test_agent_killed_fails_closed_and_restart_recovers(lab: Lab) -> None:
    lab.set_policies()
    assert lab.roundtrip(SLEEP, HTTPBIN, b"up\n") == "up\n"
    held = _held_connection(lab, SLEEP, HTTPBIN)
    rec = next(p for p in lab.state.processes if p.role == "agent-node-a" and topo.proc_alive(p))
    os.kill(rec.pid, signal.SIGKILL)

    def dead() -> bool:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(rec.pid, os.WNOHANG)  # reap it: we started the lab, so we are its parent
        return not topo.proc_alive(rec)

    wait_until(dead, 10, "agent to die")
    # The app can tell a crash from a normal close: its open connection ends with a reset.
    assert _ends_with(held) == "reset"
    before = len(lab.app.peers)
    # Captured traffic must fail, never reach the app around the agent, and fail at once: the
    # fast-reset guard answers the SYN with RST (refused), where a drop would time out.
    assert lab.roundtrip(SLEEP, HTTPBIN, b"leak?\n", timeout=2) == "refused"
    assert lab.roundtrip(SLEEP, VIP, b"leak?\n", timeout=2) == "refused"
    assert len(lab.app.peers) == before
    # Unenrolled pods are not affected by the agent being gone.
    assert lab.roundtrip(LEGACY, HTTPBIN, b"legacy\n") == "legacy\n"

    # Restart with the same command line: capture re-attaches (pins reused) and traffic flows again.
    log = rec.log or os.path.join(lab.state.dir, "logs", "agent-node-a.log")
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            rec.argv,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "ZTAGENT_BPF_PIN_ROOT": pin_root(lab.state.lab)},
        )
    topo.record_process(lab.state, proc.pid, "agent-node-a", rec.argv, log)

    def ready() -> bool:
        try:
            return http_get_in(lab.node_ns("node-a"), "10.250.0.1", 15021, "/healthz/ready", 1)[0] == 200
        except OSError:
            return False

    wait_until(ready, 120, "restarted agent to be ready")
    assert lab.roundtrip(SLEEP, HTTPBIN, b"back\n") == "back\n"

    # A clean stop (SIGTERM) detaches the program and removes its pins, keeps the routing rules:
    # still fail closed. Then a fresh start loads everything again.
    pins = os.path.join(pin_root(lab.state.lab), "node-a")
    assert os.listdir(pins)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert not os.path.exists(pins) or not os.listdir(pins)
    assert lab.roundtrip(SLEEP, HTTPBIN, b"leak?\n", timeout=2) == "refused"
    assert len(lab.app.peers) == before + 2  # the legacy and the "back" connections only
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            rec.argv,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "ZTAGENT_BPF_PIN_ROOT": pin_root(lab.state.lab)},
        )
    topo.record_process(lab.state, proc.pid, "agent-node-a", rec.argv, log)
    wait_until(ready, 120, "agent started again to be ready")
    assert lab.roundtrip(SLEEP, HTTPBIN, b"again\n") == "again\n"
