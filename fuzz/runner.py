"""Discover targets, run each one under atheris in a child process, and summarize.

libFuzzer owns the process it runs in (it calls ``exit`` when done or on a crash), so every run is
a child ``python -m fuzz _worker NAME ...``; the parent tees its output and reads libFuzzer's final
statistics (inputs executed, seconds) and the artifact files it wrote.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import pkgutil
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO, Any

FUZZ_DIR = Path(__file__).resolve().parent
# corpus/, crashes/ and logs/ live here; ZTAGENT_FUZZ_WORKDIR moves them (the CI smoke test starts
# from the seeds alone in a temporary directory).
WORKDIR_ENV = "ZTAGENT_FUZZ_WORKDIR"


def workdir() -> Path:
    return Path(os.environ.get(WORKDIR_ENV) or FUZZ_DIR)


# Instrumented for coverage feedback: our packages and the pure-Python parsers underneath them
# (cryptography's parser is Rust and protobuf's is C: opaque to the fuzzer, but their Python
# callers and our checks after them are not).
# Every package of the project (one only costs something once a target imports it), so a new
# target for any of them needs no change here.
INSTRUMENTED = (
    "fuzz.targets",
    "agent",
    "caserver",
    "cli",
    "cni",
    "credentials",
    "identity",
    "lab",
    "mesh",
    "policy",
    "serving",
    "sources",
    "tunnel",
    "waypoint",
    "h2",
    "hpack",
    "hyperframe",
    "h11",
    # (not yaml: its pure-Python scanner instrumented held mesh_config at ~300 inputs/s)
)
DEFAULT_MAX_LEN = 4096
# Seconds one input may take before libFuzzer calls it a hang (a parser that slow is a DoS).
PER_INPUT_TIMEOUT = 10

_ARTIFACT_PREFIXES = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")


def target_names() -> list[str]:
    import fuzz.targets

    return sorted(m.name for m in pkgutil.iter_modules(fuzz.targets.__path__) if not m.name.startswith("_"))


def load_target(name: str) -> ModuleType:
    if name not in target_names():
        raise SystemExit(f"unknown fuzz target {name!r}; targets: {', '.join(target_names())}")
    mod = importlib.import_module(f"fuzz.targets.{name}")
    for attr in ("fuzz_one", "SEEDS"):
        if not hasattr(mod, attr):
            raise SystemExit(f"fuzz target {name} has no {attr}")
    return mod


def write_seeds(name: str, seeds: Sequence[bytes]) -> Path:
    corpus = workdir() / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        path = corpus / f"seed-{hashlib.sha1(seed).hexdigest()[:16]}"
        if not path.exists():
            path.write_bytes(seed)
    return corpus


def worker(name: str, runs: int, seconds: int, seed: int = 0) -> None:
    """Inside the child: instrument, seed the corpus, hand the process to libFuzzer."""
    import atheris

    # The code under test logs every refusal (the CA a line per bad CSR, the admin server a
    # traceback per failing endpoint): in the fuzzing process that is all noise and most of the
    # time. Only here: importing a target (the smoke test's seed check) leaves logging alone.
    logging.disable(logging.CRITICAL)

    with atheris.instrument_imports(include=list(INSTRUMENTED)):
        mod = load_target(name)
    fuzz_one: Callable[[bytes], None] = mod.fuzz_one
    # Seeds must pass: a seed that "crashes" means the target or its seeds are wrong, and
    # libFuzzer would report it as a finding.
    corpus = write_seeds(name, mod.SEEDS)
    crashes = workdir() / "crashes" / name
    crashes.mkdir(parents=True, exist_ok=True)
    args = [
        sys.argv[0],
        f"-runs={runs}",
        f"-max_len={getattr(mod, 'MAX_LEN', DEFAULT_MAX_LEN)}",
        f"-timeout={PER_INPUT_TIMEOUT}",
        f"-artifact_prefix={crashes}/",
        "-print_final_stats=1",
        "-print_pcs=0",
    ]
    if seconds > 0:
        args.append(f"-max_total_time={seconds}")
    if seed:
        args.append(f"-seed={seed}")
    args.append(str(corpus))
    atheris.Setup(args, fuzz_one)
    atheris.Fuzz()


@dataclass
class Result:
    name: str
    returncode: int
    inputs: int | None
    seconds: float
    artifacts: list[Path] = field(default_factory=list)
    log: Path | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.artifacts

    def line(self) -> str:
        rate = f"{self.inputs / self.seconds:,.0f}/s" if self.inputs and self.seconds else "-"
        inputs = f"{self.inputs:,}" if self.inputs is not None else "?"
        crash = ", ".join(str(p) for p in self.artifacts) if self.artifacts else "none"
        status = "ok" if self.ok else f"FAILED (exit {self.returncode})"
        return (
            f"{self.name:<14} {inputs:>12} inputs  {self.seconds:8.1f} s  {rate:>10}  "
            f"crashes: {len(self.artifacts)} [{crash}]  {status}"
        )


_DONE = re.compile(rb"Done (\d+) runs in (\d+) second")
_EXECUTED = re.compile(rb"stat::number_of_executed_units: (\d+)")


def _artifacts(name: str) -> set[Path]:
    d = workdir() / "crashes" / name
    if not d.is_dir():
        return set()
    return {p for p in d.iterdir() if p.name.startswith(_ARTIFACT_PREFIXES)}


def run_target(name: str, *, runs: int, seconds: int, echo: IO[bytes] | None, seed: int = 0) -> Result:
    """Run one target in a child; ``echo`` gets libFuzzer's output as it comes (None: quiet)."""
    load_target(name)  # fail fast on a typo, in the parent
    before = _artifacts(name)
    log_dir = workdir() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    cmd = [sys.executable, "-m", "fuzz", "_worker", name, str(runs), str(seconds), str(seed)]
    started = time.monotonic()
    out = bytearray()
    with (
        log_path.open("wb") as log,
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=FUZZ_DIR.parent) as proc,
    ):
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.readline(), b""):  # type: ignore[union-attr]
            out += chunk
            log.write(chunk)
            if echo is not None:
                echo.write(chunk)
                echo.flush()
        rc = proc.wait()
    elapsed = time.monotonic() - started
    executed = _EXECUTED.findall(out) or [m[0] for m in _DONE.findall(out)]
    inputs = int(executed[-1]) if executed else None
    new = sorted(_artifacts(name) - before)
    return Result(name, rc, inputs, elapsed, new, log_path)


def replay(name: str, files: Sequence[str]) -> int:
    """Feed saved inputs (crash files, corpus entries) to the target without the fuzzer."""
    mod = load_target(name)
    failed = 0
    for f in files:
        data = Path(f).read_bytes()
        try:
            mod.fuzz_one(data)
        except Exception:
            failed += 1
            print(f"{f}: FAILS", file=sys.stderr)
            traceback.print_exc()
        else:
            print(f"{f}: ok")
    return 1 if failed else 0


def summarize(results: Sequence[Result], out: Any = None) -> None:
    out = out or sys.stdout
    print("\nfuzz summary (target, inputs run, wall time, rate, crashes):", file=out)
    for r in results:
        print("  " + r.line(), file=out)
