"""Network-namespace topology of a lab: nodes joined by a bridge, pods wired to their node by veth.

    <lab>-net                  one namespace holding bridge br0; every node plugs into it
    <lab>-node-<node>          a node: eth0 = its address/32 on the bridge, routes to the other
                               nodes' addresses (on-link) and podCIDRs (via their address), one
                               host-side veth per pod with a /32 route to the pod, ip_forward on
    <lab>-pod-<ns>-<name>      a pod: eth0 with its IPs/32, default route via 169.254.1.1 (on-link,
                               a static neighbour entry pointing at the node's veth, as routed-veth
                               CNIs such as Calico do), so every packet it sends goes to its node

Routed veths (no bridge between a node and its pods) mean all pod traffic crosses the node's IP
layer, where the capture's policy routing sees it (bpf/README.md). Every name is written to the
state file *before* it is created, so `teardown` finds it even after a crash half-way through.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

LAB_ROOT = os.environ.get("ZTAGENT_LAB_ROOT", "/run/ztagent/lab")
POD_GATEWAY = "169.254.1.1"
NUD_PERMANENT = 0x80
RT_SCOPE_LINK = 253
BRIDGE = "br0"
NODE_LINK = "eth0"
POD_LINK = "eth0"


class LabError(Exception):
    """The lab could not be built or found; the message names what is wrong."""


@dataclass(frozen=True)
class NodeSpec:
    name: str
    address: str
    pod_cidr: str | None = None


@dataclass(frozen=True)
class PodSpec:
    namespace: str
    name: str
    node: str
    ips: tuple[str, ...]

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class LabSpec:
    name: str
    nodes: tuple[NodeSpec, ...]
    pods: tuple[PodSpec, ...]

    def validate(self) -> None:
        if not self.name or len(self.name) > 24 or not all(c.isalnum() or c == "-" for c in self.name):
            raise LabError(f"lab name {self.name!r}: use 1-24 letters, digits or '-'")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise LabError(f"duplicate node names in {names}")
        if not self.nodes:
            raise LabError("a lab needs at least one node")
        seen: dict[str, str] = {}
        for n in self.nodes:
            _v4(n.address, f"node {n.name} address")
            if n.pod_cidr is not None:
                ipaddress.IPv4Network(n.pod_cidr)
            seen[n.address] = f"node {n.name}"
        refs = [p.ref for p in self.pods]
        if len(set(refs)) != len(refs):
            raise LabError(f"duplicate pods in {refs}")
        for p in self.pods:
            if p.node not in names:
                raise LabError(f"pod {p.ref}: node {p.node!r} is not one of {names}")
            if not p.ips:
                raise LabError(f"pod {p.ref}: no ips")
            for ip in p.ips:
                _v4(ip, f"pod {p.ref} ips")
                if ip in seen:
                    raise LabError(f"pod {p.ref}: ip {ip} already used by {seen[ip]}")
                seen[ip] = f"pod {p.ref}"

    @classmethod
    def from_config(cls, name: str, cfg: Any) -> LabSpec:
        """From a mesh.config.MeshConfig: every workload with IPs becomes a pod namespace."""
        nodes = tuple(NodeSpec(n.name, str(n.address), str(n.pod_cidr) if n.pod_cidr else None)
                      for n in cfg.nodes)
        pods = tuple(PodSpec(w.namespace, w.name, w.node, tuple(str(ip) for ip in w.ips if ip.version == 4))
                     for w in cfg.workloads if any(ip.version == 4 for ip in w.ips))
        return cls(name, nodes, pods)


def _v4(ip: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(ip)
    except ValueError:
        raise LabError(f"{what}: {ip!r} is not an IPv4 address (the lab is IPv4-only)") from None


def _short(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def node_netns(lab: str, node: str) -> str:
    return f"{lab}-node-{node}"


def pod_netns(lab: str, namespace: str, name: str) -> str:
    return f"{lab}-pod-{namespace}-{name}"


def net_netns(lab: str) -> str:
    return f"{lab}-net"


def host_ifname(namespace: str, name: str) -> str:
    """The pod's veth end in its node (<= 15 chars, stable, unique per node)."""
    return "zh" + _short(f"{namespace}/{name}", 10)


