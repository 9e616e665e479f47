"""`ztagent run` raises its open-files limit: a busy node proxies more than 1024 connections."""

from __future__ import annotations

import resource
import subprocess
import sys

CHILD = """
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from cli.commands.run import raise_nofile_limit
got = raise_nofile_limit()
print(got, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def test_soft_limit_is_raised_to_the_hard_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=60
    )
    got, now = (int(x) for x in out.stdout.split())
    want = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    assert got == now == want
    if want < 16384:
        assert "open-files limit" in out.stderr  # a limit this low is called out
