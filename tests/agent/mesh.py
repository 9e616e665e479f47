# ruff: noqa: E501
"""A two-node mesh on loopback for agent tests: a real CA (gRPC over mTLS), two real node agents
(`--capture none`), a TCP echo app per destination pod. No kernel features beyond sockets.

Addresses come from a per-process block of 127/8 (every 127.x.y.z is local on Linux), so
parallel test runs do not collide; other ports are ephemeral.

    node-a (agent A)                           node-b (agent B)
      sleep   .10  ns1/sa sleep                  httpbin .40 ns2/sa httpbin (app=httpbin)
      other   .11  ns1/sa other                  legacy  .41 ns2 (not enrolled)
    service httpbin.ns2: VIP .200:8000 -> httpbin:<echo port>

"Capture" is static (see agent.capture): agent A accepts on 127.0.0.1:<p> as if the app had
connected to the VIP (or to httpbin's pod IP); agent B accepts on 127.0.0.1:<q> as if a non-mesh
client had connected to httpbin's pod IP (inbound plaintext, 15006).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import socket
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.capture import StaticCapture
from agent.supervisor import AgentOptions, NodeAgent
from caserver import store as ca_store
from caserver.server import CaServer
from cli.main import main as cli_main
from sources.file import FileConfigSource, load_config

TD = "cluster.local"


def _block() -> str:
    pid = os.getpid()
    return f"127.{100 + (pid >> 8) % 150}.{pid % 256}"


class EchoApp:
    """A TCP app on a pod IP: echoes what it receives; records each peer address."""

    def __init__(self, host: str, port: int = 0) -> None:
        self.host = host
        self.port_wanted = port
        self.server: asyncio.Server | None = None
        self.peers: list[tuple[str, int]] = []
        self.open_writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.peers.append(w.get_extra_info("peername")[:2])
            self.open_writers.add(w)
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
                w.write_eof()
            except (ConnectionError, OSError):
                pass
            finally:
                self.open_writers.discard(w)
                w.close()

        self.server = await asyncio.start_server(handle, self.host, self.port_wanted)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self.open_writers):
                w.close()
            await self.server.wait_closed()


@dataclass
class Mesh:
    tmp: Path
    base: str
    hbone_port: int
    echo: EchoApp  # httpbin's app (node-b)
    legacy: EchoApp  # the unenrolled pod's app (node-b)
    local: EchoApp  # other's app (node-a, same node as sleep)
    config_path: Path
    ca: CaServer | None = None
    ca_address: str = ""
    agents: dict[str, NodeAgent] = field(default_factory=dict)
    access_logs: dict[str, Path] = field(default_factory=dict)
    policies: list[str] = field(default_factory=list)
    cert_ttl: dt.timedelta | None = None  # the agents' workload (and node renewal) TTL
    statics: dict[str, list[StaticCapture]] = field(default_factory=dict)
    ca_watch: asyncio.Task[None] | None = None

    # CA and agent lifecycle (outage tests)
    async def start_ca(self) -> None:
        """(Re)start the CA on ``ca_address`` (the same port after a stop), following the file."""
        assert self.ca is None, "CA already running"
        ca = CaServer(
            ca_store.load(self.tmp / "ca"), load_config(self.config_path), default_ttl=dt.timedelta(hours=1)
        )
        self.ca_address = await ca.start(self.ca_address or "127.0.0.1:0")
        self.ca = ca
        # The CA follows the file like `ca serve`, but its own poll never fires during a test: the
        # agents (50 ms polls) always see a change first, which is the race a CA must absorb by
        # re-reading the file before it denies.
        self.ca_watch = asyncio.get_running_loop().create_task(
            ca.watch_config(FileConfigSource(self.config_path, interval=3600))
        )

    async def stop_ca(self) -> None:
        """Stop the CA at once (no grace): its port refuses connections until start_ca."""
        if self.ca_watch is not None:
            self.ca_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.ca_watch
            self.ca_watch = None
        if self.ca is not None:
            await self.ca.stop(0)
            self.ca = None

    async def start_agent(self, node: str) -> NodeAgent:
        """Start ``node``'s agent (again) with the options it was first started with; raises the
        agent's StartupError (and keeps no agent) if it cannot start."""
        assert node not in self.agents, f"{node}'s agent is running"
        agent = NodeAgent(agent_options(self, node, statics=self.statics[node]))
        await agent.start()
        self.agents[node] = agent
        return agent

    async def stop_agent(self, node: str) -> None:
        await self.agents.pop(node).stop()

    # addresses
    def ip(self, last: int) -> str:
        return f"{self.base}.{last}"

    @property
    def sleep_ip(self) -> str:
        return self.ip(10)

    @property
    def other_ip(self) -> str:
        return self.ip(11)

    @property
    def httpbin_ip(self) -> str:
        return self.ip(40)

    @property
    def vip(self) -> str:
        return self.ip(200)

    def config_text(self, extra: str = "", *, policies: list[str] | None = None) -> str:
        b = self.base
        text = f"""\
apiVersion: ztagent.io/v1alpha1
kind: MeshConfig
trustDomain: {TD}
nodes:
  - {{name: node-a, address: {b}.100, podCIDR: {b}.0/27}}
  - {{name: node-b, address: {b}.101, podCIDR: {b}.32/27}}
workloads:
  - {{name: sleep, namespace: ns1, serviceAccount: sleep, node: node-a, ips: [{b}.10], labels: {{app: sleep}}}}
  - {{name: other, namespace: ns1, serviceAccount: other, node: node-a, ips: [{b}.11], labels: {{app: other}}}}
  - {{name: httpbin, namespace: ns2, serviceAccount: httpbin, node: node-b, ips: [{b}.40],
      labels: {{app: httpbin, version: v1}}}}
  - {{name: legacy, namespace: ns2, node: node-b, ips: [{b}.41], enrolled: false}}
services:
  - {{name: httpbin, namespace: ns2, vips: [{b}.200], ports: [{{port: 8000, targetPort: {self.echo.port}}}],
      selector: {{app: httpbin}}}}
{extra}"""
        for p in self.policies if policies is None else policies:
            text += "---\n" + p
        return text

    def write_config(self, text: str | None = None) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text if text is not None else self.config_text())
        os.replace(tmp, self.config_path)

    def set_policies(self, *docs: str) -> None:
        self.policies = list(docs)
        self.write_config()

    async def wait_applied(self, timeout: float = 10.0) -> None:
        """Until both agents serve the file's current contents (bounded)."""
        import hashlib

        want = hashlib.sha256(self.config_path.read_bytes()).hexdigest()
        for _ in range(int(timeout / 0.05)):
            if all(a.config is not None and a.config.digest == want for a in self.agents.values()):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("agents did not apply the new config in time")

    # traffic helpers
    def listener(self, node: str, original: str) -> tuple[str, int]:
        """The static-capture listener of ``node`` standing for ``original`` ip:port."""
        for lst in self.agents[node].addresses()["listeners"]:
            if lst["original"] == original:
                host, port = lst["address"].rsplit(":", 1)
                return host, int(port)
        raise KeyError(original)

    async def connect_as(
        self, source_ip: str | None, node: str, original: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = self.listener(node, original)
        local = (source_ip, 0) if source_ip else None
        return await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=local), 5)

    async def roundtrip(self, source_ip: str | None, node: str, original: str, payload: bytes) -> bytes:
        """Send ``payload``, half-close, read until EOF (bounded). Returns what came back
        (b"" when the agent refused the connection)."""
        try:
            r, w = await self.connect_as(source_ip, node, original)
        except (ConnectionError, OSError):
            return b""
        try:
            w.write(payload)
            await w.drain()
            w.write_eof()
            return await asyncio.wait_for(r.read(), 10)
        except (ConnectionError, OSError):
            return b""
        finally:
            w.close()

    # admin helpers
    async def admin(self, node: str, path: str) -> Any:
        url = self.agents[node].addresses()["admin"] + path
        return json.loads(await asyncio.to_thread(_get, url))

    async def metrics_text(self, node: str) -> str:
        url = self.agents[node].addresses()["metrics"] + "/metrics"
        return (await asyncio.to_thread(_get, url)).decode()

    def access_log(self, node: str) -> list[dict[str, Any]]:
        path = self.access_logs[node]
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return bytes(r.read())


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def agent_options(mesh: Mesh, node: str, *, statics: list[StaticCapture]) -> AgentOptions:
    return AgentOptions(
        config=str(mesh.config_path),
        node=node,
        ca=mesh.ca_address,
        node_credentials=str(mesh.tmp / f"cred-{node}"),
        capture="none",
        hbone_port=mesh.hbone_port,
        admin="127.0.0.1:0",
        metrics="127.0.0.1:0",
        readiness="127.0.0.1:0",
        static_captures=tuple(statics),
        access_log=str(mesh.access_logs[node]),
        config_interval=0.05,
        cert_ttl=mesh.cert_ttl,
        drain_timeout=1.0,
    )


