"""`ztagent run` as a real process: starts from the CLI, serves admin/readiness, reports its
addresses, answers `ztagent status`, stops cleanly on SIGTERM; and refuses to start, with a
clear message, when something it needs is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cli.main import main as cli_main

pytestmark = pytest.mark.timeout(120)
ZTAGENT = [sys.executable, "-m", "cli.main"]


def _config(base: str) -> str:
    return f"""\
apiVersion: ztagent.io/v1alpha1
kind: MeshConfig
trustDomain: cluster.local
nodes:
  - {{name: node-a, address: {base}.100, podCIDR: {base}.0/27}}
workloads:
  - {{name: sleep, namespace: ns1, serviceAccount: sleep, node: node-a, ips: [{base}.10]}}
"""


@pytest.fixture
def ca_setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    pid = os.getpid()
    base = f"127.{100 + (pid >> 8) % 150}.{(pid + 7) % 256}"
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(_config(base))
    assert cli_main(["ca", "init", "--dir", str(tmp_path / "ca"), "--trust-domain", "cluster.local"]) == 0
    assert (
        cli_main(
            [
                "ca",
                "bootstrap-node",
                "--dir",
                str(tmp_path / "ca"),
                "--node",
                "node-a",
                "--out",
                str(tmp_path / "cred"),
            ]
        )
        == 0
    )
    sock = tmp_path / "ca.sock"
    ca = subprocess.Popen(
        [
            *ZTAGENT,
            "ca",
            "serve",
            "--dir",
            str(tmp_path / "ca"),
            "--config",
            str(cfg),
            "--listen",
            f"unix:{sock}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(200):
            if sock.exists():
                break
            assert ca.poll() is None, ca.stderr.read().decode() if ca.stderr else ""
            time.sleep(0.05)
        yield tmp_path, cfg, f"unix:{sock}", base
    finally:
        ca.terminate()
        try:
            ca.wait(10)
        except subprocess.TimeoutExpired:
            ca.kill()
            ca.wait(5)


def _run_args(tmp: Path, cfg: Path, ca: str, *extra: str) -> list[str]:
    return [
        *ZTAGENT,
        "run",
        "--config",
        str(cfg),
        "--node",
        "node-a",
        "--ca",
        ca,
        "--node-credentials",
        str(tmp / "cred"),
        "--capture",
        "none",
        "--hbone-port",
        "0",
        "--admin",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--readiness",
        "127.0.0.1:0",
        "--access-log",
        str(tmp / "access.jsonl"),
        "--state-file",
        str(tmp / "state.json"),
        *extra,
    ]


def test_run_serves_reports_and_stops_on_sigterm(ca_setup) -> None:  # type: ignore[no-untyped-def]
    tmp, cfg, ca, _base = ca_setup
    proc = subprocess.Popen(_run_args(tmp, cfg, ca), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        state = tmp / "state.json"
        for _ in range(400):
            if state.exists():
                break
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.05)
        addresses = json.loads(state.read_text())["addresses"]
        with urllib.request.urlopen(addresses["readiness"] + "/healthz/ready", timeout=5) as r:
            assert r.status == 200
        admin = addresses["admin"].removeprefix("http://")
        out = subprocess.run(
            [*ZTAGENT, "status", "--admin", admin], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("HEALTHY  node node-a")
        assert "spiffe://cluster.local/ns/ns1/sa/sleep" in out.stdout
        y = subprocess.run(
            [*ZTAGENT, "status", "--admin", admin, "-o", "yaml"], capture_output=True, text=True, timeout=30
        )
        assert y.returncode == 0 and "healthy: true" in y.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert proc.stderr is not None
        logs = [json.loads(line) for line in proc.stderr.read().decode().splitlines() if line.startswith("{")]
        events = [rec.get("event") for rec in logs]
        assert "agent_started" in events and events[-1] == "agent_stopped"
        assert all({"time", "level", "logger", "msg"} <= rec.keys() for rec in logs)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_run_refuses_unknown_node_and_bad_config(ca_setup) -> None:  # type: ignore[no-untyped-def]
    tmp, cfg, ca, _base = ca_setup
    args = _run_args(tmp, cfg, ca)
    args[args.index("node-a")] = "node-z"
    p = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "node 'node-z' is not in the config" in p.stderr
    args = _run_args(tmp, cfg, ca)
    args[args.index("--admin") + 1] = "0.0.0.0:0"
    p = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "must listen on a loopback address" in p.stderr
    bad = tmp / "bad.yaml"
    bad.write_text(cfg.read_text().replace("ns1", "NS1"))
    args = _run_args(tmp, bad, ca)
    p = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert (
        "bad.yaml: document 0 (MeshConfig): workloads[0].namespace: 'NS1' is not a valid namespace"
        in p.stderr
    )


def test_run_refuses_to_start_without_certificates(ca_setup) -> None:  # type: ignore[no-untyped-def]
    tmp, cfg, _ca, _base = ca_setup
    p = subprocess.run(
        _run_args(tmp, cfg, f"unix:{tmp}/nothing-here.sock"), capture_output=True, text=True, timeout=90
    )
    assert p.returncode == 1
    assert "spiffe://cluster.local/ns/ns1/sa/sleep" in p.stderr and "cannot start" in p.stderr
