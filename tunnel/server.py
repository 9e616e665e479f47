"""HBONE server (DESIGN.md §4): mTLS + HTTP/2 CONNECT on :15008, authorize, connect upstream, relay.

One listener serves every local workload: the server credential is chosen per connection by the
local (destination) IP the client connected to, before the handshake. Per CONNECT the order is
ztunnel's: validate the request (400) -> one admission call, which builds the request context,
checks that the authority is a local destination (400, never an open relay), authorizes (401)
and connects upstream (503) -> answer 200 -> relay. The server asks its owner exactly once per
stream (``admit``); the older three-callback form (``is_local``, ``authorize``, ``connector``)
is composed into one admission for callers that only need those.

Drain order (:meth:`HboneServer.drain`): stop accepting, send GOAWAY on every connection (open
streams keep running, new ones are refused), wait for the streams to finish until the deadline,
then close whatever is left.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from identity.bundle import TrustBundleSet
from identity.spiffe import SpiffeId
from identity.svid import WorkloadCredential

from . import fdtls, hbone
from .hbone import Authority, IpAddress, Status
from .relay import (
    KEEPALIVE_INTERVAL,
    KEEPALIVE_TIMEOUT,
    STREAM_IDLE_TIMEOUT,
    H2Session,
    NullObserver,
    TunnelInfo,
    TunnelObserver,
    TunnelStream,
    _safe,
    connect_numeric,
    set_nodelay,
)
from .tls import ContextCache, PeerVerificationError, TlsSetupError, verify_peer

log = logging.getLogger("ztagent.tunnel.server")

HBONE_PORT = 15008


@dataclass(frozen=True)
class ConnectionInfo:
    """One accepted, authenticated HBONE connection."""

    local: Authority  # where the client connected (the destination workload's address)
    peer: Authority  # the client's TCP address (the source node agent)
    local_identity: SpiffeId  # the credential this connection presented
    peer_identity: SpiffeId  # verified client SPIFFE ID


@dataclass(frozen=True)
class AuthzRequest:
    peer_identity: SpiffeId
    source: Authority  # from ``forwarded: for=`` when present, else the connection's peer address
    destination: Authority
    headers: Mapping[str, str]
    connection: ConnectionInfo


@dataclass(frozen=True)
class AuthzDecision:
    allow: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """One CONNECT stream, as its admission sees it."""

    connection: ConnectionInfo
    destination: Authority  # the CONNECT authority
    forwarded: Authority | None  # validated ``forwarded: for=`` (the peer's claim), None if absent
    headers: Mapping[str, str]


class StreamObserver(Protocol):
    """Accounting for one admitted stream: told when it opens (after the 200) and when it ends."""

    def opened(self, stream: TunnelStream) -> None: ...
    def closed(self, stream: TunnelStream) -> None: ...


@dataclass(frozen=True, slots=True)
class Accept:
    """Admit the stream. ``upstream`` is a connected socket to relay to; None lets the server
    connect to the CONNECT authority itself (the plain-TCP default)."""

    upstream: socket.socket | None = None
    observer: StreamObserver | None = None
    # Headers for the 200 (ztunnel answers with the destination's ``baggage``).
    response_headers: tuple[tuple[str, str], ...] = ()
    # In-process hand-off (the waypoint): the stream is relayed to this protocol through a
    # tunnel.relay.PipeTransport instead of a socket; ``upstream`` must then be None.
    protocol: Callable[[], asyncio.Protocol] | None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    """Refuse the stream with an HBONE status (400, 401, 503); ``kind`` is the counter name."""

    status: Status
    kind: str
    reason: str


Admission = Callable[[StreamRequest], Awaitable[Accept | Refuse]]
Authorizer = Callable[[AuthzRequest], Awaitable[AuthzDecision]]
# Returns a connected socket to the destination (first argument); raises OSError (-> 503) when it
# cannot. The second argument is the original source from the request's ``forwarded: for=``
# (validated ip:port, None when absent): a connector may bind to it to keep the source IP, as
# ztunnel does. It is the authenticated peer's claim, so only trust it as far as the peer.
Connector = Callable[[Authority, "Authority | None"], Awaitable[socket.socket]]
CredentialLookup = Callable[[IpAddress], "WorkloadCredential | None"]
LocalCheck = Callable[[Authority, ConnectionInfo], bool]


async def tcp_connect(authority: Authority, source: Authority | None = None) -> socket.socket:
    """Default upstream connector: a plain TCP connect to the CONNECT authority from this host's
    own address (``source`` is ignored)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if authority.ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await connect_numeric(loop, sock, (str(authority.ip), authority.port))
    except BaseException:
        sock.close()
        raise
    return sock


