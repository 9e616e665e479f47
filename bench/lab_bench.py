"""Lab benchmark: pod -> eBPF capture -> node proxy -> HBONE -> node proxy -> pod, three ways.

    .venv/bin/python -m bench.lab_bench [--runs N] [--seconds S]      (root: namespaces, eBPF)

Two labs of the same shape (node-a with the client pod(s), node-b with the server pod(s); every
server pod runs iperf3 -s and nginx answering 1 KB):

- the **mesh** lab, brought up by ``ztagent lab up`` with real agents and their sk_lookup
  capture: enrolled client -> agent -> HBONE -> agent -> enrolled server; its unenrolled pods
  give the **direct** path (same node links, no proxy);
- the **Envoy** lab, ``ztagent lab up --no-agents`` plus ``bench.envoy_lab``: the same capture
  (installed by this process) feeds one Envoy per node, Envoy -> HBONE (mTLS, CONNECT) -> Envoy.

Alternates direct, Envoy, mesh, ``--runs`` times, each scenario of the loopback suite run from
inside the client pod: bulk (iperf3, 1 stream), 1 KB HTTP latency and req/s at 1 and 16
keep-alive connections (wrk), and new connections/s with one request each (wrk, 8 connections,
``Connection: close``). Afterwards it checks that the proxied traffic really crossed the proxies
(node-b's agent and node-b's Envoy counted it).
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
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import suite

LAB = f"ztbench{os.getpid() % 10000}"
ENVOY_LAB = f"ztbenv{os.getpid() % 10000}"


def lab_config(nodes: str, pods: str, *, plain_pods: bool) -> str:
    """The benchmark's lab: node-a (``<nodes>.1``, pods ``<pods>.1.0/24``) with the enrolled
    client, node-b (``<nodes>.2``, ``<pods>.2.0/24``) with the enrolled server; ``plain_pods``
    adds an unenrolled client and server (``.3``) for the direct path."""
    lines = [
        "apiVersion: ztagent.io/v1alpha1",
        "kind: MeshConfig",
        "trustDomain: cluster.local",
        "nodes:",
        f"  - {{name: node-a, address: {nodes}.1, podCIDR: {pods}.1.0/24}}",
        f"  - {{name: node-b, address: {nodes}.2, podCIDR: {pods}.2.0/24}}",
        "workloads:",
    ]
    for node, side, host in (("node-a", "client", 1), ("node-b", "server", 2)):
        lines.append(
            f"  - {{name: {side}, namespace: bench, serviceAccount: {side}, node: {node}, "
            f"ips: [{pods}.{host}.2], enrolled: true}}"
        )
        if plain_pods:
            lines.append(
                f"  - {{name: plain-{side}, namespace: bench, node: {node}, "
                f"ips: [{pods}.{host}.3], enrolled: false}}"
            )
    return "\n".join(lines) + "\n"


CONFIG = lab_config("10.251.0", "10.245", plain_pods=True)
ENVOY_CONFIG = lab_config("10.252.0", "10.246", plain_pods=False)
# path -> (lab, client pod, server ip)
PATHS = {
    "direct": (LAB, "bench/plain-client", "10.245.2.3"),
    "envoy": (ENVOY_LAB, "bench/client", "10.246.2.2"),
    "mesh": (LAB, "bench/client", "10.245.2.2"),
}
SERVER_PORTS = [8080, 5201]  # nginx, iperf3
METRICS = (
    "bulk_gbps",
    "http1_p50_ms",
    "http1_p99_ms",
    "http1_rps",
    "http16_p50_ms",
    "http16_p99_ms",
    "http16_rps",
    "newconns_per_s",
)


def _zt() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ztagent")


def start_servers(lab: str, pod: str, ip: str, work: str) -> list[subprocess.Popen[bytes]]:
    nginx_dir = Path(work, lab, pod.replace("/", "_"))
    nginx_dir.mkdir(parents=True)
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
    base = _in_pod(lab, pod)
    return [
        subprocess.Popen([*base, "iperf3", "-s", "-B", ip, "-p", "5201"], stdout=subprocess.DEVNULL),
        subprocess.Popen([*base, "nginx", "-p", str(nginx_dir), "-c", f"{nginx_dir}/nginx.conf"]),
    ]


def _in_pod(lab: str, pod: str) -> list[str]:
    return [_zt(), "lab", "exec", "--name", lab, pod, "--"]


def bulk(lab: str, pod: str, ip: str, seconds: int) -> float:
    return suite.iperf3_bulk(5201, seconds, host=ip, prefix=_in_pod(lab, pod))


def http(lab: str, pod: str, ip: str, seconds: int, conns: int = 1, close: bool = False) -> suite.WrkResult:
    """1 KB answers from the server pod's nginx, loaded from ``pod`` by wrk: ``conns`` keep-alive
    connections, or with ``close`` a new connection per request."""
    res = suite.wrk(8080, conns, seconds, close=close, host=ip, prefix=_in_pod(lab, pod))
    if res.errors:
        raise RuntimeError(f"wrk in {pod} -> {ip} ({conns} conns, close={close}): {res.errors} errors")
    return res


def _lab_up(name: str, config: Path, *extra: str) -> None:
    up = subprocess.run(
        [_zt(), "lab", "up", "--config", str(config), "--name", name, "--detach", "--log-level", "warning",
         *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if up.returncode != 0:
        raise RuntimeError(f"lab up {name} failed: {up.stderr[-2000:]}")


def _check_proxied(runs: int, envoy_server: Any) -> None:
    """The proxied figures are only meaningful if the traffic crossed the proxies: node-b's agent
    must have counted inbound HBONE connections from the client's identity, node-b's Envoy the
    CONNECTs it terminated (each run opens more than three: iperf3's control and data connections,
    wrk's keep-alive connections and a connection per request of the new-connections load)."""
    metrics = subprocess.run(
        [_zt(), "lab", "exec", "--name", LAB, "--node", "node-b", "--",
         "curl", "-s", "http://127.0.0.1:15020/metrics"],
        capture_output=True, text=True, timeout=30, check=False,
    ).stdout  # fmt: skip
    tunneled = [
        line for line in metrics.splitlines()
        if line.startswith("istio_tcp_connections_opened_total") and "bench/sa/client" in line
    ]  # fmt: skip
    if not tunneled or float(tunneled[0].rsplit(" ", 1)[1]) < runs:
        raise RuntimeError(f"node-b's agent did not count the mesh connections: {tunneled}")
    connects = envoy_server.stats().get("http.hbone_in.downstream_rq_total", 0)
    if connects < 3 * runs:
        raise RuntimeError(f"node-b's Envoy terminated only {connects} CONNECTs in {runs} runs")
    print(f"node-b agent: {tunneled[0]}; node-b Envoy: {connects} CONNECTs", file=sys.stderr)


def main() -> int:
    from bench import envoy_lab
    from bench import hbone_bench as hb
    from lab.topology import LAB_ROOT, LabState

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--out", default=str(suite.RESULTS / "lab.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("lab_bench needs root (network namespaces, eBPF)")
    work = tempfile.mkdtemp(prefix="ztagent-labbench-")
    Path(work, "lab.yaml").write_text(CONFIG)
    Path(work, "envoy-lab.yaml").write_text(ENVOY_CONFIG)
    samples: dict[str, dict[str, list[float]]] = {k: {p: [] for p in PATHS} for k in METRICS}
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        for name in (LAB, ENVOY_LAB):
            down = [_zt(), "lab", "down", "--name", name]
            stack.callback(subprocess.run, down, capture_output=True, timeout=120, check=False)
        _lab_up(LAB, Path(work, "lab.yaml"))
        _lab_up(ENVOY_LAB, Path(work, "envoy-lab.yaml"), "--no-agents")
        servers = [(LAB, "bench/server", "10.245.2.2"), (LAB, "bench/plain-server", "10.245.2.3"),
                   (ENVOY_LAB, "bench/server", "10.246.2.2")]  # fmt: skip
        for lab, pod, ip in servers:
            for proc in start_servers(lab, pod, ip, work):
                stack.callback(suite._stop, proc)
        _cdoc, _sdoc, client_cred, server_cred, bundles = hb.make_creds()
        envoys = stack.enter_context(
            envoy_lab.envoy_node_proxies(
                LabState.load(ENVOY_LAB, os.environ.get("ZTAGENT_LAB_ROOT", LAB_ROOT)),
                envoy_lab.LabPod("bench/client", "10.246.1.2", client_cred),
                envoy_lab.LabPod("bench/server", "10.246.2.2", server_cred),
                SERVER_PORTS,
                bundles,
            )
        )
        time.sleep(1.0)
        for r in range(args.runs):
            for name, (lab, pod, ip) in PATHS.items():
                samples["bulk_gbps"][name].append(bulk(lab, pod, ip, args.seconds))
                for conns in (1, 16):
                    res = http(lab, pod, ip, args.seconds, conns)
                    samples[f"http{conns}_p50_ms"][name].append(res.p50_ms)
                    samples[f"http{conns}_p99_ms"][name].append(res.p99_ms)
                    samples[f"http{conns}_rps"][name].append(res.rps)
                res = http(lab, pod, ip, args.seconds, 8, close=True)
                samples["newconns_per_s"][name].append(res.rps)
                print(f"run {r + 1}/{args.runs} {name} done", file=sys.stderr)
        _check_proxied(args.runs, envoys["server"])
    lines = [
        f"Lab (eBPF capture on both nodes), median of {args.runs} alternating runs [min-max]:",
        "",
        "| metric | direct (unenrolled pods) | Envoy as the node proxies "
        "| ztagent (pod -> agent -> HBONE -> agent -> pod) | ztagent/Envoy | ztagent/direct |",
        "|---|---|---|---|---|---|",
    ]
    doc: dict[str, Any] = {}
    for key, by in samples.items():
        med = {p: statistics.median(v) for p, v in by.items()}
        doc[key] = {p: {"median": med[p], "min": min(v), "max": max(v), "samples": v} for p, v in by.items()}
        cells = [f"{med[p]:.3f} [{min(by[p]):.3f}-{max(by[p]):.3f}]" for p in ("direct", "envoy", "mesh")]
        ratios = f"{med['mesh'] / med['envoy']:.2f}x | {med['mesh'] / med['direct']:.2f}x"
        lines.append(f"| {key} | {' | '.join(cells)} | {ratios} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
