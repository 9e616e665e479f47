"""Where the agents' CPU goes under the benchmark's loads: the profiles behind the README's
"where the misses come from".

    .venv/bin/python -m bench.profile [--seconds S] [--raw-dir DIR]

Runs the benchmark's ztagent path (two real ``ztagent run`` agents, ``bench.agent_rss.node_pair``)
under three loads: new connections (wrk, ``Connection: close``, 8 connections), 1 KB keep-alive
requests (wrk, 16 connections) and bulk (iperf3, one stream), then the suite's Envoy HBONE pair
under the same load. For each load it reports each proxy's CPU per unit of work from /proc (user
+ system time, which includes the kernel's socket work) and, for the agents, a py-spy sample
(``py-spy record``, Python stacks, 200 Hz) split by where the sampled stack was running:

- **loop (native)**: inside uvloop's own loop (epoll, accept, connect, reads, TLS record
  processing in its SSL protocol) with no Python frame of ours on top;
- **TLS + socket calls (native)**: ``transport.write`` lines of our relay and uvloop's calls into
  ``ssl`` (py-spy charges a C call's time to the calling Python line: this is OpenSSL encryption
  and decryption, the send syscalls and the kernel's loopback TCP work behind them);
- **h2 / HPACK**, **HBONE core + relay** (``tunnel/``), **agent** (``agent/``, ``policy/``,
  ``identity/``: policy checks, tracking, metrics, access log) and **other Python** (stdlib,
  prometheus_client, json...).

``--raw-dir`` keeps py-spy's raw stacks (one file per load and agent) for flame graphs.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import agent_rss, suite

PY_SPY = Path(sys.executable).parent / "py-spy"
CATEGORIES = (
    "loop (native)",
    "TLS + socket calls (native)",
    "h2 / HPACK",
    "HBONE core + relay",
    "agent",
    "other Python",
)
# Python lines whose own time is a native call: a transport write (TLS encrypt + send, or a plain
# send) or OpenSSL on uvloop's behalf.
_WRITE_LEAVES = ("TunnelStream._deliver", "H2Session.flush", "SSLObject.write", "SSLObject.read")


def categorize(stack: str) -> str:
    """The category of one py-spy raw stack (``frame;frame;...``, the leaf last)."""
    leaf = stack.rsplit(";", 1)[-1]
    if leaf.startswith(("Runner.run ", "run (uvloop")):
        return "loop (native)"
    if leaf.startswith(_WRITE_LEAVES):
        return "TLS + socket calls (native)"
    where = leaf[leaf.find("(") + 1 :]  # "path/file.py:line)"; library paths are package-relative
    if where.startswith(("h2/", "hpack/", "hyperframe/")):
        return "h2 / HPACK"
    if where.startswith("tunnel/"):
        return "HBONE core + relay"
    if where.startswith(("agent/", "policy/", "identity/")):
        return "agent"
    return "other Python"


def split(raw: str) -> dict[str, float]:
    """Share (0..1) of the samples in each category, from py-spy's ``--format raw`` output."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if stack and n.isdigit():
            counts[categorize(stack)] += int(n)
    total = sum(counts.values()) or 1
    return {c: counts[c] / total for c in CATEGORIES}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _profile(
    pids: dict[str, int], seconds: float, load: Callable[[], float], raw_dir: Path, tag: str
) -> dict[str, Any]:
    """Run ``load`` (returns units of work done) while py-spy samples every agent."""
    spies = {}
    for node, pid in pids.items():
        out = raw_dir / f"{tag}-{node}.txt"
        argv = [str(PY_SPY), "record", "-r", "200", "-d", str(int(seconds)), "--format", "raw",
                "-o", str(out), "-p", str(pid)]  # fmt: skip
        spies[node] = (subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), out)
    time.sleep(0.5)  # py-spy attaches
    before = {n: cpu_seconds(p) for n, p in pids.items()}
    units = load()
    used = {n: cpu_seconds(p) - before[n] for n, p in pids.items()}
    result: dict[str, Any] = {"units": units}
    for node, (proc, out) in spies.items():
        _, err = proc.communicate(timeout=seconds + 30)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"py-spy on {node} failed: {err.decode()[-500:]}")
        result[node] = {"cpu_s": used[node], "split": split(out.read_text())}
    return result


