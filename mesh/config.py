"""The local config file: one YAML stream -> an immutable, validated :class:`MeshConfig`.

Format (docs/contracts.md): exactly one document of ``kind: MeshConfig`` describing nodes,
workloads and services; every other document (and every entry of the MeshConfig's optional
``policies:`` list) is an Istio ``security.istio.io`` policy taken verbatim.

Validation is strict because the agent enforces security from this file: an unknown key is
usually a typo that would otherwise silently drop a restriction, so it is an error, and so are
duplicate YAML keys (PyYAML would keep the last one). Every error names the file, the document
(0-based index in the stream, plus its kind) and the field path, e.g.::

    mesh.yaml: document 0 (MeshConfig): workloads[1].ips[0]: '10.244.1.300' is not an IP address

:func:`parse_config` is pure (text in, model or :class:`ConfigError` out); :func:`load_config`
reads a file; :class:`FileConfigSource` watches one and delivers each good version, keeping the
last good one when an update is bad. :class:`ConfigSource` is the seam for a future Kubernetes
source.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import hashlib
import ipaddress
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import yaml

from identity.spiffe import SpiffeId, SpiffeIdError, TrustDomain
from policy.parse import join_path, type_name

log = logging.getLogger("ztagent.config")

API_VERSION: Final = "ztagent.io/v1alpha1"
MESH_KIND: Final = "MeshConfig"
POLICY_API_VERSIONS: Final = ("security.istio.io/v1", "security.istio.io/v1beta1")
POLICY_KINDS: Final = ("AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)
def parse_ip(text: str) -> IPAddress:
    """``ipaddress.ip_address`` remembered: the same few pod IPs are parsed on every connection
    (peer, destination, policy input). Raises ValueError like ``ip_address`` (errors are not
    cached)."""
    return ipaddress.ip_address(text)
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Kubernetes object names we use as namespaces / workload names / service accounts: DNS-1123
# labels (namespaces) and subdomains (names). Checking them keeps SPIFFE IDs and metric labels sane.
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# Kubernetes label keys: optional DNS prefix + "/" + name; values: <= 63 chars of [A-Za-z0-9._-].
_LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


# --------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class ConfigIssue:
    """One thing wrong with a config: where (file, document, field path) and what."""

    file: str
    document: int | None  # 0-based index in the YAML stream; None for whole-stream problems
    kind: str | None  # the document's kind, when known, to help a reader find it
    path: str  # field path inside the document, e.g. "workloads[1].ips[0]"; "" for the document
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.document is not None:
            where += f": document {self.document}"
            if self.kind:
                where += f" ({self.kind})"
        if self.path:
            where += f": {self.path}"
        return f"{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "document": self.document,
            "kind": self.kind,
            "path": self.path,
            "message": self.message,
        }


class ConfigError(Exception):
    """A config was refused; ``issues`` lists every problem found (at least one)."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        assert issues, "ConfigError needs at least one issue"
        self.issues: tuple[ConfigIssue, ...] = tuple(issues)
        lines = [str(i) for i in self.issues]
        super().__init__(lines[0] if len(lines) == 1 else f"{len(lines)} errors:\n  " + "\n  ".join(lines))


# --------------------------------------------------------------------------------------------
# Model (immutable)


@dataclass(frozen=True)
class Node:
    name: str
    address: IPAddress
    pod_cidr: IPNetwork | None = None


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


@dataclass(frozen=True)
class MeshConfig:
    trust_domain: TrustDomain
    root_namespace: str
    nodes: tuple[Node, ...]
    workloads: tuple[Workload, ...]
    services: tuple[Service, ...]
    policies: tuple[PolicyDocument, ...]
    source: str = "<memory>"
    digest: str = ""  # sha256 of the source text: tells operators which version is serving
    # Parsed policies, as produced by the policy/ package (opaque here so config does not
    # depend on policy's internal types). Set by parse_config when a parser is supplied.
    parsed_policies: Any = field(default=None, compare=False)
    # Spec errors of policy documents that are nonetheless in force, "poisoned" (enforced
    # fail-closed by the policy package: ALLOW allows nothing, DENY denies all it selects). They
    # do not refuse the config, because refusing would keep an older config whose policies lack
    # e.g. a new DENY: serving the poisoned policy is the safer reading (DESIGN.md §5).
    policy_errors: tuple[ConfigIssue, ...] = field(default=(), compare=False)

    def node(self, name: str) -> Node | None:
        for n in self.nodes:
            if n.name == name:
                return n
        return None


