"""The Kubernetes API server as a :class:`~sources.base.ConfigSource`: list, then watch.

What is read (deploy/rbac.yaml grants exactly this, read-only):

* **Pods** -> :class:`~mesh.model.Workload` (IPs from ``status.podIPs``, ``spec.nodeName``,
  ``spec.serviceAccountName`` -> ``spiffe://<td>/ns/<ns>/sa/<sa>``, labels). Only pods that are
  ``Running``, or ``Pending`` with an IP, are workloads; ``hostNetwork`` pods are not (their IP is
  the node's). Pods are also where nodes come from: Nodes are not read (the agent's RBAC does not
  grant it), a node's address is its pods' ``status.hostIP`` and its pod CIDR is unknown (None).
* **Namespaces**: enrollment. A pod is captured when ``istio.io/dataplane-mode=ambient`` is on
  its namespace or on itself, and not when the pod says ``none`` (or carries a sidecar).
* **Services** -> :class:`~mesh.model.Service` (``spec.clusterIPs`` -> VIPs; ports; a named
  ``targetPort`` is resolved as the EndpointSlice controller resolved it (the slice's port of that
  name), else through a selected pod's container ports). **EndpointSlices** serve that lookup;
  endpoints themselves are the store's selector match over the pods.
* Gateway API **Gateways** of class ``istio-waypoint`` -> :class:`~mesh.model.Waypoint`
  (addresses from ``status.addresses``, else the ClusterIPs of the Service of the same name, as
  Istio creates it). Their labels (``istio.io/waypoint-for``) are kept; binding by
  ``istio.io/use-waypoint`` is the waypoint code's.
* Istio's ``security.istio.io/v1`` AuthorizationPolicy, PeerAuthentication and
  RequestAuthentication -> :class:`~mesh.model.PolicyDocument`, verbatim (``apiVersion``,
  ``kind``, ``metadata`` name/namespace/labels/annotations, ``spec``). A policy that does not
  parse keeps its last good version in force: the store does that per policy object.

An object that cannot be mapped is skipped, logged once per (object, reason) and counted
(:attr:`KubernetesConfigSource.skipped`, :attr:`unmappable_total`); it is never fatal.

The client is lightkube (``bench/k8s_client_rss.py``: +12 MiB RSS with a watch, against +27 MiB
for kr8s and +51 MiB for kubernetes_asyncio). Its own ``watch()`` is not used, deliberately: it
has no ``allowWatchBookmarks`` and its 410 handling drops the resourceVersion (an unbounded
re-watch from "now", which loses whatever happened in between). So each resource runs the loop
client-go's Reflector runs, built on lightkube's request builder and HTTP client:

1. LIST (pages of ``limit``, one consistent snapshot at the first page's resourceVersion);
2. WATCH from that resourceVersion with ``allowWatchBookmarks=true`` and a jittered
   ``timeoutSeconds``; every event and every BOOKMARK advances the resourceVersion;
3. a watch that ends or breaks (timeout, dropped connection, undecodable line) is re-opened from
   the last resourceVersion: the server replays exactly the events after it, so nothing is lost
   and nothing is seen twice;
4. ``410 Gone`` (an HTTP 410 or an ERROR event carrying one) re-LISTs; the relisted state
   replaces that resource's cache and one ChangeSet carries ``diff(last, relisted)``;
5. any other failure backs off exponentially with full jitter (time and randomness injected).

Mapping is pure (the ``map_*`` functions); the source keeps the raw objects and recomputes only
the mesh objects an event can affect (a namespace's pods on a namespace event, a namespace's
named-port services on a pod event, ...).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import httpx2 as httpx  # what lightkube 1.x is built on (the httpx fork)
from lightkube import AsyncClient, KubeConfig
from lightkube.core.generic_client import ALL_NS
from lightkube.core.resource import NamespacedResource
from lightkube.core.resource import Resource as LkResource
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Namespace as LkNamespace
from lightkube.resources.core_v1 import Pod as LkPod
from lightkube.resources.core_v1 import Service as LkService
from lightkube.resources.discovery_v1 import EndpointSlice as LkEndpointSlice

from identity.spiffe import SpiffeId, SpiffeIdError, TrustDomain
from mesh.diff import diff, summarize
from mesh.errors import ConfigError, ConfigIssue
from mesh.model import (
    DEFAULT_ROOT_NAMESPACE,
    HBONE_PORT,
    Delete,
    IPAddress,
    Kind,
    MeshChange,
    MeshObject,
    Node,
    PolicyDocument,
    Service,
    ServicePort,
    Snapshot,
    Upsert,
    Waypoint,
    WaypointFor,
    Workload,
    freeze,
)
from mesh.parse import PolicyParser, default_policy_parser
from sources.base import ChangeSet, SourceEvent

log = logging.getLogger("ztagent.config.kubernetes")

DATAPLANE_MODE: Final = "istio.io/dataplane-mode"
AMBIENT: Final = "ambient"
NONE: Final = "none"
WAYPOINT_FOR: Final = "istio.io/waypoint-for"
WAYPOINT_CLASS: Final = "istio-waypoint"
SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
SIDECAR_STATUS: Final = "sidecar.istio.io/status"

# The Istio and Gateway API kinds, as lightkube generic resources (lightkube ships models for
# Kubernetes' own kinds only).
AuthorizationPolicy = create_namespaced_resource(
    "security.istio.io", "v1", "AuthorizationPolicy", "authorizationpolicies"
)
PeerAuthentication = create_namespaced_resource(
    "security.istio.io", "v1", "PeerAuthentication", "peerauthentications"
)
RequestAuthentication = create_namespaced_resource(
    "security.istio.io", "v1", "RequestAuthentication", "requestauthentications"
)
Gateway = create_namespaced_resource("gateway.networking.k8s.io", "v1", "Gateway", "gateways")

# Watched resources by plural; the role picks a subset (the CA: pods and namespaces, its RBAC).
RESOURCES: Final[Mapping[str, type[LkResource]]] = {
    "namespaces": LkNamespace,
    "pods": LkPod,
    "services": LkService,
    "endpointslices": LkEndpointSlice,
    "gateways": Gateway,
    "authorizationpolicies": AuthorizationPolicy,
    "peerauthentications": PeerAuthentication,
    "requestauthentications": RequestAuthentication,
}
AGENT_RESOURCES: Final = tuple(RESOURCES)
CA_RESOURCES: Final = ("namespaces", "pods")
POLICY_RESOURCES: Final = {
    "authorizationpolicies": "AuthorizationPolicy",
    "peerauthentications": "PeerAuthentication",
    "requestauthentications": "RequestAuthentication",
}

Raw = Mapping[str, Any]
ObjKey = tuple[str, str]  # (namespace or "", name)

_DELETE_ORDER: Final = (Kind.POLICY, Kind.WAYPOINT, Kind.SERVICE, Kind.WORKLOAD, Kind.NODE)
_UPSERT_ORDER: Final = (Kind.NODE, Kind.WORKLOAD, Kind.SERVICE, Kind.WAYPOINT, Kind.POLICY)


class Unmappable(Exception):
    """An object that cannot become a mesh object; the message says which field and why."""


# -- pure mapping -----------------------------------------------------------------------------


def _meta(obj: Raw) -> Raw:
    m = obj.get("metadata")
    return m if isinstance(m, Mapping) else {}


def obj_key(obj: Raw) -> ObjKey:
    m = _meta(obj)
    return (str(m.get("namespace") or ""), str(m.get("name") or ""))


def _labels(obj: Raw) -> dict[str, str]:
    raw = _meta(obj).get("labels") or {}
    return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, Mapping) else {}


def _ip(text: Any, where: str) -> IPAddress:
    try:
        return ipaddress.ip_address(str(text))
    except ValueError:
        raise Unmappable(f"{where}: {text!r} is not an IP address") from None


def pod_ips(pod: Raw) -> tuple[IPAddress, ...]:
    status = pod.get("status") or {}
    out: list[IPAddress] = []
    for i, entry in enumerate(status.get("podIPs") or ()):
        ip = _ip((entry or {}).get("ip"), f"status.podIPs[{i}].ip")
        if ip not in out:
            out.append(ip)
    if not out and status.get("podIP"):
        out.append(_ip(status["podIP"], "status.podIP"))
    return tuple(out)


def pod_is_workload(pod: Raw) -> bool:
    """Running, or Pending with an IP, and not on the host's network."""
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    if spec.get("hostNetwork"):
        return False
    phase = status.get("phase")
    return phase == "Running" or (phase == "Pending" and bool(status.get("podIP") or status.get("podIPs")))


