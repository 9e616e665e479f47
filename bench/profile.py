"""Where the agents' CPU goes under the benchmark's loads: the profiles behind the README's
"where the misses come from".

    .venv/bin/python -m bench.profile [--seconds S] [--raw-dir DIR]

Runs the benchmark's ztagent path (two real ``ztagent run`` agents, ``bench.agent_rss.node_pair``)
and the suite's Envoy HBONE pair in front of the same backends, under three loads: new connections
(wrk, ``Connection: close``, 8 connections), 1 KB keep-alive requests (wrk, 16 connections) and
bulk (iperf3, one stream). For each load:

1. **measure** (no profiler attached): the agents, then the Envoys, each proxy's CPU per unit of
   work from /proc (user + system time, so the kernel's socket work is in it), the rate the load
   reached and how busy the whole machine was;
2. **profile**: the agents again with py-spy attached (``--nonblocking``, Python stacks, 200 Hz),
   for the split of their samples by where the stack was running:

- **loop (native)**: uvloop's own loop with no Python frame of ours on top (epoll, accept,
  connect, reads, the TLS record processing of its SSL protocol);
- **TLS + socket calls (native)**: the lines of ours that are one native call (transport writes,
  socket connects, uvloop's connection set-up), and calls into ``ssl``. py-spy charges a C
  call's time to the calling Python line: this is OpenSSL encryption and decryption, the
  syscalls and the kernel's loopback TCP work behind them;
- **h2 / HPACK**: the HTTP/2 library;
- **HBONE core + relay** / **agent**: everything else, by the innermost frame of ours on the
  stack (``tunnel/``; ``agent/``, ``policy/``, ``identity/``), including the library code they
  call (asyncio helpers, ``json`` for the access log, ``prometheus_client``);
- **other Python**: what runs with no frame of ours between it and the loop.

``--raw-dir`` keeps py-spy's raw stacks (one file per load and agent) for flame graphs.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from bench import agent_rss, suite

ROOT = Path(__file__).resolve().parents[1]
PY_SPY = Path(sys.executable).parent / "py-spy"
CATEGORIES = (
    "loop (native)",
    "TLS + socket calls (native)",
    "h2 / HPACK",
    "HBONE core + relay",
    "agent",
    "other Python",
)
_OURS = {"tunnel": "HBONE core + relay", "agent": "agent", "policy": "agent", "identity": "agent"}
# Lines of ours that are one native call: transport writes, socket connects (the loopback
# handshake runs inside the syscall) and uvloop's connection set-up.
_NATIVE_CALL = re.compile(r"\b(transport|tcp)\.(write|writelines)\(|\bsock\.connect\(|\.create_connection\(")


@cache
def native_call_lines() -> frozenset[str]:
    """``path:line`` of every line of ours that is one native call (found in the source, so the
    split stays right when the code moves)."""
    found = set()
    for package in ("tunnel", "agent"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if _NATIVE_CALL.search(line):
                    found.add(f"{rel}:{n}")
    return frozenset(found)


def _location(frame: str) -> str:
    """``path:line`` of a py-spy frame ``function (path:line)``; our files relative to the repo."""
    where = frame[frame.rfind("(") + 1 :].rstrip(")")
    root = f"{ROOT.as_posix()}/"
    return where[len(root) :] if where.startswith(root) else where


def _is_loop(frame: str) -> bool:
    return frame.startswith(("Runner.run (", "run (uvloop"))


def categorize(stack: str) -> str:
    """The category of one py-spy raw stack (``frame;frame;...``, the leaf last)."""
    frames = stack.split(";")
    leaf = frames[-1]
    if _is_loop(leaf):
        return "loop (native)"
    where = _location(leaf)
    path = where.rsplit(":", 1)[0]
    if path == "ssl.py" or path.endswith("/ssl.py") or where in native_call_lines():
        return "TLS + socket calls (native)"
    if path.startswith(("h2/", "hpack/", "hyperframe/")):
        return "h2 / HPACK"
    # The innermost frame of ours above the event loop (the loop itself is called from cli/main).
    loop_at = max((i for i, f in enumerate(frames) if _is_loop(f)), default=-1)
    for frame in reversed(frames[loop_at + 1 :]):
        top = _location(frame).split("/", 1)[0]
        if top in _OURS:
            return _OURS[top]
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


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass
class Measured:
    units: float  # connections, requests or GB the load completed
    rate: float  # per second
    cpu: dict[str, float]  # CPU seconds per unit, by proxy
    machine_busy: float  # 0..1 over the load, all cores


def measure(pids: dict[str, int], load: Callable[[], float], seconds: int) -> Measured:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    busy0, total0 = machine_ticks()
    units = load()
    busy1, total1 = machine_ticks()
    cpu = {name: (cpu_seconds(pid) - before[name]) / units for name, pid in pids.items()}
    return Measured(units, units / seconds, cpu, (busy1 - busy0) / max(1, total1 - total0))


def profile(
    pids: dict[str, int], load: Callable[[], float], seconds: int, raw_dir: Path, tag: str
) -> dict[str, Any]:
    """Run ``load`` while py-spy samples every agent; the split of each agent's samples."""
    spies = {}
    for node, pid in pids.items():
        out = raw_dir / f"{tag}-{node}.txt"
        argv = [str(PY_SPY), "record", "--nonblocking", "-r", "200", "-d", str(seconds), "--format", "raw",
                "-o", str(out), "-p", str(pid)]  # fmt: skip
        spies[node] = (subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), out)
    time.sleep(0.5)  # py-spy attaches
    load()
    shares = {}
    for node, (proc, out) in spies.items():
        _, err = proc.communicate(timeout=seconds + 30)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"py-spy on {node} failed: {err.decode()[-500:]}")
        shares[node] = split(out.read_text())
    return shares