# --------------------------------------------------------------------------------------------
# YAML loading with duplicate-key detection


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of silently keeping the last."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "mapping key is not hashable", key_node.start_mark
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = loader.construct_object(value_node, deep=deep)
    return seen


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Plain dicts/lists from a frozen raw document (for JSON output and for policy parsers)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# Validation


class _Ctx:
    """Collects issues for one document so we report all of them, not just the first."""

    def __init__(self, file: str, document: int | None, kind: str | None, issues: list[ConfigIssue]) -> None:
        self.file, self.document, self.kind, self.issues = file, document, kind, issues

    def err(self, path: str, message: str) -> None:
        self.issues.append(ConfigIssue(self.file, self.document, self.kind, path, message))


def _mapping(
    ctx: _Ctx, path: str, v: Any, *, required: set[str], optional: set[str]
) -> dict[str, Any] | None:
    if not isinstance(v, dict):
        ctx.err(path, f"expected a mapping, got {type_name(v)}")
        return None
    ok = True
    for k in v:
        if not isinstance(k, str):
            ctx.err(path, f"key {k!r} is not a string")
            ok = False
        elif k not in required and k not in optional:
            allowed = ", ".join(sorted(required | optional))
            ctx.err(join_path(path, k), f"unknown field (allowed: {allowed})")
            ok = False
    for k in sorted(required):
        if k not in v:
            ctx.err(join_path(path, k), "required field is missing")
            ok = False
    return v if ok else None


def _str(ctx: _Ctx, path: str, v: Any, pattern: re.Pattern[str] | None = None, what: str = "") -> str | None:
    if not isinstance(v, str) or v == "":
        ctx.err(
            path, f"expected a non-empty string, got {type_name(v)}" if not isinstance(v, str) else "is empty"
        )
        return None
    if pattern is not None and not pattern.fullmatch(v):
        ctx.err(path, f"{v!r} is not a valid {what}")
        return None
    return v


def _name(ctx: _Ctx, path: str, v: Any) -> str | None:
    s = _str(ctx, path, v, _DNS1123_SUBDOMAIN, "name (lowercase RFC 1123 subdomain)")
    if s is not None and len(s) > 253:
        ctx.err(path, "is longer than 253 characters")
        return None
    return s


def _namespace(ctx: _Ctx, path: str, v: Any) -> str | None:
    s = _str(ctx, path, v, _DNS1123_LABEL, "namespace (lowercase RFC 1123 label)")
    if s is not None and len(s) > 63:
        ctx.err(path, "is longer than 63 characters")
        return None
    return s


def _ip(ctx: _Ctx, path: str, v: Any) -> IPAddress | None:
    if not isinstance(v, str):
        ctx.err(path, f"expected an IP address string, got {type_name(v)}")
        return None
    try:
        return ipaddress.ip_address(v)
    except ValueError:
        ctx.err(path, f"{v!r} is not an IP address")
        return None


def _cidr(ctx: _Ctx, path: str, v: Any) -> IPNetwork | None:
    if not isinstance(v, str):
        ctx.err(path, f"expected a CIDR string, got {type_name(v)}")
        return None
    try:
        return ipaddress.ip_network(v, strict=True)
    except ValueError as exc:
        # strict=True refuses host bits: "10.244.1.1/24" is almost certainly a typo for a pod CIDR.
        ctx.err(path, f"{v!r} is not a CIDR ({exc})")
        return None


