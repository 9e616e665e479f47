"""Running a lab: topology, one CA, one node agent per node, readiness, and teardown.

Processes are started by the command-line contract (docs/contracts.md):
    ztagent ca init / bootstrap-node / serve --listen unix:<lab dir>/ca.sock
    nsenter --net=/run/netns/<node> ztagent run --config F --node N --ca unix:... --node-credentials D
Agents start under `nsenter`, not `ip netns exec`: the latter remounts /sys privately, which would
hide the host's bpffs and with it the capture's pins (bpf/README.md). Each lab pins under its own
bpffs directory ($ZTAGENT_BPF_PIN_ROOT), so labs and a real node agent never share pins.
Every pid is recorded (with its start time) in the lab's state file before anything waits on it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from lab.topology import (
    LAB_ROOT,
    LabError,
    LabSpec,
    LabState,
    build,
    node_netns,
    proc_alive,
    record_process,
    teardown,
)

READY_PORT = 15021
METRICS_PORT = 15020
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


@dataclass
class UpOptions:
    config: str
    name: str = "ztlab"
    root: str = LAB_ROOT
    agents: bool = True  # False: topology only (no CA, no agents)
    ready_timeout: float = 90.0
    log_level: str = "info"
    extra_agent_args: tuple[str, ...] = ()
    cni: str | None = None  # "ptp" | "bridge": pods made by the real CNI plugins (lab/cni.py)


def ztagent_argv() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "ztagent")
    return [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "cli.main"]


def in_netns(ns: str, fn: Callable[[], T], timeout: float = 30.0) -> T:
    """Run fn in a thread that entered netns `ns` (sockets made there stay in that namespace)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {ns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if "error" in box:
        raise box["error"]
    if "value" not in box:
        raise TimeoutError(f"operation in netns {ns} did not finish in {timeout}s")
    return box["value"]  # type: ignore[no-any-return]


def http_get_in(ns: str, host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """A plain HTTP/1.0 GET from inside netns `ns`: (status, body)."""
    sock = in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    with sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise OSError(f"not an HTTP response from {host}:{port}{path}")
    return int(parts[1]), body.decode(errors="replace")


def _log_tail(path: str | None, lines: int = 15) -> str:
    if not path:
        return ""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _spawn(state: LabState, role: str, argv: list[str],
           env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    logs = os.path.join(state.dir, "logs")
    os.makedirs(logs, exist_ok=True)
    log_path = os.path.join(logs, role.replace(" ", "-") + ".log")
    with open(log_path, "ab") as log:
        # Own session: a Ctrl-C at `lab up` reaches only the lab, which stops its children in order.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **(env or {})})
    record_process(state, proc.pid, role, argv, log_path)
    return proc


def _run_step(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise LabError(f"{what} failed ({' '.join(argv)}): {(proc.stderr or proc.stdout).strip()[-800:]}")


def pin_root(lab: str) -> str:
    return f"/sys/fs/bpf/ztagent-lab-{lab}"


def up(opts: UpOptions) -> LabState:
    """Build the lab and start its processes; on failure everything made so far is removed."""
    from sources.file import load_config

    cfg = load_config(opts.config)  # ConfigError names file, document and field
    spec = LabSpec.from_config(opts.name, cfg)
    if opts.cni is not None and not opts.agents:
        raise LabError("--cni needs the agents: the CNI plugin holds every pod back until one enrolls it")
    # With --cni the topology has nodes only; the runtime makes the pods once the agents serve.
    state = build(spec if opts.cni is None else LabSpec(spec.name, spec.nodes, ()), opts.root,
                  config=os.path.abspath(opts.config))
    try:
        if opts.cni is not None:
            from lab import cni

            for node in spec.nodes:
                info = state.nodes[node.name]
                info["cni"] = cni.prepare_node(state.dir, node.name, str(info["netns"]), opts.cni,
                                               node.pod_cidr)
            state.save()
        if opts.agents:
            _start_processes(state, cfg, opts)
        if opts.cni is not None:
            for pod in spec.pods:
                cni.add_pod(state, pod)
    except BaseException:
        teardown(state)
        raise
    return state


def _start_processes(state: LabState, cfg: Any, opts: UpOptions) -> None:
    from bpf.capture import PIN_ROOT_ENV, ensure_bpffs

    zt = ztagent_argv()
    config = os.path.abspath(opts.config)
    pins = pin_root(state.lab)
    state.pin_dirs = [os.path.join(pins, n) for n in state.nodes] + [pins]
    state.save()
    ensure_bpffs(pins)  # in the host mount namespace, so the agents' pins outlive them
    ca_dir = os.path.join(state.dir, "ca")
    _run_step([*zt, "ca", "init", "--dir", ca_dir, "--trust-domain", str(cfg.trust_domain)], "ca init")
    creds: dict[str, str] = {}
    for node in state.nodes:
        creds[node] = os.path.join(state.dir, "nodes", node)
        _run_step([*zt, "ca", "bootstrap-node", "--dir", ca_dir, "--node", node, "--out", creds[node]],
                  f"ca bootstrap-node {node}")
    sock = os.path.join(state.dir, "ca.sock")
    ca = _spawn(state, "ca", [*zt, "ca", "serve", "--dir", ca_dir, "--config", config,
                              "--listen", f"unix:{sock}"])
    _wait(lambda: os.path.exists(sock), 30, "CA socket", [("ca", ca, state.processes[-1].log)])
    agents = []
    for node, info in state.nodes.items():
        argv = ["nsenter", f"--net=/run/netns/{info['netns']}", *zt, "run", "--config", config,
                "--node", node, "--ca", f"unix:{sock}", "--node-credentials", creds[node],
                "--log-level", opts.log_level, *opts.extra_agent_args]
        if info.get("cni"):
            argv += ["--cni-socket", str(info["cni"]["socket"])]
        proc = _spawn(state, f"agent-{node}", argv, env={PIN_ROOT_ENV: pins})
        agents.append((f"agent {node}", proc, state.processes[-1].log))
    watched = [("ca", ca, state.processes[0].log), *agents]
    for node, info in state.nodes.items():
        ns, addr = str(info["netns"]), str(info["address"])
        _wait(lambda: _ready(ns, addr), opts.ready_timeout,  # noqa: B023 (called before the next loop)
              f"agent on {node} to be ready (/healthz/ready on {addr}:{READY_PORT})", watched)
    _start_waypoints(state, cfg, opts, zt, config, ca_dir, watched)


def waypoint_pod(state: LabState, wp: Any) -> tuple[str, str]:
    """(pod ref, address) of the lab pod a waypoint runs in: the pod that owns one of the
    Gateway's addresses (declare it as a workload, ``enrolled: false``, as Istio's waypoint pod
    is not captured). A waypoint without one cannot run in the lab: say so."""
    for ref, info in state.pods.items():
        for a in wp.addresses:
            if str(a) in info["ips"]:
                return ref, str(a)
    raise LabError(f"waypoint {wp.key}: none of its addresses ({', '.join(map(str, wp.addresses))}) is a "
                   "pod of the lab; declare a workload with that IP (enrolled: false) for it to run in")


def _start_waypoints(state: LabState, cfg: Any, opts: UpOptions, zt: list[str], config: str, ca_dir: str,
                     watched: list[tuple[str, subprocess.Popen[bytes], str | None]]) -> None:  # fmt: skip
    """One `ztagent waypoint` per Gateway, in its pod's namespace, with a certificate for its
    identity issued from the lab CA's files (12 h: a lab's lifetime; no rotation yet)."""
    for wp in getattr(cfg, "waypoints", ()):
        ref, addr = waypoint_pod(state, wp)
        creds = os.path.join(state.dir, "waypoints", f"{wp.namespace}-{wp.name}")
        _run_step([*zt, "ca", "issue", "--dir", ca_dir, "--id", str(wp.spiffe_id), "--ttl", "12h",
                   "--out", creds], f"ca issue {wp.spiffe_id}")  # fmt: skip
        ns = str(state.pods[ref]["netns"])
        argv = ["ip", "netns", "exec", ns, *zt, "waypoint", "--config", config, "--name", wp.key,
                "--credentials", creds, "--log-level", opts.log_level]  # fmt: skip
        proc = _spawn(state, f"waypoint-{wp.namespace}-{wp.name}", argv)
        watched.append((f"waypoint {wp.key}", proc, state.processes[-1].log))
        _wait(lambda: _ready(ns, addr), opts.ready_timeout,  # noqa: B023 (called before the next loop)
              f"waypoint {wp.key} to be ready (/healthz/ready on {addr}:{READY_PORT})", watched)


def restart_agent(state: LabState, node: str, ready_timeout: float = 90.0) -> int:
    """Stop (if running) and start again the agent of `node` with its recorded command; wait until
    ready. The new agent reuses the capture pinned by the old one. Returns the new pid."""
    from bpf.capture import PIN_ROOT_ENV
    from lab.topology import stop_process

    node_ns_of(state, node)
    old = [p for p in state.processes if p.role == f"agent-{node}"]
    if not old:
        raise LabError(f"lab {state.lab} runs no agent on {node} (brought up with --no-agents?)")
    if proc_alive(old[-1]):
        stop_process(old[-1], grace_s=10)
    proc = _spawn(state, f"agent-{node}", old[-1].argv, env={PIN_ROOT_ENV: pin_root(state.lab)})
    info = state.nodes[node]
    ns, addr = str(info["netns"]), str(info["address"])
    _wait(lambda: _ready(ns, addr), ready_timeout, f"restarted agent on {node} to be ready",
          [(f"agent {node}", proc, state.processes[-1].log)])
    return proc.pid


def _ready(ns: str, address: str) -> bool:
    try:
        status, _ = http_get_in(ns, address, READY_PORT, "/healthz/ready", timeout=1.0)
    except OSError:
        return False
    return status == 200


def _wait(cond: Callable[[], bool], timeout: float, what: str,
          watched: list[tuple[str, subprocess.Popen[bytes], str | None]]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for role, proc, log in watched:
            if proc.poll() is not None:
                raise LabError(f"{role} exited with {proc.returncode} while waiting for {what}; "
                               f"last log lines ({log}):\n{_log_tail(log)}")
        if cond():
            return
        time.sleep(0.2)
    tails = "\n".join(f"--- {role} ({log}):\n{_log_tail(log, 8)}" for role, _, log in watched)
    raise LabError(f"timed out after {timeout}s waiting for {what}\n{tails}")


def describe(state: LabState, cfg: Any | None = None) -> str:
    lines = [f"lab {state.lab} is up" + (f" (config {state.config})" if state.config else "")]
    for name, info in state.nodes.items():
        agent = next((p for p in state.processes if p.role == f"agent-{name}"), None)
        pid = f"agent pid {agent.pid}" if agent else "no agent"
        lines.append(f"  node {name:<10} {info['address']:<15} netns {info['netns']}  {pid}")
    enrolled = {f"{w.namespace}/{w.name}": w.enrolled for w in cfg.workloads} if cfg is not None else {}
    for ref, info in state.pods.items():
        mode = "" if ref not in enrolled else "enrolled" if enrolled[ref] else "not enrolled"
        lines.append(f"  pod  {ref:<24} {','.join(info['ips']):<15} on {info['node']:<8} {mode}")
    if cfg is not None:
        for wp in getattr(cfg, "waypoints", ()):
            proc = next((p for p in state.processes if p.role == f"waypoint-{wp.namespace}-{wp.name}"), None)
            where = f"pid {proc.pid}" if proc else "not started"
            addrs = ",".join(map(str, wp.addresses))
            lines.append(f"  waypoint {wp.key:<20} {addrs:<15} {wp.spiffe_id}  {where}")
        for svc in cfg.services:
            ports = ",".join(str(p.port) for p in svc.ports)
            vips = ",".join(map(str, svc.vips))
            lines.append(f"  svc  {svc.namespace}/{svc.name:<18} {vips} ports {ports}")
    first_pod = next(iter(state.pods), "<pod>")
    first_node = next(iter(state.nodes), "<node>")
    flag = "" if state.lab == "ztlab" else f" --name {state.lab}"
    lines += [
        "reach it:",
        f"  ztagent lab exec{flag} {first_pod} -- curl -s http://<pod-or-service-ip>:<port>/",
        f"  ztagent lab exec{flag} --node {first_node} -- curl -s http://127.0.0.1:{METRICS_PORT}/metrics",
        f"  ztagent lab exec{flag} --node {first_node} -- ztagent status",
        f"  logs: {os.path.join(state.dir, 'logs')}",
        f"  ztagent lab down{flag}",
    ]
    return "\n".join(lines)


def run_until_signal(state: LabState, out: Callable[[str], None] = print) -> None:
    """Block until SIGINT/SIGTERM, reporting processes that die meanwhile; then tear down."""
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    reported: set[int] = set()
    try:
        while not stop.wait(0.5):
            for rec in state.processes:
                if rec.pid not in reported and not proc_alive(rec):
                    reported.add(rec.pid)
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(rec.pid, os.WNOHANG)
                    out(f"warning: {rec.role} (pid {rec.pid}) exited; log {rec.log}:\n{_log_tail(rec.log)}")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        out(f"stopping lab {state.lab} ...")
        for item in teardown(state):
            out(f"  removed {item}")


def node_ns_of(state: LabState, node: str) -> str:
    if node not in state.nodes:
        raise LabError(f"no node {node!r} in lab {state.lab}; nodes: {sorted(state.nodes)}")
    return str(state.nodes[node].get("netns") or node_netns(state.lab, node))
