"""A data-plane worker: listeners, the HBONE server and client, open connections, re-checks.

The supervisor (:mod:`agent.supervisor`) owns everything that exists once per node (config,
certificates and the CA client, capture, admin/metrics/readiness ports) and hands a worker
read access to it: the current store, credentials by identity, trust bundles. A worker owns
what exists once per data plane: its listening sockets, its HBONE server and pooled client,
its connection tracker. One worker is the default; several could share the listeners through
SO_REUSEPORT without a second CSR stream or clashing admin ports, because none of those live
here.

The worker implements :class:`agent.context.ProxyContext`, the only thing the proxies see.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from agent.admission import recheck
from agent.capture import Capture, StaticCapture, make_listener
from agent.downstream import Downstream, downstream_factory
from agent.inbound import HboneInbound, handle_plaintext
from agent.metrics import AgentMetrics
from agent.outbound import handle_outbound
from agent.tracking import ConnectionTracker
from agent.upstream import UpstreamConnector
from identity.bundle import TrustBundleSet
from identity.spiffe import SpiffeId
from identity.svid import WorkloadCredential
from mesh.config import IPAddress, parse_ip
from mesh.store import WorkloadStore
from serving.accesslog import AccessLog
from tunnel.client import HboneClient, OutboundTarget
from tunnel.relay import TunnelInfo, TunnelStream
from tunnel.server import HboneServer, ServerConfig

log = logging.getLogger("ztagent.worker")


@dataclass
class Listener:
    sock: socket.socket
    role: str  # "outbound" | "inbound"
    original: tuple[str, int] | None = None  # static capture: fixed original destination
    server: asyncio.AbstractServer | None = None
    bound: tuple[IPAddress, int] | None = None  # the listening address, once asked


@dataclass(frozen=True)
class NodeServices:
    """What a worker reads from the supervisor (node-wide state, never owned by a worker)."""

    node_name: str
    hbone_port: int
    store: Callable[[], WorkloadStore]
    credential: Callable[[SpiffeId], WorkloadCredential]  # raises LookupError
    bundles: Callable[[], TrustBundleSet]


class _RejectionCounter:
    """The HBONE server's observer: counts refusals (policy denials are counted as decisions)."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics

    def tunnel_opened(self, info: TunnelInfo) -> None:
        pass

    def tunnel_closed(self, info: TunnelInfo) -> None:
        pass

    def rejected(self, kind: str, detail: str) -> None:
        # Denials are decisions, and an upstream that did not answer is istio_tcp_*{CONNECT}
        # (ztunnel's flag); both are counted by the connection tracker, not as handshakes.
        if kind not in ("denied", "upstream-failed"):
            self.metrics.handshake_failures.labels("inbound", kind).inc()


