"""The node agent's supervisor: node-wide duties, and the composition root (DESIGN §1).

The supervisor owns what exists once per node: the config source and the current store,
certificates (CA client and certificate manager), capture, and the admin, metrics and
readiness ports. The data plane (listeners, HBONE server and client, open connections and
their re-checks) is a :class:`agent.worker.DataPlaneWorker`, which reads node-wide state through
:class:`agent.worker.NodeServices` and owns none of it.

Start order, and why: config first (nothing is meaningful without it); then certificates for
every enrolled local workload (an agent that cannot present identities must not capture
traffic it cannot carry, so a failed first fetch fails the start); then the worker's
listeners; then capture (steering traffic to listeners that exist); then admin. Readiness
(15021) turns green only when certificates and capture are in place.

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
import time
from dataclasses import dataclass, field
from importlib.metadata import version as pkg_version
from typing import TYPE_CHECKING, Any

from agent.admin import build_admin_app
from agent.capture import Capture, StaticCapture, make_capture, parse_address
from agent.metrics import AgentMetrics
from agent.tracking import ConnectionTracker
from agent.worker import DataPlaneWorker, NodeServices
from credentials.client import CaClient, NodeCredentials
from credentials.manager import CertificateManager
from identity.spiffe import SpiffeId
from mesh.config import ConfigError, MeshConfig, thaw
from mesh.store import WorkloadStore, describe_workloads
from policy import PolicyIndex, PolicySet
from serving.accesslog import AccessLog
from serving.http import RunningSite, build_metrics_app, build_readiness_app, serve
from sources.file import FileConfigSource
from tunnel.client import HboneClient
from tunnel.server import HboneServer

if TYPE_CHECKING:
    from bpf.capture import CaptureBackend

log = logging.getLogger("ztagent.agent")


class StartupError(Exception):
    """The agent cannot start; the message says what is missing and where."""


class ConfigRefused(Exception):
    """A config (or one change of it) cannot be used on this node; nothing was changed.
    The message names the object at fault."""


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
class _ConfigState:
    loaded_at: float
    refused: list[str] = field(default_factory=list)
    refused_at: float | None = None


def build_store(cfg: MeshConfig, node: str) -> WorkloadStore:
    """The store for ``cfg`` as seen from ``node``; ConfigRefused if this node cannot use it."""
    try:
        return WorkloadStore(cfg, node)
    except (KeyError, TypeError) as exc:
        raise ConfigRefused(str(exc.args[0]) if exc.args else repr(exc)) from None


class NodeAgent:
    def __init__(self, options: AgentOptions, *, capture_backend: CaptureBackend | None = None) -> None:
        self.options = options
        self.node_name = options.node
        self.hbone_port = options.hbone_port
        self.metrics = AgentMetrics()
        self.access_log = AccessLog(options.access_log)
        self.capture: Capture = make_capture(
            options.capture, options.node, backend=capture_backend, hbone_port=options.hbone_port
        )
        self.started_at = time.time()
        self._source: FileConfigSource | None = None
        self._config_state: _ConfigState | None = None
        self.config: MeshConfig | None = None
        self._store: WorkloadStore | None = None
        self._certs: CertificateManager | None = None
        self._node_identity: SpiffeId | None = None
        self._ca_client: CaClient | None = None
        self.worker: DataPlaneWorker | None = None
        self._sites: dict[str, RunningSite] = {}
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
        return self.store.policy_index

    @property
    def cert_manager(self) -> CertificateManager:
        assert self._certs is not None
        return self._certs

    @property
    def data_plane(self) -> DataPlaneWorker:
        assert self.worker is not None
        return self.worker

    @property
    def tracker(self) -> ConnectionTracker:
        return self.data_plane.connections

    @property
    def hbone_server(self) -> HboneServer | None:
        return self.worker.hbone_server if self.worker is not None else None

    @property
    def hbone_client(self) -> HboneClient:
        return self.data_plane.hbone_client

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
        except ConfigRefused as exc:
            raise StartupError(str(exc)) from None
        self._config_state = _ConfigState(loaded_at=time.time())

        # 2. certificates for every enrolled local workload
        if not o.ca or not o.node_credentials:
            raise StartupError(
                "--ca and --node-credentials are required (workload certificates come from the CA)"
            )
        try:
            # The bootstrap credential plus the renewed one persisted beside it; at least one must
            # be valid now. The client presents the newest valid one on every new connection.
            node_creds = NodeCredentials.from_dir(o.node_credentials, now=dt.datetime.now(dt.UTC))
            self._ca_client = CaClient(o.ca, node_creds)
        except Exception as exc:
            raise StartupError(f"node credentials in {o.node_credentials}: {exc}") from None
        self._ca_client.register_metrics(self.metrics.registry)
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

        # 3. the data plane: listeners, HBONE server and client
        certs = self._certs
        self.worker = DataPlaneWorker(
            NodeServices(
                node_name=self.node_name,
                hbone_port=o.hbone_port,
                store=lambda: self.store,
                credential=certs.current,
                bundles=certs.bundles,
            ),
            capture=self.capture,
            metrics=self.metrics,
            access_log=self.access_log,
            drain_timeout=o.drain_timeout,
        )
        out_sock, in_sock, hbone_sock = await self.worker.start(
            listen_host=o.listen_host,
            outbound_port=o.outbound_port,
            inbound_port=o.inbound_port,
            static_captures=o.static_captures,
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
            if self.worker is not None:
                await self.worker.stop()
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
        """Build every derived index first, then swap them in together (raises ConfigRefused,
        changing nothing, if the config cannot be used on this node)."""
        store = build_store(cfg, self.node_name)
        self.config, self._store = cfg, store

    def _local_identities(self) -> list[SpiffeId]:
        return sorted({w.spiffe_id for w in self.store.local_enrolled})

    async def _on_config(self, cfg: MeshConfig) -> None:
        old = self.config
        try:
            self._install_config(cfg)
        except ConfigRefused as exc:
            self._on_config_refused([f"{cfg.source}: {exc}"])
            return
        assert self._config_state is not None
        self._config_state = _ConfigState(loaded_at=time.time())
        self.metrics.config_reloads.labels("applied").inc()
        log.info(
            f"config applied (sha256 {cfg.digest[:12]})",
            extra={"event": "config_applied", "digest": cfg.digest, "previous": old.digest if old else None},
        )
        await self._converge()

    async def _converge(self) -> None:
        """Bring certificates, capture and the data plane in line with the current store.

        Each step fails on its own: a certificate that cannot be had or a pod that cannot be
        enrolled is logged and shown in status and readiness, and the other steps still run."""
        # Identities: fetch new ones before enrolling them, drop the ones that left.
        certs = self.cert_manager
        wanted = set(self._local_identities())
        for sid in wanted - set(certs.identities()):
            try:
                await certs.add_identity(sid)
            except Exception as exc:
                log.error(f"cannot get a certificate for {sid}: {exc}", extra={"event": "cert_add_failed"})
        for sid in set(certs.identities()) - wanted - {self._node_identity}:
            certs.remove_identity(sid)
        await self.data_plane.sync_hbone_listeners()
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
        return self.data_plane.recheck()

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
        for sid in self._local_identities():
            st = held.get(sid)
            if st is None or st.credential is None:
                # last_error starts with its cause ("CA unreachable: ...", "node credential expired: ...")
                why = f": {st.last_error}" if st is not None and st.last_error else ""
                problems.append(f"no valid certificate for {sid}{why}")
        # The node's own credential for the CA: expired renewals (working on the bootstrap
        # credential) or no valid credential at all, with what to do.
        if self._ca_client is not None:
            node = self._ca_client.node_credential_status()
            if node.problem:
                problems.append(node.problem)
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
            self.ready()
            worker = self.worker
            if worker is None:
                return
            worker.connections.sync_all()
            counts = worker.tunnel_counts()
            self.metrics.open_tunnels.labels("inbound").set(counts["inbound"])
            self.metrics.open_tunnels.labels("outbound").set(counts["outbound"])

        return build_metrics_app(self.metrics, before_scrape=before_scrape)

    def addresses(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: site.url for name, site in self._sites.items()}
        if self.worker is not None:
            out.update(self.worker.addresses())
        else:
            out.update({"hbone": [], "listeners": []})
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
        worker = self.worker
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
            "tunnels": (
                worker.tunnel_counts()
                if worker is not None
                else {"inbound": 0, "outbound": 0, "pooledConnections": 0}
            ),
            "connections": (
                {"open": len(worker.connections.open), **worker.connections.totals}
                if worker is not None
                else {"open": 0, "opened": 0, "closed": 0, "denied": 0}
            ),
            "recentDenials": list(worker.connections.recent_denials) if worker is not None else [],
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
