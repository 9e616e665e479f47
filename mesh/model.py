"""The mesh model: immutable values for nodes, workloads, services, waypoints and policies, the
whole-mesh :class:`Snapshot`, and :data:`MeshChange`, one keyed upsert or delete.

A source (a config file, a Kubernetes watch) produces a snapshot once and then changes; the
store applies changes one object at a time (mesh/store.py), and mesh/diff.py turns two
snapshots into the changes between them. Pure: no I/O, clock or randomness.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from identity.spiffe import SpiffeId, TrustDomain
from mesh.errors import ConfigIssue

API_VERSION: Final = "ztagent.io/v1alpha1"
MESH_KIND: Final = "MeshConfig"
POLICY_API_VERSIONS: Final = ("security.istio.io/v1", "security.istio.io/v1beta1")
POLICY_KINDS: Final = ("AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication")
DEFAULT_ROOT_NAMESPACE: Final = "istio-system"
HBONE_PORT: Final = 15008
# Istio's waypoint binding (Gateway API + labels), read verbatim.
GATEWAY_API_VERSIONS: Final = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")
WAYPOINT_GATEWAY_CLASS: Final = "istio-waypoint"
USE_WAYPOINT_LABEL: Final = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE_LABEL: Final = "istio.io/use-waypoint-namespace"
WAYPOINT_FOR_LABEL: Final = "istio.io/waypoint-for"
USE_WAYPOINT_NONE: Final = "none"  # opts a service or workload out of its namespace's waypoint
_NO_LABELS: Final[Mapping[str, str]] = MappingProxyType({})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=4096)
def parse_ip(text: str) -> IPAddress:
    """``ipaddress.ip_address`` remembered: the same few pod IPs are parsed on every connection
    (peer, destination, policy input). Raises ValueError like ``ip_address`` (errors are not
    cached)."""
    return ipaddress.ip_address(text)


class Kind(enum.Enum):
    """The kinds of object a :data:`MeshChange` carries; the value is how errors name them."""

    SETTINGS = "MeshSettings"
    NODE = "Node"
    WORKLOAD = "Workload"
    SERVICE = "Service"
    WAYPOINT = "Waypoint"
    POLICY = "Policy"


@dataclass(frozen=True)
class MeshSettings:
    """The mesh-wide values (one per mesh; its key is ``""``). ``namespace_labels`` are the
    labels of the Kubernetes ``Namespace`` documents in the config (``istio.io/use-waypoint``);
    a namespace without a document has none."""

    trust_domain: TrustDomain
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    namespace_labels: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def key(self) -> str:
        return ""


@dataclass(frozen=True)
class Node:
    name: str
    address: IPAddress
    pod_cidr: IPNetwork | None = None

    @property
    def key(self) -> str:
        return self.name


@dataclass(frozen=True)
class Workload:
    name: str
    namespace: str
    service_account: str
    node: str
    ips: tuple[IPAddress, ...]
    labels: Mapping[str, str]
    enrolled: bool
    spiffe_id: SpiffeId

    @functools.cached_property
    def key(self) -> str:
        """``namespace/name``: how the CLI, admin and logs refer to a workload (formatted once:
        every connection's log fields name its workloads)."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int
    name: str | None = None
    protocol: str = "TCP"


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    vips: tuple[IPAddress, ...]
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str]
    # The Service's own labels (istio.io/use-waypoint).
    labels: Mapping[str, str] = field(default_factory=lambda: _NO_LABELS)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def hostname(self) -> str:
        """The Kubernetes service FQDN, used in Istio's ``destination_service`` label."""
        return f"{self.name}.{self.namespace}.svc.cluster.local"

    def port(self, number: int) -> ServicePort | None:
        for p in self.ports:
            if p.port == number:
                return p
        return None


class WaypointFor(enum.Enum):
    """Which traffic a waypoint handles (Istio's ``istio.io/waypoint-for``; default service)."""

    SERVICE = "service"
    WORKLOAD = "workload"
    ALL = "all"
    NONE = "none"