def _labels(ctx: _Ctx, path: str, v: Any) -> Mapping[str, str] | None:
    if v is None:
        return MappingProxyType({})
    if not isinstance(v, dict):
        ctx.err(path, f"expected a mapping of label to value, got {type_name(v)}")
        return None
    out: dict[str, str] = {}
    ok = True
    for k, val in v.items():
        p = join_path(path, str(k))
        if not isinstance(k, str):
            ctx.err(path, f"label key {k!r} is not a string")
            ok = False
            continue
        prefix, _, name = k.rpartition("/")
        if (
            not _LABEL_NAME.fullmatch(name)
            or len(name) > 63
            or (prefix and not _DNS1123_SUBDOMAIN.fullmatch(prefix))
        ):
            ctx.err(p, f"{k!r} is not a valid label key")
            ok = False
            continue
        if not isinstance(val, str):
            # YAML turns `version: 1` or `on: yes` into numbers/booleans; Kubernetes requires strings.
            ctx.err(p, f"label value must be a string, got {type_name(val)} (quote it)")
            ok = False
            continue
        if len(val) > 63 or not _LABEL_VALUE.fullmatch(val):
            ctx.err(p, f"{val!r} is not a valid label value")
            ok = False
            continue
        out[k] = val
    return MappingProxyType(out) if ok else None


def _list(ctx: _Ctx, path: str, v: Any, *, allow_missing: bool = True) -> list[Any]:
    if v is None and allow_missing:
        return []
    if not isinstance(v, list):
        ctx.err(path, f"expected a list, got {type_name(v)}")
        return []
    return v


def _port(ctx: _Ctx, path: str, v: Any) -> int | None:
    if isinstance(v, bool) or not isinstance(v, int):
        ctx.err(path, f"expected a port number, got {type_name(v)}")
        return None
    if not 1 <= v <= 65535:
        ctx.err(path, f"port {v} is out of range 1-65535")
        return None
    return v


def _parse_nodes(ctx: _Ctx, raw: Any) -> list[Node]:
    nodes: list[Node] = []
    names: dict[str, str] = {}
    addrs: dict[IPAddress, str] = {}
    for i, item in enumerate(_list(ctx, "nodes", raw)):
        p = f"nodes[{i}]"
        m = _mapping(ctx, p, item, required={"name", "address"}, optional={"podCIDR"})
        if m is None:
            continue
        name = _name(ctx, join_path(p, "name"), m["name"])
        addr = _ip(ctx, join_path(p, "address"), m["address"])
        cidr = _cidr(ctx, join_path(p, "podCIDR"), m["podCIDR"]) if m.get("podCIDR") is not None else None
        if name is not None and name in names:
            ctx.err(join_path(p, "name"), f"duplicate node name {name!r} (also {names[name]})")
            continue
        if addr is not None and addr in addrs:
            ctx.err(join_path(p, "address"), f"duplicate node address {addr} (also {addrs[addr]})")
            continue
        if name is None or addr is None or (m.get("podCIDR") is not None and cidr is None):
            continue
        names[name] = p
        addrs[addr] = p
        nodes.append(Node(name=name, address=addr, pod_cidr=cidr))
    # Overlapping pod CIDRs would make "which node hosts this IP" ambiguous.
    for a_i, a in enumerate(nodes):
        for b in nodes[a_i + 1 :]:
            if a.pod_cidr and b.pod_cidr and a.pod_cidr.overlaps(b.pod_cidr):
                ctx.err("nodes", f"podCIDR {a.pod_cidr} of {a.name!r} overlaps {b.pod_cidr} of {b.name!r}")
    return nodes