class DataPlaneWorker:
    def __init__(
        self,
        node: NodeServices,
        *,
        capture: Capture,
        metrics: AgentMetrics,
        access_log: AccessLog,
        drain_timeout: float = 5.0,
    ) -> None:
        self._node = node
        self.node_name = node.node_name
        self.hbone_port = node.hbone_port
        self.metrics = metrics
        self.connections = ConnectionTracker(metrics, access_log)
        self.capture = capture
        self.upstream = UpstreamConnector(transparent=capture.transparent)
        self.drain_timeout = drain_timeout
        self.hbone_server = HboneServer(
            credentials=self._credential_for_ip,
            bundles=node.bundles,
            admit=HboneInbound(self),
            observer=_RejectionCounter(metrics),
            config=ServerConfig(drain_timeout=drain_timeout),
        )
        self.hbone_client = HboneClient(bundles=node.bundles)
        self.listeners: list[Listener] = []
        self.hbone_sockets: dict[str, socket.socket] = {}  # ip -> listener (per pod IP without steering)
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- ProxyContext -------------------------------------------------------------------------

    @property
    def store(self) -> WorkloadStore:
        return self._node.store()

    def credential(self, spiffe_id: SpiffeId) -> WorkloadCredential:
        return self._node.credential(spiffe_id)

    async def establish(self, target: OutboundTarget, reset_local: Callable[[], None]) -> TunnelStream:
        return await self.hbone_client.establish(target, reset_local)

    async def connect_upstream(self, ip: str, port: int, source_ip: IPAddress | None) -> socket.socket:
        return await self.upstream.connect(ip, port, source_ip)

    def is_own_listener(self, addr: tuple[str, int]) -> bool:
        try:
            ip = parse_ip(addr[0])
        except ValueError:
            return False
        for lst in self.listeners:
            if lst.sock.fileno() < 0:
                continue
            if lst.bound is None:  # asked on every outbound connection: no syscall each time
                h, p = lst.sock.getsockname()[:2]
                lst.bound = (parse_ip(h), p)
            h_ip, p = lst.bound
            if p == addr[1] and (h_ip == ip or h_ip.is_unspecified):
                return lst.original is None
        return False

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(
        self,
        *,
        listen_host: str,
        outbound_port: int,
        inbound_port: int,
        static_captures: Iterable[StaticCapture] = (),
    ) -> tuple[socket.socket | None, socket.socket | None, socket.socket | None]:
        """Open the listeners; returns the (outbound, inbound, HBONE) sockets for the capture."""
        out_sock = in_sock = hbone_sock = None
        if self.capture.steers_traffic:
            out_sock = make_listener(listen_host, outbound_port, transparent=True, app_facing=True)
            in_sock = make_listener(listen_host, inbound_port, transparent=True, app_facing=True)
            hbone_sock = make_listener(listen_host, self.hbone_port, transparent=True)
            self.listeners.append(Listener(out_sock, "outbound"))
            self.listeners.append(Listener(in_sock, "inbound"))
            self.hbone_sockets[listen_host] = hbone_sock
            await self.hbone_server.start(sock=hbone_sock)
        else:
            await self.sync_hbone_listeners()
        for sc in static_captures:
            sock = make_listener(sc.listen[0], sc.listen[1], transparent=False, app_facing=True)
            self.listeners.append(Listener(sock, sc.role, original=sc.original))
        loop = asyncio.get_running_loop()
        for lst in self.listeners:
            lst.server = await loop.create_server(
                downstream_factory(self._handler(lst), self._tasks), sock=lst.sock, backlog=4096
            )
        return out_sock, in_sock, hbone_sock

    async def sync_hbone_listeners(self) -> None:
        """Without steering: one HBONE listener per local enrolled pod IP (nothing steers
        ``<pod ip>:15008`` to a wildcard listener, so we listen on the pod IPs themselves)."""
        if self.capture.steers_traffic:
            return
        wanted = {str(ip) for w in self.store.local_enrolled for ip in w.ips}
        for ip in sorted(wanted - set(self.hbone_sockets)):
            sock = make_listener(ip, self.hbone_port, transparent=False)
            self.hbone_sockets[ip] = sock
            await self.hbone_server.start(sock=sock)
        # Listeners for pods that left stay open: harmless (the server refuses unknown local IPs).

    def stop_accepting(self) -> None:
        for lst in self.listeners:
            if lst.server is not None:
                lst.server.close()
            lst.sock.close()

    async def stop(self) -> int:
        """Drain: stop accepting, GOAWAY every HBONE connection, let open connections finish
        until the deadline, then reset the rest. Returns (and logs) how many were cut."""
        self.stop_accepting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout
        before = len(self.connections.open)
        await self.hbone_server.drain(self.drain_timeout)
        # Plain relays (plaintext, same-node, passthrough) and outbound tunnels share the
        # HBONE streams' deadline.
        while self.connections.open and loop.time() < deadline:
            await asyncio.sleep(0.05)
        cut = len(self.connections.open)
        self.connections.abort_all("agent stopping: drain deadline passed")
        log.info(
            f"drained: {before - cut} of {before} open connections finished, {cut} cut at the "
            f"{self.drain_timeout:g}s deadline",
            extra={"event": "drained", "open_at_stop": before, "cut": cut},
        )
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        await self.hbone_client.close()
        return cut

    def _handler(self, lst: Listener) -> Callable[[Downstream], Coroutine[Any, Any, None]]:
        async def handle(down: Downstream) -> None:
            # With bpf capture the connection keeps its original destination as its local
            # address (sk_lookup assigns the socket without rewriting the packet).
            original = lst.original if lst.original is not None else down.local
            if lst.role == "outbound":
                await handle_outbound(self, down, original)
            else:
                await handle_plaintext(self, down, original)

        return handle

    def _credential_for_ip(self, ip: IPAddress) -> WorkloadCredential | None:
        w = self.store.is_local_enrolled_ip(ip)
        if w is None:
            return None
        try:
            return self.credential(w.spiffe_id)
        except LookupError:
            return None

    # -- re-checks ------------------------------------------------------------------------------

    def recheck(self, destinations: Iterable[str] | None = None) -> int:
        """Re-evaluate open inbound connections (to ``destinations``, ``ns/name``, or all) with the
        current policy and mesh; close the ones now denied. Returns how many were closed."""
        store = self.store
        tracker = self.connections
        records = tracker.inbound() if destinations is None else tracker.inbound_to(destinations)
        closed = 0
        for rec in records:
            verdict = recheck(store, rec, self.node_name)
            if verdict is None:
                continue
            if isinstance(verdict, str):
                rec.abort(verdict)
                closed += 1
                continue
            self.connections.decided(rec, verdict, recheck=True)
            assert rec.destination_workload is not None
            self.metrics.connections_closed_by_policy.labels(rec.destination_workload.namespace).inc()
            log.info(
                f"closing open connection {rec.source_principal or rec.source_ip} -> "
                f"{rec.destination_key}:{rec.destination[1]}: policy now denies it ({verdict.reason})",
                extra={"event": "connection_closed_by_policy", "code": verdict.code,
                       "policy": ",".join(verdict.policies) or None},
            )  # fmt: skip
            rec.abort(f"policy now denies: {verdict.reason}")
            closed += 1
        return closed

    # -- status ---------------------------------------------------------------------------------

    def tunnel_counts(self) -> dict[str, int]:
        return {
            "inbound": self.hbone_server.open_tunnels,
            "outbound": self.connections.count("outbound", "hbone"),
            "pooledConnections": self.hbone_client.connections,
        }

    def addresses(self) -> dict[str, Any]:
        return {
            "hbone": sorted("{}:{}".format(*s.getsockname()[:2]) for s in self.hbone_sockets.values()),
            "listeners": [
                {
                    "role": lst.role,
                    "address": "{}:{}".format(*lst.sock.getsockname()[:2]),
                    "original": "{}:{}".format(*lst.original) if lst.original else None,
                }
                for lst in self.listeners
                if lst.sock.fileno() >= 0
            ],
        }


__all__ = ["DataPlaneWorker", "Listener", "NodeServices"]
