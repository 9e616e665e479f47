"""Node memory with real ``ztagent run`` processes (``--capture none``) on loopback.

Two nodes: node-a hosts N enrolled pods (the client among them), node-b one server pod (nginx,
1 KB answers, on its pod IP). A real CA (``ztagent ca serve`` on a unix socket) issues every
pod's certificate. For N in (1, 10, 100): node-a's agent RSS once ready and idle; then, for the
largest N, wrk drives 16 keep-alive connections (then new connections) through node-a's
static-capture outbound listener -> HBONE -> node-b's agent -> the pod, and the agents' peak RSS
(VmHWM) is "under load". node-b's pod IP comes from a per-process block of 127/8 (all local on
Linux); node-a's pods are 127.0.0.1-100 (wrk connects from 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench import suite

TD = "cluster.local"


def _zt() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ztagent")


def _block() -> str:
    pid = os.getpid()
    return f"127.{100 + (pid >> 8) % 150}.{pid % 256}"


def _config(base: str, n_pods: int, server_ports: list[int]) -> str:
    lines = [
        "apiVersion: ztagent.io/v1alpha1",
        "kind: MeshConfig",
        f"trustDomain: {TD}",
        "nodes:",
        # node-a's pods sit in 127.0.0.0/25 so that wrk's connections (from 127.0.0.1, it cannot
        # choose a source address) come from an enrolled pod, client-0.
        f"  - {{name: node-a, address: {base}.250, podCIDR: 127.0.0.0/25}}",
        f"  - {{name: node-b, address: {base}.251, podCIDR: {base}.128/26}}",
        "workloads:",
    ]
    for i in range(n_pods):
        lines.append(
            f"  - {{name: client-{i}, namespace: ns1, serviceAccount: client-{i}, node: node-a, "
            f"ips: [127.0.0.{1 + i}], labels: {{app: client}}}}"
        )
    lines.append(
        f"  - {{name: server, namespace: ns2, serviceAccount: server, node: node-b, ips: [{base}.130], "
        f"labels: {{app: server}}}}"
    )
    lines.append(f"# server pod ports {server_ports}")
    return "\n".join(lines) + "\n"


def _run_ok(argv: list[str]) -> None:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed: {out.stderr[-1000:]}")


def _wait(cond: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        if cond():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready within {timeout:.0f} s")


def server_pod_ip() -> str:
    """The server pod's IP on node-b: backends for :func:`node_pair` listen there."""
    return f"{_block()}.130"


@contextmanager
def node_pair(
    n_pods: int, log_dir: str | None = None, targets: dict[str, int] | None = None
) -> Iterator[dict[str, Any]]:
    """CA + node-a (n_pods enrolled) + node-b (the server pod); yields the agents' pids and,
    per target kind, the port of node-a's outbound listener standing for ``server_pod_ip():port``.
    Without ``targets`` an nginx answering 1 KB is started on the server pod (kind "http")."""
    base = _block()
    zt = _zt()
    with ExitStack() as stack:
        tmp = tempfile.mkdtemp(prefix="ztagent-bench-agents-")
        stack.callback(lambda: subprocess.run(["rm", "-rf", tmp], check=False))
        if targets is None:
            targets = {"http": stack.enter_context(suite.nginx_1kb(server_pod_ip()))}
        cfg = Path(tmp, "mesh.yaml")
        cfg.write_text(_config(base, n_pods, sorted(targets.values())))
        _run_ok([zt, "ca", "init", "--dir", f"{tmp}/ca", "--trust-domain", TD])
        for node in ("node-a", "node-b"):
            _run_ok(
                [zt, "ca", "bootstrap-node", "--dir", f"{tmp}/ca", "--node", node, "--out", f"{tmp}/{node}"]
            )
        sock = f"{tmp}/ca.sock"
        ca = subprocess.Popen(
            [zt, "ca", "serve", "--dir", f"{tmp}/ca", "--config", str(cfg), "--listen", f"unix:{sock}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(suite._stop, ca)
        _wait(lambda: os.path.exists(sock), 30, "ztagent ca serve", ca)
        hbone_port = suite._free_port()
        procs: dict[str, subprocess.Popen[bytes]] = {}
        for node in ("node-b", "node-a"):
            state = f"{tmp}/{node}.state.json"
            argv = [
                zt, "run", "--config", str(cfg), "--node", node, "--ca", f"unix:{sock}",
                "--node-credentials", f"{tmp}/{node}", "--capture", "none",
                "--hbone-port", str(hbone_port), "--admin", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                "--readiness", "127.0.0.1:0", "--state-file", state,
                "--access-log", f"{tmp}/{node}.access.log", "--log-level", "warning",
            ]  # fmt: skip
            if node == "node-a":
                for port in targets.values():
                    argv += ["--static-capture", f"out:127.0.0.1:0={base}.130:{port}"]
            log = open(f"{log_dir or tmp}/{node}.log", "wb")  # noqa: SIM115 - closed by the stack
            stack.callback(log.close)
            p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            stack.callback(suite._stop, p)
            _wait(lambda state=state: os.path.exists(state), 60, f"ztagent run {node}", p)
            procs[node] = p
        doc = json.loads(Path(f"{tmp}/node-a.state.json").read_text())
        by_original = {
            x["original"]: int(x["address"].rsplit(":", 1)[1])
            for x in doc["addresses"]["listeners"]
            if x["role"] == "outbound"
        }
        listeners = {kind: by_original[f"{base}.130:{port}"] for kind, port in targets.items()}
        yield {"pids": {k: v.pid for k, v in procs.items()}, "listeners": listeners, "tmp": tmp}


def measure(*, quick: bool, envoy_idle_rss_mb: float, envoy_idle_private_mb: float) -> dict[str, Any]:
    pods: dict[str, float] = {}
    private: dict[str, float] = {}
    out: dict[str, Any] = {
        "envoy_idle_rss_mb": envoy_idle_rss_mb,
        "envoy_idle_private_mb": envoy_idle_private_mb,
        "pods": pods,
        "pods_private": private,
    }
    counts = (1, 10, 100)
    for n in counts:
        with node_pair(n) as pair:
            time.sleep(2.0)  # past start-up transients (cert fetches, first config check)
            pods[str(n)] = suite.status_kb(pair["pids"]["node-a"], "VmRSS") / 1024
            private[str(n)] = suite.private_kb(pair["pids"]["node-a"]) / 1024
            print(f"agent_rss: {n} pods: {pods[str(n)]:.1f} MB", file=sys.stderr)
            if n == counts[-1]:
                port = pair["listeners"]["http"]
                secs = 1 if quick else 4
                load = suite.wrk(port, 16, secs)
                conns = suite.wrk(port, 8, secs, close=True)
                if load.errors or conns.errors > conns.rps * secs * 0.001:
                    raise RuntimeError(
                        f"traffic through the agents failed ({load.errors}/{conns.errors} wrk errors); "
                        f"agent logs in {pair['tmp']}"
                    )
                out["under_load"] = {
                    "pods": n,
                    "node_a_peak_rss_mb": suite.status_kb(pair["pids"]["node-a"], "VmHWM") / 1024,
                    "node_b_peak_rss_mb": suite.status_kb(pair["pids"]["node-b"], "VmHWM") / 1024,
                    "http16_rps": load.rps,
                    "http16_p50_ms": load.p50_ms,
                    "newconns_per_s": conns.rps,
                    "errors": load.errors + conns.errors,
                }
                print(f"agent_rss: under load {out['under_load']}", file=sys.stderr)
    return out
