"""Connection churn soak: open and close connections at a steady rate through two real agents, and
check that their memory returns to its baseline afterwards (ztunnel's users report memory that is
never given back under churn).

Two real ``ztagent run`` processes (``bench.agent_rss.node_pair``: a real CA, mTLS HBONE between
the agents, policy, metrics and access logs on) in front of nginx answering 1 KB. A warm-up at the
same rate fills the caches and pools that are meant to stay (pooled HBONE connection, interned
labels, allocator arenas); the baseline is each agent's RSS after it. Then ``--seconds`` of churn
at ``--rate`` new connections per second (one HTTP request each, ``Connection: close``), then a
settle period; "after" is the RSS once every connection has closed. Passes when each agent's RSS
after is within ``tolerance`` of its baseline.

    .venv/bin/python -m bench.soak                  # make soak: 5 minutes at 300 connections/s
    .venv/bin/python -m bench.soak --seconds 20     # what the test suite runs
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass

from bench import agent_rss, suite

REQUEST = b"GET / HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n"
# Allowed growth over the baseline: allocator noise of a few hundred KB, plus 5% for arenas that
# glibc keeps mapped but that a steady rate reuses.
TOLERANCE_MB = 2.0
TOLERANCE_FRACTION = 0.05


@dataclass
class SoakResult:
    seconds: float
    rate_wanted: float
    connections: int
    failures: int
    baseline_mb: dict[str, float]
    peak_mb: dict[str, float]
    after_mb: dict[str, float]
    ok: bool

    def summary(self) -> str:
        lines = [
            f"churn: {self.connections} connections in {self.seconds:.0f} s "
            f"({self.connections / self.seconds:.0f}/s, wanted {self.rate_wanted:.0f}/s), "
            f"{self.failures} failed",
            "| agent | baseline RSS (MB) | peak during churn (MB) | after (MB) | growth (MB) |",
            "|---|---|---|---|---|",
        ]
        for node in self.baseline_mb:
            grow = self.after_mb[node] - self.baseline_mb[node]
            lines.append(
                f"| {node} | {self.baseline_mb[node]:.1f} | {self.peak_mb[node]:.1f} | "
                f"{self.after_mb[node]:.1f} | {grow:+.1f} |"
            )
        lines.append("memory back to baseline: " + ("yes" if self.ok else "NO"))
        return "\n".join(lines)


def _rss_mb(pid: int) -> float:
    return suite.status_kb(pid, "VmRSS") / 1024


def _one(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(REQUEST)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
            return got.startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def churn(port: int, seconds: float, rate: float, workers: int = 4) -> tuple[int, int]:
    """Connections at ``rate`` per second for ``seconds`` (bounded in count and time)."""
    total = int(seconds * rate)
    done = [0, 0]  # ok, failed
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + seconds * 2 + 10  # never run on past twice the planned time

    def worker(index: int) -> None:
        n = index
        while n < total and time.monotonic() < deadline:
            due = start + n / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            ok = _one(port)
            with lock:
                done[0 if ok else 1] += 1
            n += workers

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 5)
    return done[0] + done[1], done[1]


def soak(seconds: float, rate: float, *, warmup: float = 10.0, settle: float = 5.0) -> SoakResult:
    with suite.nginx_1kb(agent_rss.server_pod_ip()) as http_port, agent_rss.node_pair(
        1, targets={"http": http_port}
    ) as pair:
        port = pair["listeners"]["http"]
        pids: dict[str, int] = pair["pids"]
        churn(port, warmup, rate)
        time.sleep(settle)
        baseline = {node: _rss_mb(pid) for node, pid in pids.items()}
        peak = dict(baseline)
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                for node, pid in pids.items():
                    peak[node] = max(peak[node], _rss_mb(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        began = time.monotonic()
        n, failed = churn(port, seconds, rate)
        elapsed = time.monotonic() - began
        stop.set()
        sampler.join(2)
        time.sleep(settle)
        after = {node: _rss_mb(pid) for node, pid in pids.items()}
    ok = all(after[k] <= baseline[k] * (1 + TOLERANCE_FRACTION) + TOLERANCE_MB for k in baseline)
    return SoakResult(elapsed, rate, n, failed, baseline, peak, after, ok and failed == 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--rate", type=float, default=300.0, help="new connections per second")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = soak(args.seconds, args.rate)
    print(json.dumps(asdict(res), indent=2) if args.json else res.summary())
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
