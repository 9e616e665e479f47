"""A real Prometheus server (Debian's /usr/bin/prometheus) for tests: temp storage, loopback only."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

PROMETHEUS = "/usr/bin/prometheus"


def _free_port() -> int:
    # Prometheus cannot report a port it picked itself, so we pick one; a collision makes the
    # start fail loudly below and we retry with another.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, promql: str) -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def targets(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=5) as r:
            return list(json.load(r)["data"]["activeTargets"])

    def wait_for(self, promql: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll until the query returns a non-empty result (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        last: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            last = self.query(promql)
            if last:
                return last
            time.sleep(0.5)
        raise AssertionError(f"no result for {promql!r} within {timeout}s; targets: {self.targets()}")


@contextlib.contextmanager
def prometheus_scraping(
    targets: list[str], interval: str = "1s", *, target_labels: dict[str, dict[str, str]] | None = None
) -> Iterator[Prometheus]:
    """Prometheus scraping ``targets``; ``target_labels`` adds labels per target (as Kubernetes
    service discovery adds ``pod``), so dashboards that select on them can be evaluated."""
    if not os.path.exists(PROMETHEUS):
        import pytest

        pytest.skip(f"{PROMETHEUS} missing: install Debian's prometheus package (scripts/setup.sh does)")
    tmp = tempfile.mkdtemp(prefix=f"ztagent-prom-{os.getpid()}-")
    proc: subprocess.Popen[bytes] | None = None
    try:
        cfg = os.path.join(tmp, "prometheus.yml")
        with open(cfg, "w") as f:
            json.dump(  # JSON is YAML
                {
                    "global": {"scrape_interval": interval, "evaluation_interval": interval},
                    "scrape_configs": [
                        {
                            "job_name": "ztagent",
                            "metrics_path": "/metrics",
                            "static_configs": [
                                {"targets": [t], "labels": (target_labels or {}).get(t, {})} for t in targets
                            ],
                        }
                    ],
                },
                f,
            )
        for _attempt in range(5):
            port = _free_port()
            with open(os.path.join(tmp, "prometheus.log"), "wb") as log:
                proc = subprocess.Popen(
                    [
                        PROMETHEUS,
                        f"--config.file={cfg}",
                        f"--storage.tsdb.path={os.path.join(tmp, 'data')}",
                        f"--web.listen-address=127.0.0.1:{port}",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            url = f"http://127.0.0.1:{port}"
            for _ in range(100):  # up to ~20 s for the TSDB to open
                if proc.poll() is not None:
                    break
                try:
                    with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                time.sleep(0.2)
            if proc.poll() is None:
                break
            proc = None
        if proc is None:
            with open(os.path.join(tmp, "prometheus.log"), "rb") as f:
                raise RuntimeError("prometheus did not start:\n" + f.read().decode(errors="replace")[-2000:])
        yield Prometheus(url)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)
