"""The agent's view of the mesh, indexed for the data path and updated one change at a time.

A :class:`WorkloadStore` is built once from a :class:`~mesh.model.Snapshot` and then follows the
mesh through :meth:`WorkloadStore.apply`, which takes a batch of
:data:`~mesh.model.MeshChange` and costs time in the size of the batch, not of the mesh:

* workloads are indexed by key, by IP, by node and by ``(namespace, label, value)``;
* services by key and by ``(VIP, port)``, and by one ``(namespace, label, value)`` pair of
  their selector, so a workload change re-matches only the services that could select it;
* endpoints and ``services_of`` are kept per service and per workload;
* the local node's enrolled workloads are a set of their own;
* the :class:`~policy.PolicyIndex` is rebuilt only when a policy or the root namespace changes
  (O(policies), never O(workloads)).

A batch is all-or-nothing: it is checked against the state it would produce (an IP owned by
two objects, a workload on an unknown node or outside its node's pod CIDR, this agent's node
deleted...) and either applied whole or refused with :class:`~mesh.errors.ChangeRefused`,
leaving the store untouched. :meth:`apply` returns :class:`AppliedChanges`, what the agent must
react to, so it never rescans the mesh.

Lookups the proxies make per connection are dict hits: workload by IP, service by (VIP, port),
policies selecting a destination workload (the PolicyIndex's per-workload cache). The store is
used from one event loop thread; :meth:`apply` does not yield, so no lookup sees half a batch.
"""

from __future__ import annotations

import enum
import itertools
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kube.names import NAMESPACE
from mesh.errors import ChangeRefused, ConfigIssue
from mesh.model import (
    USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NAMESPACE_LABEL,
    USE_WAYPOINT_NONE,
    Delete,
    IPAddress,
    Kind,
    MeshChange,
    MeshObject,
    MeshSettings,
    Node,
    PolicyDocument,
    Service,
    ServicePort,
    Snapshot,
    Upsert,
    Waypoint,
    WaypointFor,
    Workload,
    kind_of,
    parse_ip,
)
from mesh.parse import PolicyParser, default_policy_parser
from policy import PolicyIndex, PolicySet


class LoadBalancing(enum.Enum):
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"


@dataclass(frozen=True)
class Endpoint:
    """One backend chosen for a service connection."""

    workload: Workload
    ip: IPAddress
    port: int  # the target port on the workload

    @property
    def address(self) -> tuple[str, int]:
        return (str(self.ip), self.port)


class DestinationKind(enum.Enum):
    SERVICE = "service"  # a VIP: pick an endpoint first
    WORKLOAD = "workload"  # an enrolled mesh workload: HBONE to its node's agent
    UNENROLLED = "unenrolled"  # a known workload that is not in ambient: plaintext
    EXTERNAL = "external"  # outside the mesh: plaintext passthrough


@dataclass(frozen=True)
class MissingWaypoint:
    """A ``istio.io/use-waypoint`` label names a waypoint the mesh does not have."""

    namespace: str
    name: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _use_waypoint(labels: Mapping[str, str], namespace: str) -> tuple[str, str] | None:
    name = labels.get(USE_WAYPOINT_LABEL)
    if name is None:
        return None
    return labels.get(USE_WAYPOINT_NAMESPACE_LABEL, namespace), name


@dataclass(frozen=True)
class Route:
    """Where an outbound connection goes, decided from its original destination."""

    kind: DestinationKind
    address: tuple[str, int]  # the address to reach (endpoint ip:targetPort, or the original)
    workload: Workload | None = None
    node: Node | None = None  # destination workload's node (HBONE goes to its agent)
    service: Service | None = None
    service_port: ServicePort | None = None
    waypoint: Waypoint | MissingWaypoint | None = None  # traffic must go through this waypoint


@dataclass(frozen=True)
class AppliedChanges:
    """What one :meth:`WorkloadStore.apply` changed, for the agent to react to.

    * ``local_added`` / ``local_removed``: workloads that arrived on / left this node (moved,
      deleted, created); ``local_changed``: ``(old, new)`` of local workloads that stayed but
      changed. Enrolment is a field of the workload: compare ``old.enrolled``/``new.enrolled``,
      or use ``local_enrolled_changed``: the local enrolled set's members, IPs or identities
      changed (certificates, capture rules, HBONE listeners to sync).
    * ``recheck``: keys of workloads (anywhere) whose policy inputs changed or which left:
      labels, IPs, service account, enrolment, node. Open connections *to* a local workload in
      it, or *from* one of its (old or new) IPs, must be re-checked.
    * ``recheck_all``: policies or the root namespace changed: re-check every connection.
    * ``services_changed``: keys of services added, removed or changed;
      ``endpoints_changed``: keys of services whose endpoints may have changed (membership, or
      an endpoint's IPs).
    * ``policies_changed``: keys (``Kind/ns/name``) of policy documents added/removed/changed.
    * ``nodes_changed``, ``waypoints_changed``: keys; ``settings_changed``: the trust domain or
      the root namespace changed.
    """

    local_added: tuple[Workload, ...] = ()
    local_removed: tuple[Workload, ...] = ()
    local_changed: tuple[tuple[Workload, Workload], ...] = ()
    local_enrolled_changed: bool = False
    recheck: frozenset[str] = frozenset()
    recheck_all: bool = False
    services_changed: frozenset[str] = frozenset()
    endpoints_changed: frozenset[str] = frozenset()
    policies_changed: frozenset[str] = frozenset()
    nodes_changed: frozenset[str] = frozenset()
    waypoints_changed: frozenset[str] = frozenset()
    settings_changed: bool = False

    def __bool__(self) -> bool:
        return bool(
            self.local_added
            or self.local_removed
            or self.local_changed
            or self.recheck
            or self.services_changed
            or self.endpoints_changed
            or self.policies_changed
            or self.nodes_changed
            or self.waypoints_changed
            or self.settings_changed
        )


