"""`ztagent run --config-source kubernetes` and `ztagent ca serve --config-source kubernetes` as
real processes against the stand-in API server: the agent learns its node's pods from the watch,
gets certificates for the enrolled ones, follows a new pod and a pod relabelled out of the mesh.
(Node authentication here is the file credential: token mode in the agent needs the
``NodeAgent(ca_client=)`` seam, see docs/contracts.md.)"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.kubeapi import running
from tests.sources.test_kubernetes_source import TD, eventually, namespace, pod, relabel, service_account

pytestmark = pytest.mark.timeout(120)


def _block() -> str:
    pid = os.getpid()
    return f"127.{100 + (pid >> 8) % 150}.{(pid + 97) % 256}"


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = r.read()
            return r.status, json.loads(body) if body.startswith((b"{", b"[")) else body
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cli.main", *args], check=True, capture_output=True, timeout=60)


async def test_agent_and_ca_follow_the_cluster(tmp_path: pathlib.Path) -> None:
    base = _block()
    async with running(tmp_path / "kubeapi", bookmark_interval=0.5) as api:
        namespace(api, "ztagent-system")
        service_account(api, "ztagent-system", "ztagent")
        pod(api, "ztagent-system", "ztagent-a", node="node-a", ip=f"{base}.1", host_ip=f"{base}.1",
            sa="ztagent", host_network=True)  # fmt: skip
        namespace(api, "shop", {"istio.io/dataplane-mode": "ambient"})
        service_account(api, "shop", "web")
        pod(api, "shop", "web-a", node="node-a", ip=f"{base}.10", host_ip=f"{base}.1", sa="web")

        ca_dir, creds = tmp_path / "ca", tmp_path / "cred-a"
        await asyncio.to_thread(_cli, "ca", "init", "--dir", str(ca_dir), "--trust-domain", TD)
        await asyncio.to_thread(_cli, "ca", "bootstrap-node", "--dir", str(ca_dir), "--node", "node-a",
                                "--out", str(creds))  # fmt: skip
        logs = [(tmp_path / n).open("wb") for n in ("ca.log", "agent.log")]
        procs: list[asyncio.subprocess.Process] = []
        try:
            ca = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cli.main", "ca", "serve", "--dir", str(ca_dir),
                "--config-source", "kubernetes", "--kubeconfig", str(api.kubeconfig),
                "--listen", "127.0.0.1:0", "-o", "json", stdout=asyncio.subprocess.PIPE, stderr=logs[0],
            )  # fmt: skip
            procs.append(ca)
            assert ca.stdout is not None
            line = await asyncio.wait_for(ca.stdout.readline(), 30)
            assert line, (tmp_path / "ca.log").read_text()
            ca_address = json.loads(line)["address"]
            state = tmp_path / "agent-state.json"
            agent = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cli.main", "run", "--config-source", "kubernetes",
                "--kubeconfig", str(api.kubeconfig), "--trust-domain", TD, "--node", "node-a",
                "--ca", ca_address, "--node-credentials", str(creds), "--capture", "none",
                "--listen-host", f"{base}.1", "--hbone-port", "15008",
                "--admin", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--readiness", "127.0.0.1:0",
                "--state-file", str(state), "--loop", "asyncio", stderr=logs[1], stdout=logs[1],
            )  # fmt: skip
            procs.append(agent)
            await eventually(lambda: state.exists() or agent.returncode is not None, 40, "agent state file")
            assert state.exists(), (tmp_path / "agent.log").read_text()[-3000:]
            addrs = json.loads(state.read_text())["addresses"]
            admin, ready = addrs["admin"], addrs["readiness"]

            def certs() -> set[str]:
                code, body = _get(admin + "/certs")
                assert code == 200
                return {c["identity"] for c in body if c.get("serial")}  # held, not only wanted

            web = f"spiffe://{TD}/ns/shop/sa/web"
            assert (await asyncio.to_thread(_get, ready + "/healthz/ready"))[0] == 200
            assert web in await asyncio.to_thread(certs)

            # A new enrolled pod on this node: the agent learns it from its watch, the CA from its
            # own, and the agent obtains its certificate.
            service_account(api, "shop", "cart")
            pod(api, "shop", "cart-a", node="node-a", ip=f"{base}.11", host_ip=f"{base}.1", sa="cart")
            cart = f"spiffe://{TD}/ns/shop/sa/cart"
            for _ in range(200):
                if cart in await asyncio.to_thread(certs):
                    break
                await asyncio.sleep(0.1)
            assert cart in await asyncio.to_thread(certs), (tmp_path / "agent.log").read_text()[-3000:]

            # Relabelled out of the mesh: no longer a local enrolled workload.
            relabel(api, "Pod", "shop", "cart-a", {"istio.io/dataplane-mode": "none"})

            def enrolled_here() -> set[str]:
                code, body = _get(admin + "/workloads")
                assert code == 200
                return {w["name"] for w in body if w["enrolled"] and w["local"]}

            for _ in range(200):
                if "cart-a" not in await asyncio.to_thread(enrolled_here):
                    break
                await asyncio.sleep(0.1)
            assert await asyncio.to_thread(enrolled_here) == {"web-a"}
        finally:
            for p in procs:
                if p.returncode is None:
                    p.terminate()
                    await p.wait()
            for f in logs:
                f.close()


async def test_agent_token_bootstrap_as_deploy_runs_it(tmp_path: pathlib.Path) -> None:
    """deploy/'s command lines: the agent with a projected token and the CA's root, the CA with
    TokenReview; no node credential anywhere."""
    base = _block()
    async with running(tmp_path / "kubeapi", bookmark_interval=0.5) as api:
        namespace(api, "ztagent-system")
        service_account(api, "ztagent-system", "ztagent")
        for node, host in (("node-a", f"{base}.1"), ("node-b", f"{base}.2")):
            pod(api, "ztagent-system", f"ztagent-{node}", node=node, ip=host, host_ip=host, sa="ztagent",
                host_network=True)  # fmt: skip
        namespace(api, "shop", {"istio.io/dataplane-mode": "ambient"})
        service_account(api, "shop", "web")
        service_account(api, "shop", "db")
        pod(api, "shop", "web-a", node="node-a", ip=f"{base}.10", host_ip=f"{base}.1", sa="web")
        pod(api, "shop", "db-b", node="node-b", ip=f"{base}.20", host_ip=f"{base}.2", sa="db")
        ca_dir, root = tmp_path / "ca", tmp_path / "root-cert.pem"
        await asyncio.to_thread(_cli, "ca", "init", "--dir", str(ca_dir), "--trust-domain", TD)
        root.write_bytes(
            subprocess.run(
                [sys.executable, "-m", "cli.main", "ca", "bundle", "--dir", str(ca_dir)],
                check=True,
                capture_output=True,
                timeout=60,
            ).stdout
        )
        token = tmp_path / "token"
        token.write_text(
            api.server.issue_token("ztagent-system", "ztagent", ["ztagent-ca"], pod="ztagent-node-a")
        )
        logs = [(tmp_path / n).open("wb") for n in ("ca.log", "agent.log")]
        procs: list[asyncio.subprocess.Process] = []
        try:
            ca = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cli.main", "ca", "serve", "--dir", str(ca_dir),
                "--config-source", "kubernetes", "--kubeconfig", str(api.kubeconfig),
                "--listen", "127.0.0.1:0", "--node-auth", "token", "--token-audience", "ztagent-ca",
                "-o", "json", stdout=asyncio.subprocess.PIPE, stderr=logs[0],
            )  # fmt: skip
            procs.append(ca)
            assert ca.stdout is not None
            line = await asyncio.wait_for(ca.stdout.readline(), 30)
            assert line, (tmp_path / "ca.log").read_text()
            state = tmp_path / "agent-state.json"
            agent = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cli.main", "run", "--config-source", "kubernetes",
                "--kubeconfig", str(api.kubeconfig), "--node", "node-a",
                "--ca", json.loads(line)["address"], "--ca-auth", "token", "--token-path", str(token),
                "--ca-root-cert", str(root), "--capture", "none", "--listen-host", f"{base}.1",
                "--admin", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--readiness", "127.0.0.1:0",
                "--state-file", str(state), "--loop", "asyncio", stderr=logs[1], stdout=logs[1],
            )  # fmt: skip
            procs.append(agent)
            await eventually(lambda: state.exists() or agent.returncode is not None, 40, "agent state file")
            assert state.exists(), (tmp_path / "agent.log").read_text()[-3000:]
            addrs = json.loads(state.read_text())["addresses"]
            assert (await asyncio.to_thread(_get, addrs["readiness"] + "/healthz/ready"))[0] == 200
            _, body = await asyncio.to_thread(_get, addrs["admin"] + "/certs")
            held = {c["identity"] for c in body if c.get("serial")}
            assert held == {f"spiffe://{TD}/ns/shop/sa/web"}  # node-a's pod only; no node identity
            _, metrics = await asyncio.to_thread(_get, addrs["metrics"] + "/metrics")
            assert b'ztagent_node_credential_valid{credential="token"} 1.0' in metrics
        finally:
            for p in procs:
                if p.returncode is None:
                    p.terminate()
                    await p.wait()
            for f in logs:
                f.close()