def _parse_workloads(
    ctx: _Ctx, raw: Any, td: TrustDomain | None, nodes: Mapping[str, Node], ip_owner: dict[IPAddress, str]
) -> list[Workload]:
    out: list[Workload] = []
    keys: dict[str, str] = {}
    for i, item in enumerate(_list(ctx, "workloads", raw)):
        p = f"workloads[{i}]"
        m = _mapping(
            ctx,
            p,
            item,
            required={"name", "namespace", "node", "ips"},
            optional={"serviceAccount", "labels", "enrolled"},
        )
        if m is None:
            continue
        n_issues = len(ctx.issues)
        name = _name(ctx, join_path(p, "name"), m["name"])
        ns = _namespace(ctx, join_path(p, "namespace"), m["namespace"])
        # Kubernetes' default service account, as a pod without serviceAccountName gets.
        sa = _name(ctx, join_path(p, "serviceAccount"), m.get("serviceAccount", "default"))
        node_name = _str(ctx, join_path(p, "node"), m["node"])
        node = nodes.get(node_name) if node_name else None
        if node_name is not None and node is None:
            known = ", ".join(sorted(nodes)) or "none defined"
            ctx.err(join_path(p, "node"), f"unknown node {node_name!r} (nodes: {known})")
        labels = _labels(ctx, join_path(p, "labels"), m.get("labels"))
        enrolled = m.get("enrolled", True)
        if not isinstance(enrolled, bool):
            ctx.err(join_path(p, "enrolled"), f"expected true or false, got {type_name(enrolled)}")
        ips: list[IPAddress] = []
        raw_ips = _list(ctx, join_path(p, "ips"), m["ips"], allow_missing=False)
        if isinstance(m["ips"], list) and not raw_ips:
            ctx.err(join_path(p, "ips"), "a workload needs at least one IP")
        for j, rip in enumerate(raw_ips):
            ip = _ip(ctx, join_path(join_path(p, "ips"), j), rip)
            if ip is None:
                continue
            if ip in ip_owner:
                ctx.err(join_path(join_path(p, "ips"), j), f"IP {ip} is already used by {ip_owner[ip]}")
                continue
            if node is not None and node.pod_cidr is not None and ip not in node.pod_cidr:
                ctx.err(
                    join_path(join_path(p, "ips"), j),
                    f"IP {ip} is outside podCIDR {node.pod_cidr} of node {node.name!r}",
                )
                continue
            ip_owner[ip] = f"workload {ns}/{name}"
            ips.append(ip)
        if len(ctx.issues) != n_issues or None in (name, ns, sa, node) or td is None:
            continue
        assert name and ns and sa and node and labels is not None and isinstance(enrolled, bool)
        key = f"{ns}/{name}"
        if key in keys:
            ctx.err(join_path(p, "name"), f"duplicate workload {key} (also {keys[key]})")
            continue
        keys[key] = p
        try:
            sid = SpiffeId.for_workload(td, ns, sa)
        except SpiffeIdError as exc:
            ctx.err(p, f"cannot form a SPIFFE ID: {exc}")
            continue
        out.append(
            Workload(
                name=name,
                namespace=ns,
                service_account=sa,
                node=node.name,
                ips=tuple(ips),
                labels=labels,
                enrolled=enrolled,
                spiffe_id=sid,
            )
        )
    return out