def _envoy_pair(stack: ExitStack, ip: str, targets: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """The suite's Envoy HBONE pair in front of the same backends: (pids by role, ports by kind)."""
    from bench import hbone_bench
    from bench.envoy import start_hbone_pair

    _c, _s, client_cred, server_cred, bundles = hbone_bench.make_creds()
    client, server, ports = start_hbone_pair(
        stack,
        {k: (ip, port) for k, port in targets.items()},
        client_cred=client_cred,
        server_cred=server_cred,
        bundles=bundles,
    )
    return {"client": client.proc.pid, "server": server.proc.pid}, ports


LOADS = {"new connections": "conn", "keep-alive 1 KB, 16 conns": "req", "bulk, 1 stream": "GB"}


def _load(name: str, ports: dict[str, int], seconds: int) -> Callable[[], float]:
    """One of the three loads: a callable that runs it and returns the units of work it did."""

    def wrk(conns: int, close: bool) -> float:
        res = suite.wrk(ports["http"], conns, seconds, close=close)
        if res.errors:
            raise RuntimeError(f"{name}: wrk reported {res.errors} errors")
        return res.rps * seconds

    if name == "new connections":
        return lambda: wrk(8, True)
    if name == "keep-alive 1 KB, 16 conns":
        return lambda: wrk(16, False)
    return lambda: suite.iperf3_bulk(ports["iperf"], seconds) * seconds / 8  # Gbit/s -> GB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--raw-dir", help="keep py-spy's raw stacks here")
    args = ap.parse_args()
    if not PY_SPY.exists():
        raise SystemExit(f"py-spy not found at {PY_SPY}: run `make setup`")
    raw_dir = Path(args.raw_dir or tempfile.mkdtemp(prefix="ztagent-profile-"))
    raw_dir.mkdir(parents=True, exist_ok=True)
    secs = max(1, args.seconds)
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
            agent_pids, agent_ports = pair["pids"], pair["listeners"]
            time.sleep(1.5)
            for ports in (agent_ports, envoy_ports):
                suite.wrk(ports["http"], 8, 2, close=True)  # warm: certificates, pools, caches
            for name in LOADS:
                tag = name.split()[0].replace(",", "")
                results[name] = {
                    "agents": measure(agent_pids, _load(name, agent_ports, secs), secs),
                    "envoys": measure(envoy_pids, _load(name, envoy_ports, secs), secs),
                    "split": profile(agent_pids, _load(name, agent_ports, secs), secs, raw_dir, tag),
                }
                print(f"profile: {name} done", file=sys.stderr)
    finally:
        if not args.raw_dir:
            shutil.rmtree(raw_dir, ignore_errors=True)
    print(render(results))
    return 0


def _per(cpu_per_unit: float, unit: str) -> str:
    return f"{cpu_per_unit:.2f} s/GB" if unit == "GB" else f"{cpu_per_unit * 1e6:.0f} µs/{unit}"


def _rate(m: Measured, unit: str) -> str:
    return f"{m.rate * 8:.1f} Gbit/s" if unit == "GB" else f"{m.rate:.0f} {unit}/s"


def render(results: dict[str, dict[str, Any]]) -> str:
    head = (
        "| load | side | ztagent CPU per unit | Envoy's | rate: ztagent / Envoy "
        "| machine busy: ztagent / Envoy | " + " | ".join(CATEGORIES) + " |"
    )
    lines = [
        "CPU per unit of work of each proxy (client side: node-a / client Envoy; server side: node-b /",
        "server Envoy) under the same loads, measured without a profiler (/proc, user + system); the",
        "split is py-spy's share of each agent's samples in a second, profiled pass.",
        "",
        head,
        "|" + "---|" * (6 + len(CATEGORIES)),
    ]
    for name, res in results.items():
        unit = LOADS[name]
        agents, envoys = res["agents"], res["envoys"]
        for side, node, role in (("client", "node-a", "client"), ("server", "node-b", "server")):
            cells = " | ".join(f"{100 * res['split'][node][c]:.0f}%" for c in CATEGORIES)
            lines.append(
                f"| {name} | {side} | {_per(agents.cpu[node], unit)} | {_per(envoys.cpu[role], unit)} | "
                f"{_rate(agents, unit)} / {_rate(envoys, unit)} | "
                f"{100 * agents.machine_busy:.0f}% / {100 * envoys.machine_busy:.0f}% | {cells} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
