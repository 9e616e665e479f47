"""The node agent: composition root of config, workload store, certificates, capture, proxies,
admin and metrics (DESIGN §1).

Start order, and why: config first (nothing is meaningful without it); then certificates for
every enrolled local workload (an agent that cannot present identities must not capture
traffic it cannot carry, so a failed first fetch fails the start); then listeners; then capture
(steering traffic to listeners that exist); then admin. Readiness (15021) turns green only when
certificates and capture are in place.

Stop order: stop accepting, drain HBONE (GOAWAY, let streams finish until the deadline), abort
the rest, then detach capture *without* removing its routing rules, so pods' traffic fails
rather than flowing around the agent (fail closed) until an agent runs again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from importlib.metadata import version as pkg_version
from typing import Any

from agent.admin import build_admin_app
from agent.downstream import Downstream, downstream_factory
from agent.metrics import AgentMetrics, ConnectionStats
from agent.node.capture import CaptureLayer, StaticCapture, make_listener, parse_address
from agent.node.tracking import Tracked, Tracker, connection_labels, decision_fields
from agent.proxy_inbound import (
    UpstreamConnector,
    authorize_hbone,
    handle_plaintext,
    hbone_is_local,
    hbone_upstream,
    record_decision,
    trusted_source_ip,
    verified_source_workload,
)
from agent.proxy_outbound import handle_outbound
from credentials.client import CaClient, NodeCredentials
from credentials.manager import CertificateManager, NoCredentialError
from identity.spiffe import SpiffeId
from identity.svid import WorkloadCredential
from mesh.config import ConfigError, IPAddress, MeshConfig, thaw
from mesh.store import WorkloadStore, describe_workloads
from policy import Connection, PolicyIndex, PolicySet
from serving.accesslog import AccessLog
from serving.http import RunningSite, build_metrics_app, build_readiness_app, serve
from sources.file import FileConfigSource
from tunnel.client import HboneClient
from tunnel.hbone import parse_ip
from tunnel.relay import TunnelInfo
from tunnel.server import AuthzRequest, HboneServer, ServerConfig

log = logging.getLogger("ztagent.agent")


class StartupError(Exception):
    """The agent cannot start; the message says what is missing and where."""


@dataclass
class AgentOptions:
    config: str
    node: str
    ca: str | None = None
    node_credentials: str | None = None
    capture: str = "bpf"  # "bpf" | "none"
    listen_host: str = "0.0.0.0"  # for the 15001/15006/15008 listeners in bpf mode
    outbound_port: int = 15001
    inbound_port: int = 15006
    hbone_port: int = 15008
    admin: str = "127.0.0.1:15000"
    metrics: str = "0.0.0.0:15020"
    readiness: str = "0.0.0.0:15021"
    static_captures: tuple[StaticCapture, ...] = ()
    access_log: str | None = None  # path, "-" for stdout, None for stdout
    config_interval: float = 1.0
    cert_ttl: dt.timedelta | None = None
    drain_timeout: float = 5.0
    state_file: str | None = None  # JSON with the bound addresses, written once serving


@dataclass
class _Listener:
    sock: socket.socket
    role: str  # "outbound" | "inbound"
    original: tuple[str, int] | None = None  # static capture: fixed original destination
    server: asyncio.AbstractServer | None = None
    bound: tuple[IPAddress, int] | None = None  # the listening address, once asked


@dataclass
class _ConfigState:
    loaded_at: float
    refused: list[str] = field(default_factory=list)
    refused_at: float | None = None


class _ServerObserver:
    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    def tunnel_opened(self, info: TunnelInfo) -> None:
        self.agent._inbound_hbone_opened(info)

    def tunnel_closed(self, info: TunnelInfo) -> None:
        self.agent._inbound_hbone_closed(info)

    def rejected(self, kind: str, detail: str) -> None:
        if kind != "denied":  # denials are counted as policy decisions
            self.agent.metrics.handshake_failures.labels("inbound", kind).inc()


class NodeAgent:
    def __init__(self, options: AgentOptions, *, capture_backend: Any = None) -> None:
        self.options = options
        self.node_name = options.node
        self.hbone_port = options.hbone_port
        self.metrics = AgentMetrics()
        self.access_log = AccessLog(options.access_log)
        self.tracker = Tracker(self.metrics, self.access_log)
        self.capture = CaptureLayer(
            options.capture, options.node, backend=capture_backend, hbone_port=options.hbone_port
        )
        self.upstream = UpstreamConnector(transparent=self.capture.transparent)
        self.started_at = time.time()
        self._source: FileConfigSource | None = None
        self._config_state: _ConfigState | None = None
        self.config: MeshConfig | None = None
        self._store: WorkloadStore | None = None
        self._policy_index: PolicyIndex | None = None
        self._certs: CertificateManager | None = None
        self._node_identity: SpiffeId | None = None
        self._ca_client: CaClient | None = None
        self.hbone_server: HboneServer | None = None
        self._hbone_client: HboneClient | None = None
        self._listeners: list[_Listener] = []
        self._hbone_socks: dict[str, socket.socket] = {}  # ip -> listener (none mode: per pod IP)
        self._sites: dict[str, RunningSite] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._inbound_hbone: dict[int, Tracked] = {}
        self._config_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = asyncio.Event()

    # -- accessors (always set once started) ------------------------------------------------

    @property
    def store(self) -> WorkloadStore:
        assert self._store is not None
        return self._store

    @property
    def policy_index(self) -> PolicyIndex:
        assert self._policy_index is not None
        return self._policy_index

    @property
    def cert_manager(self) -> CertificateManager:
        assert self._certs is not None
        return self._certs

    @property
    def hbone_client(self) -> HboneClient:
        assert self._hbone_client is not None
        return self._hbone_client

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        o = self.options
        admin_host = parse_address(o.admin, "--admin")[0]
        if not ipaddress.ip_address(admin_host).is_loopback:
            # /config_dump and /certs describe every identity on the node: never on the network.
            raise StartupError(f"--admin {o.admin}: the admin endpoint must listen on a loopback address")
        # 1. config
        self._source = FileConfigSource(o.config, interval=o.config_interval)
        try:
            cfg = await self._source.initial()
        except ConfigError as exc:
            raise StartupError(f"config refused: {exc}") from None
        try:
            self._install_config(cfg)
        except KeyError as exc:
            raise StartupError(str(exc.args[0])) from None
        self._config_state = _ConfigState(loaded_at=time.time())

        # 2. certificates for every enrolled local workload
        if not o.ca or not o.node_credentials:
            raise StartupError(
                "--ca and --node-credentials are required (workload certificates come from the CA)"
            )
        try:
            node_creds = NodeCredentials.from_dir(o.node_credentials, now=dt.datetime.now(dt.UTC))
            self._ca_client = CaClient(o.ca, node_creds)
        except Exception as exc:
            raise StartupError(f"node credentials in {o.node_credentials}: {exc}") from None
        self._node_identity = node_creds.spiffe_id
        self._certs = CertificateManager(
            self._ca_client, self._ca_client.bundles(), registry=self.metrics.registry, ttl=o.cert_ttl
        )
        # The node's own credential is renewed like a workload's; the client picks it up.
        self._certs.on_rotate(self._ca_client.on_rotate)
        try:
            await self._certs.start([self._node_identity, *self._local_identities()])
        except Exception as exc:
            raise StartupError(str(exc)) from None

        # 3. listeners and the HBONE server/client
        self.hbone_server = HboneServer(
            credentials=self._credential_for_ip,
            bundles=self.cert_manager.bundles,
            authorize=self._authorize,
            is_local=lambda a, c: hbone_is_local(self, a, c),
            connector=lambda dst, src: hbone_upstream(self, dst, src),
            observer=_ServerObserver(self),
            config=ServerConfig(drain_timeout=o.drain_timeout),
        )
        # No client observer: the outbound handler accounts for its tunnels itself (it knows the
        # service), so the client's default NullObserver is right.
        self._hbone_client = HboneClient(bundles=self.cert_manager.bundles)
        out_sock = in_sock = hbone_sock = None
        if o.capture == "bpf":
            out_sock = make_listener(o.listen_host, o.outbound_port, transparent=True)
            in_sock = make_listener(o.listen_host, o.inbound_port, transparent=True)
            hbone_sock = make_listener(o.listen_host, o.hbone_port, transparent=True)
            self._listeners.append(_Listener(out_sock, "outbound"))
            self._listeners.append(_Listener(in_sock, "inbound"))
            self._hbone_socks[o.listen_host] = hbone_sock
            await self.hbone_server.start(sock=hbone_sock)
        else:
            await self._sync_hbone_listeners()
        for sc in o.static_captures:
            sock = make_listener(sc.listen[0], sc.listen[1], transparent=False)
            self._listeners.append(_Listener(sock, sc.role, original=sc.original))
        loop = asyncio.get_running_loop()
        for lst in self._listeners:
            lst.server = await loop.create_server(
                downstream_factory(self._connection_handler(lst), self._tasks), sock=lst.sock, backlog=4096
            )

        # 4. capture: steer traffic only now that the listeners exist
        try:
            self.capture.install()
            self.capture.set_listeners(out_sock, in_sock, hbone_sock)
            self.capture.sync(self.store.local_enrolled)
        except Exception as exc:
            raise StartupError(f"capture ({o.capture}): {exc}") from None

        # 5. admin, metrics, readiness; config watch
        self._sites["admin"] = await serve(build_admin_app(self), *parse_address(o.admin, "--admin"))
        self._sites["metrics"] = await serve(self._metrics_app(), *parse_address(o.metrics, "--metrics"))
        self._sites["readiness"] = await serve(
            build_readiness_app(self.ready), *parse_address(o.readiness, "--readiness")
        )
        self._config_task = asyncio.get_running_loop().create_task(
            self._source.run(self._on_config, self._on_config_error)
        )
        addresses = self.addresses()
        log.info(
            f"ztagent {self.version} serving node {self.node_name}",
            extra={"event": "agent_started", "addresses": addresses, "capture": o.capture},
        )
        if o.state_file:
            tmp = o.state_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"pid": os.getpid(), "node": self.node_name, "addresses": addresses}, f)
            os.replace(tmp, o.state_file)

    async def stop(self) -> None:
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            if self._config_task is not None:
                self._config_task.cancel()
            for lst in self._listeners:
                if lst.server is not None:
                    lst.server.close()
                lst.sock.close()
            if self.hbone_server is not None:
                await self.hbone_server.drain(self.options.drain_timeout)
            for t in list(self.tracker.open.values()):
                t.abort("agent stopping")
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=5)
            if self._hbone_client is not None:
                await self._hbone_client.close()
            if self._certs is not None:
                await self._certs.stop()
            if self._ca_client is not None:
                await self._ca_client.close()
            self.capture.stop()
            for site in self._sites.values():
                await site.close()
            self.access_log.close()
        finally:
            self._stopped.set()
            log.info("agent stopped", extra={"event": "agent_stopped"})

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # -- config -----------------------------------------------------------------------------

    def _install_config(self, cfg: MeshConfig) -> None:
        """Build every derived index first, then swap them in together (raises, changing
        nothing, if the config cannot be used on this node)."""
        store = WorkloadStore(cfg, self.node_name)
        self.config, self._store, self._policy_index = cfg, store, store.policy_index

    def _local_identities(self) -> list[SpiffeId]:
        return sorted({w.spiffe_id for w in self.store.local_enrolled})

    async def _on_config(self, cfg: MeshConfig) -> None:
        old = self.config
        try:
            self._install_config(cfg)
        except KeyError as exc:
            self._on_config_refused([f"{cfg.source}: {exc.args[0]}"])
            return
        assert self._config_state is not None
        self._config_state = _ConfigState(loaded_at=time.time())
        self.metrics.config_reloads.labels("applied").inc()
        log.info(
            f"config applied (sha256 {cfg.digest[:12]})",
            extra={"event": "config_applied", "digest": cfg.digest, "previous": old.digest if old else None},
        )
        # Identities: fetch new ones before enrolling them, drop the ones that left.
        wanted = set(self._local_identities())
        for sid in wanted - set(self.cert_manager.identities()):
            try:
                await self.cert_manager.add_identity(sid)
            except Exception as exc:
                log.error(f"cannot get a certificate for {sid}: {exc}", extra={"event": "cert_add_failed"})
        for sid in set(self.cert_manager.identities()) - wanted - {self._node_identity}:
            self.cert_manager.remove_identity(sid)
        if self.options.capture == "none":
            await self._sync_hbone_listeners()
        try:
            self.capture.sync(self.store.local_enrolled)
        except Exception as exc:
            log.error(f"capture sync failed: {exc}", extra={"event": "capture_error"})
        self.recheck_connections()

    def _on_config_refused(self, lines: list[str], *, logged: bool = False) -> None:
        self.metrics.config_reloads.labels("refused").inc()
        self._config_state = dataclasses.replace(
            self._config_state or _ConfigState(loaded_at=0.0), refused=lines, refused_at=time.time()
        )
        if not logged:
            log.error(
                f"config update refused, the last good config keeps serving: {lines[0]}",
                extra={"event": "config_refused", "errors": lines},
            )

    def _on_config_error(self, exc: ConfigError) -> None:
        # The source already logged it with every issue (file, document, field).
        self._on_config_refused([str(i) for i in exc.issues], logged=True)

    def recheck_connections(self) -> int:
        """Re-evaluate every open inbound connection with the current policy; close the denied."""
        closed = 0
        for t in self.tracker.inbound():
            assert t.policy_input is not None and t.destination_key is not None
            ns, _, name = t.destination_key.partition("/")
            w = self.store.by_name(ns, name)
            if w is None or not w.enrolled or w.node != self.node_name:
                t.abort("destination no longer an enrolled workload on this node")
                closed += 1
                continue
            conn = dataclasses.replace(t.policy_input, destination_labels=w.labels)
            d = self.policy_index.check(conn)
            if d.allowed:
                continue
            record_decision(
                self,
                d,
                path=t.path + " (re-check)",
                source_ip=conn.source_ip,
                source_principal=t.log_fields.get("source_principal"),
                destination=w,
                destination_ip=str(conn.destination_ip),
                port=conn.destination_port,
            )
            self.metrics.connections_closed_by_policy.labels(w.namespace).inc()
            log.info(
                f"closing open connection {t.log_fields.get('source_principal') or conn.source_ip} -> "
                f"{w.key}:{conn.destination_port}: policy now denies it ({d.reason})",
                extra={"event": "connection_closed_by_policy", **decision_fields(d)},
            )
            t.abort(f"policy now denies: {d.reason}")
            closed += 1
        return closed

    # -- HBONE server callbacks ---------------------------------------------------------------

    def _credential_for_ip(self, ip: Any) -> WorkloadCredential | None:
        w = self.store.is_local_enrolled_ip(ip)
        if w is None:
            return None
        try:
            return self.cert_manager.current(w.spiffe_id)
        except NoCredentialError:
            return None

    async def _authorize(self, req: AuthzRequest) -> Any:
        return await authorize_hbone(self, req)

    def _inbound_hbone_opened(self, info: TunnelInfo) -> None:
        dest = self.store.by_ip(info.destination.ip)
        principal = info.source_principal
        # The same trust rule as the admission check (authorize_hbone): the forwarded source is
        # believed only when it is a workload with the peer's identity, else the TCP peer address
        # stands in, so re-checks on policy change see what admission saw.
        claimed = info.source.ip if info.source is not None else None
        peer_ip = info.peer.ip if info.peer is not None else None
        src_ip = trusted_source_ip(self, principal, claimed, peer_ip)
        src_w = verified_source_workload(self, principal, src_ip)
        service = None
        if dest is not None:
            for s in self.store.services_of(dest):
                if any(p.target_port == info.destination.port for p in s.ports):
                    service = s
                    break
        labels = connection_labels(
            reporter="destination",
            source=src_w,
            source_principal=principal,
            destination=dest,
            destination_principal=info.destination_principal,
            service=service,
            security="mutual_tls",
        )
        policy_input = None
        if dest is not None:
            policy_input = Connection(
                source_principal=principal,
                source_ip=src_ip,
                destination_namespace=dest.namespace,
                destination_port=info.destination.port,
                destination_labels=dest.labels,
                destination_ip=info.destination.ip,
            )

        def abort(reason: str) -> None:
            assert self.hbone_server is not None
            for session in list(self.hbone_server.sessions):
                for st in list(session.streams.values()):
                    if st.info is info:
                        st.abort(reason=reason)
                        return

        t = Tracked(
            direction="inbound",
            path="hbone",
            stats=ConnectionStats(self.metrics, labels),
            read_bytes=lambda: (info.bytes_sent, info.bytes_received),
            abort=abort,
            log_fields={
                "reporter": "destination",
                "source_ip": str(src_ip) if src_ip is not None else None,
                "source_workload": src_w.key if src_w else None,
                "source_principal": principal,
                "destination_workload": dest.key if dest else None,
                "destination_principal": info.destination_principal,
                "destination": str(info.destination),
                "destination_service": service.hostname if service else None,
                "security": "mutual_tls",
                "decision": "ALLOW",
            },
            policy_input=policy_input,
            destination_key=dest.key if dest else None,
        )
        self._inbound_hbone[id(info)] = self.tracker.add(t)

    def _inbound_hbone_closed(self, info: TunnelInfo) -> None:
        t = self._inbound_hbone.pop(id(info), None)
        if t is not None:
            self.tracker.close(t, info.close_reason or "closed")

    # -- listeners ----------------------------------------------------------------------------

    async def _sync_hbone_listeners(self) -> None:
        """--capture none: one HBONE listener per local enrolled pod IP (nothing steers
        ``<pod ip>:15008`` to a wildcard listener, so we listen on the pod IPs themselves)."""
        assert self.hbone_server is not None
        wanted = {str(ip) for w in self.store.local_enrolled for ip in w.ips}
        for ip in sorted(wanted - set(self._hbone_socks)):
            sock = make_listener(ip, self.hbone_port, transparent=False)
            self._hbone_socks[ip] = sock
            await self.hbone_server.start(sock=sock)
        # Listeners for pods that left stay open: harmless (the server refuses unknown local IPs).

    def _connection_handler(self, lst: _Listener) -> Callable[[Downstream], Coroutine[Any, Any, None]]:
        async def handle(down: Downstream) -> None:
            # With bpf capture the connection keeps its original destination as its local
            # address (sk_lookup assigns the socket without rewriting the packet).
            original = lst.original if lst.original is not None else down.local
            if lst.role == "outbound":
                await handle_outbound(self, down, original)
            else:
                await handle_plaintext(self, down, original)

        return handle

    def is_own_listener(self, addr: tuple[str, int]) -> bool:
        try:
            ip = parse_ip(addr[0])
        except ValueError:
            return False
        for lst in self._listeners:
            if lst.sock.fileno() < 0:
                continue
            if lst.bound is None:  # asked on every outbound connection: no syscall each time
                h, p = lst.sock.getsockname()[:2]
                lst.bound = (parse_ip(h), p)
            h_ip, p = lst.bound
            if p == addr[1] and (h_ip == ip or h_ip.is_unspecified):
                return lst.original is None
        return False

    # -- health, admin, metrics ---------------------------------------------------------------

    @property
    def version(self) -> str:
        try:
            return pkg_version("ztagent")
        except Exception:
            return "unknown"

    def _cert_problems(self) -> list[str]:
        if self._certs is None:
            return ["certificate manager not started"]
        problems = []
        held = {s.spiffe_id: s for s in self._certs.status()}
        for sid in [self._node_identity, *self._local_identities()]:
            st = held.get(sid) if sid is not None else None
            if st is None or st.credential is None:
                why = f": {st.last_error}" if st is not None and st.last_error else ""
                problems.append(f"no valid certificate for {sid}{why}")
        return problems

    def ready(self) -> tuple[bool, list[str]]:
        reasons = []
        if self._store is None or self._sites.get("admin") is None:
            reasons.append("starting")
        reasons.extend(self._cert_problems())
        ok, detail = self.capture.ready()
        if not ok:
            reasons.append(f"capture: {detail}")
        self.metrics.ready.set(0 if reasons else 1)
        return (not reasons, reasons)

    def _metrics_app(self) -> Any:
        def before_scrape() -> None:
            # Live byte counts of open connections, and the readiness gauge, as of this scrape.
            self.tracker.sync_all()
            self.ready()
            server = self.hbone_server
            self.metrics.open_tunnels.labels("inbound").set(server.open_tunnels if server else 0)
            self.metrics.open_tunnels.labels("outbound").set(self.tracker.count("outbound", "hbone"))

        return build_metrics_app(self.metrics, before_scrape=before_scrape)

    def addresses(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: site.url for name, site in self._sites.items()}
        out["hbone"] = sorted(
            f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in self._hbone_socks.values()
        )
        out["listeners"] = [
            {
                "role": lst.role,
                "address": "{}:{}".format(*lst.sock.getsockname()[:2]),
                "original": "{}:{}".format(*lst.original) if lst.original else None,
            }
            for lst in self._listeners
            if lst.sock.fileno() >= 0
        ]
        return out

    def status(self) -> dict[str, Any]:
        ready, reasons = self.ready()
        problems = list(reasons)
        cs = self._config_state
        if cs is not None and cs.refused:
            problems.append(
                f"last config update refused ({len(cs.refused)} errors); serving the previous config"
            )
        certs = {c["identity"]: c for c in self.certs_list()}
        workloads = []
        for w in self.store.local_enrolled if self._store is not None else ():
            workloads.append(
                {
                    "name": w.name,
                    "namespace": w.namespace,
                    "spiffeId": str(w.spiffe_id),
                    "ips": [str(i) for i in w.ips],
                    "cert": certs.get(str(w.spiffe_id)),
                }
            )
        for c in certs.values():
            if c.get("consecutiveFailures"):
                problems.append(f"certificate renewal failing for {c['identity']}: {c.get('lastError')}")
        server = self.hbone_server
        return {
            "version": self.version,
            "node": self.node_name,
            "startedAt": dt.datetime.fromtimestamp(self.started_at, dt.UTC).isoformat(),
            "uptimeSeconds": round(time.time() - self.started_at, 1),
            "healthy": not problems,
            "ready": ready,
            "problems": problems,
            "capture": self.capture.status(),
            "config": {
                "source": self.config.source if self.config else None,
                "digest": self.config.digest if self.config else None,
                "loadedAt": _iso(cs.loaded_at) if cs else None,
                "errors": cs.refused if cs else [],
                "refusedAt": _iso(cs.refused_at) if cs and cs.refused_at else None,
            },
            "workloads": workloads,
            "tunnels": {
                "inbound": server.open_tunnels if server is not None else 0,
                "outbound": self.tracker.count("outbound", "hbone"),
                "pooledConnections": self._hbone_client.connections if self._hbone_client else 0,
            },
            "connections": {"open": len(self.tracker.open), **self.tracker.totals},
            "recentDenials": list(self.tracker.recent_denials),
            "addresses": self.addresses(),
        }

    def certs_list(self) -> list[dict[str, Any]]:
        if self._certs is None:
            return []
        now = dt.datetime.now(dt.UTC)
        out = []
        for st in self._certs.status():
            c = st.credential
            entry: dict[str, Any] = {
                "identity": str(st.spiffe_id),
                "nextAction": st.next_action.isoformat(),
                "consecutiveFailures": st.consecutive_failures,
                "lastError": st.last_error or None,
            }
            if c is not None:
                leaf = c.chain[0]
                entry.update(
                    {
                        "serial": format(leaf.serial_number, "x"),
                        "notBefore": c.not_before.isoformat(),
                        "notAfter": c.not_after.isoformat(),
                        "expiresInSeconds": round((c.not_after - now).total_seconds(), 1),
                        "issuer": leaf.issuer.rfc4514_string(),
                    }
                )
            out.append(entry)
        return out

    def certs(self) -> list[dict[str, Any]]:
        return self.certs_list()

    def config_dump(self) -> dict[str, Any]:
        cfg = self.config
        if cfg is None:
            return {}
        return {
            "source": cfg.source,
            "digest": cfg.digest,
            "trustDomain": cfg.trust_domain.name,
            "rootNamespace": cfg.root_namespace,
            "nodes": [
                {
                    "name": n.name,
                    "address": str(n.address),
                    "podCIDR": str(n.pod_cidr) if n.pod_cidr else None,
                }
                for n in cfg.nodes
            ],
            "workloads": describe_workloads(self.store),
            "services": [
                {
                    "name": s.name,
                    "namespace": s.namespace,
                    "vips": [str(v) for v in s.vips],
                    "ports": [
                        {"port": p.port, "targetPort": p.target_port, "name": p.name, "protocol": p.protocol}
                        for p in s.ports
                    ],
                    "selector": dict(s.selector),
                    "endpoints": [w.key for w in self.store.endpoints(s)],
                }
                for s in cfg.services
            ],
            "policies": [thaw(p.raw) for p in cfg.policies],
        }

    def workloads(self) -> list[dict[str, Any]]:
        return describe_workloads(self.store)

    def policies(self) -> list[dict[str, Any]]:
        cfg = self.config
        if cfg is None:
            return []
        local = self.store.local_enrolled
        index = self.policy_index
        out = []
        for doc in cfg.policies:
            selects = []
            if doc.kind == "AuthorizationPolicy":
                for w in local:
                    if any(
                        p.key == f"{doc.namespace}/{doc.name}" for p in index.select(w.namespace, w.labels)
                    ):
                        selects.append(w.key)
            out.append(
                {
                    "kind": doc.kind,
                    "namespace": doc.namespace,
                    "name": doc.name,
                    "source": {"file": doc.file, "document": doc.document, "path": doc.path or None},
                    "selectsLocal": selects,
                    "spec": thaw(doc.raw.get("spec")),
                }
            )
        ps = cfg.parsed_policies
        if isinstance(ps, PolicySet) and ps.warnings:
            out.append({"warnings": [str(w) for w in ps.warnings]})
        return out


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


__all__ = ["AgentOptions", "NodeAgent", "StartupError"]
