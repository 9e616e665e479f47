"""Shared helpers for the CA tests (no tests here): CA directories, configs, a real `ztagent ca
serve` process, raw gRPC stubs for sending requests the agent's client never would."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from caserver import store as ca_store
from cli.main import main as cli_main
from credentials.identities import CA_SERVER_NAME
from credentials.proto import ca_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
ZTAGENT = str(Path(sys.executable).parent / "ztagent")
TD = "cluster.local"

BASE_WORKLOADS = [
    # name, namespace, service account, node
    ("sleep", "ns1", "sleep", "node-a"),
    ("httpbin", "ns2", "httpbin", "node-b"),
    ("legacy", "ns3", "legacy", "node-a", False),  # not enrolled: gets no certificate
]


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def config_text(workloads: list[tuple[Any, ...]] = BASE_WORKLOADS, trust_domain: str = TD) -> str:
    lines = [
        "apiVersion: ztagent.io/v1alpha1",
        "kind: MeshConfig",
        f"trustDomain: {trust_domain}",
        "nodes:",
        "  - {name: node-a, address: 10.250.0.1}",
        "  - {name: node-b, address: 10.250.0.2}",
        "workloads:",
    ]
    for i, w in enumerate(workloads):
        name, ns, sa, node = w[:4]
        enrolled = w[4] if len(w) > 4 else True
        lines.append(
            f"  - {{name: {name}, namespace: {ns}, serviceAccount: {sa}, node: {node}, "
            f"ips: [10.244.9.{i + 2}], enrolled: {str(enrolled).lower()}}}"
        )
    return "\n".join(lines) + "\n"


def write_config(path: Path, text: str) -> None:
    # Replace atomically (as editors and ConfigMap updates do) so the server never reads half.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def cli(*argv: str) -> int:
    return cli_main(list(argv))


def dir_digest(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


@dataclass
class CaEnv:
    base: Path
    ca_dir: Path
    config: Path
    node_a: Path
    node_b: Path
    foreign_node_a: Path  # a node-a credential from a different CA
    workload_cred: Path  # a workload (not node) credential from the right CA

    @property
    def socket(self) -> str:
        return f"unix:{self.base}/ca.sock"


def make_env(base: Path) -> CaEnv:
    ca_dir = base / "ca"
    ca_store.init_self_signed(ca_dir, TD, now=now())
    config = base / "mesh.yaml"
    write_config(config, config_text())
    env = CaEnv(
        base,
        ca_dir,
        config,
        base / "node-a",
        base / "node-b",
        base / "foreign-node-a",
        base / "workload",
    )
    with contextlib.redirect_stdout(None):
        assert (
            # 24 h, not the 30 d default: tests check these credentials expire two days out.
            cli(
                "ca",
                "bootstrap-node",
                "--dir",
                str(ca_dir),
                "--node",
                "node-a",
                "--ttl",
                "24h",
                "--out",
                str(env.node_a),
            )
            == 0
        )
        assert (
            cli(
                "ca",
                "bootstrap-node",
                "--dir",
                str(ca_dir),
                "--node",
                "node-b",
                "--ttl",
                "24h",
                "--out",
                str(env.node_b),
            )
            == 0
        )
        other = base / "other-ca"
        ca_store.init_self_signed(other, TD, now=now())
        assert (
            cli(
                "ca",
                "bootstrap-node",
                "--dir",
                str(other),
                "--node",
                "node-a",
                "--out",
                str(env.foreign_node_a),
            )
            == 0
        )
        assert (
            cli(
                "ca",
                "issue",
                "--dir",
                str(ca_dir),
                "--id",
                f"spiffe://{TD}/ns/ns1/sa/sleep",
                "--out",
                str(env.workload_cred),
            )
            == 0
        )
    return env


@contextlib.contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A short directory under /tmp: unix socket paths are limited to 107 bytes."""
    d = Path(tempfile.mkdtemp(prefix=f"ztca{os.getpid()}-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class ServeProcess:
    """`ztagent ca serve` as a real subprocess; stderr (JSON logs) captured to a file."""

    def __init__(
        self, env: CaEnv, *extra: str, ca_dir: Path | None = None, listen: str | None = None
    ) -> None:
        self.env = env
        self.listen = listen or env.socket
        self.stderr_path = env.base / f"serve-{time.monotonic_ns()}.err"
        self.argv = [
            ZTAGENT, "ca", "serve", "--dir", str(ca_dir or env.ca_dir), "--config", str(env.config),
            "--listen", self.listen, "-o", "json", *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.info: dict[str, Any] = {}

    def start(self, timeout: float = 20.0) -> str:
        err = open(self.stderr_path, "wb")  # noqa: SIM115 - owned by the child until it exits
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=err, cwd=ROOT)
        err.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"ca serve did not start: {self.stderr()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    continue
                line += chunk
        info = json.loads(line)
        self.info = info
        self.address = info["address"]
        return self.address

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for ln in self.stderr().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(ln))
        return out

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        if p.stdout is not None:
            p.stdout.close()

    def __enter__(self) -> ServeProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def raw_channel(address: str, cred_dir: Path) -> grpc.aio.Channel:
    files = ca_store.read_credentials(cred_dir)
    creds = grpc.ssl_channel_credentials(files.roots_pem, files.key_pem, files.chain_pem)
    return grpc.aio.secure_channel(
        address, creds, options=[("grpc.ssl_target_name_override", CA_SERVER_NAME)]
    )


def raw_stub(channel: grpc.aio.Channel) -> Any:
    return ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
