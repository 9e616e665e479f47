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

from agent import views
from agent.admin import build_admin_app
from agent.capture import Capture, StaticCapture, make_capture, parse_address
from agent.cni import CniEnrollment, state_path_for
from agent.metrics import DEFAULT_CLUSTER_ID, AgentMetrics
from agent.tracking import ConnectionTracker
from agent.worker import DataPlaneWorker, NodeServices
from cni.server import CniServer
from credentials.client import CaClient, NodeCredentials
from credentials.manager import CertificateManager
from identity.spiffe import SpiffeId
from mesh.config import ConfigError, ConfigIssue, MeshConfig
from mesh.errors import ChangeRefused
from mesh.store import AppliedChanges, WorkloadStore
from policy import PolicyIndex
from serving.accesslog import AccessLog
from serving.http import RunningSite, build_metrics_app, build_readiness_app, serve
from sources.base import ConfigRefused as SourceRefused
from sources.base import ConfigSource
from sources.file import FileConfigSource
from tunnel.client import HboneClient
from tunnel.server import HboneServer

if TYPE_CHECKING:
    from bpf.capture import CaptureBackend

log = logging.getLogger("ztagent.agent")


class StartupError(Exception):
    """The agent cannot start; the message says what is missing and where."""


class ConfigRefused(Exception):
    """A config this node cannot use (its node is missing, an invariant broken); nothing was
    changed. The message names the object at fault."""


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
    namespace: str | None = None  # as kubectl -n: the namespace of documents that name none
    cluster_id: str = DEFAULT_CLUSTER_ID  # source_cluster/destination_cluster (ztunnel's CLUSTER_ID)
    cni_socket: str | None = None  # serve ztagent-cni here (agent/cni.py): pods enrolled as they are made


@dataclass
class _ConfigState:
    loaded_at: float
    source: str | None = None
    digest: str | None = None
    refused: list[str] = field(default_factory=list)
    refused_at: float | None = None


def build_store(cfg: MeshConfig, node: str) -> WorkloadStore:
    """The store for ``cfg`` as seen from ``node``; ConfigRefused if this node cannot use it."""
    try:
        return WorkloadStore(cfg, node)
    except ChangeRefused as exc:
        raise ConfigRefused("; ".join(i.message for i in exc.issues)) from None
    except TypeError as exc:  # a policy set that would be evaluated as empty (allow all)
        raise ConfigRefused(str(exc)) from None


