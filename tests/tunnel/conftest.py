"""Fixtures for tunnel tests: a real CA (identity.ca), real SVIDs, real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import pytest
import uvloop

from identity.bundle import TrustBundleSet
from identity.ca import CertificateAuthority
from identity.keys import build_csr, generate_key
from identity.spiffe import SpiffeId
from identity.svid import WorkloadCredential
from tunnel.client import ClientConfig, HboneClient, OutboundTarget
from tunnel.hbone import Authority
from tunnel.relay import TunnelInfo
from tunnel.server import AuthzDecision, AuthzRequest, HboneServer, ServerConfig

NOW = dt.datetime.now(dt.UTC)
TD = "cluster.local"


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    # pytest-asyncio's loop hook (>= 1.4; event-loop policies are deprecated), applied to the
    # tests under this directory only. The agent runs on uvloop by default (`ztagent run --loop
    # asyncio` is the fallback): test the production path unless ZTAGENT_TEST_LOOP=asyncio asks
    # for the other one. One factory: test ids stay unchanged.
    if os.environ.get("ZTAGENT_TEST_LOOP") == "asyncio":
        return {"asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


def issue(
    ca: CertificateAuthority, ns: str, sa: str, ttl: dt.timedelta = dt.timedelta(hours=1)
) -> WorkloadCredential:
    key = generate_key()
    sid = SpiffeId.for_workload(ca.trust_domain, ns, sa)
    issued = ca.sign_csr(build_csr(key, sid), allowed=lambda _i: True, ttl=ttl, now=NOW)
    return WorkloadCredential(sid, key, issued.chain)


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create_root(TD, NOW - dt.timedelta(minutes=5))


@pytest.fixture(scope="session")
def other_ca() -> CertificateAuthority:
    return CertificateAuthority.create_root(TD, NOW - dt.timedelta(minutes=5))


@pytest.fixture(scope="session")
def bundles(ca: CertificateAuthority) -> TrustBundleSet:
    return TrustBundleSet.of(ca.bundle)


@pytest.fixture(scope="session")
def client_cred(ca: CertificateAuthority) -> WorkloadCredential:
    return issue(ca, "ns1", "sleep")


@pytest.fixture(scope="session")
def server_cred(ca: CertificateAuthority) -> WorkloadCredential:
    return issue(ca, "ns2", "httpbin")


class Recorder:
    """A TunnelObserver that records what the agent would export."""

    def __init__(self) -> None:
        self.opened: list[TunnelInfo] = []
        self.closed: list[TunnelInfo] = []
        self.rejections: list[tuple[str, str]] = []

    def tunnel_opened(self, info: TunnelInfo) -> None:
        self.opened.append(info)

    def tunnel_closed(self, info: TunnelInfo) -> None:
        self.closed.append(info)

    def rejected(self, kind: str, detail: str) -> None:
        self.rejections.append((kind, detail))

    def kinds(self) -> list[str]:
        return [k for k, _ in self.rejections]


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then half-close back (keeps the other direction's semantics visible)."""
    try:
        while data := await reader.read(1 << 20):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


@dataclass
class Mesh:
    """Outbound capture listener -> HboneClient -> HboneServer -> backend, all on 127.0.0.1."""

    client: HboneClient
    server: HboneServer
    client_obs: Recorder
    server_obs: Recorder
    server_addr: Authority
    backend: Authority
    source: WorkloadCredential
    expected: list[SpiffeId]
    outbound: asyncio.Server | None = None
    outbound_addr: tuple[str, int] = ("", 0)
    tunnel_errors: list[BaseException] = field(default_factory=list)
    destination: Authority | None = None
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def start_outbound(self) -> None:
        loop = asyncio.get_running_loop()
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(512)
        lsock.setblocking(False)
        self.outbound_addr = lsock.getsockname()

        tasks: set[asyncio.Task[None]] = set()

        async def accept_loop() -> None:
            while True:
                conn, _ = await loop.sock_accept(lsock)
                t = loop.create_task(self._proxy(conn))
                tasks.add(t)
                t.add_done_callback(tasks.discard)

        task = loop.create_task(accept_loop())

        async def close() -> None:
            task.cancel()
            lsock.close()

        self.closers.append(close)

    async def start_outbound_protocol(self) -> None:
        """The other way in: the client's listener protocol owns accepted connections directly."""
        loop = asyncio.get_running_loop()

        def resolve(local: Authority, peer: Authority) -> OutboundTarget:
            return OutboundTarget(
                self.source, self.destination or self.backend, self.server_addr, tuple(self.expected)
            )

        srv = await loop.create_server(self.client.listener_protocol(resolve), "127.0.0.1", 0)
        self.outbound_addr = srv.sockets[0].getsockname()

        async def close() -> None:
            srv.close()

        self.closers.append(close)

    async def _proxy(self, conn: socket.socket) -> None:
        try:
            await self.client.proxy(
                conn,
                source=self.source,
                destination=self.destination or self.backend,
                agent_address=self.server_addr,
                expected_identities=self.expected,
            )
        except Exception as exc:
            self.tunnel_errors.append(exc)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(*self.outbound_addr, limit=1 << 22)


async def start_backend(
    handler: Callable[..., Awaitable[None]] = echo_handler,
) -> tuple[asyncio.Server, Authority]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0, limit=1 << 22)
    host, port = srv.sockets[0].getsockname()[:2]
    return srv, Authority.of(host, port)


async def allow_all(_req: AuthzRequest) -> AuthzDecision:
    return AuthzDecision(True, "test allows all")


@contextlib.asynccontextmanager
async def running_mesh(
    *,
    client_cred: WorkloadCredential,
    server_cred: WorkloadCredential,
    bundles: TrustBundleSet,
    authorize: Callable[[AuthzRequest], Awaitable[AuthzDecision]] = allow_all,
    server_config: ServerConfig | None = None,
    client_config: ClientConfig | None = None,
    expected: list[SpiffeId] | None = None,
    server_credentials: Callable[..., WorkloadCredential | None] | None = None,
    backend_handler: Callable[..., Awaitable[None]] = echo_handler,
    outbound: str = "socket",
    **server_kwargs: object,
) -> AsyncIterator[Mesh]:
    backend, backend_addr = await start_backend(backend_handler)
    server_obs, client_obs = Recorder(), Recorder()
    server = HboneServer(
        credentials=server_credentials or (lambda _ip: server_cred),
        bundles=lambda: bundles,
        authorize=authorize,
        observer=server_obs,
        config=server_config,
        **server_kwargs,  # type: ignore[arg-type]
    )
    addr = await server.start("127.0.0.1", 0)
    client = HboneClient(bundles=lambda: bundles, observer=client_obs, config=client_config)
    mesh = Mesh(
        client=client,
        server=server,
        client_obs=client_obs,
        server_obs=server_obs,
        server_addr=addr,
        backend=backend_addr,
        source=client_cred,
        expected=expected if expected is not None else [server_cred.spiffe_id],
    )
    if outbound == "protocol":
        await mesh.start_outbound_protocol()
    else:
        await mesh.start_outbound()
    try:
        yield mesh
    finally:
        for close in mesh.closers:
            await close()
        await client.close()
        await server.close()
        backend.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(backend.wait_closed(), 2)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def wait_for_condition(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