def enrolled(pod: Raw, namespace: Raw | None) -> bool:
    """Istio ambient's rule: the pod's own label decides if present (``none`` opts out), else the
    namespace's; a pod with an injected sidecar is never captured."""
    if SIDECAR_STATUS in (_meta(pod).get("annotations") or {}):
        return False
    mode = _labels(pod).get(DATAPLANE_MODE)
    if mode is not None:
        return mode == AMBIENT
    return namespace is not None and _labels(namespace).get(DATAPLANE_MODE) == AMBIENT


def map_pod(pod: Raw, namespace: Raw | None, td: TrustDomain) -> Workload | None:
    """The pod's workload, None when it is not one now; Unmappable when it should be but
    cannot."""
    if not pod_is_workload(pod):
        return None
    ns, name = obj_key(pod)
    spec = pod.get("spec") or {}
    node = spec.get("nodeName")
    if not node:
        raise Unmappable("spec.nodeName: a pod with an IP but no node")
    sa = str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default")
    ips = pod_ips(pod)
    if not ips:
        raise Unmappable("status.podIPs: no IP")
    try:
        sid = SpiffeId.for_workload(td, ns, sa)
    except SpiffeIdError as exc:
        raise Unmappable(f"spec.serviceAccountName: {exc}") from None
    return Workload(
        name=name,
        namespace=ns,
        service_account=sa,
        node=str(node),
        ips=ips,
        labels=freeze(_labels(pod)),
        enrolled=enrolled(pod, namespace),
        spiffe_id=sid,
    )