@contextlib.asynccontextmanager
async def running_mesh(tmp: Path, *, cert_ttl: dt.timedelta | None = None) -> AsyncIterator[Mesh]:
    """The mesh above; ``cert_ttl`` is the agents' certificate TTL (default: the CA's 1 h)."""
    base = _block()
    echo, legacy, local = EchoApp(f"{base}.40"), EchoApp(f"{base}.41"), EchoApp(f"{base}.11")
    for app in (echo, legacy, local):
        await app.start()
    mesh = Mesh(tmp, base, _free_port(f"{base}.40"), echo, legacy, local, tmp / "mesh.yaml")
    mesh.cert_ttl = cert_ttl
    mesh.access_logs = {"node-a": tmp / "access-a.jsonl", "node-b": tmp / "access-b.jsonl"}
    try:
        mesh.write_config()
        assert cli_main(["ca", "init", "--dir", str(tmp / "ca"), "--trust-domain", TD]) == 0
        for node in ("node-a", "node-b"):
            out = str(tmp / f"cred-{node}")
            assert (
                cli_main(["ca", "bootstrap-node", "--dir", str(tmp / "ca"), "--node", node, "--out", out])
                == 0
            )
        await mesh.start_ca()
        b = base
        mesh.statics = {
            "node-a": [
                StaticCapture(("127.0.0.1", 0), (f"{b}.200", 8000)),  # the service VIP
                StaticCapture(("127.0.0.1", 0), (f"{b}.40", echo.port)),  # httpbin's pod IP
                StaticCapture(("127.0.0.1", 0), (f"{b}.41", legacy.port)),  # an unenrolled pod
                StaticCapture(("127.0.0.1", 0), (f"{b}.11", local.port)),  # same-node pod
                StaticCapture(("127.0.0.1", 0), ("192.0.2.1", 9)),  # outside the mesh
            ],
            "node-b": [
                StaticCapture(("127.0.0.1", 0), (f"{b}.40", echo.port), "inbound"),  # plaintext
                StaticCapture(("127.0.0.1", 0), (f"{b}.40", 1), "inbound"),  # a closed port
            ],
        }
        await mesh.start_agent("node-a")
        await mesh.start_agent("node-b")
        yield mesh
    finally:
        for agent in mesh.agents.values():
            await agent.stop()
        await mesh.stop_ca()
        for app in (echo, legacy, local):
            await app.close()