def same_ip_as_connection(authority: Authority, conn: ConnectionInfo) -> bool:
    """ztunnel's rule: the CONNECT IP must be the local workload the connection arrived for."""
    return authority.ip == conn.local.ip


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class ServerConfig:
    handshake_timeout: float = 10.0
    upstream_connect_timeout: float = 10.0
    authorize_timeout: float = 10.0
    # One admission covers the request context, policy and the upstream connect.
    admission_timeout: float = 20.0
    drain_timeout: float = 30.0
    keepalive_interval: float = KEEPALIVE_INTERVAL
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    stream_idle_timeout: float = STREAM_IDLE_TIMEOUT
    max_concurrent_streams: int = hbone.SERVER_MAX_CONCURRENT_STREAMS
    # OpenSSL on the socket's fd (tunnel.fdtls) instead of the loop's memory-BIO SSL transport.
    # Off by default: measured slower as a Python transport under the asyncio protocol layering
    # (bench/ab.py, tunnel/fdtls.py's docstring); kept, tested, for the integrated pump.
    tls_on_fd: bool = False


def _callback_admission(server: HboneServer) -> Admission:
    """The three-callback form as one admission: local check (400), authorize (401), connect (503).
    The callbacks are read from the server at each call, so they can be swapped at run time."""

    async def admit(req: StreamRequest) -> Accept | Refuse:
        conn = req.connection
        authorize, connector = server.authorize, server.connector
        assert authorize is not None
        if not server.is_local(req.destination, conn):
            return Refuse(Status.BAD_REQUEST, "not-local", f"{req.destination} is not a local destination")
        source = req.forwarded or conn.peer
        try:
            async with asyncio.timeout(server.config.authorize_timeout):
                request = AuthzRequest(conn.peer_identity, source, req.destination, req.headers, conn)
                decision = await authorize(request)
        except Exception as exc:  # fail closed: an authorizer that breaks denies
            log.exception("authorization callback failed")
            decision = AuthzDecision(False, f"authorization callback failed: {exc!r}")
        if not decision.allow:
            return Refuse(Status.UNAUTHORIZED, "denied", f"denied: {decision.reason}")
        if connector is tcp_connect:
            return Accept()
        try:
            async with asyncio.timeout(server.config.upstream_connect_timeout):
                sock = await connector(req.destination, req.forwarded)
        except (OSError, TimeoutError) as exc:
            return Refuse(Status.SERVICE_UNAVAILABLE, "upstream-failed", f"upstream connect failed: {exc!r}")
        return Accept(sock)

    return admit