def _envoy_pair(stack: ExitStack, ip: str, targets: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """The suite's Envoy HBONE pair in front of the same backends: (pids by role, ports by kind)."""
    from bench import hbone_bench
    from bench.envoy import hbone_client_config, hbone_server_config, start_envoy

    _c, _s, client_cred, server_cred, bundles = hbone_bench.make_creds()
    kinds = list(targets)
    server = start_envoy(
        hbone_server_config(
            backend=(ip, targets[kinds[0]]),
            cred=server_cred,
            bundles=bundles,
            routes={f"{ip}:{targets[k]}": (ip, targets[k]) for k in kinds},
        )
    )
    stack.callback(server.stop)
    client = start_envoy(
        hbone_client_config(
            target=[f"{ip}:{targets[k]}" for k in kinds],
            server=("127.0.0.1", server.listener_port),
            cred=client_cred,
            bundles=bundles,
            expect_san=str(server_cred.spiffe_id),
        )
    )
    stack.callback(client.stop)
    ports = {k: client.listener_ports[f"outbound-{i}"] for i, k in enumerate(kinds)}
    return {"client": client.proc.pid, "server": server.proc.pid}, ports


def _loads(ports: dict[str, int], secs: float) -> dict[str, tuple[Callable[[], float], str]]:
    """The three loads, each returning the units of work it did (connections, requests, GB)."""

    def newconns() -> float:
        return suite.wrk(ports["http"], 8, secs, close=True).rps * secs

    def keepalive() -> float:
        return suite.wrk(ports["http"], 16, secs).rps * secs

    def bulk() -> float:
        return suite.iperf3_bulk(ports["iperf"], secs) * secs / 8  # GB

    return {
        "new connections": (newconns, "conn"),
        "keep-alive 1 KB, 16 conns": (keepalive, "req"),
        "bulk, 1 stream": (bulk, "GB"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--raw-dir", help="keep py-spy's raw stacks here")
    args = ap.parse_args()
    if not PY_SPY.exists():
        raise SystemExit(f"py-spy not found at {PY_SPY}: run `make setup`")
    raw_dir = Path(args.raw_dir or tempfile.mkdtemp(prefix="ztagent-profile-"))
    raw_dir.mkdir(parents=True, exist_ok=True)
    secs = args.seconds
    results: dict[str, dict[str, Any]] = {}
    try:
        with ExitStack() as stack:
            ip = agent_rss.server_pod_ip()
            targets = {
                "http": stack.enter_context(suite.nginx_1kb(ip)),
                "iperf": stack.enter_context(suite.iperf3_server(ip)),
            }
            pair = stack.enter_context(agent_rss.node_pair(1, targets=targets))
            envoy_pids, envoy_ports = _envoy_pair(stack, ip, targets)
            time.sleep(1.5)
            for ports in (pair["listeners"], envoy_ports):
                suite.wrk(ports["http"], 8, 2, close=True)  # warm: certificates, pools, caches
            envoy_loads = _loads(envoy_ports, secs)
            for name, (load, unit) in _loads(pair["listeners"], secs).items():
                res = _profile(pair["pids"], secs, load, raw_dir, name.split()[0].replace(",", ""))
                before = {role: cpu_seconds(pid) for role, pid in envoy_pids.items()}
                units = envoy_loads[name][0]()
                res["envoy"] = {
                    role: (cpu_seconds(pid) - before[role]) / units for role, pid in envoy_pids.items()
                }
                res["unit"] = unit
                results[name] = res
                print(f"profile: {name} done", file=sys.stderr)
    finally:
        if not args.raw_dir:
            shutil.rmtree(raw_dir, ignore_errors=True)
    print(render(results))
    return 0


def _per(cpu_per_unit: float, unit: str) -> str:
    return f"{cpu_per_unit:.2f} s/GB" if unit == "GB" else f"{cpu_per_unit * 1e6:.0f} µs/{unit}"


def render(results: dict[str, dict[str, Any]]) -> str:
    head = "| load | agent | CPU per unit | Envoy's, same load | " + " | ".join(CATEGORIES) + " |"
    lines = [
        "CPU of the two agents (node-a: client side, node-b: server side) under the benchmark's loads,",
        "beside the Envoy pair's (client, server) under the same loads in the same run; per unit of work",
        "from /proc (user + system); the split is py-spy's share of the agent's samples.",
        "",
        head,
        "|" + "---|" * (4 + len(CATEGORIES)),
    ]
    for name, res in results.items():
        unit, units = res["unit"], res["units"]
        for node, role in (("node-a", "client"), ("node-b", "server")):
            r = res[node]
            cells = " | ".join(f"{100 * r['split'][c]:.0f}%" for c in CATEGORIES)
            ours, envoy = _per(r["cpu_s"] / units, unit), _per(res["envoy"][role], unit)
            lines.append(f"| {name} | {node} | {ours} | {envoy} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