def pod_host(pod: Raw) -> tuple[str, IPAddress] | None:
    """(node name, node address) a pod reports, if it reports both."""
    node = (pod.get("spec") or {}).get("nodeName")
    host = (pod.get("status") or {}).get("hostIP")
    if not node or not host:
        return None
    try:
        return str(node), ipaddress.ip_address(str(host))
    except ValueError:
        return None


def _container_port(pods: Iterable[Raw], name: str) -> int | None:
    for pod in pods:
        for c in (pod.get("spec") or {}).get("containers") or ():
            for p in c.get("ports") or ():
                if p.get("name") == name and isinstance(p.get("containerPort"), int):
                    return int(p["containerPort"])
    return None


def map_service(svc: Raw, slices: Iterable[Raw], pods: Iterable[Raw]) -> tuple[Service | None, list[str]]:
    """The mesh service (None for ExternalName) and the problems of ports left out (a named
    targetPort no slice or selected pod resolves)."""
    ns, name = obj_key(svc)
    spec = svc.get("spec") or {}
    if spec.get("type") == "ExternalName":
        return None, []
    selector = {str(k): str(v) for k, v in (spec.get("selector") or {}).items()}
    ips = [x for x in (spec.get("clusterIPs") or [spec.get("clusterIP")]) if x and x != "None"]
    vips = tuple(_ip(x, "spec.clusterIPs") for x in ips)
    slice_ports: dict[str, int] = {}
    for sl in slices:
        for p in sl.get("ports") or ():
            if p.get("name") is not None and isinstance(p.get("port"), int):
                slice_ports.setdefault(str(p["name"]), int(p["port"]))
    selected = [p for p in pods if selector and all(_labels(p).get(k) == v for k, v in selector.items())]
    ports: list[ServicePort] = []
    problems: list[str] = []
    for i, p in enumerate(spec.get("ports") or ()):
        number = p.get("port")
        if not isinstance(number, int):
            raise Unmappable(f"spec.ports[{i}].port: {number!r} is not a port number")
        pname = p.get("name") or None
        target = p.get("targetPort", number)
        if isinstance(target, str) and not target.isdigit():
            resolved = slice_ports.get(pname or "")
            if resolved is None:
                resolved = _container_port(selected, target)
            if resolved is None:
                problems.append(
                    f"spec.ports[{i}].targetPort: named port {target!r} is on no EndpointSlice and "
                    "no selected pod (port left out)"
                )
                continue
            target = resolved
        ports.append(
            ServicePort(
                port=number, target_port=int(target), name=pname, protocol=str(p.get("protocol") or "TCP")
            )
        )
    return Service(
        name=name, namespace=ns, vips=vips, ports=tuple(ports), selector=freeze(selector)
    ), problems


def map_gateway(gw: Raw, service: Raw | None, td: TrustDomain) -> Waypoint | None:
    """A waypoint for a Gateway of class istio-waypoint (None for other classes)."""
    spec = gw.get("spec") or {}
    if spec.get("gatewayClassName") != WAYPOINT_CLASS:
        return None
    ns, name = obj_key(gw)
    traffic = _labels(gw).get(WAYPOINT_FOR, WaypointFor.SERVICE.value)
    try:
        traffic_for = WaypointFor(traffic)
    except ValueError:
        raise Unmappable(
            f"metadata.labels[{WAYPOINT_FOR}]: expected one of {[f.value for f in WaypointFor]}, "
            f"got {traffic!r}"
        ) from None
    addrs: list[IPAddress] = []
    for i, a in enumerate((gw.get("status") or {}).get("addresses") or ()):
        if (a.get("type") or "IPAddress") == "IPAddress":
            addrs.append(_ip(a.get("value"), f"status.addresses[{i}].value"))
    if not addrs and service is not None:
        sspec = service.get("spec") or {}
        for x in sspec.get("clusterIPs") or [sspec.get("clusterIP")]:
            if x and x != "None":
                addrs.append(_ip(x, f"Service {ns}/{name} spec.clusterIPs"))
    if not addrs:
        raise Unmappable("status.addresses: no address yet (and no Service of the same name)")
    port = HBONE_PORT
    for lst in spec.get("listeners") or ():
        if lst.get("protocol") == "HBONE" and isinstance(lst.get("port"), int):
            port = int(lst["port"])
    # Istio's waypoint Deployment runs as a service account named after the Gateway.
    try:
        sid = SpiffeId.for_workload(td, ns, name)
    except SpiffeIdError as exc:
        raise Unmappable(f"metadata.name: {exc}") from None
    return Waypoint(
        name=name,
        namespace=ns,
        service_account=name,
        addresses=tuple(addrs),
        spiffe_id=sid,
        hbone_port=port,
        traffic_for=traffic_for,
    )