# --- state ----------------------------------------------------------------------------------------


@dataclass
class ProcRecord:
    pid: int
    start_ticks: int  # /proc/<pid>/stat field 22: tells a recycled pid from ours
    role: str
    argv: list[str]
    log: str | None = None


@dataclass
class LabState:
    lab: str
    dir: str
    netns: list[str] = field(default_factory=list)
    processes: list[ProcRecord] = field(default_factory=list)
    pin_dirs: list[str] = field(default_factory=list)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {netns, address}
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)  # "ns/name" -> {netns, node, ...}
    config: str | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.dir, "state.json")

    def save(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, lab: str, root: str = LAB_ROOT) -> LabState:
        d = os.path.join(root, lab)
        try:
            with open(os.path.join(d, "state.json")) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise LabError(f"no lab {lab!r} (no {d}/state.json)") from None
        procs = [ProcRecord(**p) for p in raw.pop("processes", [])]
        raw.pop("dir", None)
        return cls(dir=d, processes=procs, **raw)

    def record_netns(self, name: str) -> None:
        if name not in self.netns:
            self.netns.append(name)
            self.save()

    def find_pod(self, ref: str) -> dict[str, Any]:
        if ref in self.pods:
            return self.pods[ref]
        matches = [v for k, v in self.pods.items() if k.split("/", 1)[1] == ref]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise LabError(f"no pod {ref!r} in lab {self.lab}; pods: {sorted(self.pods)}")
        raise LabError(f"pod name {ref!r} is ambiguous in lab {self.lab}: use namespace/name")


def list_labs(root: str = LAB_ROOT) -> list[str]:
    try:
        return sorted(d for d in os.listdir(root) if os.path.exists(os.path.join(root, d, "state.json")))
    except FileNotFoundError:
        return []


# --- building ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _ns(name: str) -> Iterator[IPRoute]:
    ipr = IPRoute(netns=name)
    try:
        yield ipr
    finally:
        ipr.close()


def sysctl(ns: str, key: str, value: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"], check=True,
                   capture_output=True, timeout=10)


def _up(ipr: IPRoute, ifname: str) -> int:
    idx = int(ipr.link_lookup(ifname=ifname)[0])
    ipr.link("set", index=idx, state="up")
    return idx


def _create_netns(state: LabState, name: str) -> None:
    state.record_netns(name)
    if name in netns.listnetns():
        raise LabError(f"network namespace {name} already exists: another lab by this name? "
                       f"run `ztagent lab down --name {state.lab}` first")
    netns.create(name)
    with _ns(name) as ipr:
        _up(ipr, "lo")


def build(spec: LabSpec, root: str = LAB_ROOT, config: str | None = None) -> LabState:
    """Create the topology; on any failure tear down what was made and re-raise."""
    spec.validate()
    d = os.path.join(root, spec.name)
    if os.path.exists(os.path.join(d, "state.json")):
        raise LabError(f"lab {spec.name!r} already exists ({d}/state.json): `ztagent lab down` it first")
    state = LabState(lab=spec.name, dir=d, config=config)
    state.save()
    try:
        _build(spec, state)
    except BaseException:
        teardown(state)
        raise
    return state