@dataclass(frozen=True)
class Waypoint:
    """An L7 proxy that traffic to bound services/workloads must go through (Istio ambient's
    waypoint Gateway). Parsed from the MeshConfig's ``waypoints:`` list; the routing that binds
    workloads and services to it is ``istio.io/use-waypoint`` (mesh/store.py ``waypoint_for``).
    Also read from a Gateway API ``Gateway`` of class ``istio-waypoint`` (mesh/parse.py)."""

    name: str
    namespace: str
    service_account: str
    addresses: tuple[IPAddress, ...]  # where its HBONE listener is reached
    spiffe_id: SpiffeId  # the identity the agent expects when it tunnels to it
    hbone_port: int = HBONE_PORT
    traffic_for: WaypointFor = WaypointFor.SERVICE

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class PolicyDocument:
    """One Istio policy document exactly as written, plus where it came from.

    ``raw`` is a deep read-only copy. The policy/ package turns these into evaluable policies;
    keeping the source text's location lets its errors name file and document like ours do.
    """

    kind: str
    api_version: str
    name: str
    namespace: str
    raw: Mapping[str, Any]
    file: str
    document: int  # index in the stream (for policies listed under MeshConfig.policies: the MeshConfig's)
    path: str  # "" for a top-level document, "policies[3]" for an embedded one

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


MeshObject = MeshSettings | Node | Workload | Service | Waypoint | PolicyDocument

_KIND_OF: Final[Mapping[type, Kind]] = {
    MeshSettings: Kind.SETTINGS,
    Node: Kind.NODE,
    Workload: Kind.WORKLOAD,
    Service: Kind.SERVICE,
    Waypoint: Kind.WAYPOINT,
    PolicyDocument: Kind.POLICY,
}


def kind_of(obj: MeshObject) -> Kind:
    return _KIND_OF[type(obj)]


@dataclass(frozen=True)
class Upsert:
    """Create or replace the object of this kind with this key."""

    obj: MeshObject

    @property
    def kind(self) -> Kind:
        return kind_of(self.obj)

    @property
    def key(self) -> str:
        return self.obj.key


@dataclass(frozen=True)
class Delete:
    """Remove the object of ``kind`` with ``key`` (the mesh settings cannot be deleted)."""

    kind: Kind
    key: str


MeshChange = Upsert | Delete


@dataclass(frozen=True)
class Snapshot:
    """The whole mesh at one version (what the config file describes)."""

    trust_domain: TrustDomain
    root_namespace: str
    nodes: tuple[Node, ...]
    workloads: tuple[Workload, ...]
    services: tuple[Service, ...]
    policies: tuple[PolicyDocument, ...]
    source: str = "<memory>"
    digest: str = ""  # sha256 of the source text: tells operators which version is serving
    # Parsed policies, as produced by the policy/ package (opaque here so the model does not
    # depend on policy's internal types). Set by parse_config when a parser is supplied.
    parsed_policies: Any = field(default=None, compare=False)
    # Spec errors of policy documents that are nonetheless in force, "poisoned" (enforced
    # fail-closed by the policy package: ALLOW allows nothing, DENY denies all it selects). They
    # do not refuse the config, because refusing would keep an older config whose policies lack
    # e.g. a new DENY: serving the poisoned policy is the safer reading (DESIGN.md §5).
    policy_errors: tuple[ConfigIssue, ...] = field(default=(), compare=False)
    waypoints: tuple[Waypoint, ...] = ()
    namespace_labels: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def settings(self) -> MeshSettings:
        return MeshSettings(self.trust_domain, self.root_namespace, self.namespace_labels)

    def node(self, name: str) -> Node | None:
        for n in self.nodes:
            if n.name == name:
                return n
        return None

    def objects(self) -> dict[Kind, dict[str, MeshObject]]:
        """Every object by kind and key, in snapshot order."""
        out: dict[Kind, dict[str, MeshObject]] = {Kind.SETTINGS: {"": self.settings}}
        for kind, items in (
            (Kind.NODE, self.nodes),
            (Kind.WORKLOAD, self.workloads),
            (Kind.SERVICE, self.services),
            (Kind.WAYPOINT, self.waypoints),
            (Kind.POLICY, self.policies),
        ):
            out[kind] = {o.key: o for o in items}
        return out


# The name the config file's document kind and older callers use for a snapshot.
MeshConfig = Snapshot


def freeze(value: Any) -> Any:
    """A deep read-only copy of plain YAML data (dict -> MappingProxyType, list -> tuple)."""
    if isinstance(value, dict):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Plain dicts/lists from a frozen raw document (for JSON output and for policy parsers)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value