def _parse_services(ctx: _Ctx, raw: Any, ip_owner: dict[IPAddress, str]) -> list[Service]:
    out: list[Service] = []
    keys: dict[str, str] = {}
    for i, item in enumerate(_list(ctx, "services", raw)):
        p = f"services[{i}]"
        m = _mapping(ctx, p, item, required={"name", "namespace", "vips", "ports"}, optional={"selector"})
        if m is None:
            continue
        n_issues = len(ctx.issues)
        name = _name(ctx, join_path(p, "name"), m["name"])
        ns = _namespace(ctx, join_path(p, "namespace"), m["namespace"])
        selector = _labels(ctx, join_path(p, "selector"), m.get("selector"))
        vips: list[IPAddress] = []
        raw_vips = _list(ctx, join_path(p, "vips"), m["vips"], allow_missing=False)
        if isinstance(m["vips"], list) and not raw_vips:
            ctx.err(join_path(p, "vips"), "a service needs at least one VIP")
        for j, rv in enumerate(raw_vips):
            vp = join_path(join_path(p, "vips"), j)
            vip = _ip(ctx, vp, rv)
            if vip is None:
                continue
            if vip in ip_owner:
                ctx.err(vp, f"VIP {vip} is already used by {ip_owner[vip]}")
                continue
            ip_owner[vip] = f"service {ns}/{name}"
            vips.append(vip)
        ports: list[ServicePort] = []
        seen_ports: set[int] = set()
        seen_names: set[str] = set()
        raw_ports = _list(ctx, join_path(p, "ports"), m["ports"], allow_missing=False)
        if isinstance(m["ports"], list) and not raw_ports:
            ctx.err(join_path(p, "ports"), "a service needs at least one port")
        for j, rp in enumerate(raw_ports):
            pp = join_path(join_path(p, "ports"), j)
            pm = _mapping(ctx, pp, rp, required={"port"}, optional={"targetPort", "name", "protocol"})
            if pm is None:
                continue
            port = _port(ctx, join_path(pp, "port"), pm["port"])
            target = _port(ctx, join_path(pp, "targetPort"), pm.get("targetPort", pm["port"]))
            pname = pm.get("name")
            if pname is not None:
                pname = _str(ctx, join_path(pp, "name"), pname, _DNS1123_LABEL, "port name")
                if pname is not None and pname in seen_names:
                    ctx.err(join_path(pp, "name"), f"duplicate port name {pname!r}")
                    continue
            protocol = pm.get("protocol", "TCP")
            if protocol != "TCP":
                # The agent proxies TCP only (like ztunnel); accepting UDP would promise capture we don't do.
                ctx.err(join_path(pp, "protocol"), f"only TCP is supported, got {protocol!r}")
                continue
            if port is None or target is None:
                continue
            if port in seen_ports:
                ctx.err(join_path(pp, "port"), f"duplicate port {port}")
                continue
            seen_ports.add(port)
            if pname:
                seen_names.add(pname)
            ports.append(ServicePort(port=port, target_port=target, name=pname, protocol="TCP"))
        if len(ctx.issues) != n_issues or name is None or ns is None or selector is None:
            continue
        key = f"{ns}/{name}"
        if key in keys:
            ctx.err(join_path(p, "name"), f"duplicate service {key} (also {keys[key]})")
            continue
        keys[key] = p
        out.append(Service(name=name, namespace=ns, vips=tuple(vips), ports=tuple(ports), selector=selector))
    return out


def _policy_doc(ctx: _Ctx, path: str, raw: Any, document: int) -> PolicyDocument | None:
    """Check the envelope of an Istio policy document; its spec is the policy/ package's job."""
    if not isinstance(raw, dict):
        ctx.err(path, f"expected a policy document (mapping), got {type_name(raw)}")
        return None
    kind = raw.get("kind")
    api = raw.get("apiVersion")
    ok = True
    if kind not in POLICY_KINDS:
        ctx.err(
            join_path(path, "kind"), f"unsupported kind {kind!r} (expected one of {', '.join(POLICY_KINDS)})"
        )
        ok = False
    if api not in POLICY_API_VERSIONS:
        ctx.err(
            join_path(path, "apiVersion"),
            f"unsupported apiVersion {api!r} (expected {' or '.join(POLICY_API_VERSIONS)})",
        )
        ok = False
    meta = raw.get("metadata")
    name = ns = None
    if not isinstance(meta, dict):
        ctx.err(join_path(path, "metadata"), "required mapping with name and namespace is missing")
        ok = False
    else:
        name = _name(ctx, join_path(path, "metadata.name"), meta.get("name"))
        ns = _namespace(ctx, join_path(path, "metadata.namespace"), meta.get("namespace"))
    if not ok or name is None or ns is None:
        return None
    assert isinstance(kind, str) and isinstance(api, str)
    return PolicyDocument(
        kind=kind,
        api_version=api,
        name=name,
        namespace=ns,
        raw=_freeze(raw),
        file=ctx.file,
        document=document,
        path=path,
    )


# A policy parser takes the envelope-checked documents and returns (parsed, issues), where the
# issues are spec errors of policies that ``parsed`` still enforces fail-closed (they become
# MeshConfig.policy_errors, not a refusal). It is a parameter so config does not hard-wire the
# policy package's API (and tests can pass their own).
PolicyParser = Callable[[Sequence[PolicyDocument]], tuple[Any, Sequence[ConfigIssue]]]


