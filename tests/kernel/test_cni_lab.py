# ruff: noqa: E501
"""Pods join the mesh the moment the runtime creates them (issue 16, "done when"): a lab whose pods
are made by Debian's real ``ptp`` and ``bridge`` plugins (+ ``host-local``) with ``ztagent-cni``
chained (``ztagent lab up --cni``), real ``ztagent run`` agents serving their CNI sockets, real eBPF
capture, a real CA.

    node-a: frontend/sleep, frontend/other (enrolled), frontend/legacy (NOT enrolled)
    node-b: backend/httpbin (enrolled), an echo app on :8080

For both shapes: a pod created while tcpdump records node-a's link sends its first SYN already
captured (the link carries HBONE to 15008 and never the app's port or bytes); DEL removes every
trace; a pod created while the agent is down is held back (ADD fails "try again later", nothing of
it runs), an enrolled pod's connections are reset while no agent serves, and both are carried once
the agent is back. For the bridge: same-node traffic between enrolled pods, and from a pod still on
the bridge, goes through the agent.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab import cni as lab_cni
from lab import topology as topo
from lab.runner import UpOptions, http_get_in, restart_agent, up
from tests.kernel.nsutil import EchoApp, requires_bcc, socket_in

pytestmark = [
    pytest.mark.kernel,
    requires_bcc,
    pytest.mark.skipif(not os.access(f"{lab_cni.REF_PLUGINS}/ptp", os.X_OK),
                       reason="containernetworking-plugins not installed (scripts/setup.sh installs it)"),
    pytest.mark.timeout(600),
]

SLEEP, OTHER, LEGACY, HTTPBIN = "frontend/sleep", "frontend/other", "frontend/legacy", "backend/httpbin"
IPS = {SLEEP: "10.244.1.2", LEGACY: "10.244.1.3", OTHER: "10.244.1.4", HTTPBIN: "10.244.2.2"}
APP_PORT = 8080
MARKER = b"ZTAGENT-PLAINTEXT-MARKER-" + secrets.token_hex(4).encode()

CONFIG = """\
apiVersion: ztagent.io/v1alpha1
kind: MeshConfig
trustDomain: cluster.local
nodes:
  - {name: node-a, address: 10.250.0.1, podCIDR: 10.244.1.0/24}
  - {name: node-b, address: 10.250.0.2, podCIDR: 10.244.2.0/24}
workloads:
  - {name: sleep, namespace: frontend, serviceAccount: sleep, node: node-a, ips: [10.244.1.2], labels: {app: sleep}}
  - {name: legacy, namespace: frontend, serviceAccount: legacy, node: node-a, ips: [10.244.1.3], enrolled: false}
  - {name: other, namespace: frontend, serviceAccount: other, node: node-a, ips: [10.244.1.4], labels: {app: other}}
  - {name: httpbin, namespace: backend, serviceAccount: httpbin, node: node-b, ips: [10.244.2.2], labels: {app: httpbin}}