def map_policy(obj: Raw, kind: str, origin: str) -> PolicyDocument:
    """The Istio document as written (status and server-set metadata dropped, so a status write
    or a resync is not a policy change)."""
    ns, name = obj_key(obj)
    meta = _meta(obj)
    keep = {k: meta[k] for k in ("name", "namespace", "labels", "annotations") if k in meta}
    api = str(obj.get("apiVersion") or "security.istio.io/v1")
    raw = {"apiVersion": api, "kind": kind, "metadata": keep}
    if "spec" in obj:
        raw["spec"] = obj["spec"]
    return PolicyDocument(
        kind=kind,
        api_version=api,
        name=name,
        namespace=ns,
        raw=freeze(json.loads(json.dumps(raw))),
        file=f"{origin}/{kind}/{ns}/{name}",
        document=0,
        path="",
    )


def trim_pod(pod: Raw) -> dict[str, Any]:
    """Only what the mapping reads (as a client-go informer's transform does). Measured with
    10 000 minimal pods from the stand-in (source + store in one process): +47 MB RSS untrimmed,
    +37 MB trimmed; real pods carry far more (managedFields, volumes, env, conditions)."""
    meta, spec, status = _meta(pod), pod.get("spec") or {}, pod.get("status") or {}
    ann = meta.get("annotations") or {}
    containers = [
        {
            "ports": [
                {"name": p.get("name"), "containerPort": p.get("containerPort")} for p in c.get("ports") or ()
            ]
        }
        for c in spec.get("containers") or ()
        if c.get("ports")
    ]
    return {
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "labels": meta.get("labels") or {},
            "annotations": {SIDECAR_STATUS: ann[SIDECAR_STATUS]} if SIDECAR_STATUS in ann else {},
            "resourceVersion": meta.get("resourceVersion"),
        },
        "spec": {
            k: spec[k]
            for k in ("nodeName", "hostNetwork", "serviceAccountName", "serviceAccount")
            if k in spec
        }
        | {"containers": containers},
        "status": {k: status[k] for k in ("phase", "podIP", "podIPs", "hostIP") if k in status},
    }


_TRIM: Final[Mapping[str, Callable[[Raw], Raw]]] = {"pods": trim_pod}


# -- the source -------------------------------------------------------------------------------


class Gone(Exception):
    """410: the resourceVersion is older than the server's history; relist."""