def parse_config(
    text: str,
    *,
    file: str = "<config>",
    policy_parser: PolicyParser | None = None,
) -> MeshConfig:
    """Parse and validate one config stream; raise :class:`ConfigError` listing every problem.

    Pure: no I/O. ``policy_parser`` (default: :func:`default_policy_parser`, which uses the
    policy/ package) validates and compiles the Istio policy documents; their spec errors do not
    raise but land on ``policy_errors`` (the poisoned policies are enforced fail-closed), while
    structure, YAML and envelope (kind, apiVersion, metadata) errors do raise.
    """
    issues: list[ConfigIssue] = []
    try:
        docs = list(yaml.load_all(text, Loader=_StrictLoader))
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        # PyYAML's constructors raise plain ValueError (`2024-02-30`, `!!int x`) and its composer
        # recurses per nesting level; both must be a refusal, not kill the reload (fuzz finding).
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        if isinstance(exc, RecursionError):
            problem = "nested too deeply"
        # The index of the failing document is the number of '---' separators before the mark.
        doc_index: int | None = None
        if mark is not None:
            doc_index = _document_index_at(text, mark.line)
        raise ConfigError(
            [ConfigIssue(file, doc_index, None, "", f"invalid YAML: {where}{problem}")]
        ) from None

    mesh_docs: list[tuple[int, dict[str, Any]]] = []
    policy_docs: list[PolicyDocument] = []
    for idx, doc in enumerate(docs):
        if doc is None:
            continue  # empty document (e.g. a trailing '---'): harmless
        kind = doc.get("kind") if isinstance(doc, dict) else None
        ctx = _Ctx(file, idx, kind if isinstance(kind, str) else None, issues)
        if not isinstance(doc, dict):
            ctx.err("", f"expected a mapping, got {type_name(doc)}")
        elif kind == MESH_KIND:
            mesh_docs.append((idx, doc))
        elif kind is None:
            ctx.err("kind", "required field is missing")
        else:
            pd = _policy_doc(ctx, "", doc, idx)
            if pd is not None:
                policy_docs.append(pd)

    if not mesh_docs:
        issues.append(ConfigIssue(file, None, None, "", f"no document of kind {MESH_KIND}"))
        raise ConfigError(issues)
    if len(mesh_docs) > 1:
        for idx, _ in mesh_docs[1:]:
            issues.append(
                ConfigIssue(
                    file,
                    idx,
                    MESH_KIND,
                    "",
                    f"a second {MESH_KIND} (the first is document {mesh_docs[0][0]})",
                )
            )
    idx, doc = mesh_docs[0]
    ctx = _Ctx(file, idx, MESH_KIND, issues)
    m = _mapping(
        ctx,
        "",
        doc,
        required={"apiVersion", "kind", "trustDomain"},
        optional={"rootNamespace", "nodes", "workloads", "services", "policies"},
    )
    if m is None:
        raise ConfigError(issues)
    if m["apiVersion"] != API_VERSION:
        ctx.err("apiVersion", f"unsupported apiVersion {m['apiVersion']!r} (expected {API_VERSION})")
    td: TrustDomain | None = None
    if not isinstance(m["trustDomain"], str):
        ctx.err("trustDomain", f"expected a string, got {type_name(m['trustDomain'])}")
    else:
        try:
            td = TrustDomain(m["trustDomain"])
        except SpiffeIdError as exc:
            ctx.err("trustDomain", f"{m['trustDomain']!r} is not a valid trust domain ({exc})")
    root_ns = _namespace(ctx, "rootNamespace", m.get("rootNamespace", "istio-system"))
    nodes = _parse_nodes(ctx, m.get("nodes"))
    ip_owner: dict[IPAddress, str] = {n.address: f"node {n.name}" for n in nodes}
    workloads = _parse_workloads(ctx, m.get("workloads"), td, {n.name: n for n in nodes}, ip_owner)
    services = _parse_services(ctx, m.get("services"), ip_owner)
    for j, raw in enumerate(_list(ctx, "policies", m.get("policies"))):
        pd = _policy_doc(ctx, f"policies[{j}]", raw, idx)
        if pd is not None:
            policy_docs.append(pd)

    seen: dict[str, PolicyDocument] = {}
    for pd in policy_docs:
        if pd.key in seen:
            other = seen[pd.key]
            pctx = _Ctx(file, pd.document, pd.kind, issues)
            pctx.err(
                join_path(pd.path, "metadata.name"),
                f"duplicate {pd.kind} {pd.namespace}/{pd.name} (also document {other.document}"
                + (f" {other.path}" if other.path else "")
                + ")",
            )
        else:
            seen[pd.key] = pd

    if issues:
        raise ConfigError(issues)

    parser = policy_parser if policy_parser is not None else default_policy_parser
    parsed, policy_issues = parser(policy_docs)
    assert td is not None and root_ns is not None
    return MeshConfig(
        trust_domain=td,
        root_namespace=root_ns,
        nodes=tuple(nodes),
        workloads=tuple(workloads),
        services=tuple(services),
        policies=tuple(policy_docs),
        source=file,
        digest=hashlib.sha256(text.encode()).hexdigest(),
        parsed_policies=parsed,
        policy_errors=tuple(policy_issues),
    )