class _ServerSession(H2Session):
    def __init__(
        self, server: HboneServer, local: Authority, peer: Authority, credential: WorkloadCredential
    ):
        cfg = server.config
        super().__init__(
            hbone.ServerConnection(max_concurrent_streams=cfg.max_concurrent_streams),
            server.loop,
            keepalive_interval=cfg.keepalive_interval,
            keepalive_timeout=cfg.keepalive_timeout,
            stream_idle_timeout=cfg.stream_idle_timeout,
        )
        self.server = server
        self.local = local
        self.peer = peer
        self.credential = credential
        self.conn: ConnectionInfo | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            peer_id = verify_peer(ssl_object, self.server.bundles(), self.server.clock())
        except PeerVerificationError as exc:
            self.server._reject(exc.rule, f"{self.peer}: {exc}")
            self.is_closed = True
            transport.abort()  # type: ignore[attr-defined]
            return
        self.conn = ConnectionInfo(self.local, self.peer, self.credential.spiffe_id, peer_id)
        self.server.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server.sessions.discard(self)

    def protocol_error(self, reason: str) -> None:
        self.server._reject("protocol-error", f"{self.peer}: {reason}")
        super().protocol_error(reason)

    def handle_role_event(self, ev: hbone.Event) -> None:
        if isinstance(ev, hbone.ConnectRequest):
            assert self.conn is not None
            fwd = ev.headers.get("forwarded")
            forwarded = hbone.parse_forwarded_for(fwd) if fwd else None
            source = forwarded or self.peer
            info = TunnelInfo(
                direction="inbound",
                source_principal=str(self.conn.peer_identity),
                destination_principal=str(self.conn.local_identity),
                source=source,
                destination=ev.authority,
                peer=self.peer,
            )
            st = TunnelStream(self, ev.stream_id, info, outbound=False)
            self.streams[ev.stream_id] = st
            task = self.loop.create_task(self._serve(st, ev, source, forwarded))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif isinstance(ev, hbone.RequestRejected):
            self.server._reject("bad-request", f"{self.peer}: {ev.status}: {ev.reason}")
        elif isinstance(ev, hbone.StreamRefused):
            self.server._reject("stream-refused", f"{self.peer}: {ev.reason}")

    def _answer(self, st: TunnelStream, status: Status, kind: str, reason: str) -> None:
        self.server._reject(kind, f"{st.info.source} -> {st.info.destination}: {status.value}: {reason}")
        if not st.closed:
            assert isinstance(self.core, hbone.ServerConnection)
            self.core.respond(st.stream_id, status)
            self.flush()
            st._finish(f"{status.value}: {reason}")

    async def _serve(
        self,
        st: TunnelStream,
        req: hbone.ConnectRequest,
        source: Authority,
        forwarded: Authority | None,
    ) -> None:
        assert self.conn is not None
        server = self.server
        try:
            request = StreamRequest(self.conn, req.authority, forwarded, req.headers)
            try:
                async with asyncio.timeout(server.config.admission_timeout):
                    outcome = await server.admit(request)
            except (OSError, TimeoutError) as exc:
                reason = f"upstream connect failed: {exc!r}"
                outcome = Refuse(Status.SERVICE_UNAVAILABLE, "upstream-failed", reason)
            except Exception as exc:  # fail closed: an admission that breaks refuses
                log.exception("HBONE admission failed")
                outcome = Refuse(Status.UNAUTHORIZED, "denied", f"denied: admission failed: {exc!r}")
            if isinstance(outcome, Refuse):
                self._answer(st, outcome.status, outcome.kind, outcome.reason)
                return
            sock = outcome.upstream
            if st.closed or self.is_closed:
                if sock is not None:
                    sock.close()
                st.abort()
                return
            if outcome.protocol is not None:
                st.hold()  # nothing on the stream before the 200
                st.attach_protocol(outcome.protocol(), {"peername": (str(source.ip), source.port)})
            elif sock is None:
                try:
                    async with asyncio.timeout(server.config.upstream_connect_timeout):
                        await st.connect(req.authority)  # connect + attach in one step
                except (OSError, TimeoutError) as exc:
                    self._answer(
                        st, Status.SERVICE_UNAVAILABLE, "upstream-failed", f"upstream connect failed: {exc!r}"
                    )
                    return
                if st.closed or self.is_closed:
                    st.abort()
                    return
            assert isinstance(self.core, hbone.ServerConnection)
            self.core.respond(st.stream_id, Status.OK, headers=outcome.response_headers)
            self.request_flush()
            server.stats["tunnels_opened"] += 1
            _safe(server.observer.tunnel_opened, st.info)
            st.done.add_done_callback(lambda _f: _safe(server.observer.tunnel_closed, st.info))
            observer = outcome.observer
            if observer is not None:
                _safe(observer.opened, st)
                st.done.add_done_callback(lambda _f: _safe(observer.closed, st))
            if sock is not None:
                await st.attach(sock)
            else:
                st.start_sending()
        except Exception as exc:
            log.exception("HBONE request handling failed")
            self._answer(st, Status.SERVICE_UNAVAILABLE, "internal-error", repr(exc))

    def stream_finished(self, stream: TunnelStream) -> None:
        super().stream_finished(stream)
        if self.core.goaway_sent and not self.streams:
            self.close("drained")

    def session_closed(self, reason: str) -> None:
        if reason.startswith("peer silent"):
            self.server._reject("keepalive-timeout", f"{self.peer}: {reason}")
        for task in list(self._tasks):
            task.cancel()