class NodeAgent:
    def __init__(
        self,
        options: AgentOptions,
        *,
        capture_backend: CaptureBackend | None = None,
        source: ConfigSource | None = None,
        ca_client: CaClient | None = None,
    ) -> None:
        self.options = options
        self.node_name = options.node
        self.hbone_port = options.hbone_port
        self.metrics = AgentMetrics(cluster_id=options.cluster_id, version=self.version)
        self.access_log = AccessLog(options.access_log)
        self.capture: Capture = make_capture(
            options.capture, options.node, backend=capture_backend, hbone_port=options.hbone_port
        )
        self.started_at = time.time()
        # The mesh comes from an injected source: the config file by default, a Kubernetes watch
        # or another importer behind the same interface (sources.base.ConfigSource).
        self._source: ConfigSource = source or FileConfigSource(
            options.config, interval=options.config_interval, default_namespace=options.namespace
        )
        self._config_state: _ConfigState | None = None
        self._store: WorkloadStore | None = None
        self._stale_reported: dict[str, tuple[ConfigIssue, ...]] = {}
        self._certs: CertificateManager | None = None
        self._node_identity: SpiffeId | None = None
        self._ca_client: CaClient | None = ca_client  # injected: token mode (credentials.client)
        self.worker: DataPlaneWorker | None = None
        self._sites: dict[str, RunningSite] = {}
        self._config_task: asyncio.Task[None] | None = None
        self.cni_server: CniServer | None = None
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
        try:
            cfg = await self._source.initial()
        except ConfigError as exc:
            raise StartupError(f"config refused: {exc}") from None
        try:
            self._store = build_store(cfg, self.node_name)
        except ConfigRefused as exc:
            raise StartupError(str(exc)) from None
        self._config_state = _ConfigState(loaded_at=time.time(), source=cfg.source, digest=cfg.digest)
        self._report_policies()

        # 2. certificates for every enrolled local workload
        if self._ca_client is None:
            if not o.ca or not o.node_credentials:
                raise StartupError(
                    "--ca and --node-credentials are required (workload certificates come from the CA)"
                )
            try:
                # The bootstrap credential plus the renewed one persisted beside it; at least one
                # must be valid now. The client presents the newest valid one on every connection.
                node_creds = NodeCredentials.from_dir(o.node_credentials, now=dt.datetime.now(dt.UTC))
                self._ca_client = CaClient(o.ca, node_creds)
            except Exception as exc:
                raise StartupError(f"node credentials in {o.node_credentials}: {exc}") from None
        self._ca_client.register_metrics(self.metrics.registry)
        self._node_identity = self._ca_client.node_identity  # None in token mode
        self._certs = CertificateManager(
            self._ca_client, self._ca_client.bundles(), registry=self.metrics.registry, ttl=o.cert_ttl
        )
        # The node's own credential is renewed like a workload's; the client picks it up.
        self._certs.on_rotate(self._ca_client.on_rotate)
        try:
            own = [self._node_identity] if self._node_identity is not None else []
            await self._certs.start([*own, *self._local_identities()])
        except Exception as exc:
            raise StartupError(str(exc)) from None

        # 3. the data plane: listeners, HBONE server and client
        cni = None
        if o.cni_socket:  # pods come from the runtime: capture enrolls only those it has made
            cni = CniEnrollment(self, state_path=state_path_for(o.cni_socket))
            self.capture = cni.capture
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
            if cni is not None:
                cni.reconcile()  # before the socket is served and readiness can turn green
            self.capture.sync(self.store.local_enrolled)
        except Exception as exc:
            raise StartupError(f"capture ({o.capture}): {exc}") from None
        if cni is not None and o.cni_socket:
            self.cni_server = CniServer(cni, o.cni_socket)
            await self.cni_server.start()

        # 5. admin, metrics, readiness; config watch
        self._sites["admin"] = await serve(build_admin_app(self), *parse_address(o.admin, "--admin"))
        self._sites["metrics"] = await serve(self._metrics_app(), *parse_address(o.metrics, "--metrics"))
        self._sites["readiness"] = await serve(
            build_readiness_app(self.ready), *parse_address(o.readiness, "--readiness")
        )
        self._config_task = asyncio.get_running_loop().create_task(self._follow_config())
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
            if self.cni_server is not None:  # first: ADDs now fail "try again later" (fail closed)
                await self.cni_server.close()
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

    @property
    def config(self) -> MeshConfig | None:
        """The mesh as one snapshot (admin views; built on demand after a change)."""
        return self._store.snapshot if self._store is not None else None

    def _local_identities(self) -> list[SpiffeId]:
        return sorted({w.spiffe_id for w in self.store.local_enrolled})

    async def _follow_config(self) -> None:
        """Apply the source's change sets to the store as they come; the last good state serves
        through every refusal."""
        async for event in self._source.changes():
            if isinstance(event, SourceRefused):
                # The source already logged it with every issue (file, document, field).
                self._on_config_refused([str(i) for i in event.issues], logged=True)
                continue
            try:
                applied = self.store.apply(event.changes, source=event.source, digest=event.digest)
            except ChangeRefused as exc:
                self._on_config_refused([str(i) for i in exc.issues])
                continue
            previous = self._config_state.digest if self._config_state is not None else None
            self._config_state = _ConfigState(loaded_at=time.time(), source=event.source, digest=event.digest)
            self.metrics.config_reloads.labels("applied").inc()
            log.info(
                f"config applied ({event.source} at {event.digest[:12]}): {len(event.changes)} change(s)",
                extra={"event": "config_applied", "digest": event.digest, "previous": previous},
            )
            self._report_policies()
            await self._converge(applied)

    def _report_policies(self) -> None:
        """Log each policy update refused while its last good version stays in force (once per
        refusal), and keep the gauge current."""
        stale = self.store.stale_policies
        for key, issues in stale.items():
            if self._stale_reported.get(key) != issues:
                log.error(
                    f"policy {key}: the update is refused and its last good version stays in force: "
                    + "; ".join(str(i) for i in issues),
                    extra={
                        "event": "policy_update_refused",
                        "policy": key,
                        "errors": [str(i) for i in issues],
                    },
                )
        for key in set(self._stale_reported) - set(stale):
            log.info(f"policy {key}: a good version is in force again", extra={"event": "policy_recovered"})
        self._stale_reported = stale
        self.metrics.policies_last_good.set(len(stale))
        self.metrics.policies_invalid.set(len(self.store.policy_errors))

    async def _converge(self, applied: AppliedChanges | None = None) -> None:
        """Bring certificates, capture and the data plane in line with the store after a change
        (``None``: everything, as at start).

        Each step fails on its own: a certificate that cannot be had or a pod that cannot be
        enrolled is logged and shown in status and readiness, and the other steps still run."""
        if applied is None or applied.local_enrolled_changed:
            # Identities: fetch new ones before enrolling them, drop the ones that left.
            certs = self.cert_manager
            wanted = set(self._local_identities())
            for sid in wanted - set(certs.identities()):
                try:
                    await certs.add_identity(sid)
                except Exception as exc:
                    log.error(f"cannot get a certificate for {sid}: {exc}",
                              extra={"event": "cert_add_failed"})  # fmt: skip
            for sid in set(certs.identities()) - wanted - {self._node_identity}:
                certs.remove_identity(sid)
            await self.data_plane.sync_hbone_listeners()
            try:
                self.capture.sync(self.store.local_enrolled)
            except Exception as exc:
                log.error(f"capture sync failed: {exc}", extra={"event": "capture_error"})
        if applied is None or applied.recheck_all:
            self.recheck_connections()
        elif applied.recheck:
            # Only connections to the workloads whose policy inputs changed (an open connection's
            # source side is its authenticated identity and address, which no change rewrites).
            self.data_plane.recheck(applied.recheck)

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
            if self._store is not None:
                held = {st.spiffe_id for st in self.cert_manager.status() if st.credential is not None}
                pending = sum(1 for w in self._store.local_enrolled if w.spiffe_id not in held)
                self.metrics.active_proxies.set(len(self._store.local_enrolled) - pending)
                self.metrics.pending_proxies.set(pending)

        return build_metrics_app(self.metrics, before_scrape=before_scrape)

    def addresses(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: site.url for name, site in self._sites.items()}
        if self.worker is not None:
            out.update(self.worker.addresses())
        else:
            out.update({"hbone": [], "listeners": []})
        return out

    # The views themselves are pure functions in agent.views; these gather their inputs.

    def _view_config_state(self) -> views.ConfigState | None:
        cs = self._config_state
        if cs is None:
            return None
        stale = self._store.stale_policies if self._store is not None else {}
        return views.ConfigState(cs.source, cs.digest, cs.loaded_at, cs.refused, cs.refused_at, stale)

    def status(self) -> dict[str, Any]:
        worker = self.worker
        return views.status(
            version=self.version,
            node=self.node_name,
            started_at=self.started_at,
            now=time.time(),
            ready=self.ready(),
            config=self._view_config_state(),
            store=self._store,
            certs=self.certs_list(),
            capture=self.capture.status(),
            tunnels=worker.tunnel_counts() if worker is not None else None,
            tracker=worker.connections if worker is not None else None,
            recent_denials=worker.connections.recent_denials if worker is not None else (),
            addresses=self.addresses(),
        )

    def certs_list(self) -> list[dict[str, Any]]:
        if self._certs is None:
            return []
        return views.certs_list(self._certs.status(), dt.datetime.now(dt.UTC))

    def certs(self) -> list[dict[str, Any]]:
        return self.certs_list()

    def config_dump(self) -> dict[str, Any]:
        """ztunnel's ``/config_dump`` keys, plus ztagent's own (source, digest, nodes, documents)."""
        certs = self._certs
        worker = self.worker
        dump = views.ztunnel_dump(
            self.config,
            self._store,
            cluster_id=self.metrics.cluster_id,
            statuses=certs.status() if certs is not None else [],
            bundles=certs.bundles() if certs is not None else None,
            tracker=worker.connections if worker is not None else None,
            now=dt.datetime.now(dt.UTC),
        )
        if dump:
            dump.update(views.config_dump(self.config, self._store))
        return dump

    def workloads(self) -> list[dict[str, Any]]:
        return views.workloads(self._store)

    def policies(self) -> list[dict[str, Any]]:
        return views.policies(self.config, self._store)

    def connections(self) -> list[dict[str, Any]]:
        worker = self.worker
        if worker is not None:
            worker.connections.sync_all()
        return views.connections(worker.connections if worker is not None else None, time.monotonic())


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


__all__ = ["AgentOptions", "NodeAgent", "StartupError"]
