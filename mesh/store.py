"""The agent's view of the mesh, indexed for the data path.

A :class:`WorkloadStore` is built from one :class:`~mesh.config.MeshConfig` and never mutated
afterwards except for endpoint health, so a config reload swaps the whole store atomically
(connections in flight keep the store they started with; the policy re-check after a reload
uses the new one).

Lookups the proxies make per connection are dict hits: workload by IP, service by (VIP, port),
policies selecting a destination workload (computed once per workload per config version, so
the cost of a decision does not grow with policies that select other workloads).
"""

from __future__ import annotations

import enum
import itertools
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mesh.config import IPAddress, MeshConfig, Node, Service, ServicePort, Workload, parse_ip
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
class Route:
    """Where an outbound connection goes, decided from its original destination."""

    kind: DestinationKind
    address: tuple[str, int]  # the address to reach (endpoint ip:targetPort, or the original)
    workload: Workload | None = None
    node: Node | None = None  # destination workload's node (HBONE goes to its agent)
    service: Service | None = None
    service_port: ServicePort | None = None
    waypoint: Any = None  # seam: set when traffic must go through a waypoint (later issue)


def _selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    # Kubernetes semantics: an empty selector on a Service selects nothing (endpoints are
    # managed by hand), so only non-empty selectors match.
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


class WorkloadStore:
    """Immutable indexes over one config, as seen from ``local_node``."""

    def __init__(
        self,
        config: MeshConfig,
        local_node: str,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        unhealthy_for: float = 10.0,
    ) -> None:
        self.config = config
        self.local_node = local_node
        node = config.node(local_node)
        if node is None:
            raise KeyError(
                f"node {local_node!r} is not in the config (nodes: {[n.name for n in config.nodes]})"
            )
        self.node: Node = node
        self._rng = rng or random.Random()
        self._clock = clock
        self._unhealthy_for = unhealthy_for
        self._by_ip: dict[IPAddress, Workload] = {}
        self._by_key: dict[str, Workload] = {}
        self._by_node: dict[str, list[Workload]] = {n.name: [] for n in config.nodes}
        self._nodes: dict[str, Node] = {n.name: n for n in config.nodes}
        for w in config.workloads:
            self._by_key[w.key] = w
            self._by_node[w.node].append(w)
            for ip in w.ips:
                self._by_ip[ip] = w
        self._by_vip: dict[tuple[IPAddress, int], tuple[Service, ServicePort]] = {}
        self._vips: set[IPAddress] = set()
        self._services: dict[str, Service] = {}
        self._endpoints: dict[str, tuple[Workload, ...]] = {}
        for s in config.services:
            self._services[s.key] = s
            self._endpoints[s.key] = tuple(
                w
                for w in config.workloads
                if w.namespace == s.namespace and _selector_matches(s.selector, w.labels)
            )
            for vip in s.vips:
                self._vips.add(vip)
                for p in s.ports:
                    self._by_vip[(vip, p.port)] = (s, p)
        self._rr: dict[tuple[str, int], itertools.count[int]] = {}
        self._unhealthy: dict[tuple[str, int], float] = {}  # (ip, port) -> monotonic deadline
        # The evaluable index (policy package): per-connection decisions read only the root
        # namespace's and the destination namespace's policies. Built with the store so a config
        # swap changes workloads and policies together.
        # Anything but a PolicySet (a parser bug, a config built by hand) would give an empty
        # index, which allows everything: refuse the config instead (fail closed).
        parsed = config.parsed_policies
        if not isinstance(parsed, PolicySet):
            raise TypeError(
                f"{config.source}: parsed policies are {type(parsed).__name__}, not a PolicySet; "
                "refusing to build a policy index that would allow everything"
            )
        self.policy_index = PolicyIndex(parsed, config.root_namespace)

    # -- workloads --------------------------------------------------------------------------

    def by_ip(self, ip: str | IPAddress) -> Workload | None:
        try:
            addr = parse_ip(ip) if isinstance(ip, str) else ip
        except ValueError:
            return None
        return self._by_ip.get(addr)

    def by_name(self, namespace: str, name: str) -> Workload | None:
        return self._by_key.get(f"{namespace}/{name}")

    def on_node(self, node: str) -> Sequence[Workload]:
        return tuple(self._by_node.get(node, ()))

    @property
    def workloads(self) -> Sequence[Workload]:
        return self.config.workloads

    @property
    def local_workloads(self) -> Sequence[Workload]:
        return self.on_node(self.local_node)

    @property
    def local_enrolled(self) -> Sequence[Workload]:
        """Workloads this agent captures, holds certificates for and serves HBONE for."""
        return tuple(w for w in self.local_workloads if w.enrolled)

    def is_local_enrolled_ip(self, ip: str | IPAddress) -> Workload | None:
        w = self.by_ip(ip)
        return w if w is not None and w.enrolled and w.node == self.local_node else None

    def node_named(self, name: str) -> Node | None:
        return self._nodes.get(name)

    # -- services ---------------------------------------------------------------------------

    def service_at(self, ip: str | IPAddress, port: int) -> tuple[Service, ServicePort] | None:
        addr = self._addr(ip)
        return None if addr is None else self._by_vip.get((addr, port))

    def is_vip(self, ip: str | IPAddress) -> bool:
        addr = self._addr(ip)
        return addr is not None and addr in self._vips

    def service(self, namespace: str, name: str) -> Service | None:
        return self._services.get(f"{namespace}/{name}")

    def endpoints(self, service: Service) -> Sequence[Workload]:
        return self._endpoints.get(service.key, ())

    def services_of(self, workload: Workload) -> Sequence[Service]:
        return tuple(s for s in self.config.services if workload in self._endpoints.get(s.key, ()))

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

    # -- routing ----------------------------------------------------------------------------

    def waypoint_for(self, workload: Workload | None, service: Service | None) -> Any:
        """Seam for the waypoint issue: the waypoint that must see this traffic, or None.

        It will consult namespace/service waypoint bindings from the config; until waypoints
        exist in the config format, no traffic goes through one.
        """
        return None

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

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _addr(ip: str | IPAddress) -> IPAddress | None:
        if not isinstance(ip, str):
            return ip
        try:
            return parse_ip(ip)
        except ValueError:
            return None


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
