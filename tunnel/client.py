"""HBONE client: a pool of mTLS HTTP/2 connections carrying one CONNECT stream per TCP connection.

Connections are pooled by (source identity, destination identities, destination agent address),
as ztunnel does, so a new pod connection normally costs one HEADERS frame and no handshake. A
pooled connection takes at most 100 streams (or fewer if the server says so); past that, or once
it is going away (GOAWAY, dead keepalive, rotated source certificate), a new one is opened.
Concurrent callers wanting the same key share one in-flight handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import errno
import logging
import os
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from identity.bundle import TrustBundleSet
from identity.spiffe import SpiffeId
from identity.svid import WorkloadCredential

from . import fdtls, h2
from .authority import CLIENT_MAX_STREAMS_PER_CONNECTION, Authority, HboneError, format_forwarded
from .h2 import ErrorCode
from .relay import (
    KEEPALIVE_INTERVAL,
    KEEPALIVE_TIMEOUT,
    SETTINGS_ACK_TIMEOUT,
    STREAM_IDLE_TIMEOUT,
    H2Session,
    HeldConnection,
    NullObserver,
    TunnelInfo,
    TunnelObserver,
    TunnelStream,
    _safe,
    connect_numeric,
    set_keepalive,
    set_nodelay,
)
from .tls import ContextCache, PeerVerificationError, check_expected_identity, same_credential, verify_peer

log = logging.getLogger("ztagent.tunnel.client")

POOL_IDLE_TIMEOUT = 300.0  # release a pooled connection with no streams after 5 min (ztunnel)
CONNECT_TIMEOUT = 10.0


class TunnelError(Exception):
    """A tunnel could not be established. ``kind`` is a stable label for metrics."""

    def __init__(self, kind: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


_STATUS_HINTS = {
    400: "the server says the request is malformed or {dest} is not a workload on that node",
    401: "denied by authorization policy at the destination",
    503: "the destination node could not connect to {dest} (nothing listening on that port?)",
}


@dataclass
class ClientConfig:
    connect_timeout: float = CONNECT_TIMEOUT
    response_timeout: float = 30.0  # server answers after authz + upstream connect (itself <= 10 s)
    keepalive_interval: float = KEEPALIVE_INTERVAL
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    settings_ack_timeout: float = SETTINGS_ACK_TIMEOUT  # then GOAWAY(SETTINGS_TIMEOUT)
    pool_idle_timeout: float = POOL_IDLE_TIMEOUT
    stream_idle_timeout: float = STREAM_IDLE_TIMEOUT
    max_streams_per_connection: int = CLIENT_MAX_STREAMS_PER_CONNECTION
    # OpenSSL on the socket's fd (tunnel.fdtls) instead of the loop's memory-BIO SSL transport.
    # Off by default: measured slower as a Python transport under the asyncio protocol layering
    # (bench/ab.py, tunnel/fdtls.py's docstring); kept, tested, for the integrated pump.
    tls_on_fd: bool = False


PoolKey = tuple[SpiffeId, frozenset[SpiffeId], Authority]


@dataclass(frozen=True)
class OutboundTarget:
    """Where one outbound TCP connection goes, as the agent resolved it."""

    source: WorkloadCredential
    destination: Authority  # original destination ip:port (the CONNECT authority)
    agent_address: Authority  # the destination node's HBONE server
    expected_identities: Collection[SpiffeId]
    source_address: Authority | None = None  # for ``forwarded: for=``
    baggage: str | None = None
    extra_headers: Mapping[str, str] | None = None


# (local address the connection arrived at = original destination, peer address) -> target
Resolver = Callable[[Authority, Authority], "OutboundTarget | None"]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def traceparent(rng: Callable[[int], bytes] = os.urandom) -> str:
    """A W3C trace context header for a new sampled trace (ztunnel sends one per CONNECT)."""
    return f"00-{rng(16).hex()}-{rng(8).hex()}-01"


class _ClientSession(H2Session):
    def __init__(self, client: HboneClient, key: PoolKey, credential: WorkloadCredential) -> None:
        cfg = client.config
        super().__init__(
            h2.ClientConnection(),
            client.loop,
            keepalive_interval=cfg.keepalive_interval,
            keepalive_timeout=cfg.keepalive_timeout,
            settings_ack_timeout=cfg.settings_ack_timeout,
            stream_idle_timeout=cfg.stream_idle_timeout,
        )
        self.client = client
        self.key = key
        self.credential = credential
        self.reserved = 0  # streams open or being opened on this connection
        self.draining = False
        self.ready: asyncio.Future[None] = client.loop.create_future()
        self.peer_identity: SpiffeId | None = None
        self.verify_error: PeerVerificationError | None = None
        self.responses: dict[int, asyncio.Future[h2.ConnectResponse]] = {}
        self._idle_since = client.loop.time()

    @property
    def where(self) -> str:
        return str(self.key[2])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            peer = verify_peer(ssl_object, self.client.bundles(), self.client.clock())
            check_expected_identity(peer, self.key[1], self.where)
        except PeerVerificationError as exc:
            self.verify_error = exc
            self.is_closed = True
            transport.abort()  # type: ignore[attr-defined]
            return
        self.peer_identity = peer
        super().connection_made(transport)

    def usable(self, credential: WorkloadCredential) -> bool:
        if self.draining or self.is_closed or self.core.goaway_received:
            return False
        if not same_credential(self.credential, credential):
            # Source certificate rotated: new streams go to a connection presenting the new one.
            self.retire("source certificate rotated")
            return False
        return True

    def has_room(self) -> bool:
        limit = self.client.config.max_streams_per_connection
        if self.ready.done() and not self.is_closed:
            limit = min(limit, self.core.peer_max_concurrent_streams)
        return self.reserved < limit

    def retire(self, reason: str) -> None:
        if self.draining:
            return
        self.draining = True
        self.client._forget(self)
        log.debug("retiring HBONE connection to %s: %s", self.where, reason)
        if self.reserved == 0 and self.ready.done():
            self.close(reason)

    def handle_role_event(self, ev: h2.Event) -> None:
        if isinstance(ev, h2.ConnectResponse):
            fut = self.responses.pop(ev.stream_id, None)
            if fut is not None and not fut.done():
                fut.set_result(ev)

    def goaway_received(self, ev: h2.ConnectionTerminated) -> None:
        self.retire(f"server sent GOAWAY (error {ev.error_code})")
        for sid, fut in list(self.responses.items()):
            if sid > ev.last_stream_id and not fut.done():
                fut.set_exception(
                    TunnelError("goaway", f"{self.where} went away before handling the request; retry")
                )
        super().goaway_received(ev)

    def stream_finished(self, stream: TunnelStream) -> None:
        super().stream_finished(stream)
        fut = self.responses.pop(stream.stream_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(
                TunnelError(
                    "reset", f"stream to {self.where} ended before a response: {stream.info.close_reason}"
                )
            )

    def release(self) -> None:
        self.reserved -= 1
        if self.reserved == 0:
            self._idle_since = self.loop.time()
            if self.draining and not self.is_closed:
                self.close("retired")

    def keepalive_tick(self) -> None:
        if self.reserved == 0 and self.loop.time() - self._idle_since >= self.client.config.pool_idle_timeout:
            self.retire("idle")
            if not self.is_closed:
                self.close("idle")

    def session_closed(self, reason: str) -> None:
        self.client._forget(self)
        for fut in self.responses.values():
            if not fut.done():
                fut.set_exception(
                    TunnelError("connection-lost", f"HBONE connection to {self.where} ended: {reason}")
                )
        self.responses.clear()


class HboneClient:
    """Opens HBONE tunnels from local TCP sockets to remote workloads."""

    def __init__(
        self,
        *,
        bundles: Callable[[], TrustBundleSet],
        observer: TunnelObserver | None = None,
        clock: Callable[[], dt.datetime] = _now,
        config: ClientConfig | None = None,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.bundles = bundles
        self.observer: TunnelObserver = observer or NullObserver()
        self.clock = clock
        self.config = config or ClientConfig()
        self.rng = rng
        self.contexts = ContextCache()
        self.pool: dict[PoolKey, list[_ClientSession]] = {}
        self.stats: Counter[str] = Counter()
        self._all: set[_ClientSession] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # -- public API -------------------------------------------------------------------------------
    async def open_tunnel(
        self,
        sock: socket.socket,
        *,
        source: WorkloadCredential,
        destination: Authority,
        agent_address: Authority,
        expected_identities: Collection[SpiffeId],
        source_address: Authority | None = None,
        baggage: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> TunnelStream:
        """Tunnel the connected TCP socket ``sock`` to ``destination`` through the HBONE server at
        ``agent_address``. Returns once the server answered 200 and relaying has started; the
        stream owns ``sock`` from then on (await ``stream.done`` for the final :class:`TunnelInfo`).
        On failure raises :class:`TunnelError` and resets ``sock``."""
        if source_address is None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Only an IP socket's peer is a source address; a socketpair end (in-process callers,
            # docs/contracts.md) has none and goes without `forwarded: for=` (its peer name is ""
            # or a path, which raised IndexError here).
            try:
                peer = sock.getpeername()
                source_address = Authority.of(peer[0].split("%")[0], peer[1])
            except (OSError, HboneError):
                source_address = None
        target = OutboundTarget(
            source,
            destination,
            agent_address,
            tuple(expected_identities),
            source_address,
            baggage,
            extra_headers,
        )
        stream = await self.establish(target, lambda: abort_with_rst_sock(sock))
        await stream.attach(sock)
        return stream

    def listener_protocol(self, resolve: Resolver) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server(factory, sock=listening_socket)``: each
        accepted connection is tunnelled to ``resolve(local, peer)`` (None: reset it). Cheaper
        than accepting sockets and calling :meth:`open_tunnel`: the accepted connection becomes the
        tunnel's TCP side directly, held paused until the server's 200."""
        return lambda: _OutboundSide(self, resolve)

    async def proxy(self, sock: socket.socket, **kwargs: object) -> TunnelInfo:
        """:meth:`open_tunnel` then wait until both directions are finished."""
        stream = await self.open_tunnel(sock, **kwargs)  # type: ignore[arg-type]
        return await stream.done

    async def close(self) -> None:
        for s in list(self._all):
            s.close("client closed")
        self.pool.clear()

    @property
    def connections(self) -> int:
        return sum(1 for s in self._all if not s.is_closed)

    # -- internals --------------------------------------------------------------------------------
    def _fail(self, exc: TunnelError) -> None:
        self.stats[exc.kind] += 1
        _safe(self.observer.rejected, exc.kind, str(exc))

    async def establish(self, target: OutboundTarget, reset_local: Callable[[], None]) -> TunnelStream:
        """Open the CONNECT stream for ``target`` and wait for the 200, without a TCP side: the
        caller makes ``stream.tcp_protocol()`` the protocol of the transport it holds (bytes the
        server sends meanwhile are kept). On failure calls ``reset_local`` and raises
        :class:`TunnelError`."""
        try:
            if not target.expected_identities:
                raise TunnelError(
                    "no-expected-identity", f"no expected server identity for {target.destination}"
                )
            key: PoolKey = (
                target.source.spiffe_id,
                frozenset(target.expected_identities),
                target.agent_address,
            )
            src = target.source_address
            info = TunnelInfo(
                direction="outbound",
                source_principal=str(target.source.spiffe_id),
                destination_principal="",
                source=src,
                destination=target.destination,
            )
            headers: dict[str, str] = {}
            if target.baggage:
                headers["baggage"] = target.baggage
            if src is not None:
                headers["forwarded"] = format_forwarded(src.ip, src.port)
            headers["traceparent"] = traceparent(self.rng)
            headers.update(target.extra_headers or {})
            session = await self._acquire(key, target.source)
            return await self._open_stream(session, info, headers)
        except TunnelError as exc:
            self._fail(exc)
            reset_local()
            raise
        except BaseException:
            reset_local()
            raise

    async def _open_stream(
        self, session: _ClientSession, info: TunnelInfo, headers: dict[str, str]
    ) -> TunnelStream:
        assert isinstance(session.core, h2.ClientConnection)
        if session.is_closed or not session.core.can_open_stream():
            session.release()
            raise TunnelError(
                "connection-lost", f"HBONE connection to {session.where} closed before the stream opened"
            )
        assert isinstance(session.core, h2.ClientConnection)
        try:
            sid = session.core.open_stream(info.destination, headers)
        except HboneError as exc:
            session.release()
            raise TunnelError("bad-request", f"cannot build CONNECT {info.destination}: {exc}") from None
        info.destination_principal = str(session.peer_identity)
        stream = TunnelStream(session, sid, info, outbound=True)
        fut: asyncio.Future[h2.ConnectResponse] = self.loop.create_future()
        session.responses[sid] = fut
        session.streams[sid] = stream
        stream.done.add_done_callback(lambda _f: session.release())
        session.request_flush()
        try:
            async with asyncio.timeout(self.config.response_timeout):
                resp = await fut
        except TimeoutError:
            stream.abort(ErrorCode.CANCEL, "no response")
            raise TunnelError(
                "response-timeout",
                f"{session.where} did not answer CONNECT {info.destination} "
                f"within {self.config.response_timeout}s",
            ) from None
        except asyncio.CancelledError:
            stream.abort(ErrorCode.CANCEL, "cancelled")
            raise
        if not resp.ok:
            hint = _STATUS_HINTS.get(resp.status, "unexpected status")
            stream._finish(f"status {resp.status}")
            raise TunnelError(
                f"status-{resp.status}",
                f"HBONE CONNECT {info.destination} via {session.where} answered {resp.status}: "
                + hint.format(dest=info.destination),
                status=resp.status,
            )
        self.stats["tunnels_opened"] += 1
        _safe(self.observer.tunnel_opened, info)
        stream.done.add_done_callback(lambda _f: _safe(self.observer.tunnel_closed, info))
        return stream

    def _forget(self, session: _ClientSession) -> None:
        lst = self.pool.get(session.key)
        if lst is not None and session in lst:
            lst.remove(session)
            if not lst:
                del self.pool[session.key]
        if session.is_closed:
            self._all.discard(session)

    async def _acquire(self, key: PoolKey, credential: WorkloadCredential) -> _ClientSession:
        """A pooled connection with a free stream slot (reserved for the caller), or a new one."""
        for _attempt in range(3):
            for s in list(self.pool.get(key, ())):
                if s.usable(credential) and s.has_room():
                    s.reserved += 1
                    if not s.ready.done():
                        try:
                            await asyncio.shield(s.ready)
                        except TunnelError as exc:
                            s.reserved -= 1
                            if exc.kind == "handshake-cancelled":
                                break  # its opener gave up, not the server: look again
                            raise
                        except BaseException:
                            # Also on our own cancellation: a slot kept here would never be
                            # released, and the connection would never go idle.
                            s.reserved -= 1
                            raise
                    if s.is_closed or s.draining:
                        s.reserved -= 1
                        break  # went away while we waited: look again
                    return s
            else:
                s = _ClientSession(self, key, credential)
                s.reserved = 1
                self.pool.setdefault(key, []).append(s)
                self._all.add(s)
                try:
                    await self._connect(s, credential)
                except BaseException as exc:
                    self._forget(s)
                    self._all.discard(s)
                    if not s.ready.done():
                        # Waiters sharing this handshake must not see our cancellation as theirs
                        # (a foreign CancelledError would unwind their tasks): give them an error.
                        shared = (
                            exc
                            if isinstance(exc, TunnelError)
                            else TunnelError(
                                "handshake-cancelled",
                                f"the handshake with {key[2]} was abandoned by the caller that "
                                f"started it ({type(exc).__name__})",
                            )
                        )
                        s.ready.set_exception(shared)
                        s.ready.exception()  # retrieved: waiters re-raise it themselves
                    raise
                s.ready.set_result(None)
                return s
        raise TunnelError("pool", f"could not get a usable HBONE connection to {key[2]}")

    async def _connect(self, session: _ClientSession, credential: WorkloadCredential) -> None:
        agent = session.key[2]
        timeout = self.config.connect_timeout
        started = time.monotonic()
        where = str(agent)
        try:
            ctx = self.contexts.client_context(credential, self.bundles())
        except Exception as exc:
            raise TunnelError(
                "tls-setup", f"cannot build a TLS context for {credential.spiffe_id}: {exc}"
            ) from exc
        family = socket.AF_INET6 if agent.ip.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        set_nodelay(sock)
        set_keepalive(sock)  # under the PINGs: a peer node that vanished is found by TCP too
        try:
            await asyncio.wait_for(connect_numeric(self.loop, sock, (str(agent.ip), agent.port)), timeout)
        except TimeoutError:
            sock.close()
            raise TunnelError(
                "connect-timeout",
                f"no answer from {where} within {timeout:g}s: the HBONE port {agent.port} may be "
                "blocked between the nodes (a NetworkPolicy or a firewall dropping it), or the node "
                "is down",
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise TunnelError(
                "connect-refused",
                f"connection refused by {where}: is the node agent running and listening "
                f"on port {agent.port}?",
            ) from None
        except OSError as exc:
            sock.close()
            hint = (
                " (no route: check routing to that node)"
                if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH)
                else ""
            )
            raise TunnelError(
                "connect-error", f"cannot connect to {where}: {exc.strerror or exc}{hint}"
            ) from None
        except BaseException:
            sock.close()
            raise
        remaining = max(0.1, timeout - (time.monotonic() - started))
        try:
            if self.config.tls_on_fd:
                await fdtls.start_tls(
                    self.loop, sock, ctx, lambda: session, server_side=False, timeout=remaining
                )
            else:
                await asyncio.wait_for(
                    self.loop.create_connection(
                        lambda: session, sock=sock, ssl=ctx, server_hostname="",
                        ssl_handshake_timeout=remaining,
                    ),
                    remaining + 1,
                )  # fmt: skip
        except ssl.SSLError as exc:
            sock.close()
            raise TunnelError(
                "tls-handshake",
                f"TLS handshake with {where} failed: {exc.reason or exc}: does the server trust our trust "
                "domain, and do we trust its certificate?",
            ) from None
        except (TimeoutError, ConnectionAbortedError):
            sock.close()
            raise TunnelError(
                "tls-timeout",
                f"TLS handshake with {where} did not finish within {timeout:g}s: is an HBONE server "
                f"listening on port {agent.port}?",
            ) from None
        except OSError as exc:
            sock.close()
            raise TunnelError("tls-handshake", f"TLS handshake with {where} failed: {exc}") from None
        if session.verify_error is not None:
            raise TunnelError(session.verify_error.rule, str(session.verify_error))
        self.stats["connections_opened"] += 1