def _build(spec: LabSpec, state: LabState) -> None:
    lab = spec.name
    net = net_netns(lab)
    _create_netns(state, net)
    with _ns(net) as ipr:
        ipr.link("add", ifname=BRIDGE, kind="bridge")
        _up(ipr, BRIDGE)
    br_idx = None
    for node in spec.nodes:
        ns = node_netns(lab, node.name)
        _create_netns(state, ns)
        state.nodes[node.name] = {"netns": ns, "address": node.address, "pod_cidr": node.pod_cidr,
                                  "link": NODE_LINK}
        state.save()
        port = "n" + _short(node.name, 10)
        with _ns(net) as ipr:
            ipr.link("add", ifname=port, kind="veth", peer={"ifname": NODE_LINK, "net_ns_fd": ns})
            br_idx = ipr.link_lookup(ifname=BRIDGE)[0]
            idx = ipr.link_lookup(ifname=port)[0]
            ipr.link("set", index=idx, master=br_idx)
            ipr.link("set", index=idx, state="up")
        with _ns(ns) as ipr:
            idx = _up(ipr, NODE_LINK)
            ipr.addr("add", index=idx, address=node.address, prefixlen=32)
            for other in spec.nodes:
                if other.name == node.name:
                    continue
                ipr.route("add", dst=f"{other.address}/32", oif=idx, scope=RT_SCOPE_LINK)
                if other.pod_cidr:
                    ipr.route("add", dst=other.pod_cidr, gateway=other.address, oif=idx)
        sysctl(ns, "net.ipv4.ip_forward", "1")
    for pod in spec.pods:
        node_ns = node_netns(lab, pod.node)
        ns = pod_netns(lab, pod.namespace, pod.name)
        _create_netns(state, ns)
        host = host_ifname(pod.namespace, pod.name)
        state.pods[pod.ref] = {"netns": ns, "node": pod.node, "node_netns": node_ns, "host_ifname": host,
                               "ips": list(pod.ips)}
        state.save()
        with _ns(node_ns) as ipr:
            ipr.link("add", ifname=host, kind="veth", peer={"ifname": POD_LINK, "net_ns_fd": ns})
            hidx = _up(ipr, host)
            host_mac = ipr.get_links(hidx)[0].get("address")
            for ip in pod.ips:
                ipr.route("add", dst=f"{ip}/32", oif=hidx, scope=RT_SCOPE_LINK)
        with _ns(ns) as ipr:
            idx = _up(ipr, POD_LINK)
            for ip in pod.ips:
                ipr.addr("add", index=idx, address=ip, prefixlen=32)
            ipr.route("add", dst=f"{POD_GATEWAY}/32", oif=idx, scope=RT_SCOPE_LINK)
            ipr.route("add", dst="default", gateway=POD_GATEWAY, oif=idx)
            ipr.neigh("add", dst=POD_GATEWAY, lladdr=host_mac, ifindex=idx, state=NUD_PERMANENT)


# --- teardown ------------------------------------------------------------------------------------


def _start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: fields after the last ')' are fixed.
    return int(stat.rsplit(")", 1)[1].split()[19])


def proc_alive(rec: ProcRecord) -> bool:
    return _start_ticks(rec.pid) == rec.start_ticks


def record_process(state: LabState, pid: int, role: str, argv: list[str],
                   log: str | None = None) -> ProcRecord:
    ticks = _start_ticks(pid)
    rec = ProcRecord(pid=pid, start_ticks=ticks if ticks is not None else -1, role=role, argv=argv, log=log)
    state.processes.append(rec)
    state.save()
    return rec


def stop_process(rec: ProcRecord, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after grace_s; only if the pid is still the process we started."""
    import signal
    import time

    if not proc_alive(rec):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(rec.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not proc_alive(rec):
            break
        with contextlib.suppress(ChildProcessError):
            os.waitpid(rec.pid, os.WNOHANG)
        time.sleep(0.05)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(rec.pid, 0)


def _netns_pids(name: str) -> list[int]:
    try:
        out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [int(p) for p in out.stdout.split() if p.isdigit()]


def teardown(state: LabState) -> list[str]:
    """Remove everything recorded: processes, then namespaces (taking their links, routes and rules
    with them), then bpffs pins, then the state directory. Idempotent; returns what it removed."""
    import shutil
    import signal

    removed: list[str] = []
    for rec in reversed(state.processes):
        if proc_alive(rec):
            stop_process(rec)
            removed.append(f"process {rec.pid} ({rec.role})")
    existing = set(netns.listnetns())
    for name in reversed(state.netns):
        # Anything still running inside a lab namespace (an `exec`ed command) would keep it alive.
        for pid in _netns_pids(name) if name in existing else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if name in existing:
            with contextlib.suppress(OSError, NetlinkError):
                netns.remove(name)
            removed.append(f"netns {name}")
    for pin_dir in state.pin_dirs:
        if os.path.isdir(pin_dir):
            for entry in os.listdir(pin_dir):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(pin_dir, entry))
            with contextlib.suppress(OSError):
                os.rmdir(pin_dir)
            removed.append(f"pins {pin_dir}")
    shutil.rmtree(state.dir, ignore_errors=True)
    return removed
