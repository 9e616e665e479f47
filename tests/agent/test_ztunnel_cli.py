"""`ztagent ztunnel-config ...` and `ztagent precheck` (issue 17), run as processes against a
real loopback mesh (tests/agent/mesh.py) and on this machine."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli.commands.precheck import HostFacts, evaluate, gather, report
from cli.commands.ztunnel_config import cert_rows
from tests.agent.mesh import Mesh, running_mesh

pytestmark = pytest.mark.timeout(180)

ZTAGENT = [sys.executable, "-m", "cli.main"]


@pytest.fixture
async def mesh(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with running_mesh(tmp_path) as m:
        yield m


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *ZTAGENT, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def admin(mesh: Mesh, node: str) -> str:
    return str(mesh.agents[node].addresses()["admin"]).removeprefix("http://")


async def test_workloads_table_filters_and_formats(mesh: Mesh) -> None:
    rc, out, err = await cli("ztunnel-config", "workloads", "--admin", admin(mesh, "node-a"))
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAMESPACE", "POD", "NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"]
    rows = {tuple(line.split()[:2]): line.split() for line in lines[1:]}
    # Mesh-wide: node-b's workloads are listed by node-a's agent too.
    assert rows[("ns2", "httpbin")] == ["ns2", "httpbin", mesh.httpbin_ip, "node-b", "None", "HBONE"]
    assert rows[("ns2", "legacy")][-1] == "TCP"
    assert len(rows) == 4

    rc, out, _ = await cli(
        "ztunnel-config",
        "workloads",
        "--admin",
        admin(mesh, "node-a"),
        "--workload-node",
        "node-a",
        "-o",
        "json",
    )
    assert rc == 0
    assert sorted(w["name"] for w in json.loads(out)) == ["other", "sleep"]
    rc, out, _ = await cli(
        "ztunnel-config",
        "workloads",
        "--admin",
        admin(mesh, "node-a"),
        "--address",
        mesh.httpbin_ip,
        "-o",
        "yaml",
    )
    assert rc == 0 and [w["uid"] for w in yaml.safe_load(out)] == ["Kubernetes//Pod/ns2/httpbin"]


async def test_services_policies_certificates_and_a_saved_dump(mesh: Mesh, tmp_path: Path) -> None:
    mesh.set_policies(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny-legacy, namespace: ns2}\n"
        "spec: {action: DENY, rules: [{from: [{source: {notPrincipals: ['*']}}]}]}\n"
    )
    await mesh.wait_applied()
    rc, out, err = await cli("ztunnel-config", "services", "--admin", admin(mesh, "node-b"))
    assert rc == 0, err
    assert out.splitlines()[1].split() == ["ns2", "httpbin", mesh.vip, "None", "1/1"]
    rc, out, _ = await cli("ztunnel-config", "policies", "--admin", admin(mesh, "node-b"))
    assert rc == 0 and out.splitlines()[1].split() == ["ns2", "deny-legacy", "Deny", "Namespace", "1"]

    rc, out, _ = await cli("ztunnel-config", "certificates", "--admin", admin(mesh, "node-b"))
    assert rc == 0
    rows = [line.split() for line in out.splitlines()[1:]]
    httpbin = [r for r in rows if r[0] == "spiffe://cluster.local/ns/ns2/sa/httpbin"]
    assert [r[1] for r in httpbin] == ["Leaf", "Root"]
    assert all(r[2] == "Available" and r[3] == "true" for r in httpbin)

    # A saved dump reads the same way (istioctl's --file).
    dump = tmp_path / "dump.json"
    dump.write_text(json.dumps(await mesh.admin("node-b", "/config_dump")))
    rc, out, _ = await cli("ztunnel-config", "all", "--file", str(dump))
    assert rc == 0 and "# workloads" in out and "# certificates" in out and "deny-legacy" in out
    rc, _, err = await cli("ztunnel-config", "workloads", "--file", str(tmp_path / "missing.json"))
    assert rc == 2 and "cannot read the config dump" in err
    rc, _, err = await cli("ztunnel-config", "workloads", "--admin", "127.0.0.1:1")
    assert rc == 2 and "cannot reach the ztagent admin endpoint at 127.0.0.1:1" in err


async def test_connections_and_log_level(mesh: Mesh) -> None:
    r, w = await mesh.connect_as(mesh.sleep_ip, "node-a", f"{mesh.vip}:8000")
    try:
        w.write(b"abc")
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(3), 5) == b"abc"
        rc, out, err = await cli("ztunnel-config", "connections", "--admin", admin(mesh, "node-a"))
        assert rc == 0, err
        (row,) = [line.split() for line in out.splitlines()[1:]]
        assert row[0] == "outbound" and row[3] == "HBONE" and row[5] == "ns2/httpbin"
    finally:
        w.close()

    rc, out, _ = await cli(
        "ztunnel-config", "log", "--admin", admin(mesh, "node-b"), "--level", "access:debug,info"
    )
    assert rc == 0 and out == "current log level is access:debug,info\n"
    rc, out, _ = await cli("ztunnel-config", "log", "--admin", admin(mesh, "node-b"))
    assert rc == 0 and out == "current log level is access:debug,info\n"
    rc, _, err = await cli("ztunnel-config", "log", "--admin", admin(mesh, "node-b"), "--level", "chatty")
    assert rc == 1 and "unknown level 'chatty'" in err
    rc, out, _ = await cli("ztunnel-config", "log", "--admin", admin(mesh, "node-b"), "--level", "info")
    assert rc == 0 and out == "current log level is info\n"


def test_certificate_rows_judge_validity_at_the_given_time() -> None:
    import datetime as dt

    certs = [
        {
            "identity": "spiffe://td/ns/a/sa/b",
            "state": "Available",
            "certChain": [
                {
                    "serialNumber": "1f",
                    "validFrom": "2026-01-01T00:00:00+00:00",
                    "expirationTime": "2026-01-02T00:00:00+00:00",
                }
            ],
            "rootCerts": [
                {
                    "serialNumber": "2",
                    "validFrom": "2025-01-01T00:00:00+00:00",
                    "expirationTime": "2035-01-01T00:00:00+00:00",
                }
            ],
        },
        {"identity": "spiffe://td/ns/a/sa/c", "state": "Initializing", "certChain": [], "rootCerts": []},
    ]
    rows = cert_rows(certs, dt.datetime(2026, 1, 3, tzinfo=dt.UTC))
    assert [(r[0][-1], r[1], r[3]) for r in rows[1:]] == [
        ("b", "Leaf", "false"),
        ("b", "Root", "true"),
        ("c", "Leaf", "false"),
    ]


FACTS = HostFacts(
    kernel_release="6.8.0-generic",
    cap_eff=(1 << 12) | (1 << 39),
    bpffs_mounted=True,
    btf=True,
    kernel_headers=False,
    bcc="0.29.1",
    libnftables=True,
    sk_lookup=None,
)


def test_precheck_says_what_is_missing() -> None:
    import dataclasses

    assert report(evaluate(FACTS))["ok"] is True
    old = dataclasses.replace(
        FACTS,
        kernel_release="5.10.0-28-amd64",
        cap_eff=1 << 21,
        bpffs_mounted=False,
        btf=False,
        bcc=None,
        libnftables=False,
        sk_lookup="bpf(BPF_PROG_LOAD): EINVAL (Invalid argument)",
    )
    checks = {c.name: c for c in evaluate(old)}
    failed = {n for n, c in checks.items() if c.ok is False}
    assert failed == {
        "kernel",
        "sk_lookup",
        "bpffs",
        "nftables-owner",
        "bcc",
        "kernel-headers",
        "CAP_NET_ADMIN",
    }
    assert checks["CAP_BPF"].ok is True  # CAP_SYS_ADMIN stands in for CAP_BPF
    assert "5.17" in checks["kernel"].fix and "linux-headers-5.10.0-28-amd64" in checks["kernel-headers"].fix
    # 5.12 <= kernel < 5.17: the owner-flag guard works, the capture program does not.
    mid = {c.name: c.ok for c in evaluate(dataclasses.replace(FACTS, kernel_release="5.15.0"))}
    assert mid["kernel"] is False and mid["nftables-owner"] is True
    unprivileged = {
        c.name: c for c in evaluate(dataclasses.replace(FACTS, cap_eff=0, sk_lookup="skip: no caps"))
    }
    assert unprivileged["sk_lookup"].ok is None and unprivileged["CAP_BPF"].ok is False
    with pytest.raises(ValueError, match="kernel release 'weird'"):
        evaluate(dataclasses.replace(FACTS, kernel_release="weird"))


async def test_precheck_on_this_machine() -> None:
    rc, out, err = await cli("precheck", "-o", "json")
    rep = json.loads(out)
    assert rc == (0 if rep["ok"] else 1), err
    names = [c["name"] for c in rep["checks"]]
    assert names == [
        "kernel",
        "sk_lookup",
        "bpffs",
        "nftables-owner",
        "bcc",
        "kernel-headers",
        "CAP_BPF",
        "CAP_NET_ADMIN",
    ]
    # The facts precheck judged are this machine's.
    facts = gather()
    assert rep["checks"][0]["detail"].startswith(facts.kernel_release)