class _OutboundSide(HeldConnection):
    """An accepted outbound connection, held until its tunnel is up, then the stream's TCP side."""

    def __init__(self, client: HboneClient, resolve: Resolver) -> None:
        super().__init__()
        self.client = client
        self.resolve = resolve
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not type(self.client.loop).__module__.startswith("uvloop"):  # uvloop sets it itself
            sock = transport.get_extra_info("socket")
            if sock is not None:
                set_nodelay(sock)
        try:
            local, peer = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
            peer_addr = Authority.of(peer[0].split("%")[0], peer[1])
            target = self.resolve(Authority.of(local[0].split("%")[0], local[1]), peer_addr)
        except Exception as exc:
            log.warning("cannot resolve outbound connection: %r", exc)
            target = None
        if target is None:
            self.client._fail(TunnelError("no-target", "no tunnel target for an accepted connection"))
            self.reset()
            return
        if target.source_address is None:
            target = dataclasses.replace(target, source_address=peer_addr)
        self.task = self.client.loop.create_task(self._run(target))

    async def _run(self, target: OutboundTarget) -> None:
        try:
            stream = await self.client.establish(target, self.reset)
        except (TunnelError, asyncio.CancelledError):
            return
        try:
            self.hand_over(stream.tcp_protocol())
        except ConnectionError:
            stream.abort(ErrorCode.CANCEL, "local connection closed while the tunnel opened")

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.task is not None:
            self.task.cancel()


def abort_with_rst_sock(sock: socket.socket) -> None:
    """Reset a pod's TCP connection we could not tunnel (ztunnel resets rather than FINs)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


__all__ = ["ClientConfig", "HboneClient", "OutboundTarget", "Resolver", "TunnelError", "traceparent"]
