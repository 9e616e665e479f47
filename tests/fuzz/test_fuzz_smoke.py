"""CI's short fuzzing pass (issue 12): every target for a few thousand coverage-guided inputs.

Each target runs in its own process under atheris, from its seeds alone (a temporary working
directory), with a fixed libFuzzer seed; any crash fails the test and names the saved input.
``make fuzz`` is the long run (>= 1 000 000 inputs per target).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import runner

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {"admin_http", "ca_request", "hbone_frames", "mesh_config", "policy", "spiffe_id", "svid"}
SMOKE_RUNS = 3000
SMOKE_SECONDS = 7  # cap per target, so the whole pass stays under a minute on a loaded machine


def test_every_parser_has_a_target() -> None:
    assert set(runner.target_names()) >= EXPECTED


@pytest.mark.parametrize("name", runner.target_names())
def test_seeds_pass_the_target(name: str) -> None:
    # A seed that fails is a broken target (or a regression the seed was added for).
    mod = runner.load_target(name)
    assert mod.SEEDS
    for seed in mod.SEEDS:
        mod.fuzz_one(seed)


@pytest.mark.parametrize("name", runner.target_names())  # every target, also ones added later
def test_short_fuzz_run_finds_nothing(name: str, tmp_path: Path) -> None:
    env = {**os.environ, runner.WORKDIR_ENV: str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz",
            "run",
            name,
            "--runs",
            str(SMOKE_RUNS),
            "--seconds",
            str(SMOKE_SECONDS),
            "--seed",
            "1",
            "-q",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = (tmp_path / "logs" / f"{name}.log").read_text(errors="replace")
    crashes = sorted((tmp_path / "crashes" / name).glob("*"))
    assert proc.returncode == 0 and not crashes, f"{proc.stdout}\n{proc.stderr}\n{log[-4000:]}"
    # It really fuzzed: libFuzzer's final statistics report the inputs it ran.
    executed = [int(x) for x in runner._EXECUTED.findall(log.encode())]
    assert executed and executed[-1] >= min(SMOKE_RUNS, 500), log[-2000:]
