"""Keeps the benchmark suite from rotting: one cheap scenario end to end through all four paths
(direct, a real Envoy pair, two real agents, our tunnel pair), checking the result file it
writes. Asserts that the suite works and reports sane figures, never how fast anything is."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.envoy import ENVOY

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(not ENVOY.exists(), reason="Envoy binary not installed at .venv/bin/envoy"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("wrk", "iperf3", "nginx")), reason="wrk/iperf3/nginx not installed"
    ),
]


@pytest.mark.timeout(90)
def test_quick_http1_runs_all_four_paths(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "http1", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rps = res["metrics"]["http1_rps"]
    assert set(rps["paths"]) == {"direct", "envoy", "agent", "pair"}
    for stat in rps["paths"].values():
        assert stat["median"] > 0 and len(stat["samples"]) == 1
    assert rps["agent_over_envoy"] > 0 and rps["pair_over_envoy"] > 0
    assert "| 1 KB HTTP req/s, 1 conn (req/s) |" in out.with_suffix(".md").read_text()
    assert "bulk_gbps" not in res["metrics"]  # --only is honoured