class HboneServer:
    """The HBONE listener. ``credentials(local_ip)`` gives the SVID to present for connections
    arriving at that local IP (None: no local workload there, the connection is refused)."""

    def __init__(
        self,
        *,
        credentials: CredentialLookup,
        bundles: Callable[[], TrustBundleSet],
        admit: Admission | None = None,
        authorize: Authorizer | None = None,
        is_local: LocalCheck = same_ip_as_connection,
        connector: Connector = tcp_connect,
        observer: TunnelObserver | None = None,
        clock: Callable[[], dt.datetime] = _now,
        config: ServerConfig | None = None,
    ) -> None:
        if (admit is None) == (authorize is None):
            raise TypeError("HboneServer takes either admit=, or authorize= (with is_local=/connector=)")
        self.credentials = credentials
        self.bundles = bundles
        self.authorize = authorize
        self.is_local = is_local
        self.connector = connector
        self.admit: Admission = admit or _callback_admission(self)
        self.observer: TunnelObserver = observer or NullObserver()
        self.clock = clock
        self.config = config or ServerConfig()
        self.contexts = ContextCache()
        self.sessions: set[_ServerSession] = set()
        self.stats: Counter[str] = Counter()
        self._listeners: list[socket.socket] = []
        self._accept_tasks: list[asyncio.Task[None]] = []
        self._handshakes: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "server not started"
        return self._loop

    def _reject(self, kind: str, detail: str) -> None:
        self.stats[kind] += 1
        log.warning("HBONE %s: %s", kind, detail)
        _safe(self.observer.rejected, kind, detail)

    async def start(
        self, host: str = "0.0.0.0", port: int = HBONE_PORT, *, sock: socket.socket | None = None
    ) -> Authority:
        """Listen (or use ``sock``, e.g. an IP_TRANSPARENT socket the agent made); returns the address."""
        self._loop = asyncio.get_running_loop()
        if sock is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
        sock.setblocking(False)
        self._listeners.append(sock)
        self._accept_tasks.append(self.loop.create_task(self._accept_loop(sock)))
        addr = sock.getsockname()
        return Authority.of(addr[0], addr[1])

    async def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = await self.loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if listener.fileno() < 0:
                    return
                self._reject("accept-error", repr(exc))
                await asyncio.sleep(0.05)  # e.g. EMFILE: do not spin
                continue
            task = self.loop.create_task(self._handshake(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket) -> None:
        try:
            local_addr, peer_addr = conn.getsockname(), conn.getpeername()
            local = Authority.of(ipaddress.ip_address(local_addr[0].split("%")[0]), local_addr[1])
            peer = Authority.of(ipaddress.ip_address(peer_addr[0].split("%")[0]), peer_addr[1])
        except (OSError, hbone.HboneError):
            conn.close()
            return
        credential = self.credentials(local.ip)
        if credential is None:
            self._reject("no-local-workload", f"{peer} connected to {local}: no local workload with that IP")
            conn.close()
            return
        try:
            ctx = self.contexts.server_context(credential, self.bundles())
        except (TlsSetupError, ssl.SSLError, ValueError) as exc:
            self._reject("tls-setup", f"cannot build TLS context for {credential.spiffe_id}: {exc}")
            conn.close()
            return
        session = _ServerSession(self, local, peer, credential)
        conn.setblocking(False)
        set_nodelay(conn)
        try:
            if self.config.tls_on_fd:
                await fdtls.start_tls(
                    self.loop, conn, ctx, lambda: session, server_side=True,
                    timeout=self.config.handshake_timeout,
                )  # fmt: skip
            else:
                await self.loop.connect_accepted_socket(
                    lambda: session, conn, ssl=ctx, ssl_handshake_timeout=self.config.handshake_timeout
                )
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            self._reject("tls-handshake", f"{peer} -> {local}: TLS handshake failed: {exc}")
            conn.close()
            return
        if session.conn is not None:  # None: verify_peer refused the peer (counted as rejected)
            self.stats["connections_accepted"] += 1

    def stop_accepting(self) -> None:
        for task in self._accept_tasks:
            task.cancel()
        self._accept_tasks.clear()
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting, GOAWAY everyone, let streams finish until ``timeout``, then close."""
        self.stop_accepting()
        deadline = self.config.drain_timeout if timeout is None else timeout
        for s in list(self.sessions):
            s.core.goaway()
            s.flush()
            if not s.streams:
                s.close("drained")
        waiters = [s.closed_future for s in self.sessions if not s.closed_future.done()]
        if waiters:
            await asyncio.wait(waiters, timeout=deadline)
        for s in list(self.sessions):
            s.abort(f"drain deadline of {deadline}s passed")
        for task in list(self._handshakes):
            task.cancel()

    async def close(self) -> None:
        await self.drain(0)

    @property
    def open_tunnels(self) -> int:
        return sum(len(s.streams) for s in self.sessions)