def _selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    # Kubernetes semantics: an empty selector on a Service selects nothing (endpoints are
    # managed by hand), so only non-empty selectors match.
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _selector_slot(s: Service) -> tuple[str, str, str] | None:
    """The one (namespace, key, value) a service is indexed under: every workload it selects
    carries this label, so a workload change re-matches only services filed under its labels."""
    if not s.selector:
        return None
    k = min(s.selector)
    return (s.namespace, k, s.selector[k])


def _owner(kind: Kind, key: str) -> str:
    return f"{kind.value.lower()} {key}"


_PLURAL = {
    Kind.NODE: "nodes",
    Kind.WORKLOAD: "workloads",
    Kind.SERVICE: "services",
    Kind.WAYPOINT: "waypoints",
    Kind.POLICY: "policies",
    Kind.SETTINGS: "settings",
}


@dataclass
class _Pending:
    obj: MeshObject | None  # the object after the batch; None: deleted
    deleted: bool  # a Delete for this key came in the batch (a later Upsert re-creates it)
    order: int  # index of the change that (re)inserted it: new objects go last in that order


@dataclass
class _Diffs:
    services_changed: set[str] = field(default_factory=set)
    endpoints_changed: set[str] = field(default_factory=set)


class WorkloadStore:
    """Indexes over the mesh, as seen from ``local_node``; see the module docstring."""

    def __init__(
        self,
        config: Snapshot,
        local_node: str,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        unhealthy_for: float = 10.0,
        policy_parser: PolicyParser | None = None,
    ) -> None:
        self.local_node = local_node
        node = config.node(local_node)
        if node is None:
            raise ChangeRefused(
                [
                    ConfigIssue(
                        config.source,
                        None,
                        Kind.NODE.value,
                        "nodes",
                        f"node {local_node!r} is not in the config (nodes: {[n.name for n in config.nodes]})",
                    )
                ]
            )
        self.node: Node = node
        self._rng = rng or random.Random()
        self._clock = clock
        self._unhealthy_for = unhealthy_for
        self._policy_parser: PolicyParser = policy_parser or default_policy_parser
        self._rr: dict[tuple[str, int], itertools.count[int]] = {}
        self._unhealthy: dict[tuple[str, int], float] = {}  # (ip, port) -> monotonic deadline
        self._source = config.source
        self._digest = config.digest
        self._settings = config.settings
        self._seq = itertools.count()
        self._snapshot: Snapshot | None = config  # materialized lazily after a change

        # Every index, filled here in one pass over the snapshot (the "rebuild" that apply()
        # must always agree with: tests/mesh/test_store_incremental.py checks it).
        self._nodes: dict[str, Node] = {n.name: n for n in config.nodes}
        self._ip_owner: dict[IPAddress, tuple[Kind, str]] = {
            n.address: (Kind.NODE, n.name) for n in config.nodes
        }
        self._workloads: dict[str, Workload] = {}
        self._wseq: dict[str, int] = {}
        self._by_ip: dict[IPAddress, Workload] = {}
        self._by_node: dict[str, dict[str, Workload]] = {}
        self._by_label: dict[tuple[str, str, str], dict[str, Workload]] = {}
        self._local_enrolled: dict[str, Workload] = {}
        for w in config.workloads:
            self._workloads[w.key] = w
            self._wseq[w.key] = next(self._seq)
            self._by_node.setdefault(w.node, {})[w.key] = w
            for ip in w.ips:
                self._by_ip[ip] = w
                self._ip_owner[ip] = (Kind.WORKLOAD, w.key)
            for k, v in w.labels.items():
                self._by_label.setdefault((w.namespace, k, v), {})[w.key] = w
            if w.enrolled and w.node == local_node:
                self._local_enrolled[w.key] = w
        self._services: dict[str, Service] = {}
        self._sseq: dict[str, int] = {}
        self._by_vip: dict[tuple[IPAddress, int], tuple[Service, ServicePort]] = {}
        self._by_selector: dict[tuple[str, str, str], dict[str, Service]] = {}
        self._endpoints: dict[str, dict[str, Workload]] = {}
        self._services_of: dict[str, dict[str, Service]] = {}
        for s in config.services:
            self._services[s.key] = s
            self._sseq[s.key] = next(self._seq)
            slot = _selector_slot(s)
            if slot is not None:
                self._by_selector.setdefault(slot, {})[s.key] = s
            # Candidates from the label index, not a scan of every workload: building the store
            # was O(services x workloads) (0.75 s at 1 000 x 10 000, bench/store_update_bench.py).
            eps = {
                wk: w
                for wk, w in (self._by_label.get(slot, {}) if slot is not None else {}).items()
                if _selector_matches(s.selector, w.labels)
            }
            self._endpoints[s.key] = eps
            for wk in eps:
                self._services_of.setdefault(wk, {})[s.key] = s
            for vip in s.vips:
                self._ip_owner[vip] = (Kind.SERVICE, s.key)
                for p in s.ports:
                    self._by_vip[(vip, p.port)] = (s, p)
        self._waypoints: dict[str, Waypoint] = {w.key: w for w in config.waypoints}
        self._policies: dict[str, PolicyDocument] = {p.key: p for p in config.policies}
        self._good_policies: dict[str, PolicyDocument] = {
            k: d for k, d in self._policies.items() if not self._policy_issues(d)
        }
        self._stale: dict[str, tuple[ConfigIssue, ...]] = {}
        # Sorted views, rebuilt on the first query after a change to what they cover.
        self._endpoints_view: dict[str, tuple[Workload, ...]] = {}
        self._services_of_view: dict[str, tuple[Service, ...]] = {}
        self._on_node_view: dict[str, tuple[Workload, ...]] = {}
        self._local_enrolled_view: tuple[Workload, ...] | None = None
        # The evaluable index (policy package): per-connection decisions read only the root
        # namespace's and the destination namespace's policies.
        self._parsed_policies: Any = config.parsed_policies
        self._policy_errors: tuple[ConfigIssue, ...] = config.policy_errors
        self.policy_index = self._policy_index_for(
            config.parsed_policies, config.root_namespace, config.source
        )

    @staticmethod
    def _policy_index_for(parsed: Any, root_namespace: str, source: str) -> PolicyIndex:
        # Anything but a PolicySet (a parser bug, a config built by hand) would give an empty
        # index, which allows everything: refuse the config instead (fail closed).
        if not isinstance(parsed, PolicySet):
            raise TypeError(
                f"{source}: parsed policies are {type(parsed).__name__}, not a PolicySet; "
                "refusing to build a policy index that would allow everything"
            )
        return PolicyIndex(parsed, root_namespace)

    # -- the whole mesh -----------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        """The mesh as one snapshot (built on demand after a change: O(mesh), for admin views)."""
        if self._snapshot is None:
            self._snapshot = Snapshot(
                trust_domain=self._settings.trust_domain,
                root_namespace=self._settings.root_namespace,
                nodes=tuple(self._nodes.values()),
                workloads=tuple(self._workloads.values()),
                services=tuple(self._services.values()),
                policies=tuple(self._policies.values()),
                source=self._source,
                digest=self._digest,
                parsed_policies=self._parsed_policies,
                policy_errors=self._policy_errors,
                waypoints=tuple(self._waypoints.values()),
                namespace_labels=self._settings.namespace_labels,
            )
        return self._snapshot

    @property
    def config(self) -> Snapshot:
        return self.snapshot

    @property
    def settings(self) -> MeshSettings:
        return self._settings

    @property
    def digest(self) -> str:
        return self._digest

    @property
    def policy_errors(self) -> tuple[ConfigIssue, ...]:
        return self._policy_errors

    # -- workloads ----------------------------------------------------------------------------

    def by_ip(self, ip: str | IPAddress) -> Workload | None:
        try:
            addr = parse_ip(ip) if isinstance(ip, str) else ip
        except ValueError:
            return None
        return self._by_ip.get(addr)

    def by_name(self, namespace: str, name: str) -> Workload | None:
        return self._workloads.get(f"{namespace}/{name}")

    def on_node(self, node: str) -> Sequence[Workload]:
        view = self._on_node_view.get(node)
        if view is None:
            view = self._on_node_view[node] = self._in_order(self._by_node.get(node, {}).values())
        return view

    @property
    def workloads(self) -> Sequence[Workload]:
        return tuple(self._workloads.values())

    @property
    def local_workloads(self) -> Sequence[Workload]:
        return self.on_node(self.local_node)

    @property
    def local_enrolled(self) -> Sequence[Workload]:
        """Workloads this agent captures, holds certificates for and serves HBONE for."""
        if self._local_enrolled_view is None:
            self._local_enrolled_view = self._in_order(self._local_enrolled.values())
        return self._local_enrolled_view

    def is_local_enrolled_ip(self, ip: str | IPAddress) -> Workload | None:
        w = self.by_ip(ip)
        return w if w is not None and w.enrolled and w.node == self.local_node else None

    def node_named(self, name: str) -> Node | None:
        return self._nodes.get(name)

    def _in_order(self, ws: Iterable[Workload]) -> tuple[Workload, ...]:
        # Snapshot order (a workload keeps its place when it changes; a new one goes last), so
        # that a store that followed changes answers exactly like one rebuilt from the result.
        return tuple(sorted(ws, key=lambda w: self._wseq[w.key]))

    # -- services and waypoints ---------------------------------------------------------------

    def service_at(self, ip: str | IPAddress, port: int) -> tuple[Service, ServicePort] | None:
        addr = self._addr(ip)
        return None if addr is None else self._by_vip.get((addr, port))

    def is_vip(self, ip: str | IPAddress) -> bool:
        addr = self._addr(ip)
        return addr is not None and self._ip_owner.get(addr, (None,))[0] is Kind.SERVICE

    def service(self, namespace: str, name: str) -> Service | None:
        return self._services.get(f"{namespace}/{name}")

    @property
    def services(self) -> Sequence[Service]:
        return tuple(self._services.values())

    def endpoints(self, service: Service) -> Sequence[Workload]:
        view = self._endpoints_view.get(service.key)
        if view is None:
            eps = self._endpoints.get(service.key)
            if eps is None:
                return ()
            view = self._endpoints_view[service.key] = self._in_order(eps.values())
        return view

    def services_of(self, workload: Workload) -> Sequence[Service]:
        view = self._services_of_view.get(workload.key)
        if view is None:
            svcs = self._services_of.get(workload.key, {}).values()
            view = self._services_of_view[workload.key] = tuple(sorted(svcs, key=lambda s: self._sseq[s.key]))
        return view

    def waypoint(self, namespace: str, name: str) -> Waypoint | None:
        return self._waypoints.get(f"{namespace}/{name}")

    def mark_unhealthy(self, ip: str | IPAddress, port: int) -> None:
        """Passive health: an endpoint that refused a connection is skipped for a while."""
        self._unhealthy[(str(ip), port)] = self._clock() + self._unhealthy_for

    def is_healthy(self, ip: str | IPAddress, port: int) -> bool:
        deadline = self._unhealthy.get((str(ip), port))
        if deadline is None:
            return True
        if self._clock() >= deadline:
            del self._unhealthy[(str(ip), port)]
            return True
        return False

    def pick_endpoint(
        self,
        service: Service,
        port: ServicePort,
        strategy: LoadBalancing = LoadBalancing.ROUND_ROBIN,
    ) -> Endpoint | None:
        """A healthy endpoint, or None when the service has none (the caller refuses).

        When every endpoint is marked unhealthy we still return one: passive health is a guess,
        and refusing all traffic because of a transient failure would turn a blip into an outage.
        """
        candidates = [Endpoint(w, ip, port.target_port) for w in self.endpoints(service) for ip in w.ips[:1]]
        if not candidates:
            return None
        healthy = [e for e in candidates if self.is_healthy(e.ip, e.port)] or candidates
        if strategy is LoadBalancing.RANDOM:
            return self._rng.choice(healthy)
        counter = self._rr.setdefault((service.key, port.port), itertools.count())
        return healthy[next(counter) % len(healthy)]

    # -- routing ------------------------------------------------------------------------------

    def waypoint_for(
        self, workload: Workload | None, service: Service | None
    ) -> Waypoint | MissingWaypoint | None:
        """The waypoint that must see traffic to ``service`` (a VIP) or, when ``service`` is
        None, to ``workload`` addressed by its own IP; None when the traffic goes direct.

        Istio's binding: the ``istio.io/use-waypoint`` label on the addressed object (the
        Service for service traffic, the pod for pod-IP traffic) wins over its namespace's; the
        value ``none`` opts the object out of its namespace's waypoint;
        ``istio.io/use-waypoint-namespace`` names the waypoint's namespace (default: the
        object's). A waypoint is only used for the traffic its ``istio.io/waypoint-for`` takes
        (service, workload, all; none takes nothing). A label naming a waypoint that does not
        exist yields :class:`MissingWaypoint`: the caller must refuse, since going direct would
        skip the L7 policy someone asked for (fail closed; istiod would leave it unbound).
        """
        if service is not None:
            labels, ns, wanted = service.labels, service.namespace, (WaypointFor.SERVICE, WaypointFor.ALL)
        elif workload is not None:
            labels, ns, wanted = workload.labels, workload.namespace, (WaypointFor.WORKLOAD, WaypointFor.ALL)
        else:
            return None
        ref = _use_waypoint(labels, ns)
        if ref is None:
            ref = _use_waypoint(self._settings.namespace_labels.get(ns, {}), ns)
        if ref is None or ref[1] == USE_WAYPOINT_NONE:
            return None
        wp = self._waypoints.get(f"{ref[0]}/{ref[1]}")
        if wp is None:
            return MissingWaypoint(ref[0], ref[1])
        return wp if wp.traffic_for in wanted else None

    def route(
        self,
        dst_ip: str,
        dst_port: int,
        strategy: LoadBalancing = LoadBalancing.ROUND_ROBIN,
    ) -> Route | None:
        """Where a captured outbound connection to (dst_ip, dst_port) goes.

        None means a service VIP with no endpoint: the connection must be refused.
        """
        svc = self.service_at(dst_ip, dst_port)
        if svc is not None:
            service, sport = svc
            ep = self.pick_endpoint(service, sport, strategy)
            if ep is None:
                return None
            return self._workload_route(ep.workload, ep.address, service=service, service_port=sport)
        if self.is_vip(dst_ip):
            return None  # a VIP on a port the service does not expose: nothing to connect to
        w = self.by_ip(dst_ip)
        if w is None:
            return Route(DestinationKind.EXTERNAL, (dst_ip, dst_port))
        return self._workload_route(w, (dst_ip, dst_port))

    def _workload_route(
        self,
        w: Workload,
        address: tuple[str, int],
        *,
        service: Service | None = None,
        service_port: ServicePort | None = None,
    ) -> Route:
        kind = DestinationKind.WORKLOAD if w.enrolled else DestinationKind.UNENROLLED
        return Route(
            kind,
            address,
            workload=w,
            node=self._nodes.get(w.node),
            service=service,
            service_port=service_port,
            waypoint=self.waypoint_for(w, service),
        )

    @staticmethod
    def _addr(ip: str | IPAddress) -> IPAddress | None:
        if not isinstance(ip, str):
            return ip
        try:
            return parse_ip(ip)
        except ValueError:
            return None

    # -- changes ------------------------------------------------------------------------------

    def apply(
        self, changes: Iterable[MeshChange], *, source: str | None = None, digest: str | None = None
    ) -> AppliedChanges:
        """Apply a batch of changes, all or nothing; raise :class:`ChangeRefused` (store
        untouched) if the result would break an invariant. ``source`` names the origin in
        errors and in the snapshot; ``digest`` is the version the batch brings the store to."""
        src = source if source is not None else self._source
        pending: dict[tuple[Kind, str], _Pending] = {}
        issues: list[ConfigIssue] = []
        for i, ch in enumerate(changes):
            if isinstance(ch, Upsert):
                k = (kind_of(ch.obj), ch.key)
                prev = pending.get(k)
                if prev is None:
                    pending[k] = _Pending(ch.obj, False, i)
                else:
                    pending[k] = _Pending(ch.obj, prev.deleted, i if prev.obj is None else prev.order)
            elif isinstance(ch, Delete):
                if ch.kind is Kind.SETTINGS:
                    issues.append(ConfigIssue(src, None, ch.kind.value, "settings", "cannot be deleted"))
                    continue
                pending[(ch.kind, ch.key)] = _Pending(None, True, i)
            else:
                raise TypeError(f"not a MeshChange: {ch!r}")
        # A source may resend an object unchanged (a Kubernetes resync does): nothing to do. A
        # policy sent again exactly as its good version in force ends that policy's refusal.
        recovered = {
            key
            for (kind, key), p in pending.items()
            if kind is Kind.POLICY
            and key in self._stale
            and not p.deleted
            and p.obj == self._stored(kind, key)
        }
        pending = {k: p for k, p in pending.items() if p.deleted or p.obj != self._stored(*k)}
        stale = self._keep_last_good(pending)
        issues.extend(self._check(pending, src))
        new_index: PolicyIndex | None = None
        parsed, errors = self._parsed_policies, self._policy_errors
        policy_touched = any(k[0] in (Kind.POLICY, Kind.SETTINGS) for k in pending)
        if not issues and policy_touched:
            # Built before anything changes: a parser that fails leaves the store as it was.
            docs = self._overlay_policies(pending)
            parsed, new_errors = self._policy_parser(docs)
            errors = tuple(new_errors)
            settings = self._cur(pending, Kind.SETTINGS, "")
            assert isinstance(settings, MeshSettings)
            new_index = self._policy_index_for(parsed, settings.root_namespace, src)
        if issues:
            raise ChangeRefused(issues)
        result = self._commit(pending)
        self._commit_last_good(pending, stale)
        for key in recovered:
            self._stale.pop(key, None)
        if new_index is not None:
            self.policy_index, self._parsed_policies, self._policy_errors = new_index, parsed, errors
        self._source = src
        if digest is not None:
            self._digest = digest
        self._snapshot = None
        return result

    # -- last good version, per policy ---------------------------------------------------------
    # One typo in one policy must not be an outage: a new version of a policy that fails to
    # parse is not applied when the store holds a good version of it; the good one stays in
    # force and the refusal is reported (``stale_policies``). Only a policy that never had a good
    # version goes in poisoned, enforced fail-closed. The same rule serves a Kubernetes watch,
    # where policies change one object at a time.

    def _policy_issues(self, doc: PolicyDocument) -> tuple[ConfigIssue, ...]:
        _parsed, issues = self._policy_parser([doc])
        return tuple(issues)

    def _keep_last_good(
        self, pending: dict[tuple[Kind, str], _Pending]
    ) -> dict[str, tuple[ConfigIssue, ...] | None]:
        """Swap refused new versions of good policies back to their good version, in place.
        Returns, per touched policy key, its refusal (kept last good) or None (good/deleted)."""
        verdicts: dict[str, tuple[ConfigIssue, ...] | None] = {}
        for (kind, key), p in list(pending.items()):
            if kind is not Kind.POLICY:
                continue
            if not isinstance(p.obj, PolicyDocument):
                verdicts[key] = None
                continue
            issues = self._policy_issues(p.obj)
            good = self._good_policies.get(key)
            if issues and good is not None:
                verdicts[key] = issues
                if good == self._policies.get(key):
                    del pending[(kind, key)]  # nothing changes: the good version is in force
                else:
                    pending[(kind, key)] = _Pending(good, p.deleted, p.order)
            else:
                verdicts[key] = issues or None
        return verdicts

    def _commit_last_good(
        self,
        pending: Mapping[tuple[Kind, str], _Pending],
        verdicts: Mapping[str, tuple[ConfigIssue, ...] | None],
    ) -> None:
        for key, refused in verdicts.items():
            p = pending.get((Kind.POLICY, key))
            if refused is not None and key in self._good_policies:
                self._stale[key] = refused
                continue
            self._stale.pop(key, None)
            if p is None or not isinstance(p.obj, PolicyDocument):
                self._good_policies.pop(key, None)
            elif refused is None:
                self._good_policies[key] = p.obj
            else:
                self._good_policies.pop(key, None)  # never good: in force poisoned (fail closed)

    @property
    def stale_policies(self) -> dict[str, tuple[ConfigIssue, ...]]:
        """Policies whose latest version was refused (``Kind/ns/name`` -> why); their last good
        version is in force."""
        return dict(self._stale)

    def _cur(self, pending: Mapping[tuple[Kind, str], _Pending], kind: Kind, key: str) -> MeshObject | None:
        """The object of ``kind``/``key`` as it would be after the batch."""
        p = pending.get((kind, key))
        if p is not None:
            return p.obj
        return self._stored(kind, key)

    def _stored(self, kind: Kind, key: str) -> MeshObject | None:
        table: Mapping[str, MeshObject]
        if kind is Kind.SETTINGS:
            return self._settings
        if kind is Kind.NODE:
            table = self._nodes
        elif kind is Kind.WORKLOAD:
            table = self._workloads
        elif kind is Kind.SERVICE:
            table = self._services
        elif kind is Kind.WAYPOINT:
            table = self._waypoints
        else:
            table = self._policies
        return table.get(key)

    def _overlay_policies(self, pending: Mapping[tuple[Kind, str], _Pending]) -> list[PolicyDocument]:
        merged: dict[str, PolicyDocument] = dict(self._policies)
        for (kind, key), p in pending.items():
            if kind is not Kind.POLICY:
                continue
            if p.deleted:
                merged.pop(key, None)
            if isinstance(p.obj, PolicyDocument):
                merged[key] = p.obj
        return list(merged.values())

    def _check(self, pending: Mapping[tuple[Kind, str], _Pending], src: str) -> list[ConfigIssue]:
        """Every invariant the batch would break, checked against the state after it, touching
        only the batch's objects (and a deleted or re-CIDRed node's own workloads)."""
        issues: list[ConfigIssue] = []

        def err(kind: Kind, key: str, fld: str, message: str) -> None:
            where = _PLURAL[kind] + (f"[{key}]" if kind is not Kind.SETTINGS else "")
            issues.append(ConfigIssue(src, None, kind.value, f"{where}.{fld}" if fld else where, message))

        settings = self._cur(pending, Kind.SETTINGS, "")
        assert isinstance(settings, MeshSettings)
        td = settings.trust_domain
        # IP claims of the batch's objects after it; an IP held by an untouched object is taken.
        claims: dict[IPAddress, tuple[Kind, str]] = {}

        def claim(ip: IPAddress, kind: Kind, key: str, fld: str, what: str) -> None:
            holder = claims.get(ip)
            if holder is None:
                stored = self._ip_owner.get(ip)
                if stored is not None and stored != (kind, key) and stored not in pending:
                    holder = stored
            if holder is not None and holder != (kind, key):
                err(kind, key, fld, f"{what} {ip} is already used by {_owner(*holder)}")
                return
            claims[ip] = (kind, key)

        for (kind, key), p in pending.items():
            obj = p.obj
            if obj is None:
                if kind is Kind.NODE:
                    if key == self.local_node:
                        err(kind, key, "", "is this agent's node: it cannot be deleted while the agent runs")
                    for wk in self._by_node.get(key, {}):
                        w = self._cur(pending, Kind.WORKLOAD, wk)
                        if isinstance(w, Workload) and w.node == key:
                            err(kind, key, "", f"workload {wk} still runs on it")
                continue
            if isinstance(obj, MeshSettings):
                ns_problem = NAMESPACE.check(obj.root_namespace)
                if ns_problem is not None:
                    err(kind, key, "rootNamespace", ns_problem)
                if obj.trust_domain != self._settings.trust_domain:
                    # Every identity changes with the trust domain: the one O(mesh) check, for a
                    # change that re-keys the whole mesh anyway.
                    for k2, o2 in [
                        *((Kind.WORKLOAD, wk) for wk in self._workloads),
                        *((Kind.WAYPOINT, wpk) for wpk in self._waypoints),
                    ]:
                        obj2 = self._cur(pending, k2, o2)
                        if isinstance(obj2, Workload | Waypoint) and obj2.spiffe_id.trust_domain != td:
                            err(k2, o2, "serviceAccount", f"identity {obj2.spiffe_id} is outside {td}")
            elif isinstance(obj, Node):
                claim(obj.address, kind, key, "address", "IP")
                old = self._nodes.get(key)
                if obj.pod_cidr is not None:
                    for other_key in {*self._nodes, *(k for (kd, k) in pending if kd is Kind.NODE)}:
                        other = self._cur(pending, Kind.NODE, other_key)
                        if (
                            other_key != key
                            and isinstance(other, Node)
                            and other.pod_cidr is not None
                            and obj.pod_cidr.overlaps(other.pod_cidr)
                        ):
                            err(
                                kind,
                                key,
                                "podCIDR",
                                f"{obj.pod_cidr} overlaps {other.pod_cidr} of {other_key!r}",
                            )
                    if old is None or old.pod_cidr != obj.pod_cidr:
                        for wk in self._by_node.get(key, {}):
                            if (Kind.WORKLOAD, wk) in pending:
                                continue  # checked with its own (new) version below
                            w = self._workloads[wk]
                            outside = [ip for ip in w.ips if ip not in obj.pod_cidr]
                            if outside:
                                err(
                                    kind,
                                    key,
                                    "podCIDR",
                                    f"workload {wk} has IP {outside[0]} outside {obj.pod_cidr}",
                                )
            elif isinstance(obj, Workload):
                node = self._cur(pending, Kind.NODE, obj.node)
                if not isinstance(node, Node):
                    err(kind, key, "node", f"unknown node {obj.node!r}")
                if not obj.ips:
                    err(kind, key, "ips", "a workload needs at least one IP")
                if obj.spiffe_id.trust_domain != td:
                    err(kind, key, "serviceAccount", f"identity {obj.spiffe_id} is outside trust domain {td}")
                for j, ip in enumerate(obj.ips):
                    if ip in obj.ips[:j]:
                        err(kind, key, f"ips[{j}]", f"IP {ip} is listed twice")
                        continue
                    if isinstance(node, Node) and node.pod_cidr is not None and ip not in node.pod_cidr:
                        err(
                            kind,
                            key,
                            f"ips[{j}]",
                            f"IP {ip} is outside podCIDR {node.pod_cidr} of node {node.name!r}",
                        )
                        continue
                    claim(ip, kind, key, f"ips[{j}]", "IP")
            elif isinstance(obj, Service):
                ports = [p.port for p in obj.ports]
                if len(set(ports)) != len(ports):
                    err(kind, key, "ports", "a port number is listed twice")
                for j, vip in enumerate(obj.vips):
                    if vip in obj.vips[:j]:
                        err(kind, key, f"vips[{j}]", f"VIP {vip} is listed twice")
                        continue
                    claim(vip, kind, key, f"vips[{j}]", "VIP")
            elif isinstance(obj, Waypoint) and obj.spiffe_id.trust_domain != td:
                err(kind, key, "serviceAccount", f"identity {obj.spiffe_id} is outside trust domain {td}")
        return issues

    def _commit(self, pending: Mapping[tuple[Kind, str], _Pending]) -> AppliedChanges:
        """Apply a checked batch: remove every touched object's old version from the indexes,
        then add the new versions (so swaps of IPs between objects need no ordering)."""
        d = _Diffs()
        by_kind: dict[Kind, list[tuple[str, _Pending]]] = {k: [] for k in Kind}
        # In the order the batch (re)inserts them, as applying it one change at a time would.
        for (kind, key), p in sorted(pending.items(), key=lambda kp: kp[1].order):
            by_kind[kind].append((key, p))
        old_w: dict[str, Workload] = {}
        for key, p in by_kind[Kind.WORKLOAD]:
            w = self._workloads.get(key)
            if w is not None:
                old_w[key] = w
                self._unindex_workload(w, d, forget=p.deleted or p.obj is None)
        old_s: dict[str, Service] = {}
        for key, p in by_kind[Kind.SERVICE]:
            s = self._services.get(key)
            if s is not None:
                old_s[key] = s
                self._unindex_service(s, forget=p.deleted or p.obj is None)
        nodes_changed: set[str] = set()
        for key, p in by_kind[Kind.NODE]:
            n_old = self._nodes.get(key)
            if n_old is not None:
                self._ip_owner.pop(n_old.address, None)
                if p.deleted or p.obj is None:
                    del self._nodes[key]
            if isinstance(p.obj, Node):
                self._nodes[key] = p.obj
                self._ip_owner[p.obj.address] = (Kind.NODE, key)
                if key == self.local_node:
                    self.node = p.obj
            if n_old != p.obj:
                nodes_changed.add(key)
        for key, p in by_kind[Kind.SERVICE]:
            if isinstance(p.obj, Service):
                self._index_service(p.obj, d)
            if old_s.get(key) != p.obj:
                d.services_changed.add(key)
                d.endpoints_changed.add(key)
        for _key, p in by_kind[Kind.WORKLOAD]:
            if isinstance(p.obj, Workload):
                self._index_workload(p.obj, d)
        waypoints_changed: set[str] = set()
        for key, p in by_kind[Kind.WAYPOINT]:
            old_wp = self._waypoints.get(key)
            if p.deleted:
                self._waypoints.pop(key, None)
            if isinstance(p.obj, Waypoint):
                self._waypoints[key] = p.obj
            if old_wp != p.obj:
                waypoints_changed.add(key)
        policies_changed: set[str] = set()
        for key, p in by_kind[Kind.POLICY]:
            old_p = self._policies.get(key)
            if p.deleted:
                self._policies.pop(key, None)
            if isinstance(p.obj, PolicyDocument):
                self._policies[key] = p.obj
            if old_p != p.obj:
                policies_changed.add(key)
        settings_changed = False
        for _key, p in by_kind[Kind.SETTINGS]:
            if isinstance(p.obj, MeshSettings) and p.obj != self._settings:
                self._settings, settings_changed = p.obj, True

        local = self.local_node
        added: list[Workload] = []
        removed: list[Workload] = []
        changed: list[tuple[Workload, Workload]] = []
        recheck: set[str] = set()
        enrolled_changed = False
        view_stale = False
        for key, p in by_kind[Kind.WORKLOAD]:
            old, new = old_w.get(key), p.obj if isinstance(p.obj, Workload) else None
            if old == new:
                continue
            recheck.add(key)
            was_local, is_local = old is not None and old.node == local, new is not None and new.node == local
            if was_local and is_local:
                assert old is not None and new is not None
                changed.append((old, new))
            elif was_local:
                assert old is not None
                removed.append(old)
            elif is_local:
                assert new is not None
                added.append(new)
            was_enrolled = was_local and old is not None and old.enrolled
            is_enrolled = is_local and new is not None and new.enrolled
            view_stale = view_stale or was_enrolled or is_enrolled
            if was_enrolled != is_enrolled or (
                was_enrolled
                and old is not None
                and new is not None
                and (old.ips, old.spiffe_id) != (new.ips, new.spiffe_id)
            ):
                enrolled_changed = True  # a certificate, a capture rule or a listener to change
        if view_stale:
            self._local_enrolled_view = None
        return AppliedChanges(
            local_added=tuple(added),
            local_removed=tuple(removed),
            local_changed=tuple(changed),
            local_enrolled_changed=enrolled_changed,
            recheck=frozenset(recheck),
            recheck_all=bool(policies_changed) or settings_changed,
            services_changed=frozenset(d.services_changed),
            endpoints_changed=frozenset(d.endpoints_changed),
            policies_changed=frozenset(policies_changed),
            nodes_changed=frozenset(nodes_changed),
            waypoints_changed=frozenset(waypoints_changed),
            settings_changed=settings_changed,
        )

    # Index maintenance: each touches one object and the services that can select it.

    def _unindex_workload(self, w: Workload, d: _Diffs, *, forget: bool) -> None:
        key = w.key
        for ip in w.ips:
            held = self._by_ip.get(ip)
            if held is not None and held.key == key:
                del self._by_ip[ip]
            if self._ip_owner.get(ip) == (Kind.WORKLOAD, key):
                del self._ip_owner[ip]
        on_node = self._by_node.get(w.node)
        if on_node is not None:
            on_node.pop(key, None)
            if not on_node:
                del self._by_node[w.node]
        self._on_node_view.pop(w.node, None)
        self._local_enrolled.pop(key, None)
        for k, v in w.labels.items():
            slot = self._by_label.get((w.namespace, k, v))
            if slot is not None:
                slot.pop(key, None)
                if not slot:
                    del self._by_label[(w.namespace, k, v)]
        for sk in self._services_of.pop(key, {}):
            self._endpoints[sk].pop(key, None)
            self._endpoints_view.pop(sk, None)
            d.endpoints_changed.add(sk)
        self._services_of_view.pop(key, None)
        if forget:
            del self._workloads[key]
            del self._wseq[key]

    def _index_workload(self, w: Workload, d: _Diffs) -> None:
        key = w.key
        self._workloads[key] = w
        if key not in self._wseq:
            self._wseq[key] = next(self._seq)
        for ip in w.ips:
            self._by_ip[ip] = w
            self._ip_owner[ip] = (Kind.WORKLOAD, key)
        self._by_node.setdefault(w.node, {})[key] = w
        self._on_node_view.pop(w.node, None)
        if w.enrolled and w.node == self.local_node:
            self._local_enrolled[key] = w
        for k, v in w.labels.items():
            self._by_label.setdefault((w.namespace, k, v), {})[key] = w
            for sk, s in self._by_selector.get((w.namespace, k, v), {}).items():
                if _selector_matches(s.selector, w.labels):
                    self._endpoints[sk][key] = w
                    self._endpoints_view.pop(sk, None)
                    self._services_of.setdefault(key, {})[sk] = s
                    d.endpoints_changed.add(sk)
        self._services_of_view.pop(key, None)

    def _unindex_service(self, s: Service, *, forget: bool) -> None:
        key = s.key
        for vip in s.vips:
            if self._ip_owner.get(vip) == (Kind.SERVICE, key):
                del self._ip_owner[vip]
            for p in s.ports:
                if self._by_vip.get((vip, p.port), (None,))[0] is s:
                    del self._by_vip[(vip, p.port)]
        slot = _selector_slot(s)
        if slot is not None:
            filed = self._by_selector.get(slot)
            if filed is not None:
                filed.pop(key, None)
                if not filed:
                    del self._by_selector[slot]
        for wk in self._endpoints.pop(key, {}):
            self._services_of[wk].pop(key, None)
            if not self._services_of[wk]:
                del self._services_of[wk]
            self._services_of_view.pop(wk, None)
        self._endpoints_view.pop(key, None)
        if forget:
            del self._services[key]
            del self._sseq[key]

    def _index_service(self, s: Service, d: _Diffs) -> None:
        key = s.key
        self._services[key] = s
        if key not in self._sseq:
            self._sseq[key] = next(self._seq)
        for vip in s.vips:
            self._ip_owner[vip] = (Kind.SERVICE, key)
            for p in s.ports:
                self._by_vip[(vip, p.port)] = (s, p)
        slot = _selector_slot(s)
        eps: dict[str, Workload] = {}
        if slot is not None:
            self._by_selector.setdefault(slot, {})[key] = s
            # Candidates: the workloads carrying the selector's indexed label, in that namespace.
            for wk, w in self._by_label.get(slot, {}).items():
                if _selector_matches(s.selector, w.labels):
                    eps[wk] = w
                    self._services_of.setdefault(wk, {})[key] = s
                    self._services_of_view.pop(wk, None)
        self._endpoints[key] = eps
        self._endpoints_view.pop(key, None)
        d.endpoints_changed.add(key)


def describe_workloads(store: WorkloadStore, ids: Iterable[Workload] | None = None) -> list[dict[str, Any]]:
    """JSON-friendly workload list for the admin API."""
    out = []
    for w in ids if ids is not None else store.workloads:
        out.append(
            {
                "name": w.name,
                "namespace": w.namespace,
                "serviceAccount": w.service_account,
                "node": w.node,
                "ips": [str(i) for i in w.ips],
                "labels": dict(w.labels),
                "enrolled": w.enrolled,
                "spiffeId": str(w.spiffe_id),
                "local": w.node == store.local_node,
                "services": [s.key for s in store.services_of(w)],
            }
        )
    return out
