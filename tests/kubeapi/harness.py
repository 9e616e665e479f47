"""Starting the stand-in API server for a test, in-process or as a subprocess, with a test CA,
a server certificate for 127.0.0.1, an admin bearer token and a real kubeconfig.

    async with running(tmp_path) as api:          # in-process: api.server is the KubeApiServer
        subprocess.run(["kubectl", "--kubeconfig", api.kubeconfig, "get", "pods"])

    with ApiServerProcess(tmp_path) as api:        # python -m tests.kubeapi --port 0 --state-file F
        api.control("drop_watches")                # fault injection over HTTPS (/_kubeapi/faults)
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import pathlib
import secrets
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .server import ApiError, KubeApiServer, server_ssl_context

ADMIN_USER = "kubernetes-admin"


def make_tls(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """A test CA and a server certificate for 127.0.0.1/localhost/kubernetes.default.svc:
    returns (ca.crt, server.crt, server.key)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes-test-ca")])
    start, day = now - datetime.timedelta(minutes=5), datetime.timedelta(days=1)
    usage = x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=True,
        crl_sign=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(now + 2 * day)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage, critical=True)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes.default.svc"),
        x509.DNSName("kubernetes.default.svc.cluster.local"),
    ]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(now + day)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    ca_file, cert_file, key_file = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_file.chmod(0o600)
    return ca_file, cert_file, key_file


def write_kubeconfig(
    path: pathlib.Path, url: str, ca_file: pathlib.Path, token: str, namespace: str = "default"
) -> pathlib.Path:
    cfg = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "kubeapi", "cluster": {"server": url, "certificate-authority": str(ca_file)}}],
        "users": [{"name": ADMIN_USER, "user": {"token": token}}],
        "contexts": [{"name": "kubeapi", "context": {"cluster": "kubeapi", "user": ADMIN_USER,
                                                     "namespace": namespace}}],
        "current-context": "kubeapi",
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


@dataclass
class RunningApiServer:
    server: KubeApiServer
    url: str
    ca_file: pathlib.Path
    token: str
    kubeconfig: pathlib.Path
    runner: web.AppRunner

    async def close(self) -> None:
        await self.runner.cleanup()


def _control_routes(server: KubeApiServer, app: web.Application) -> None:
    """/_kubeapi/faults: fault injection for a server in another process (admin token only)."""

    async def faults(request: web.Request) -> web.Response:
        user = server._authenticate(request)
        if "system:masters" not in user.groups:
            raise ApiError(403, "Forbidden", "fault injection needs the admin token")
        body: dict[str, Any] = await request.json()
        action = body.get("action")
        result: Any = None
        if action == "drop_watches":
            result = server.drop_watches()
        elif action == "expire_watches":
            result = server.expire_watches()
        elif action == "compact":
            server.compact()
        elif action == "delay":
            server.faults.delay = float(body["seconds"])
        elif action == "fail_next":
            server.faults.fail_next.extend((int(c), str(r)) for c, r in body["failures"])
        elif action == "drop_watch_after_events":
            n = body.get("events")
            server.faults.drop_watch_after_events = None if n is None else int(n)
        elif action == "issue_token":
            result = server.issue_token(
                body["namespace"],
                body["serviceAccount"],
                list(body["audiences"]),
                pod=body.get("pod"),
                expiration_seconds=int(body.get("expirationSeconds", 3600)),
            )
        elif action == "add_token":
            server.add_token(body["token"], body["username"], tuple(body.get("groups", ())))
        else:
            raise ApiError(400, "BadRequest", f"unknown action {action!r}")
        return web.Response(
            body=json.dumps({"result": result, "resourceVersion": str(server.store.rv)}).encode(),
            content_type="application/json",
        )

    app.router.add_post("/_kubeapi/faults", faults)


def build_app(server: KubeApiServer) -> web.Application:
    app = web.Application(middlewares=[server._middleware], client_max_size=16 << 20)
    _control_routes(server, app)
    app.router.add_route("*", "/{tail:.*}", server._route)
    return app


async def start(
    directory: pathlib.Path, *, host: str = "127.0.0.1", port: int = 0, **server_kwargs: Any
) -> RunningApiServer:
    ca_file, cert_file, key_file = make_tls(directory / "pki")
    server = KubeApiServer(**server_kwargs)
    token = secrets.token_urlsafe(24)
    server.add_token(token, ADMIN_USER)
    runner = web.AppRunner(build_app(server), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=server_ssl_context(str(cert_file), str(key_file)))
    await site.start()
    sock = site._server.sockets[0]  # type: ignore[union-attr]
    actual = sock.getsockname()[1]
    url = f"https://{host}:{actual}"
    kubeconfig = write_kubeconfig(directory / "kubeconfig", url, ca_file, token)
    return RunningApiServer(server, url, ca_file, token, kubeconfig, runner)


@contextlib.asynccontextmanager
async def running(directory: pathlib.Path, **kwargs: Any) -> AsyncIterator[RunningApiServer]:
    api = await start(directory, **kwargs)
    try:
        yield api
    finally:
        await api.close()


class ApiServerProcess:
    """`python -m tests.kubeapi` as a child process; the state file carries its address."""

    def __init__(
        self, directory: pathlib.Path, *, extra_args: tuple[str, ...] = (), timeout: float = 20.0
    ) -> None:
        self.directory = directory
        self.state_file = directory / "kubeapi-state.json"
        self.extra_args = extra_args
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.state: dict[str, Any] = {}

    def start(self) -> ApiServerProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.state_file.unlink(missing_ok=True)
        root = pathlib.Path(__file__).resolve().parents[2]
        env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.kubeapi",
                "--port",
                "0",
                "--dir",
                str(self.directory),
                "--state-file",
                str(self.state_file),
                *self.extra_args,
            ],
            cwd=root,
            env=env,
        )
        deadline = time.monotonic() + self.timeout
        while not self.state_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"kubeapi exited with {self.proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("kubeapi did not write its state file")
            time.sleep(0.05)
        self.state = json.loads(self.state_file.read_text())
        return self

    @property
    def kubeconfig(self) -> pathlib.Path:
        return pathlib.Path(self.state["kubeconfig"])

    @property
    def url(self) -> str:
        return str(self.state["url"])

    def control(self, action: str, **params: Any) -> Any:
        ctx = ssl.create_default_context(cafile=self.state["ca_file"])
        req = urllib.request.Request(
            self.url + "/_kubeapi/faults",
            data=json.dumps({"action": action, **params}).encode(),
            headers={"Authorization": f"Bearer {self.state['token']}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return json.loads(r.read())["result"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ApiServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