def _document_index_at(text: str, line: int) -> int:
    """0-based document index containing 0-based ``line`` (counting '---' separator lines)."""
    index = 0
    started = False
    for n, ln in enumerate(text.splitlines()):
        if n >= line:
            break
        if ln.startswith("---"):
            if started:
                index += 1
            started = True
        elif ln.strip() and not ln.lstrip().startswith("#") and not ln.startswith("%"):
            started = True
    return index


def default_policy_parser(docs: Sequence[PolicyDocument]) -> tuple[Any, Sequence[ConfigIssue]]:
    """Compile policies with the policy/ package, mapping its errors to :class:`ConfigIssue`.

    The returned issues are the spec errors of policies the package kept "poisoned" (enforced
    fail-closed); :func:`parse_config` records them on ``MeshConfig.policy_errors`` instead of
    refusing the config. (Documents that are not policies at all never get here: the envelope
    check above already refused them.) Warnings stay on the returned ``PolicySet``.
    """
    from policy import parse_policies  # the pure policy ring; imported here to keep config light

    policy_set = parse_policies([thaw(d.raw) for d in docs])
    issues = []
    for e in policy_set.errors:
        d = docs[e.document]
        issues.append(ConfigIssue(d.file, d.document, d.kind, _join_path(d.path, e.path), e.message))
    return policy_set, issues


def _join_path(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"


def load_config(path: str | os.PathLike[str], *, policy_parser: PolicyParser | None = None) -> MeshConfig:
    """Read and parse a config file; unreadable files are a :class:`ConfigError` too."""
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(p, None, None, "", f"cannot read: {exc}")]) from None
    return parse_config(text, file=p, policy_parser=policy_parser)


# --------------------------------------------------------------------------------------------
# Sources


UpdateCallback = Callable[[MeshConfig], Awaitable[None] | None]
ErrorCallback = Callable[[ConfigError], Awaitable[None] | None]


class ConfigSource(abc.ABC):
    """Where the agent's view of the mesh comes from: the local file now, Kubernetes later.

    A source is started once with :meth:`run` (a long-lived coroutine) and calls ``on_update``
    with each new good :class:`MeshConfig` and ``on_error`` with each refused one. It must
    deliver an initial config, or fail, before the agent serves: :meth:`initial`.
    """

    name: str = "config"

    @abc.abstractmethod
    def initial(self) -> MeshConfig:
        """The first config (raises :class:`ConfigError`): the agent refuses to start without one."""

    @abc.abstractmethod
    async def run(self, on_update: UpdateCallback, on_error: ErrorCallback) -> None:
        """Watch for changes until cancelled."""

    @property
    @abc.abstractmethod
    def last_error(self) -> ConfigError | None:
        """The error of the most recent refused update, cleared by the next good one."""


