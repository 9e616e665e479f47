"""Fixtures for the CNI tests: the plugin exactly as a node gets it (the zipapp cni.install writes,
run by the node's /usr/bin/python3) and a short-pathed temp dir for agent sockets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cni.install import install_binary

NODE_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


@pytest.fixture(scope="session")
def plugin_bin_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="cni-bin-", dir="/tmp"))
    try:
        install_binary(d, NODE_PYTHON)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def plugin_exe(plugin_bin_dir: Path) -> Path:
    return plugin_bin_dir / "ztagent-cni"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths must fit in 108 bytes: pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="cni-sock-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class Outcome:
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None


def invoke(
    exe: Path, env: dict[str, str], stdin: bytes | dict[str, Any] | None, timeout: float = 30
) -> Outcome:
    """Exec the plugin the way a runtime does: CNI_* environment, config on stdin, nothing else."""
    data = json.dumps(stdin).encode() if isinstance(stdin, dict) else (stdin or b"")
    base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    p = subprocess.run([str(exe)], input=data, env={**base, **env}, capture_output=True, timeout=timeout)
    return Outcome(p.returncode, p.stdout.decode(), p.stderr.decode())
