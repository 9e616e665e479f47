"""`ztagent status | head`: a reader that goes away early is not an error of ours (issue 12).

A real admin endpoint (serving.http) answers /status; the CLI runs as its own process with its
stdout on a pipe whose reading end is already closed, as after `head` exits."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from serving.http import HttpApp, json_response, serve

STATUS = {
    "healthy": True,
    "node": "node-a",
    "version": "test",
    "uptimeSeconds": 5,
    "ready": True,
    "workloads": [{"name": f"w{i}", "namespace": "default", "spiffeId": "x", "ips": []} for i in range(200)],
}


@pytest.mark.parametrize("output", ["table", "json", "yaml"])
async def test_status_into_a_closed_pipe_exits_quietly_with_the_status_code(output: str) -> None:
    app = HttpApp()
    app.add_get("/status", lambda: json_response(STATUS))
    site = await serve(app, "127.0.0.1", 0)
    r, w = os.pipe()
    os.close(r)  # the reader is gone before we write a byte
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cli.main",
            "status",
            "--admin",
            f"127.0.0.1:{site.port}",
            "-o",
            output,
            stdout=w,
            stderr=asyncio.subprocess.PIPE,
        )
        os.close(w)
        w = -1
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if w >= 0:
            os.close(w)
        await site.close()
    assert b"BrokenPipe" not in err and b"Traceback" not in err, err.decode()
    assert proc.returncode == 0  # healthy, as the status said; not 1 or Python's 120
