"""The local config file format: one YAML stream -> an immutable, validated :class:`Snapshot`.

Format (docs/contracts.md): exactly one document of ``kind: MeshConfig`` describing nodes,
workloads, services and waypoints; every other document (and every entry of the MeshConfig's
optional ``policies:`` list) is an Istio ``security.istio.io`` policy taken verbatim.

Validation is strict because the agent enforces security from this file: an unknown key is
usually a typo that would otherwise silently drop a restriction, so it is an error, and so are
duplicate YAML keys (PyYAML would keep the last one). Every error names the file, the document
(0-based index in the stream, plus its kind) and the field path, e.g.::

    mesh.yaml: document 0 (MeshConfig): workloads[1].ips[0]: '10.244.1.300' is not an IP address

Pure: text in, snapshot or :class:`ConfigError` out (reading the file is sources/file.py's job).
Names and labels follow mesh/names.py (the Kubernetes rules for each kind).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from identity.spiffe import SpiffeId, SpiffeIdError, TrustDomain
from kube import names
from mesh.errors import ConfigError, ConfigIssue
from mesh.model import (
    API_VERSION,
    DEFAULT_ROOT_NAMESPACE,
    GATEWAY_API_VERSIONS,
    HBONE_PORT,
    MESH_KIND,
    POLICY_API_VERSIONS,
    POLICY_KINDS,
    WAYPOINT_FOR_LABEL,
    WAYPOINT_GATEWAY_CLASS,
    IPAddress,
    IPNetwork,
    Node,
    PolicyDocument,
    Service,
    ServicePort,
    Snapshot,
    Waypoint,
    WaypointFor,
    Workload,
    freeze,
    thaw,
)
from mesh.yamlstrict import YamlSyntaxError, load_documents
from policy import parse_policies
from policy.parse import NO_NAMESPACE_HINT, join_path, type_name

# A policy parser takes the envelope-checked documents and returns (parsed, issues), where the
# issues are spec errors of policies that ``parsed`` still enforces fail-closed (they become
# Snapshot.policy_errors, not a refusal). It is a parameter so the model does not hard-wire the
# policy package's API (and tests can pass their own).
PolicyParser = Callable[[Sequence[PolicyDocument]], tuple[Any, Sequence[ConfigIssue]]]


class _Ctx:
    """Collects issues for one document so we report all of them, not just the first."""

    def __init__(
        self,
        file: str,
        document: int | None,
        kind: str | None,
        issues: list[ConfigIssue],
        default_namespace: str | None = None,
    ) -> None:
        self.file, self.document, self.kind, self.issues = file, document, kind, issues
        self.default_namespace = default_namespace

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


def _str(ctx: _Ctx, path: str, v: Any, rule: names.NameRule | None = None) -> str | None:
    if not isinstance(v, str) or v == "":
        ctx.err(
            path, f"expected a non-empty string, got {type_name(v)}" if not isinstance(v, str) else "is empty"
        )
        return None
    if rule is not None:
        problem = rule.check(v)
        if problem is not None:
            ctx.err(path, problem)
            return None
    return v


def _name(ctx: _Ctx, path: str, v: Any) -> str | None:
    return _str(ctx, path, v, names.OBJECT_NAME)


def _namespace(ctx: _Ctx, path: str, v: Any) -> str | None:
    return _str(ctx, path, v, names.NAMESPACE)


def _ns_required(ctx: _Ctx) -> set[str]:
    return {"namespace"} if ctx.default_namespace is None else set()


def _namespace_or_default(ctx: _Ctx, path: str, m: Mapping[str, Any]) -> str | None:
    # The field is required unless the caller gave a default (as ``kubectl -n`` does).
    if m.get("namespace") in (None, "") and ctx.default_namespace is not None:
        return ctx.default_namespace
    return _namespace(ctx, join_path(path, "namespace"), m.get("namespace"))


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
        key_problem = names.label_key_error(k)
        if key_problem is not None:
            ctx.err(p, f"{k!r} is not a valid label key ({key_problem})")
            ok = False
            continue
        if not isinstance(val, str):
            # YAML turns `version: 1` or `on: yes` into numbers/booleans; Kubernetes requires strings.
            ctx.err(p, f"label value must be a string, got {type_name(val)} (quote it)")
            ok = False
            continue
        value_problem = names.label_value_error(val)
        if value_problem is not None:
            ctx.err(p, f"{val!r} is not a valid label value ({value_problem})")
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
            required={"name", "node", "ips"} | _ns_required(ctx),
            optional={"serviceAccount", "labels", "enrolled", "namespace"},
        )
        if m is None:
            continue
        n_issues = len(ctx.issues)
        name = _name(ctx, join_path(p, "name"), m["name"])
        ns = _namespace_or_default(ctx, p, m)
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
        m = _mapping(
            ctx,
            p,
            item,
            required={"name", "vips", "ports"} | _ns_required(ctx),
            optional={"selector", "namespace", "labels"},
        )
        if m is None:
            continue
        n_issues = len(ctx.issues)
        name = _str(ctx, join_path(p, "name"), m["name"], names.SERVICE_NAME)
        ns = _namespace_or_default(ctx, p, m)
        selector = _labels(ctx, join_path(p, "selector"), m.get("selector"))
        svc_labels = _labels(ctx, join_path(p, "labels"), m.get("labels"))
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
                pname = _str(ctx, join_path(pp, "name"), pname, names.PORT_NAME)
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
        if svc_labels is None:
            continue
        key = f"{ns}/{name}"
        if key in keys:
            ctx.err(join_path(p, "name"), f"duplicate service {key} (also {keys[key]})")
            continue
        keys[key] = p
        out.append(Service(name=name, namespace=ns, vips=tuple(vips), ports=tuple(ports), selector=selector,
                           labels=svc_labels))  # fmt: skip
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
        if meta.get("namespace") in (None, "") and ctx.default_namespace is None:
            # The policy package's own words, so lint, the CLI and the loader say the same thing.
            ctx.err(join_path(path, "metadata.namespace"),
                    f"{NO_NAMESPACE_HINT} (or defaultNamespace in the MeshConfig); the config is "
                    "refused until then")  # fmt: skip
            ok = False
        else:
            ns = _namespace_or_default(ctx, join_path(path, "metadata"), meta)
    if not ok or name is None or ns is None:
        return None
    assert isinstance(kind, str) and isinstance(api, str) and isinstance(meta, dict)
    if meta.get("namespace") in (None, ""):
        # Defaulted: the document is stored with its namespace, as ``kubectl apply -n`` stores
        # it, so the policy parser sees the namespace the envelope check resolved.
        raw = {**raw, "metadata": {**meta, "namespace": ns}}
    return PolicyDocument(
        kind=kind,
        api_version=api,
        name=name,
        namespace=ns,
        raw=freeze(raw),
        file=ctx.file,
        document=document,
        path=path,
    )


def _parse_waypoints(ctx: _Ctx, raw: Any, td: TrustDomain | None) -> list[Waypoint]:
    """The ``waypoints:`` list. Their addresses are not checked against pod IPs and VIPs: a
    waypoint is reached at its own Service VIP or pod IP, which the mesh also lists."""
    out: list[Waypoint] = []
    keys: dict[str, str] = {}
    for i, item in enumerate(_list(ctx, "waypoints", raw)):
        p = f"waypoints[{i}]"
        m = _mapping(
            ctx,
            p,
            item,
            required={"name", "addresses"} | _ns_required(ctx),
            optional={"namespace", "serviceAccount", "hbonePort", "for"},
        )
        if m is None:
            continue
        n_issues = len(ctx.issues)
        name = _name(ctx, join_path(p, "name"), m["name"])
        ns = _namespace_or_default(ctx, p, m)
        # Istio's waypoint Deployment runs as a service account named after the Gateway.
        sa = _name(ctx, join_path(p, "serviceAccount"), m.get("serviceAccount", m["name"]))
        port = _port(ctx, join_path(p, "hbonePort"), m.get("hbonePort", HBONE_PORT))
        traffic_for = m.get("for", WaypointFor.SERVICE.value)
        allowed_for = [f.value for f in WaypointFor]
        if traffic_for not in allowed_for:
            ctx.err(join_path(p, "for"), f"expected one of {', '.join(allowed_for)}, got {traffic_for!r}")
        addrs: list[IPAddress] = []
        raw_addrs = _list(ctx, join_path(p, "addresses"), m["addresses"], allow_missing=False)
        if isinstance(m["addresses"], list) and not raw_addrs:
            ctx.err(join_path(p, "addresses"), "a waypoint needs at least one address")
        for j, ra in enumerate(raw_addrs):
            a = _ip(ctx, join_path(join_path(p, "addresses"), j), ra)
            if a is not None:
                addrs.append(a)
        if len(ctx.issues) != n_issues or name is None or ns is None or sa is None or port is None:
            continue
        if td is None:
            continue
        key = f"{ns}/{name}"
        if key in keys:
            ctx.err(join_path(p, "name"), f"duplicate waypoint {key} (also {keys[key]})")
            continue
        keys[key] = p
        try:
            sid = SpiffeId.for_workload(td, ns, sa)
        except SpiffeIdError as exc:
            ctx.err(p, f"cannot form a SPIFFE ID: {exc}")
            continue
        out.append(
            Waypoint(
                name=name,
                namespace=ns,
                service_account=sa,
                addresses=tuple(addrs),
                spiffe_id=sid,
                hbone_port=port,
                traffic_for=WaypointFor(traffic_for),
            )
        )
    return out


def _parse_gateway(ctx: _Ctx, doc: dict[str, Any], td: TrustDomain | None) -> Waypoint | None:
    """A Gateway API ``Gateway`` of class ``istio-waypoint``, verbatim: the Istio way to declare
    a waypoint. Istio's controller would give it a Service address; a config file has no
    controller, so ``spec.addresses`` (Gateway API's own field, ``type: IPAddress``) must say
    where its HBONE listener is. The service account is the Gateway's name (Istio's waypoint
    Deployment); ``istio.io/waypoint-for`` selects the traffic (default service)."""
    m = _mapping(ctx, "", doc, required={"apiVersion", "kind", "metadata", "spec"}, optional={"status"})
    if m is None:
        return None
    n_issues = len(ctx.issues)
    if m["apiVersion"] not in GATEWAY_API_VERSIONS:
        ctx.err("apiVersion", f"unsupported apiVersion {m['apiVersion']!r} (expected "
                              f"{' or '.join(GATEWAY_API_VERSIONS)})")  # fmt: skip
    meta = _mapping(ctx, "metadata", m["metadata"], required={"name"},
                    optional={"namespace", "labels", "annotations"})  # fmt: skip
    spec = _mapping(ctx, "spec", m["spec"], required={"gatewayClassName", "addresses"},
                    optional={"listeners", "infrastructure"})  # fmt: skip
    if meta is None or spec is None:
        return None
    name = _name(ctx, "metadata.name", meta["name"])
    ns = _namespace_or_default(ctx, "metadata", meta)
    labels = _labels(ctx, "metadata.labels", meta.get("labels"))
    if spec["gatewayClassName"] != WAYPOINT_GATEWAY_CLASS:
        ctx.err("spec.gatewayClassName", f"only {WAYPOINT_GATEWAY_CLASS!r} Gateways (waypoints) are "
                                         f"supported, got {spec['gatewayClassName']!r}")  # fmt: skip
    port = HBONE_PORT
    for j, raw in enumerate(_list(ctx, "spec.listeners", spec.get("listeners"))):
        lp = f"spec.listeners[{j}]"
        lm = _mapping(ctx, lp, raw, required={"name", "port", "protocol"}, optional={"allowedRoutes"})
        if lm is None:
            continue
        lport = _port(ctx, join_path(lp, "port"), lm["port"])
        if lm["protocol"] != "HBONE":
            ctx.err(join_path(lp, "protocol"), f"a waypoint listens with HBONE, got {lm['protocol']!r}")
        elif lport is not None:
            port = lport
    addrs: list[IPAddress] = []
    raw_addrs = _list(ctx, "spec.addresses", spec["addresses"], allow_missing=False)
    if isinstance(spec["addresses"], list) and not raw_addrs:
        ctx.err("spec.addresses", "a waypoint needs at least one address")
    for j, ra in enumerate(raw_addrs):
        ap = f"spec.addresses[{j}]"
        am = _mapping(ctx, ap, ra, required={"value"}, optional={"type"})
        if am is None:
            continue
        if am.get("type", "IPAddress") != "IPAddress":
            ctx.err(join_path(ap, "type"), f"only IPAddress addresses are supported, got {am['type']!r}")
            continue
        a = _ip(ctx, join_path(ap, "value"), am["value"])
        if a is not None:
            addrs.append(a)
    traffic_for = (labels or {}).get(WAYPOINT_FOR_LABEL, WaypointFor.SERVICE.value)
    allowed_for = [f.value for f in WaypointFor]
    if traffic_for not in allowed_for:
        ctx.err(f"metadata.labels.{WAYPOINT_FOR_LABEL}",
                f"expected one of {', '.join(allowed_for)}, got {traffic_for!r}")  # fmt: skip
    if len(ctx.issues) != n_issues or name is None or ns is None or labels is None or td is None:
        return None
    try:
        sid = SpiffeId.for_workload(td, ns, name)
    except SpiffeIdError as exc:
        ctx.err("metadata.name", f"cannot form a SPIFFE ID: {exc}")
        return None
    return Waypoint(name=name, namespace=ns, service_account=name, addresses=tuple(addrs), spiffe_id=sid,
                    hbone_port=port, traffic_for=WaypointFor(traffic_for))  # fmt: skip


def _parse_namespace(ctx: _Ctx, doc: dict[str, Any]) -> tuple[str, Mapping[str, str]] | None:
    """A Kubernetes ``v1`` ``Namespace`` document: only its name and labels matter here."""
    m = _mapping(ctx, "", doc, required={"apiVersion", "kind", "metadata"}, optional={"spec", "status"})
    if m is None:
        return None
    if m["apiVersion"] != "v1":
        ctx.err("apiVersion", f"a Namespace is apiVersion v1, got {m['apiVersion']!r}")
        return None
    meta = _mapping(ctx, "metadata", m["metadata"], required={"name"}, optional={"labels", "annotations"})
    if meta is None:
        return None
    name = _namespace(ctx, "metadata.name", meta["name"])
    labels = _labels(ctx, "metadata.labels", meta.get("labels"))
    if name is None or labels is None:
        return None
    return name, labels


def _declared_default_namespace(docs: list[Any], file: str, issues: list[ConfigIssue]) -> str | None:
    """``defaultNamespace`` of the first MeshConfig document, if it sets a valid one."""
    for idx, doc in enumerate(docs):
        if isinstance(doc, dict) and doc.get("kind") == MESH_KIND and "defaultNamespace" in doc:
            value = doc["defaultNamespace"]
            problem = names.NAMESPACE.check(value) if isinstance(value, str) else "expected a string"
            if problem is not None:
                issues.append(ConfigIssue(file, idx, MESH_KIND, "defaultNamespace", f"{value!r}: {problem}"))
                return None
            return str(value)
    return None


def parse_config(
    text: str,
    *,
    file: str = "<config>",
    policy_parser: PolicyParser | None = None,
    default_namespace: str | None = None,
) -> Snapshot:
    """Parse and validate one config stream; raise :class:`ConfigError` listing every problem.

    Pure: no I/O. ``policy_parser`` (default: :func:`default_policy_parser`, which uses the
    policy/ package) validates and compiles the Istio policy documents; their spec errors do not
    raise but land on ``policy_errors`` (the poisoned policies are enforced fail-closed), while
    structure, YAML and envelope (kind, apiVersion, metadata) errors do raise.

    ``default_namespace`` (like ``kubectl -n``) is the namespace of workloads, services,
    waypoints and policies that name none; without it (the default) the field is required.
    """
    issues: list[ConfigIssue] = []
    if default_namespace is not None and names.NAMESPACE.check(default_namespace) is not None:
        raise ValueError(f"default_namespace: {names.NAMESPACE.check(default_namespace)}")
    try:
        docs = load_documents(text)
    except YamlSyntaxError as exc:
        raise ConfigError([ConfigIssue(file, exc.document, None, "", f"invalid YAML: {exc}")]) from None

    if default_namespace is None:
        # The MeshConfig's own default (an explicit -n wins, as kubectl's does over a context).
        default_namespace = _declared_default_namespace(docs, file, issues)
    mesh_docs: list[tuple[int, dict[str, Any]]] = []
    policy_docs: list[PolicyDocument] = []
    gateway_docs: list[tuple[int, dict[str, Any]]] = []
    namespace_labels: dict[str, Mapping[str, str]] = {}
    for idx, doc in enumerate(docs):
        if doc is None:
            continue  # empty document (e.g. a trailing '---'): harmless
        kind = doc.get("kind") if isinstance(doc, dict) else None
        ctx = _Ctx(file, idx, kind if isinstance(kind, str) else None, issues, default_namespace)
        if not isinstance(doc, dict):
            ctx.err("", f"expected a mapping, got {type_name(doc)}")
        elif kind == MESH_KIND:
            mesh_docs.append((idx, doc))
        elif kind == "Gateway":
            gateway_docs.append((idx, doc))  # needs the trust domain: parsed below
        elif kind == "Namespace":
            got = _parse_namespace(ctx, doc)
            if got is not None:
                if got[0] in namespace_labels:
                    ctx.err("metadata.name", f"duplicate Namespace {got[0]}")
                namespace_labels[got[0]] = got[1]
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
    ctx = _Ctx(file, idx, MESH_KIND, issues, default_namespace)
    m = _mapping(
        ctx,
        "",
        doc,
        required={"apiVersion", "kind", "trustDomain"},
        optional={"rootNamespace", "defaultNamespace", "nodes", "workloads", "services", "waypoints",
                  "policies"},
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
    root_ns = _namespace(ctx, "rootNamespace", m.get("rootNamespace", DEFAULT_ROOT_NAMESPACE))
    nodes = _parse_nodes(ctx, m.get("nodes"))
    ip_owner: dict[IPAddress, str] = {n.address: f"node {n.name}" for n in nodes}
    workloads = _parse_workloads(ctx, m.get("workloads"), td, {n.name: n for n in nodes}, ip_owner)
    services = _parse_services(ctx, m.get("services"), ip_owner)
    waypoints = _parse_waypoints(ctx, m.get("waypoints"), td)
    wp_keys = {w.key for w in waypoints}
    for gidx, gdoc in gateway_docs:
        gw = _parse_gateway(_Ctx(file, gidx, "Gateway", issues, default_namespace), gdoc, td)
        if gw is not None:
            if gw.key in wp_keys:
                _Ctx(file, gidx, "Gateway", issues).err("metadata.name", f"duplicate waypoint {gw.key}")
                continue
            wp_keys.add(gw.key)
            waypoints.append(gw)
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

    if issues or td is None or root_ns is None:
        raise ConfigError(issues)

    parser = policy_parser if policy_parser is not None else default_policy_parser
    parsed, policy_issues = parser(policy_docs)
    return Snapshot(
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
        waypoints=tuple(waypoints),
        namespace_labels=MappingProxyType(namespace_labels),
    )


def default_policy_parser(docs: Sequence[PolicyDocument]) -> tuple[Any, Sequence[ConfigIssue]]:
    """Compile policies with the policy/ package, mapping its errors to :class:`ConfigIssue`.

    The returned issues are the spec errors of policies the package kept "poisoned" (enforced
    fail-closed); :func:`parse_config` records them on ``Snapshot.policy_errors`` instead of
    refusing the config. (Documents that are not policies at all never get here: the envelope
    check above already refused them.) Warnings stay on the returned ``PolicySet``.
    """
    policy_set = parse_policies([thaw(d.raw) for d in docs])
    issues: list[ConfigIssue] = []
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
