"""``ztagent waypoint``: one waypoint process (config, credential, HBONE server, admin, metrics).

It reads the same config file as the node agents (reloaded on change; a bad update is refused and
the last good version keeps serving), finds its own ``Gateway`` (or ``waypoints:`` entry) by
``namespace/name``, presents the SVID from a credential directory (``ztagent ca issue`` output:
``key.pem``, ``cert-chain.pem``, ``root-cert.pem``), terminates HBONE on :15008, and serves
``/metrics`` (:15020), ``/healthz/ready`` (:15021) and an admin ``/status`` (127.0.0.1:15000),
like the agent (serving/http.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from credentials.files import read_credentials
from identity.bundle import TrustBundle, TrustBundleSet
from identity.keys import load_key_pem
from identity.svid import WorkloadCredential, load_pem_chain
from mesh.errors import ConfigError
from mesh.model import Snapshot, Waypoint
from mesh.store import WorkloadStore
from policy.jwt import JwksStore
from serving.accesslog import AccessLog
from serving.http import HttpApp, Response, build_metrics_app, build_readiness_app, json_response, serve
from sources.file import load_config
from tunnel.client import HboneClient
from tunnel.server import HboneServer, ServerConfig
from waypoint.decide import WaypointPolicies
from waypoint.extauthz import ExtAuthzHttpClient, ExtAuthzHttpProvider, ProviderConfigError
from waypoint.jwks import DEFAULT_REFRESH, JwksFetcher
from waypoint.metrics import WaypointMetrics
from waypoint.proxy import WaypointProxy

log = logging.getLogger("ztagent.waypoint")


class StartupError(Exception):
    """The waypoint cannot start; the message says what is missing."""


@dataclass
class WaypointOptions:
    config: str
    name: str  # namespace/name of the Gateway
    credentials: str
    listen_host: str = "0.0.0.0"
    hbone_port: int | None = None  # default: the Gateway's HBONE listener port
    admin: tuple[str, int] = ("127.0.0.1", 15000)
    metrics: tuple[str, int] = ("0.0.0.0", 15020)
    readiness: tuple[str, int] = ("0.0.0.0", 15021)
    access_log: str | None = None
    ext_authz: str | None = None  # YAML: Istio MeshConfig extensionProviders list
    jwks_refresh: float = DEFAULT_REFRESH
    config_interval: float = 1.0
    namespace: str | None = None


def load_credential(directory: str, snap: Snapshot) -> tuple[WorkloadCredential, TrustBundleSet]:
    files = read_credentials(directory)
    chain = load_pem_chain(files.chain_pem)
    cred = WorkloadCredential.from_chain(load_key_pem(files.key_pem), chain)
    return cred, TrustBundleSet.of(TrustBundle.from_pem(snap.trust_domain, files.roots_pem))


def load_ext_authz(path: str | None) -> dict[str, ExtAuthzHttpClient]:
    if path is None:
        return {}
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    items = doc.get("extensionProviders") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise ProviderConfigError("extensionProviders", "expected a list of providers")
    out = {}
    for i, item in enumerate(items):
        p = ExtAuthzHttpProvider.from_mesh_config(item, f"extensionProviders[{i}]")
        out[p.name] = ExtAuthzHttpClient(p)
    return out


def find_waypoint(snap: Snapshot, key: str) -> Waypoint:
    for w in snap.waypoints:
        if w.key == key:
            return w
    have = ", ".join(w.key for w in snap.waypoints) or "none"
    raise StartupError(
        f"no waypoint {key} in {snap.source} (a Gateway of class istio-waypoint; have: {have})"
    )


def _node_of(snap: Snapshot, wp: Waypoint) -> str:
    for w in snap.workloads:
        if set(w.ips) & set(wp.addresses):
            return w.node
    if not snap.nodes:
        raise StartupError(f"{snap.source}: the mesh has no nodes")
    return snap.nodes[0].name


class WaypointRole:
    def __init__(self, options: WaypointOptions) -> None:
        self.options = options
        self.metrics = WaypointMetrics()
        self.access_log = AccessLog(options.access_log)
        self.stores: dict[str, JwksStore] = {}
        self.snapshot: Snapshot | None = None
        self.store: WorkloadStore | None = None
        self.policies: WaypointPolicies | None = None
        self.waypoint: Waypoint | None = None
        self.credential: WorkloadCredential | None = None
        self.bundles: TrustBundleSet | None = None
        self.server: HboneServer | None = None
        self.client: HboneClient | None = None
        self.proxy: WaypointProxy | None = None
        self.fetcher: JwksFetcher | None = None
        self.sites: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.last_config_error: str | None = None
        self.bound: dict[str, Any] = {}

    # -- config -----------------------------------------------------------------------------------
    def _install(self, snap: Snapshot) -> None:
        wp = find_waypoint(snap, self.options.name)
        if self.waypoint is not None and wp.spiffe_id != self.waypoint.spiffe_id:
            raise StartupError(f"waypoint {wp.key} changed identity to {wp.spiffe_id}: restart it")
        store = WorkloadStore(snap, _node_of(snap, wp))
        now = dt.datetime.now(dt.UTC).timestamp()
        pol = WaypointPolicies.from_snapshot(snap, wp, self.stores, now)
        for t in self._targets(store, pol, wp):
            pol.authenticator(t, now)  # every RequestAuthentication's JWKS is fetched from the start
        self.snapshot, self.store, self.policies, self.waypoint = snap, store, pol, wp

    @staticmethod
    def _targets(store: WorkloadStore, pol: WaypointPolicies, wp: Waypoint) -> list[Any]:
        out = [pol.target(None, None)]
        for svc in store.services:
            bound = store.waypoint_for(None, svc)
            if isinstance(bound, Waypoint) and bound.key == wp.key:
                out.append(pol.target(svc.namespace, svc.name))
        return out

    def remote_jwks(self) -> Iterable[tuple[str, JwksStore]]:
        if self.policies is None:
            return ()
        seen: dict[str, JwksStore] = {}
        for a in self.policies.all_authenticators():
            for uri, _timeout in a.remote_sources():
                if uri in a.stores:
                    seen[uri] = a.stores[uri]
        return tuple(seen.items())

    def _stamp(self) -> tuple[int, int, int] | None:
        # mtime alone misses a rewrite within the file system's timestamp granularity.
        try:
            st = os.stat(self.options.config)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def _watch_config(self, last: tuple[int, int, int] | None) -> None:
        path = self.options.config
        while True:
            await asyncio.sleep(self.options.config_interval)
            st = self._stamp()
            if st is None or st == last:
                continue
            last = st
            try:
                snap = load_config(path, default_namespace=self.options.namespace)
                if self.snapshot is not None and snap.digest == self.snapshot.digest:
                    continue
                self._install(snap)
                self.last_config_error = None
                log.info(f"config {snap.digest[:12]} applied", extra={"event": "config_applied"})
            except (ConfigError, StartupError) as exc:
                self.last_config_error = str(exc)
                log.error(
                    f"config update refused, the last good version keeps serving: {exc}",
                    extra={"event": "config_refused"},
                )

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        o = self.options
        stamp = self._stamp()  # before reading: a change made meanwhile is seen by the watcher
        try:
            snap = load_config(o.config, default_namespace=o.namespace)
        except ConfigError as exc:
            raise StartupError(str(exc)) from None
        self._install(snap)
        assert self.waypoint is not None
        try:
            self.credential, self.bundles = load_credential(o.credentials, snap)
        except Exception as exc:
            raise StartupError(f"credentials {o.credentials}: {exc}") from None
        if self.credential.spiffe_id != self.waypoint.spiffe_id:
            raise StartupError(
                f"credentials {o.credentials} are for {self.credential.spiffe_id}, but waypoint "
                f"{self.waypoint.key} runs as {self.waypoint.spiffe_id}"
            )
        try:
            ext = load_ext_authz(o.ext_authz)
        except (OSError, ProviderConfigError, yaml.YAMLError) as exc:
            raise StartupError(f"--ext-authz {o.ext_authz}: {exc}") from None
        bundles = self.bundles
        cred = self.credential
        self.client = HboneClient(bundles=lambda: bundles)
        self.proxy = WaypointProxy(
            waypoint=self.waypoint,
            store=self._store,
            policies=self._policies,
            credential=lambda: cred,
            client=self.client,
            metrics=self.metrics,
            access_log=self.access_log,
            ext_authz=ext,
        )
        self.server = HboneServer(
            credentials=lambda _ip: cred,
            bundles=lambda: bundles,
            admit=self.proxy.admit,
            config=ServerConfig(),
        )
        port = o.hbone_port if o.hbone_port is not None else self.waypoint.hbone_port
        bound = await self.server.start(o.listen_host, port)
        self.bound["hbone"] = str(bound)
        self.fetcher = JwksFetcher(self.remote_jwks, refresh=o.jwks_refresh, on_result=self._jwks_result)
        await self.fetcher.refresh_now()
        self.fetcher.start()
        self.sites.append(await serve(build_metrics_app(self.metrics), *o.metrics))
        self.sites.append(await serve(build_readiness_app(self.ready), *o.readiness))
        self.sites.append(await serve(self._admin_app(), *o.admin))
        self._tasks.append(asyncio.get_running_loop().create_task(self._watch_config(stamp)))
        log.info(
            f"waypoint {self.waypoint.key} serving HBONE on {bound} as {self.waypoint.spiffe_id}",
            extra={"event": "waypoint_ready"},
        )

    def _store(self) -> WorkloadStore:
        assert self.store is not None
        return self.store

    def _policies(self) -> WaypointPolicies:
        assert self.policies is not None
        return self.policies

    def _jwks_result(self, uri: str, ok: bool) -> None:
        s = self.stores.get(uri)
        self.metrics.jwks_ready.labels(uri).set(1 if s is not None and s.current is not None else 0)
        if not ok:
            self.metrics.jwks_failures.labels(uri).inc()

    def ready(self) -> tuple[bool, list[str]]:
        reasons = []
        if self.server is None:
            reasons.append("HBONE server not started")
        cred = self.credential
        if cred is None:
            reasons.append("no credential")
        elif cred.chain[0].not_valid_after_utc <= dt.datetime.now(dt.UTC):
            reasons.append(f"credential for {cred.spiffe_id} expired")
        return (not reasons, reasons)

    def status(self) -> dict[str, Any]:
        wp = self.waypoint
        ok, reasons = self.ready()
        return {
            "role": "waypoint",
            "waypoint": wp.key if wp else None,
            "identity": str(wp.spiffe_id) if wp else None,
            "ready": ok,
            "reasons": reasons,
            "bound": self.bound,
            "config": {
                "digest": self.snapshot.digest if self.snapshot else None,
                "lastError": self.last_config_error,
            },
            "jwks": [s.state() for s in self.stores.values()],
            "hbone": dict(self.server.stats) if self.server else {},
        }

    def _admin_app(self) -> HttpApp:
        app = HttpApp()
        app.add_get("/status", lambda: json_response(self.status()))
        app.add_get(
            "/healthz/ready",
            lambda: Response(b"ready\n") if self.ready()[0] else Response(b"not ready\n", 503),
        )
        return app

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.fetcher is not None:
            await self.fetcher.stop()
        if self.server is not None:
            await self.server.drain(5.0)
        if self.client is not None:
            await self.client.close()
        if self.proxy is not None:
            await self.proxy.close()
        for s in self.sites:
            await s.close()
        self.access_log.close()


def ext_authz_providers(clients: Mapping[str, ExtAuthzHttpClient]) -> list[str]:
    return sorted(clients)


__all__ = ["StartupError", "WaypointOptions", "WaypointRole", "find_waypoint", "load_credential"]