async def _call(cb: Callable[[Any], Awaitable[None] | None], arg: Any) -> None:
    r = cb(arg)
    if r is not None:
        await r


class FileConfigSource(ConfigSource):
    """Watches one file by polling (mtime, size, inode, content hash).

    Polling rather than inotify: it also sees a file replaced by rename (editors, ConfigMap
    symlink swaps) and needs no extra dependency; the cost is one stat per interval.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        interval: float = 1.0,
        policy_parser: PolicyParser | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.name = f"file:{self.path}"
        self.interval = interval
        self._policy_parser = policy_parser
        self._last_error: ConfigError | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._digest: str | None = None
        self._raw: str | None = None

    @property
    def last_error(self) -> ConfigError | None:
        return self._last_error

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def initial(self) -> MeshConfig:
        self._stamp = self._stat()
        cfg = load_config(self.path, policy_parser=self._policy_parser)
        self._digest = self._raw = cfg.digest
        log_policy_errors(cfg)
        return cfg

    def poll_once(self) -> MeshConfig | ConfigError | None:
        """One check: a new good config, a refused one, or None when nothing changed."""
        stamp = self._stat()
        if stamp == self._stamp and (stamp is None or time.time_ns() - stamp[0] > 2_000_000_000):
            return None
        # A write in the same coarse clock tick as the previous one can leave (mtime, size, inode)
        # unchanged, so a recently modified file is compared by content as well.
        self._stamp = stamp
        try:
            with open(self.path, "rb") as f:
                raw = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            raw = None
        if raw is not None and raw == self._raw and self._last_error is None:
            return None
        self._raw = raw
        try:
            cfg = load_config(self.path, policy_parser=self._policy_parser)
        except ConfigError as exc:
            # Remember the stamp so one bad version is reported once, not every interval.
            self._last_error = exc
            return exc
        recovered = self._last_error is not None
        self._last_error = None
        if cfg.digest == self._digest and not recovered:
            return None  # touched but unchanged
        # Back to the serving version after a refused one is delivered too: consumers showing
        # "last update refused" must learn that the file is good again.
        self._digest = cfg.digest
        return cfg

    async def run(self, on_update: UpdateCallback, on_error: ErrorCallback) -> None:
        while True:
            await asyncio.sleep(self.interval)
            result = self.poll_once()
            try:
                if isinstance(result, ConfigError):
                    log.error(
                        f"config update refused, keeping the last good config: {result}",
                        extra={"event": "config_refused", "errors": [i.to_dict() for i in result.issues]},
                    )
                    await _call(on_error, result)
                elif result is not None:
                    log.info(
                        "config reloaded",
                        extra={"event": "config_reloaded", "file": self.path, "digest": result.digest},
                    )
                    log_policy_errors(result)
                    await _call(on_update, result)
            except Exception:
                # A consumer's bug must not stop the watch: later updates still get through.
                log.exception("config consumer failed", extra={"event": "config_consumer_error"})


def log_policy_errors(cfg: MeshConfig) -> None:
    """Log, as errors, every poisoned policy a just-loaded config puts in force.

    Accepted is not fine: such a policy denies (DENY) or stops allowing (ALLOW) traffic until it
    is fixed, so each load of a config that still has them says so, with file, document and field.
    """
    if not cfg.policy_errors:
        return
    lines = [str(i) for i in cfg.policy_errors]
    log.error(
        f"config loaded with {len(lines)} policy error(s); the invalid policies are enforced "
        "fail-closed (ALLOW allows nothing, DENY denies everything it selects): " + "; ".join(lines),
        extra={"event": "config_policy_errors", "errors": [i.to_dict() for i in cfg.policy_errors]},
    )


def iter_issues(exc: ConfigError) -> Iterator[ConfigIssue]:
    yield from exc.issues


def workloads_on(cfg: MeshConfig, node: str) -> Iterable[Workload]:
    return (w for w in cfg.workloads if w.node == node)
