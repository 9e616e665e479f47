"""Lab benchmark: pod -> eBPF capture -> agent -> HBONE -> agent -> pod, against unenrolled pods.

    .venv/bin/python -m bench.lab_bench [--runs N] [--seconds S]      (root: namespaces, eBPF)

Builds a two-node lab with ``ztagent lab up`` (real agents, real sk_lookup capture): on node-a an
enrolled client pod and an unenrolled one, on node-b an enrolled server pod and an unenrolled one,
each server pod running iperf3 -s and nginx (1 KB). The mesh path is enrolled client -> enrolled
server (captured at both ends, HBONE between the agents); the direct path is unenrolled client ->
unenrolled server over the same node links. Alternates the two paths, ``--runs`` times: bulk
(iperf3, 1 stream) and 1 KB HTTP latency/req/s at 1 connection (wrk). The Envoy pair is not in
the lab (its transparent listeners would need our capture to feed them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import suite

LAB = f"ztbench{os.getpid() % 10000}"
CONFIG = """apiVersion: ztagent.io/v1alpha1
kind: MeshConfig
trustDomain: cluster.local
nodes:
  - {name: node-a, address: 10.251.0.1, podCIDR: 10.245.1.0/24}
  - {name: node-b, address: 10.251.0.2, podCIDR: 10.245.2.0/24}
workloads:
  - {name: client, namespace: bench, serviceAccount: client, node: node-a, ips: [10.245.1.2], enrolled: true}
  - {name: plain-client, namespace: bench, node: node-a, ips: [10.245.1.3], enrolled: false}
  - {name: server, namespace: bench, serviceAccount: server, node: node-b, ips: [10.245.2.2], enrolled: true}
  - {name: plain-server, namespace: bench, node: node-b, ips: [10.245.2.3], enrolled: false}
"""
PATHS = {"direct": ("bench/plain-client", "10.245.2.3"), "mesh": ("bench/client", "10.245.2.2")}


def _zt() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ztagent")


def lab_exec(pod: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_zt(), "lab", "exec", "--name", LAB, pod, "--", *argv], capture_output=True, text=True, **kw
    )


def start_servers(pod: str, ip: str, work: str) -> list[subprocess.Popen[bytes]]:
    nginx_dir = Path(work, pod.replace("/", "_"))
    nginx_dir.mkdir()
    temps = "".join(
        f"{k}_temp_path {nginx_dir}/{k}; " for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (nginx_dir / "nginx.conf").write_text(
        f"daemon off; master_process off; worker_processes 1; pid {nginx_dir}/nginx.pid;\n"
        f"error_log {nginx_dir}/error.log warn; events {{ worker_connections 4096; }}\n"
        f"http {{ access_log off; keepalive_requests 10000000; {temps}\n"
        f"  server {{ listen {ip}:8080;\n"
        f'    location / {{ default_type text/plain; return 200 "{"x" * 1024}"; }} }} }}\n'
    )
    base = [_zt(), "lab", "exec", "--name", LAB, pod, "--"]
    return [
        subprocess.Popen([*base, "iperf3", "-s", "-B", ip, "-p", "5201"], stdout=subprocess.DEVNULL),
        subprocess.Popen([*base, "nginx", "-p", str(nginx_dir), "-c", f"{nginx_dir}/nginx.conf"]),
    ]


def bulk(pod: str, ip: str, seconds: int) -> float:
    for _ in range(10):
        out = lab_exec(
            pod, ["iperf3", "-c", ip, "-p", "5201", "-t", str(seconds), "-J"], timeout=seconds + 30
        )
        doc = json.loads(out.stdout or "{}")
        if "busy" not in str(doc.get("error", "")):
            break
        time.sleep(0.5)
    if out.returncode != 0 or "error" in doc:
        raise RuntimeError(f"iperf3 in {pod} -> {ip}: {doc.get('error') or out.stderr[-500:]}")
    return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e9


def http1(pod: str, ip: str, seconds: int) -> suite.WrkResult:
    argv = ["wrk", "-t1", "-c1", f"-d{seconds}s", "--latency", f"http://{ip}:8080/"]
    out = lab_exec(pod, argv, timeout=seconds + 30)
    if out.returncode != 0:
        raise RuntimeError(f"wrk in {pod}: {out.stderr[-500:]}")
    return suite.parse_wrk(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--out", default=str(suite.RESULTS / "lab.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("lab_bench needs root (network namespaces, eBPF)")
    work = tempfile.mkdtemp(prefix="ztagent-labbench-")
    cfg = Path(work, "lab.yaml")
    cfg.write_text(CONFIG)
    procs: list[subprocess.Popen[bytes]] = []
    samples: dict[str, dict[str, list[float]]] = {
        k: {p: [] for p in PATHS} for k in ("bulk_gbps", "http1_p50_ms", "http1_p99_ms", "http1_rps")
    }
    try:
        up = subprocess.run(
            [_zt(), "lab", "up", "--config", str(cfg), "--name", LAB, "--detach", "--log-level", "warning"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if up.returncode != 0:
            raise RuntimeError(f"lab up failed: {up.stderr[-2000:]}")
        procs += start_servers("bench/server", "10.245.2.2", work)
        procs += start_servers("bench/plain-server", "10.245.2.3", work)
        time.sleep(1.0)
        for r in range(args.runs):
            for name, (pod, ip) in PATHS.items():
                samples["bulk_gbps"][name].append(bulk(pod, ip, args.seconds))
                res = http1(pod, ip, args.seconds)
                samples["http1_p50_ms"][name].append(res.p50_ms)
                samples["http1_p99_ms"][name].append(res.p99_ms)
                samples["http1_rps"][name].append(res.rps)
                print(f"run {r + 1}/{args.runs} {name} done", file=sys.stderr)
        # The mesh figures are only meaningful if the traffic really crossed the agents: node-b's
        # agent must count inbound HBONE connections from the client's identity.
        metrics = subprocess.run(
            [_zt(), "lab", "exec", "--name", LAB, "--node", "node-b", "--",
             "curl", "-s", "http://127.0.0.1:15020/metrics"],
            capture_output=True, text=True, timeout=30, check=False,
        ).stdout  # fmt: skip
        tunneled = [
            line for line in metrics.splitlines()
            if line.startswith("istio_tcp_connections_opened_total") and "bench/sa/client" in line
        ]  # fmt: skip
        if not tunneled or float(tunneled[0].rsplit(" ", 1)[1]) < args.runs:
            raise RuntimeError(f"node-b's agent did not count the mesh connections: {tunneled}")
        print(f"node-b agent: {tunneled[0]}", file=sys.stderr)
    finally:
        for p in procs:
            suite._stop(p)
        subprocess.run([_zt(), "lab", "down", "--name", LAB], capture_output=True, timeout=120, check=False)
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"Lab (eBPF capture, real agents), median of {args.runs} alternating runs [min-max]:",
        "",
        "| metric | direct (unenrolled pods) | mesh (pod -> agent -> HBONE -> agent -> pod) | mesh/direct |",
        "|---|---|---|---|",
    ]
    doc: dict[str, Any] = {}
    for key, by in samples.items():
        med = {p: statistics.median(v) for p, v in by.items()}
        doc[key] = {p: {"median": med[p], "min": min(v), "max": max(v), "samples": v} for p, v in by.items()}
        cells = [f"{med[p]:.3f} [{min(by[p]):.3f}-{max(by[p]):.3f}]" for p in PATHS]
        lines.append(f"| {key} | {cells[0]} | {cells[1]} | {med['mesh'] / med['direct']:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