class ApiFailure(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason = code, reason


def _status_error(body: Any, fallback_code: int) -> ApiFailure | Gone:
    if not isinstance(body, Mapping):
        body = {}
    code = int(body.get("code") or fallback_code)
    if code == 410:
        return Gone(str(body.get("message") or "410 Gone"))
    return ApiFailure(code, str(body.get("reason") or ""), str(body.get("message") or ""))


@dataclass
class _Watched:
    plural: str
    res: type[LkResource]
    rv: str = ""
    items: dict[ObjKey, Raw] | None = None


ClientFactory = Callable[[], AsyncClient]
Sleep = Callable[[float], Awaitable[None]]


def client_factory(kubeconfig: str | os.PathLike[str] | None = None) -> ClientFactory:
    """A lightkube client from ``kubeconfig``, or in-cluster / ``$KUBECONFIG`` credentials."""

    def make() -> AsyncClient:
        if kubeconfig is not None:
            return AsyncClient(config=KubeConfig.from_file(os.fspath(kubeconfig)))
        return AsyncClient()

    return make


class KubernetesConfigSource:
    """List-then-watch of the cluster, as a ConfigSource (see the module docstring)."""

    def __init__(
        self,
        client: ClientFactory | str | os.PathLike[str] | None = None,
        *,
        trust_domain: TrustDomain | str,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        cluster_id: str = "Kubernetes",
        resources: Iterable[str] = AGENT_RESOURCES,
        page_size: int = 500,
        watch_timeout: tuple[float, float] = (300.0, 600.0),
        backoff: tuple[float, float] = (0.5, 30.0),
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
        policy_parser: PolicyParser | None = None,
    ) -> None:
        self._factory = client if callable(client) else client_factory(client)
        self.trust_domain = (
            trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain(trust_domain)
        )
        self.root_namespace = root_namespace
        self.cluster_id = cluster_id
        wanted = tuple(resources)
        unknown = [r for r in wanted if r not in RESOURCES]
        if unknown:
            raise ValueError(f"resources: unknown {unknown} (known: {list(RESOURCES)})")
        self._watched = {p: _Watched(p, RESOURCES[p]) for p in wanted}
        self._page_size = page_size
        self._watch_timeout = watch_timeout
        self._backoff = backoff
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._policy_parser = policy_parser or default_policy_parser
        self._client: AsyncClient | None = None
        self._view: dict[Kind, dict[str, MeshObject]] = {k: {} for k in _UPSERT_ORDER}
        self._pods_by_ns: dict[str, set[ObjKey]] = {}
        self._hosts: dict[str, dict[ObjKey, IPAddress]] = {}  # node -> pod -> hostIP
        self._slices_of: dict[ObjKey, set[ObjKey]] = {}  # service -> its EndpointSlices
        self._skipped: dict[tuple[str, ObjKey], str] = {}
        self.unmappable_total = 0
        self.events_total = 0
        self.relists_total = 0
        self.watch_restarts_total = 0
        self._snapshot: Snapshot | None = None

    # -- public -------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return f"k8s:{self.cluster_id}"

    @property
    def skipped(self) -> dict[str, str]:
        """Objects left out now and why: ``"pods/ns/name" -> reason``."""
        return {f"{p}/{k[0]}/{k[1]}".replace("//", "/"): why for (p, k), why in self._skipped.items()}

    @property
    def resource_versions(self) -> dict[str, str]:
        """The resourceVersion each watch resumes from (advanced by events and bookmarks)."""
        return {p: w.rv for p, w in self._watched.items()}

    def raw(self, plural: str, namespace: str, name: str) -> Raw | None:
        """The last seen object (e.g. the CA looks up a token's pod for its ``spec.nodeName``)."""
        items = self._watched[plural].items
        return None if items is None else items.get((namespace, name))

    async def initial(self) -> Snapshot:
        try:
            if self._client is None:
                self._client = self._factory()
        except Exception as exc:  # lightkube's ConfigError, an unreadable kubeconfig, ...
            raise ConfigError(
                [
                    ConfigIssue(
                        self.name, None, None, "", f"no API server credentials: {type(exc).__name__}: {exc}"
                    )
                ]
            ) from None
        try:
            listed = await asyncio.gather(*(self._list(w) for w in self._watched.values()))
        except (ApiFailure, Gone, httpx.HTTPError, ValueError) as exc:
            raise ConfigError(
                [ConfigIssue(self.name, None, None, "", f"cannot list from the API server: {exc}")]
            ) from None
        for w, (items, rv) in zip(self._watched.values(), listed, strict=True):
            w.items, w.rv = items, rv
        self._rebuild()
        self._snapshot = self._make_snapshot(self._max_rv())
        return self._snapshot

    async def changes(self) -> AsyncIterator[SourceEvent]:
        if self._snapshot is None:
            raise RuntimeError(f"{self.name}: initial() has not succeeded yet")
        queue: asyncio.Queue[tuple[str, str, Any, str]] = asyncio.Queue()
        tasks = [asyncio.ensure_future(self._run_watch(w, queue)) for w in self._watched.values()]
        try:
            while True:
                plural, ev_type, obj, rv = await queue.get()
                changes = (
                    self._relisted(plural, obj) if ev_type == "RELIST" else self._event(plural, ev_type, obj)
                )
                self.events_total += 1
                # A node is known while a pod reports it; its removal goes in a set of its own,
                # after the pods': a consumer that refuses it (the store never deletes its own
                # node) still takes the pod changes.
                gone = [c for c in changes if isinstance(c, Delete) and c.kind is Kind.NODE]
                rest = [c for c in changes if not (isinstance(c, Delete) and c.kind is Kind.NODE)]
                for part in (rest, gone):
                    if not part:
                        continue
                    log.info(
                        f"{self.name}: {summarize(part)}",
                        extra={
                            "event": "config_reloaded",
                            "source": self.name,
                            "digest": rv,
                            "changes": len(part),
                        },
                    )
                    yield ChangeSet(tuple(part), self.name, rv)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- HTTP: list and watch through lightkube's request builder ----------------------------

    @property
    def _http(self) -> Any:
        assert self._client is not None
        return self._client._client  # lightkube's GenericAsyncClient (request builder + httpx)

    def _request(self, res: type[LkResource], *, watch: bool, params: dict[str, Any]) -> Any:
        ns = ALL_NS if issubclass(res, NamespacedResource) else None
        br = self._http.prepare_request("list", res, namespace=ns, watch=watch, params=params)
        if watch:
            # The server ends the watch after timeoutSeconds and sends bookmarks meanwhile; a
            # connection silent for longer than that is dead (a lost peer sends no FIN).
            br.timeout = httpx.Timeout(10.0, read=float(params["timeoutSeconds"]) + 30.0)
        return self._http.build_adapter_request(br)

    async def _list(self, w: _Watched) -> tuple[dict[ObjKey, Raw], str]:
        """One consistent LIST, page by page; restarts from the first page if a continue token
        expires (410) between pages."""
        items: dict[ObjKey, Raw] = {}
        cont: str | None = None
        rv = ""
        while True:
            params: dict[str, Any] = {"limit": self._page_size}
            if cont:
                params["continue"] = cont
            resp = await self._http.send(self._request(w.res, watch=False, params=params))
            body = resp.json()
            if resp.status_code == 410 and cont:
                items, cont = {}, None
                continue
            if resp.status_code != 200:
                raise _status_error(body, resp.status_code)
            trim = _TRIM.get(w.plural)
            for it in body.get("items") or ():
                items[obj_key(it)] = trim(it) if trim is not None else it
            meta = body.get("metadata") or {}
            rv = rv or str(meta.get("resourceVersion") or "")
            cont = meta.get("continue") or None
            if not cont:
                return items, str(meta.get("resourceVersion") or rv)

    async def _watch_stream(self, w: _Watched) -> AsyncIterator[tuple[str, Raw]]:
        lo, hi = self._watch_timeout
        params = {
            "resourceVersion": w.rv,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": int(lo + (hi - lo) * self._rng.random()),
        }
        resp = await self._http.send(self._request(w.res, watch=True, params=params), stream=True)
        try:
            if resp.status_code != 200:
                await resp.aread()
                try:
                    body = resp.json()
                except ValueError:
                    body = {}
                raise _status_error(body, resp.status_code)
            async for line in resp.aiter_lines():
                if not line.strip():
                    continue
                ev = json.loads(line)  # a torn line: ValueError, the watch is re-opened
                yield str(ev.get("type")), ev.get("object") or {}
        finally:
            await resp.aclose()

    async def _run_watch(self, w: _Watched, queue: asyncio.Queue[tuple[str, str, Any, str]]) -> None:
        failures = 0
        while True:
            try:
                async for ev_type, obj in self._watch_stream(w):
                    if ev_type == "ERROR":
                        raise _status_error(obj, 500)
                    rv = str(_meta(obj).get("resourceVersion") or "")
                    if ev_type == "BOOKMARK":
                        w.rv = rv or w.rv
                        continue
                    if ev_type not in ("ADDED", "MODIFIED", "DELETED"):
                        continue
                    w.rv = rv or w.rv
                    trim = _TRIM.get(w.plural)
                    queue.put_nowait((w.plural, ev_type, trim(obj) if trim is not None else obj, w.rv))
                    failures = 0
                # A watch that timed out server-side: resume from where it stood.
                self.watch_restarts_total += 1
                failures = 0
            except asyncio.CancelledError:
                raise
            except Gone as exc:
                log.info(
                    f"{self.name}: {w.plural} watch at resourceVersion {w.rv} expired ({exc}); relisting",
                    extra={"event": "k8s_relist", "resource": w.plural},
                )
                try:
                    items, rv = await self._list(w)
                except (ApiFailure, Gone, httpx.HTTPError, ValueError) as exc2:
                    failures += 1
                    await self._pause(w, failures, exc2)
                    continue
                self.relists_total += 1
                w.rv = rv
                queue.put_nowait((w.plural, "RELIST", items, rv))
                failures = 0
            except Exception as exc:  # a watch must outlive any one failure
                # ApiFailure, httpx errors, torn JSON lines; anything else is a bug, logged with
                # its traceback by _pause, and the watch still resumes (fail loud, keep serving).
                self.watch_restarts_total += 1
                failures += 1
                await self._pause(w, failures, exc)

    async def _pause(self, w: _Watched, failures: int, exc: BaseException) -> None:
        """Full-jitter exponential backoff (what client-go's backoff manager does)."""
        base, cap = self._backoff
        delay = self._rng.uniform(0, min(cap, base * 2 ** (failures - 1)))
        expected = isinstance(exc, ApiFailure | Gone | httpx.HTTPError | ValueError)
        log.warning(
            f"{self.name}: {w.plural} watch failed ({type(exc).__name__}: {exc}); retrying from "
            f"resourceVersion {w.rv} in {delay:.2f}s",
            exc_info=None if expected else exc,
            extra={"event": "k8s_watch_error", "resource": w.plural, "attempt": failures},
        )
        await self._sleep(delay)

    # -- the view: raw objects -> mesh objects ------------------------------------------------

    def _items(self, plural: str) -> dict[ObjKey, Raw]:
        w = self._watched.get(plural)
        return {} if w is None or w.items is None else w.items

    def _max_rv(self) -> str:
        rvs = [w.rv for w in self._watched.values() if w.rv]
        return max(rvs, key=lambda r: (len(r), r)) if rvs else ""

    def _report(self, plural: str, key: ObjKey, why: str | None) -> None:
        k = (plural, key)
        if why is None:
            self._skipped.pop(k, None)
            return
        if self._skipped.get(k) == why:
            return
        self._skipped[k] = why
        self.unmappable_total += 1
        log.warning(
            f"{self.name}: {plural} {key[0]}/{key[1]} left out: {why}".replace(" /", " "),
            extra={
                "event": "k8s_unmappable",
                "resource": plural,
                "object": "/".join(key).strip("/"),
                "reason": why,
            },
        )

    def _compute_workload(self, key: ObjKey) -> Workload | None:
        pod = self._items("pods").get(key)
        if pod is None:
            self._report("pods", key, None)
            return None
        ns = self._items("namespaces").get(("", key[0]))
        try:
            w = map_pod(pod, ns, self.trust_domain)
        except Unmappable as exc:
            self._report("pods", key, str(exc))
            return None
        self._report("pods", key, None)
        return w

    def _compute_node(self, node: str) -> Node | None:
        hosts = self._hosts.get(node)
        if not hosts:
            return None
        counts: dict[IPAddress, int] = {}
        for ip in hosts.values():
            counts[ip] = counts.get(ip, 0) + 1
        # Pods of one node agree on its address; while they do not (the node's IP changed), the
        # address most of them report wins, ties to the higher address: deterministic on relist.
        address = max(counts, key=lambda ip: (counts[ip], int(ip)))
        return Node(name=node, address=address, pod_cidr=None)

    def _pods_in(self, ns: str) -> list[Raw]:
        pods = self._items("pods")
        return [pods[k] for k in sorted(self._pods_by_ns.get(ns, ())) if k in pods]

    def _compute_service(self, key: ObjKey) -> Service | None:
        svc = self._items("services").get(key)
        if svc is None:
            self._report("services", key, None)
            return None
        all_slices = self._items("endpointslices")
        slices = [all_slices[k] for k in sorted(self._slices_of.get(key, ())) if k in all_slices]
        try:
            s, problems = map_service(svc, slices, self._pods_in(key[0]))
        except Unmappable as exc:
            self._report("services", key, str(exc))
            return None
        self._report("services", key, "; ".join(problems) or None)
        return s

    def _compute_waypoint(self, key: ObjKey) -> Waypoint | None:
        gw = self._items("gateways").get(key)
        if gw is None:
            self._report("gateways", key, None)
            return None
        try:
            wp = map_gateway(gw, self._items("services").get(key), self.trust_domain)
        except Unmappable as exc:
            self._report("gateways", key, str(exc))
            return None
        self._report("gateways", key, None)
        return wp

    def _compute_policy(self, plural: str, key: ObjKey) -> PolicyDocument | None:
        obj = self._items(plural).get(key)
        return None if obj is None else map_policy(obj, POLICY_RESOURCES[plural], self.name)

    def _index_pod(self, key: ObjKey, pod: Raw | None) -> set[str]:
        """Update the per-namespace and per-node pod indexes; returns the nodes touched."""
        touched: set[str] = set()
        for node, hosts in list(self._hosts.items()):
            if hosts.pop(key, None) is not None:
                touched.add(node)
                if not hosts:
                    del self._hosts[node]
        if pod is None:
            self._pods_by_ns.get(key[0], set()).discard(key)
            return touched
        self._pods_by_ns.setdefault(key[0], set()).add(key)
        host = pod_host(pod)
        if host is not None:
            self._hosts.setdefault(host[0], {})[key] = host[1]
            touched.add(host[0])
        return touched

    def _index_slice(self, key: ObjKey, sl: Raw | None) -> set[ObjKey]:
        """Update the service -> slices index; returns the services touched."""
        touched = {svc for svc, keys in self._slices_of.items() if key in keys}
        for svc in touched:
            self._slices_of[svc].discard(key)
            if not self._slices_of[svc]:
                del self._slices_of[svc]
        name = _labels(sl).get(SERVICE_NAME_LABEL) if sl is not None else None
        if name:
            self._slices_of.setdefault((key[0], name), set()).add(key)
            touched.add((key[0], name))
        return touched

    def _named_port_services(self, ns: str) -> list[ObjKey]:
        """Services of ``ns`` with a named targetPort: the ones a pod event can re-resolve."""
        out = []
        for k, svc in self._items("services").items():
            if k[0] != ns:
                continue
            ports = (svc.get("spec") or {}).get("ports") or ()
            if any(isinstance(p.get("targetPort"), str) and not p["targetPort"].isdigit() for p in ports):
                out.append(k)
        return sorted(out)

    def _rebuild(self) -> None:
        """Every mesh object from the raw caches (initial LIST, and after a relist)."""
        self._pods_by_ns, self._hosts, self._slices_of = {}, {}, {}
        for key, pod in self._items("pods").items():
            self._index_pod(key, pod)
        for key, sl in self._items("endpointslices").items():
            self._index_slice(key, sl)
        view: dict[Kind, dict[str, MeshObject]] = {k: {} for k in _UPSERT_ORDER}

        def put(obj: MeshObject | None) -> None:
            if obj is not None:
                view[_kind(obj)][obj.key] = obj

        for node in sorted(self._hosts):
            put(self._compute_node(node))
        for key in sorted(self._items("pods")):
            put(self._compute_workload(key))
        for key in sorted(self._items("services")):
            put(self._compute_service(key))
        for key in sorted(self._items("gateways")):
            put(self._compute_waypoint(key))
        for plural in POLICY_RESOURCES:
            for key in sorted(self._items(plural)):
                put(self._compute_policy(plural, key))
        # Objects gone since: forget their reports.
        for plural, key in list(self._skipped):
            if key not in self._items(plural):
                self._skipped.pop((plural, key), None)
        self._view = view

    def _make_snapshot(self, digest: str, *, parse: bool = True) -> Snapshot:
        policies = tuple(o for o in self._view[Kind.POLICY].values() if isinstance(o, PolicyDocument))
        # A snapshot only diffed (relist) needs no compiled policies: the consumer compiles.
        parsed, errors = self._policy_parser(policies) if parse else (None, ())
        return Snapshot(
            trust_domain=self.trust_domain,
            root_namespace=self.root_namespace,
            nodes=tuple(o for o in self._view[Kind.NODE].values() if isinstance(o, Node)),
            workloads=tuple(o for o in self._view[Kind.WORKLOAD].values() if isinstance(o, Workload)),
            services=tuple(o for o in self._view[Kind.SERVICE].values() if isinstance(o, Service)),
            policies=policies,
            source=self.name,
            digest=digest,
            parsed_policies=parsed,
            policy_errors=tuple(errors),
            waypoints=tuple(o for o in self._view[Kind.WAYPOINT].values() if isinstance(o, Waypoint)),
        )

    def _relisted(self, plural: str, items: dict[ObjKey, Raw]) -> list[MeshChange]:
        before = self._make_snapshot("", parse=False)
        self._watched[plural].items = items
        self._rebuild()
        return diff(before, self._make_snapshot("", parse=False))

    def _event(self, plural: str, ev_type: str, obj: Raw) -> list[MeshChange]:
        items = self._watched[plural].items
        assert items is not None
        key = obj_key(obj)
        if ev_type == "DELETED":
            items.pop(key, None)
        else:
            items[key] = obj
        current = items.get(key)
        new: dict[tuple[Kind, str], MeshObject | None] = {}

        def recompute(kind: Kind, mkey: str, obj2: MeshObject | None) -> None:
            new[(kind, mkey)] = obj2

        def services(keys: Iterable[ObjKey]) -> None:
            for skey in keys:
                recompute(Kind.SERVICE, f"{skey[0]}/{skey[1]}", self._compute_service(skey))

        if plural == "pods":
            for node in self._index_pod(key, current):
                recompute(Kind.NODE, node, self._compute_node(node))
            recompute(Kind.WORKLOAD, f"{key[0]}/{key[1]}", self._compute_workload(key))
            services(self._named_port_services(key[0]))  # may resolve through this pod
        elif plural == "namespaces":
            for pkey in sorted(self._pods_by_ns.get(key[1], ())):
                recompute(Kind.WORKLOAD, f"{pkey[0]}/{pkey[1]}", self._compute_workload(pkey))
        elif plural == "services":
            recompute(Kind.SERVICE, f"{key[0]}/{key[1]}", self._compute_service(key))
            if key in self._items("gateways"):
                recompute(Kind.WAYPOINT, f"{key[0]}/{key[1]}", self._compute_waypoint(key))
        elif plural == "endpointslices":
            services(sorted(self._index_slice(key, current)))
        elif plural == "gateways":
            recompute(Kind.WAYPOINT, f"{key[0]}/{key[1]}", self._compute_waypoint(key))
        else:
            doc = self._compute_policy(plural, key)
            recompute(Kind.POLICY, f"{POLICY_RESOURCES[plural]}/{key[0]}/{key[1]}", doc)
        return self._changes(new)

    def _changes(self, new: Mapping[tuple[Kind, str], MeshObject | None]) -> list[MeshChange]:
        deletes: dict[Kind, list[MeshChange]] = {k: [] for k in _DELETE_ORDER}
        upserts: dict[Kind, list[MeshChange]] = {k: [] for k in _UPSERT_ORDER}
        for (kind, mkey), obj in new.items():
            old = self._view[kind].get(mkey)
            if obj is None:
                if old is not None:
                    del self._view[kind][mkey]
                    deletes[kind].append(Delete(kind, mkey))
            elif old != obj:
                self._view[kind][mkey] = obj
                upserts[kind].append(Upsert(obj))
        out: list[MeshChange] = []
        for k in _DELETE_ORDER:
            out.extend(deletes[k])
        for k in _UPSERT_ORDER:
            out.extend(upserts[k])
        return out


def _kind(obj: MeshObject) -> Kind:
    return Upsert(obj).kind
