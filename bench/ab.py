"""Two checkouts of ztagent, alternated in one run: is a change faster or slower?

Absolute figures move by ±30% between runs on a shared VM (and far more when other work loads
it), so a change is judged by running the same loads through the real agents of both checkouts
in alternation, in the same run, and comparing medians. Each side is a pair of real ``ztagent
run`` processes (``bench.agent_rss.node_pair``: a real CA, HBONE mTLS, policy, metrics and access
logs on) in front of the same backends (nginx 1 KB, iperf3 on the server pod's IP).

    .venv/bin/python -m bench.ab --baseline /path/to/old/checkout [--runs 5]

The baseline checkout runs with its own code (``PYTHONPATH`` set to it, its own ``cli``/``agent``
entry point), this checkout with the installed one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench import agent_rss, suite


def _launcher(tree: Path) -> str:
    """An executable that runs ``ztagent`` from ``tree`` (whichever layout it has)."""
    module = "cli.main" if (tree / "cli" / "main.py").exists() else "agent.cli"
    d = tempfile.mkdtemp(prefix="ztagent-ab-")
    path = Path(d, "ztagent")
    path.write_text(
        # -P: the working directory (this checkout) must not shadow the baseline tree.
        f"#!/bin/sh\nPYTHONPATH={tree} exec {sys.executable} -P -m {module} \"$@\"\n", encoding="utf-8"
    )
    path.chmod(0o755)
    return str(path)


@contextmanager
def _agents(launcher: str | None, backends: dict[str, int]) -> Iterator[dict[str, Any]]:
    original = agent_rss._zt
    if launcher is not None:
        agent_rss._zt = lambda: launcher
    try:
        with agent_rss.node_pair(1, targets=backends) as pair:
            yield pair
    finally:
        agent_rss._zt = original


def measure(listeners: dict[str, int], seconds: float) -> dict[str, float]:
    bulk = suite.iperf3_bulk(listeners["iperf"], seconds)
    h16 = suite.wrk(listeners["http"], 16, seconds)
    new = suite.wrk(listeners["http"], 8, seconds, close=True)
    h1 = suite.wrk(listeners["http"], 1, seconds)
    return {
        "bulk_gbps": bulk,
        "http1_p50_ms": h1.p50_ms,
        "http16_rps": h16.rps,
        "newconns_per_s": new.rps,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="checkout to compare against")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    args = p.parse_args(argv)
    base_launcher = _launcher(Path(args.baseline).resolve())
    samples: dict[str, dict[str, list[float]]] = {"baseline": {}, "this": {}}
    with ExitStack() as stack:
        pod_ip = agent_rss.server_pod_ip()
        backends = {
            "iperf": stack.enter_context(suite.iperf3_server(pod_ip)),
            "http": stack.enter_context(suite.nginx_1kb(pod_ip)),
        }
        for run in range(args.runs):
            for side, launcher in (("baseline", base_launcher), ("this", None)):
                with _agents(launcher, backends) as pair:
                    suite.wrk(pair["listeners"]["http"], 2, 1)  # warm-up
                    got = measure(pair["listeners"], args.seconds)
                for k, v in got.items():
                    samples[side].setdefault(k, []).append(v)
                figures = " ".join(f"{k}={v:.3f}" for k, v in got.items())
                print(f"run {run + 1}/{args.runs} {side:8s} {figures}", flush=True)
    print(f"\nmedian of {args.runs} alternating runs; baseline = {args.baseline}")
    print("| metric | baseline | this | this/baseline |")
    print("|---|---|---|---|")
    for k in samples["this"]:
        b, t = statistics.median(samples["baseline"][k]), statistics.median(samples["this"][k])
        print(f"| {k} | {b:.3f} | {t:.3f} | {t / b:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