"""


@dataclass
class Lab:
    shape: str
    state: topo.LabState

    def ns(self, ref: str) -> str:
        return str(self.state.find_pod(ref)["netns"])

    def node_ns(self, node: str = "node-a") -> str:
        return str(self.state.nodes[node]["netns"])

    def status(self, node: str = "node-a") -> dict[str, Any]:
        code, body = http_get_in(self.node_ns(node), "127.0.0.1", 15000, "/status", timeout=5)
        assert code == 200, body
        return dict(json.loads(body))

    def pod_spec(self, ref: str) -> topo.PodSpec:
        ns, name = ref.split("/")
        return topo.PodSpec(ns, name, "node-a" if ref != HTTPBIN else "node-b", (IPS[ref],))

    def agent(self, node: str = "node-a") -> topo.ProcRecord:
        return [p for p in self.state.processes if p.role == f"agent-{node}"][-1]


@pytest.fixture(scope="module", params=["ptp", "bridge"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    shape = request.param
    d = Path(tempfile.mkdtemp(prefix="cniagent-", dir="/tmp"))
    cfg = d / "mesh.yaml"
    cfg.write_text(CONFIG)
    state = up(UpOptions(config=str(cfg), name=f"cniagent-{shape}", cni=shape, ready_timeout=120))
    try:
        yield Lab(shape, state)
    finally:
        topo.teardown(state)


@pytest.fixture(scope="module")
def app(lab: Lab) -> Iterator[EchoApp]:
    a = EchoApp(lab.ns(HTTPBIN), APP_PORT)
    yield a
    a.close()


def exchange(ns: str, dst: tuple[str, int], payload: bytes, timeout: float = 5.0) -> bytes:
    s = socket_in(ns)
    with s:
        s.settimeout(timeout)
        s.connect(dst)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def connect_outcome(ns: str, dst: tuple[str, int], timeout: float = 3.0) -> tuple[str, float]:
    s = socket_in(ns)
    t0 = time.monotonic()
    with s:
        s.settimeout(timeout)
        try:
            s.connect(dst)
            s.sendall(b"x")
            s.shutdown(socket.SHUT_WR)
            got = s.recv(10)
            return ("carried" if got else "closed"), time.monotonic() - t0
        except ConnectionRefusedError:
            return "refused", time.monotonic() - t0
        except ConnectionResetError:
            return "reset", time.monotonic() - t0
        except TimeoutError:
            return "timeout", time.monotonic() - t0


@contextlib.contextmanager
def tcpdump(ns: str, iface: str, path: Path) -> Iterator[None]:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "-Z", "root", "--immediate-mode", "-i", iface, "-nn", "-U", "-s", "0", "-w", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()  # "listening on eth0 ...": capturing from here on
        assert "listening" in line, line
        yield
        time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        print("tcpdump:", proc.stderr.read().decode())


def read_pcap(path: Path) -> str:
    return subprocess.run(["tcpdump", "-r", str(path), "-nn", "-A"], capture_output=True, text=True, check=True).stdout


def recreate(lab: Lab, ref: str) -> None:
    """DEL a lab pod through the runtime, then create it again (a new sandbox, fresh veth)."""
    lab_cni.delete_pod(lab.state, ref)
    lab_cni.add_pod(lab.state, lab.pod_spec(ref))


def test_a_new_pods_first_syn_is_already_captured(lab: Lab, app: EchoApp, tmp_path: Path) -> None:
    lab_cni.delete_pod(lab.state, OTHER)
    pcap = tmp_path / "node-a.pcap"
    with tcpdump(lab.node_ns(), "eth0", pcap):
        lab_cni.add_pod(lab.state, lab.pod_spec(OTHER))  # returns once the agent has it in capture
        got = exchange(lab.ns(OTHER), (IPS[HTTPBIN], APP_PORT), MARKER)  # its very first packets
    assert got == MARKER
    assert app.peers[-1] == IPS[OTHER]  # delivered from the pod's own address, by node-b's agent
    text = read_pcap(pcap)
    assert f"{IPS[OTHER]}." not in text and f"> {IPS[HTTPBIN]}.{APP_PORT}" not in text, text[:3000]
    assert MARKER.decode() not in text
    assert f"> {IPS[HTTPBIN]}.15008" in text, text[:3000]  # what did cross: HBONE to the pod's 15008
    st = lab.status()
    assert OTHER in st["capture"]["enrolled"] and st["capture"]["kernel"]["counters"]["outbound"] >= 1


def _traces(lab: Lab, ip: str, veth: str, agent: bool = True) -> list[str]:
    ns = lab.node_ns()
    found = []
    rules = subprocess.run(["ip", "-n", ns, "rule"], capture_output=True, text=True).stdout
    found += [f"rule: {r}" for r in rules.splitlines() if ip in r or veth in r]
    routes = subprocess.run(["ip", "-n", ns, "route", "show", "table", "all"], capture_output=True, text=True).stdout
    found += [f"route: {r}" for r in routes.splitlines() if ip in r.split() or veth in r]
    links = subprocess.run(["ip", "-n", ns, "link"], capture_output=True, text=True).stdout
    found += [f"link: {veth}"] if veth in links else []
    nft = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "ip", "ztagent"], capture_output=True, text=True).stdout
    found += [f"guard: {ip}"] if ip in nft else []
    neigh = subprocess.run(["ip", "-n", ns, "neigh", "show", "proxy"], capture_output=True, text=True).stdout
    found += [f"proxy neigh: {n}" for n in neigh.splitlines() if ip in n]
    ipam = Path(lab.state.nodes["node-a"]["cni"]["dir"]) / "ipam"
    found += [f"lease: {p}" for p in ipam.rglob("*") if p.name == ip]
    if not agent:
        return found
    st = lab.status()
    found += [f"capture map: {ip}"] if ip in st["capture"]["kernel"]["podIps"] else []
    found += [f"attachment: {a}" for a in st["capture"].get("cni", []) if ip in a["ips"]]
    return found


def test_del_removes_every_trace(lab: Lab) -> None:
    veth = str(lab.state.find_pod(OTHER)["host_ifname"])
    assert _traces(lab, IPS[OTHER], veth)  # the check sees them while the pod exists
    lab_cni.delete_pod(lab.state, OTHER)
    try:
        assert _traces(lab, IPS[OTHER], veth) == []
        assert OTHER not in lab.status()["capture"]["enrolled"]
    finally:
        lab_cni.add_pod(lab.state, lab.pod_spec(OTHER))


def test_agent_down_holds_new_pods_back_and_resets_enrolled_ones_then_carries_both(lab: Lab, app: EchoApp) -> None:
    lab_cni.delete_pod(lab.state, OTHER)
    topo.stop_process(lab.agent(), grace_s=10)
    # An enrolled pod whose rules exist: its SYNs are reset at once (bpf/guard.py), never carried.
    outcome, took = connect_outcome(lab.ns(SLEEP), (IPS[HTTPBIN], APP_PORT))
    assert outcome in ("refused", "reset") and took < 1.0, (outcome, took)
    # A pod created now: ADD fails "try again later"; the runtime gets no result, so none of the
    # pod's containers would start, and tears the sandbox down.
    with pytest.raises(lab_cni.CniPluginError) as ei:
        lab_cni.add_pod(lab.state, lab.pod_spec(OTHER))
    assert (ei.value.plugin, ei.value.code) == ("ztagent-cni", 11), ei.value
    assert "fail closed" in ei.value.error["msg"]
    assert lab_cni.runtime_for(lab.state.nodes["node-a"]["cni"]).cached_result(
        lab_cni.Attachment(lab.state.find_pod(OTHER)["container_id"], None)) is None
    lab_cni.delete_pod(lab.state, OTHER)  # the runtime's teardown, DEL without prevResult
    assert _traces(lab, IPS[OTHER], "none", agent=False) == []
    # The agent comes back (kubelet's retry of the sandbox follows): reconciled, then both carried.
    restart_agent(lab.state, "node-a")
    assert exchange(lab.ns(SLEEP), (IPS[HTTPBIN], APP_PORT), b"after") == b"after"
    lab_cni.add_pod(lab.state, lab.pod_spec(OTHER))
    assert exchange(lab.ns(OTHER), (IPS[HTTPBIN], APP_PORT), MARKER) == MARKER
    assert app.peers[-1] == IPS[OTHER]


def test_reconciliation_drops_pods_that_vanished_while_the_agent_was_down(lab: Lab) -> None:
    veth = str(lab.state.find_pod(OTHER)["host_ifname"])
    topo.stop_process(lab.agent(), grace_s=10)
    # The sandbox disappears behind the agent's back (a DEL while it was down succeeds and is not seen).
    lab_cni.delete_pod(lab.state, OTHER)
    restart_agent(lab.state, "node-a")
    assert _traces(lab, IPS[OTHER], veth) == []
    lab_cni.add_pod(lab.state, lab.pod_spec(OTHER))


def test_reconciliation_adopts_running_pods_it_has_no_record_of(lab: Lab, app: EchoApp) -> None:
    """An agent installed on a node whose pods already run (or that lost its state) finds them by
    their namespaces and enrolls them before it is ready."""
    topo.stop_process(lab.agent(), grace_s=10)
    state_file = Path(lab.state.nodes["node-a"]["cni"]["dir"]) / "attachments.json"
    state_file.unlink()
    restart_agent(lab.state, "node-a")
    cni = {a["workload"]: a for a in lab.status()["capture"]["cni"]}
    assert set(cni) == {SLEEP, OTHER, LEGACY}, cni  # legacy too: recorded, not enrolled
    assert set(lab.status()["capture"]["enrolled"]) == {SLEEP, OTHER}
    assert cni[SLEEP]["containerId"].startswith("netns:") and os.path.samefile(cni[SLEEP]["netns"], f"/run/netns/{lab.ns(SLEEP)}")
    assert cni[OTHER]["hostInterface"] == lab.state.find_pod(OTHER)["host_ifname"]
    assert exchange(lab.ns(OTHER), (IPS[HTTPBIN], APP_PORT), b"adopted") == b"adopted"


def test_same_node_traffic_goes_through_the_agent(lab: Lab) -> None:
    """Both shapes: same-node pod-to-pod traffic is captured (on the bridge because enrolled veths
    are routed off it; routed veths always cross the node's IP layer)."""
    if lab.shape == "bridge":
        ns = lab.node_ns()
        links = {link["ifname"]: link for link in json.loads(subprocess.run(["ip", "-j", "-n", ns, "link"], capture_output=True, text=True).stdout)}
        for ref in (SLEEP, OTHER):
            assert links[lab.state.find_pod(ref)["host_ifname"]].get("master") is None  # routed off the bridge
        assert links[lab.state.find_pod(LEGACY)["host_ifname"]].get("master") == lab_cni.BRIDGE_NAME  # not enrolled: stays
    app = EchoApp(lab.ns(OTHER), 9090)
    try:
        before = lab.status()["capture"]["kernel"]["counters"]
        assert exchange(lab.ns(SLEEP), (IPS[OTHER], 9090), b"same-node") == b"same-node"
        assert app.peers[-1] == IPS[SLEEP]
        after = lab.status()["capture"]["kernel"]["counters"]
        assert after["outbound"] > before["outbound"]  # the agent's 15001 took it: not switched at L2
        # A pod left on the bridge reaches the enrolled pod only through the inbound capture (15006).
        assert exchange(lab.ns(LEGACY), (IPS[OTHER], 9090), b"plain") == b"plain"
        assert app.peers[-1] == IPS[LEGACY]
        assert lab.status()["capture"]["kernel"]["counters"]["inbound"] > after["inbound"]
    finally:
        app.close()


def test_cost_of_enrollment_and_same_node_connections(lab: Lab) -> None:
    """Not a benchmark: the figures bpf/README.md quotes (`-s` prints them), with loose bounds that
    catch a regression by an order of magnitude. ADD: the whole chain, timed per plugin by the
    runtime (next test); connections: sleep -> other on the same node, a new connection and a
    1 KB echo each, through the agent in both shapes."""
    app = EchoApp(lab.ns(OTHER), 9091)
    try:
        payload = b"x" * 1024
        took = []
        for _ in range(50):
            t0 = time.perf_counter()
            assert exchange(lab.ns(SLEEP), (IPS[OTHER], 9091), payload) == payload
            took.append(time.perf_counter() - t0)
    finally:
        app.close()
    took.sort()
    print(f"\n[{lab.shape}] same-node connect + 1 KB echo through the agent, 50 sequential: "
          f"p50 {took[25] * 1e3:.2f} ms, p90 {took[45] * 1e3:.2f} ms")
    assert took[25] < 0.1


def test_add_wall_time_with_real_enrollment(lab: Lab) -> None:
    times: dict[str, list[float]] = {}
    for _ in range(5):
        lab_cni.delete_pod(lab.state, OTHER)
        rt = lab_cni.runtime_for(lab.state.nodes["node-a"]["cni"])
        att = lab_cni.pod_attachment("frontend", "other", topo.pod_netns(lab.state.lab, "frontend", "other"), (IPS[OTHER],))
        topo._create_netns(lab.state, topo.pod_netns(lab.state.lab, "frontend", "other"))
        lab.state.pods[OTHER] = {"netns": topo.pod_netns(lab.state.lab, "frontend", "other"), "node": "node-a",
                                 "node_netns": lab.node_ns(), "ips": [IPS[OTHER]], "container_id": att.container_id, "cni": True}
        result = rt.add(att)
        lab.state.pods[OTHER]["host_ifname"] = lab_cni.host_ifname_of(result)
        lab.state.save()
        for plugin, command, secs in rt.timings:
            if command == "ADD":
                times.setdefault(plugin, []).append(secs)
    med = {p: sorted(v)[len(v) // 2] * 1e3 for p, v in times.items()}
    print(f"\n[{lab.shape}] ADD wall time, median of 5 (incl. `ip netns exec`): "
          + ", ".join(f"{p} {ms:.1f} ms" for p, ms in med.items()))
    assert med["ztagent-cni"] < 2000


def test_a_config_change_enrolls_a_running_pod_it_had_recorded(lab: Lab) -> None:
    """legacy was ADDed as not enrolled; the config now enrolls it: the agent captures the running
    pod on the interface the runtime reported (and routes it off the bridge), no re-creation."""
    assert lab.state.config is not None
    veth = str(lab.state.find_pod(LEGACY)["host_ifname"])
    Path(lab.state.config).write_text(CONFIG.replace("ips: [10.244.1.3], enrolled: false", "ips: [10.244.1.3]"))
    try:
        deadline = time.monotonic() + 30
        while LEGACY not in lab.status()["capture"]["enrolled"]:
            assert time.monotonic() < deadline, lab.status()["capture"]
            time.sleep(0.3)
        st = lab.status()
        assert st["capture"]["kernel"]["podIps"][IPS[LEGACY]] == veth and st["ready"], st["problems"]
        link = json.loads(subprocess.run(["ip", "-j", "-n", lab.node_ns(), "link", "show", veth], capture_output=True, text=True).stdout)[0]
        assert link.get("master") is None
        assert exchange(lab.ns(LEGACY), (IPS[HTTPBIN], APP_PORT), b"now-meshed") == b"now-meshed"
    finally:
        Path(lab.state.config).write_text(CONFIG)
        deadline = time.monotonic() + 30
        while LEGACY in lab.status()["capture"]["enrolled"] and time.monotonic() < deadline:
            time.sleep(0.3)
