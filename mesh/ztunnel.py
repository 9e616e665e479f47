"""ztunnel's local config (``LOCAL_XDS_PATH``) translated to ztagent's config stream.

ztunnel reads a YAML file with three lists, camelCase, in the shape of its xDS types
(``examples/localhost.yaml``)::

    workloads: [{uid, name, namespace, serviceAccount, workloadIps, protocol: HBONE|TCP, node,
                 canonicalName, canonicalRevision, authorizationPolicies: [ns/name],
                 services: {"ns/hostname": {port: targetPort}}, ...}]
    services:  [{name, namespace, hostname, vips: ["network/ip"], ports: {port: targetPort},
                 subjectAltNames}]
    policies:  [{name, namespace, scope: Global|Namespace|WorkloadSelector, action: Allow|Deny,
                 rules: [[[{principals, namespaces, serviceAccounts, sourceIps, destinationIps,
                            destinationPorts, not...}]]]}]

ztunnel's file has no node addresses (ztunnel runs on one node), so a *node map* comes beside it
(``nodes:`` as in a MeshConfig, optionally ``trustDomain`` and ``rootNamespace``).

:func:`translate` returns the documents of a ztagent config stream (one ``MeshConfig``, then one
``security.istio.io/v1`` AuthorizationPolicy per ztunnel policy), for ``mesh.parse`` to parse
as any config file. ztunnel attaches by name, ztagent by labels, so the translation writes
labels: a workload listed in a service's ``services`` map gets ``<SERVICE_LABEL>/<service>``, a
workload naming a policy in ``authorizationPolicies`` gets ``<POLICY_LABEL>/<policy>``, and the
service or policy selects them. Anything ztagent does not carry out (waypoints, networks,
locality, per-endpoint target ports, dry-run policies, ...) is refused with the field named: a
config that would be half applied is not applied at all.

Pure: text in (already parsed YAML), documents out; no files, no clock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import ConfigError, ConfigIssue

API_VERSION = "ztagent.io/v1alpha1"
SERVICE_LABEL = "services.ztunnel.ztagent.io"
POLICY_LABEL = "policies.ztunnel.ztagent.io"
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_ROOT_NAMESPACE = "istio-system"
KIND = "ztunnel local config"

_WORKLOAD_FIELDS = {
    "uid", "name", "namespace", "serviceAccount", "workloadIps", "protocol", "node", "network",
    "trustDomain", "workloadName", "workloadType", "canonicalName", "canonicalRevision", "clusterId",
    "status", "hostname", "authorizationPolicies", "services", "waypoint", "networkGateway",
    "applicationTunnel", "nativeTunnel", "locality", "capacity", "networkMode",
}  # fmt: skip
_SERVICE_FIELDS = {
    "name", "namespace", "hostname", "vips", "ports", "subjectAltNames", "endpoints", "waypoint",
    "loadBalancer", "ipFamilies",
}  # fmt: skip
_POLICY_FIELDS = {"name", "namespace", "scope", "action", "rules", "dryRun"}
_MATCH_FIELDS = {
    "namespaces", "notNamespaces", "serviceAccounts", "notServiceAccounts", "principals",
    "notPrincipals", "sourceIps", "notSourceIps", "destinationIps", "notDestinationIps",
    "destinationPorts", "notDestinationPorts",
}  # fmt: skip
_SOURCE_ONLY = {
    "namespaces",
    "notNamespaces",
    "serviceAccounts",
    "notServiceAccounts",
    "principals",
    "notPrincipals",
    "sourceIps",
    "notSourceIps",
}
_DEST_ONLY = {"destinationIps", "notDestinationIps", "destinationPorts", "notDestinationPorts"}


@dataclass
class _Ctx:
    file: str
    issues: list[ConfigIssue] = field(default_factory=list)

    def bad(self, path: str, message: str) -> None:
        self.issues.append(ConfigIssue(self.file, 0, KIND, path, message))


def _unsupported(
    ctx: _Ctx, path: str, obj: Mapping[str, Any], known: set[str], empty_ok: Mapping[str, Any]
) -> None:
    """Refuse unknown fields, and known ones ztagent cannot honour unless they have their
    neutral value (``empty_ok``: field -> the values that mean "not used")."""
    for k, v in obj.items():
        if k not in known:
            ctx.bad(f"{path}.{k}", f"unknown field (one of {', '.join(sorted(known))})")
        elif k in empty_ok and v not in empty_ok[k] and v is not None:
            ctx.bad(f"{path}.{k}", f"{v!r}: not supported by ztagent ({_WHY[k]})")


_WHY = {
    "network": "one network only; no network gateways",
    "networkGateway": "one network only; no network gateways",
    "waypoint": "waypoints are configured in the MeshConfig's waypoints, not by address",
    "applicationTunnel": "no application tunnels",
    "nativeTunnel": "no native tunnels",
    "locality": "no locality-aware routing",
    "hostname": "workloads are addressed by IP",
    "networkMode": "host-network workloads are not captured",
    "capacity": "endpoints are not weighted",
    "status": "every configured workload is healthy until a connection to it fails",
    "endpoints": "endpoints are the workloads that list the service in their services map",
    "loadBalancer": "endpoints are picked at random among the healthy",
    "dryRun": "a dry-run policy would be enforced; remove it or make it real",
}

_WORKLOAD_NEUTRAL: dict[str, Any] = {
    "network": ("",), "networkGateway": ({},), "waypoint": ({},), "applicationTunnel": ({},),
    "nativeTunnel": (False,), "locality": ({},), "hostname": ("",), "networkMode": ("STANDARD", "Standard"),
    "capacity": (1,), "status": ("Healthy",),
}  # fmt: skip
_SERVICE_NEUTRAL: dict[str, Any] = {"endpoints": ({}, []), "waypoint": ({},), "loadBalancer": ({},)}


def _str(ctx: _Ctx, path: str, v: Any, *, required: bool = True) -> str | None:
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v:
        ctx.bad(path, f"expected a non-empty string, got {v!r}")
        return None
    return v


def _list(ctx: _Ctx, path: str, v: Any) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        ctx.bad(path, f"expected a list, got {type(v).__name__}")
        return []
    return v


def _map(ctx: _Ctx, path: str, v: Any) -> Mapping[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        ctx.bad(path, f"expected a mapping, got {type(v).__name__}")
        return {}
    return v


def _port(ctx: _Ctx, path: str, v: Any) -> int | None:
    try:
        p = int(v)
    except (TypeError, ValueError):
        ctx.bad(path, f"expected a port number, got {v!r}")
        return None
    if isinstance(v, bool) or not 0 < p < 65536:
        ctx.bad(path, f"expected a port number 1-65535, got {v!r}")
        return None
    return p


def _port_map(ctx: _Ctx, path: str, v: Any) -> dict[int, int]:
    out: dict[int, int] = {}
    for k, t in _map(ctx, path, v).items():
        port, target = _port(ctx, f"{path}[{k}]", k), _port(ctx, f"{path}[{k}]", t)
        if port is not None and target is not None:
            out[port] = target
    return out


def _vip(ctx: _Ctx, path: str, v: Any) -> str | None:
    """``network/ip`` (ztunnel's NetworkAddress); ztagent has one network, so it must be empty."""
    s = _str(ctx, path, v)
    if s is None:
        return None
    network, slash, ip = s.rpartition("/")
    if not slash:
        network, ip = "", s
    if network:
        ctx.bad(path, f"{s!r}: network {network!r}: ztagent has one network (write '/{ip}')")
        return None
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        ctx.bad(path, f"{s!r}: not an IP address")
        return None


# -- policies -----------------------------------------------------------------------------------


def _string_match(ctx: _Ctx, path: str, m: Any, *, principal: bool) -> str | None:
    """ztunnel's StringMatch ({Exact|Prefix|Suffix|Presence}) in Istio's string syntax; for
    principals the ``spiffe://`` that ztunnel's identities carry is dropped (Istio's form)."""
    if isinstance(m, str):  # a bare string is an exact match
        m = {"Exact": m}
    if not isinstance(m, Mapping) or len(m) != 1:
        ctx.bad(path, f"expected one of Exact, Prefix, Suffix, Presence, got {m!r}")
        return None
    ((kind, value),) = m.items()
    if kind == "Presence":
        return "*"
    if kind not in ("Exact", "Prefix", "Suffix") or not isinstance(value, str) or not value:
        ctx.bad(path, f"expected one of Exact, Prefix, Suffix, Presence with a non-empty string, got {m!r}")
        return None
    if principal and kind != "Suffix":
        value = value.removeprefix("spiffe://")
    if "*" in value:
        ctx.bad(path, f"{value!r}: '*' cannot be matched literally in Istio's syntax")
        return None
    return {"Exact": value, "Prefix": value + "*", "Suffix": "*" + value}[kind]


_CONDITION = {
    "principals": "source.principal", "namespaces": "source.namespace", "sourceIps": "source.ip",
    "destinationIps": "destination.ip", "destinationPorts": "destination.port",
}  # fmt: skip


def _match(ctx: _Ctx, path: str, m: Any, td: str) -> dict[str, list[str]] | None:
    """One RbacMatch as ``{istio condition key or 'not:'key: values}`` (its fields are ANDed)."""
    if not isinstance(m, Mapping):
        ctx.bad(path, f"expected a match mapping, got {type(m).__name__}")
        return None
    out: dict[str, list[str]] = {}
    for k, v in m.items():
        p = f"{path}.{k}"
        if k not in _MATCH_FIELDS:
            ctx.bad(p, f"unknown match field (one of {', '.join(sorted(_MATCH_FIELDS))})")
            continue
        neg = k.startswith("not")
        base = k[3].lower() + k[4:] if neg else k
        values: list[str] = []
        for i, item in enumerate(_list(ctx, p, v)):
            ip = f"{p}[{i}]"
            if base == "serviceAccounts":
                if not isinstance(item, Mapping) or set(item) != {"namespace", "serviceAccount"}:
                    ctx.bad(ip, "expected {namespace, serviceAccount}")
                    continue
                values.append(f"{td}/ns/{item['namespace']}/sa/{item['serviceAccount']}")
            elif base in ("principals", "namespaces"):
                s = _string_match(ctx, ip, item, principal=base == "principals")
                if s is not None:
                    values.append(s)
            elif base == "destinationPorts":
                port = _port(ctx, ip, item)
                if port is not None:
                    values.append(str(port))
            else:  # sourceIps / destinationIps: an address or a CIDR
                try:
                    values.append(str(ipaddress.ip_network(str(item), strict=False)))
                except ValueError:
                    ctx.bad(ip, f"{item!r}: not an IP address or CIDR")
        if not values:
            ctx.bad(p, "expected at least one value (an empty list matches nothing in ztunnel)")
            continue
        key = _CONDITION["principals" if base == "serviceAccounts" else base]
        out.setdefault(("not:" if neg else "") + key, []).extend(values)
    return out


def _when(match: Mapping[str, list[str]]) -> list[dict[str, Any]]:
    conds: dict[str, dict[str, Any]] = {}
    for key, values in match.items():
        neg = key.startswith("not:")
        k = key.removeprefix("not:")
        conds.setdefault(k, {"key": k})["notValues" if neg else "values"] = values
    return list(conds.values())


_SOURCE_KEY = {"source.principal": "principals", "source.namespace": "namespaces", "source.ip": "ipBlocks"}
_DEST_KEY = {"destination.port": "ports"}


def _rule(ctx: _Ctx, path: str, rule: Any, td: str) -> dict[str, Any]:
    """ztunnel's rule (an AND of clauses, each an OR of matches) as one Istio rule: a clause of
    one match becomes ``when`` conditions; a clause of several becomes ``from`` (all source
    matches) or ``to`` (all destination-port matches); anything else cannot be written as one
    Istio rule and is refused."""
    out: dict[str, Any] = {}
    when: list[dict[str, Any]] = []
    for ci, clause in enumerate(_list(ctx, path, rule)):
        cp = f"{path}[{ci}]"
        matches = [_match(ctx, f"{cp}[{mi}]", m, td) for mi, m in enumerate(_list(ctx, cp, clause))]
        if any(m is None for m in matches):
            continue
        ms = [m for m in matches if m is not None]
        if not ms:
            ctx.bad(cp, "an empty clause matches nothing in ztunnel; Istio has no rule for that")
            continue
        if len(ms) == 1:
            when.extend(_when(ms[0]))
            continue
        keys = {k.removeprefix("not:") for m in ms for k in m}
        if keys <= set(_SOURCE_KEY) and "from" not in out:
            out["from"] = [{"source": _fields(m, _SOURCE_KEY)} for m in ms]
        elif keys <= set(_DEST_KEY) and "to" not in out:
            out["to"] = [{"operation": _fields(m, _DEST_KEY)} for m in ms]
        else:
            ctx.bad(
                cp,
                "a clause that ORs matches over several kinds of field (or a second such clause) "
                "cannot be written as one Istio rule: split the policy",
            )
    if when:
        out["when"] = when
    return out


def _fields(m: Mapping[str, list[str]], names: Mapping[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, values in m.items():
        neg = key.startswith("not:")
        name = names[key.removeprefix("not:")]
        out[("not" + name[0].upper() + name[1:]) if neg else name] = values
    return out


def _policy(ctx: _Ctx, path: str, p: Any, td: str, root_ns: str, attached: set[str]) -> dict[str, Any] | None:
    if not isinstance(p, Mapping):
        ctx.bad(path, f"expected a policy mapping, got {type(p).__name__}")
        return None
    _unsupported(ctx, path, p, _POLICY_FIELDS, {"dryRun": (False,)})
    name, ns = _str(ctx, f"{path}.name", p.get("name")), _str(ctx, f"{path}.namespace", p.get("namespace"))
    action = p.get("action", "Allow")
    if action not in ("Allow", "Deny"):
        ctx.bad(f"{path}.action", f"{action!r}: expected Allow or Deny")
    scope = p.get("scope", "Namespace")
    if scope not in ("Global", "Namespace", "WorkloadSelector"):
        ctx.bad(f"{path}.scope", f"{scope!r}: expected Global, Namespace or WorkloadSelector")
    rules = [
        _rule(ctx, f"{path}.rules[{i}]", r, td)
        for i, r in enumerate(_list(ctx, f"{path}.rules", p.get("rules")))
    ]
    if name is None or ns is None:
        return None
    spec: dict[str, Any] = {"action": str(action).upper()}
    if scope == "Global":
        ns = root_ns
    elif scope == "WorkloadSelector":
        key = f"{ns}/{name}"
        if key not in attached:
            ctx.bad(
                f"{path}.scope", f"WorkloadSelector, but no workload lists {key!r} in authorizationPolicies"
            )
        spec["selector"] = {"matchLabels": {f"{POLICY_LABEL}/{name}": "true"}}
    spec["rules"] = rules
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


# -- the whole file -----------------------------------------------------------------------------


def translate(local: Any, nodes: Any, *, file: str, nodes_file: str) -> list[dict[str, Any]]:
    """The ztagent config documents for ztunnel's local config ``local`` (parsed YAML) with the
    node map ``nodes``; ConfigError naming file and field for anything refused."""
    ctx = _Ctx(file)
    nctx = _Ctx(nodes_file)
    if isinstance(local, list):
        ctx.bad("", "a bare list of workloads is ztunnel's old local format: write workloads: [...]")
        local = {}
    if not isinstance(local, Mapping):
        ctx.bad("", f"expected a mapping with workloads, services, policies; got {type(local).__name__}")
        local = {}
    for k in local:
        if k not in ("workloads", "services", "policies"):
            ctx.bad(str(k), "unknown field (one of policies, services, workloads)")
    nm = nodes if isinstance(nodes, Mapping) else {}
    if not isinstance(nodes, Mapping):
        nctx.bad("", f"expected a node map (nodes: [...]), got {type(nodes).__name__}")
    for k in nm:
        if k not in ("apiVersion", "kind", "nodes", "trustDomain", "rootNamespace"):
            nctx.bad(str(k), "a node map carries nodes (and trustDomain, rootNamespace) only")
    if not _list(nctx, "nodes", nm.get("nodes")):
        nctx.bad("nodes", "expected at least one node")
    td = str(nm.get("trustDomain") or DEFAULT_TRUST_DOMAIN)
    root_ns = str(nm.get("rootNamespace") or DEFAULT_ROOT_NAMESPACE)

    services_raw = _list(ctx, "services", local.get("services"))
    by_ref: dict[str, tuple[int, Mapping[str, Any]]] = {}  # "ns/hostname" -> service
    for i, s in enumerate(services_raw):
        if (
            isinstance(s, Mapping)
            and isinstance(s.get("namespace"), str)
            and isinstance(s.get("hostname"), str)
        ):
            by_ref[f"{s['namespace']}/{s['hostname']}"] = (i, s)

    workloads: list[dict[str, Any]] = []
    members: dict[str, list[tuple[str, dict[int, int], str]]] = {}  # ref -> [(wl key, ports, path)]
    identities: dict[str, str] = {}  # wl key -> spiffe id
    attached: set[str] = set()
    for i, w in enumerate(_list(ctx, "workloads", local.get("workloads"))):
        path = f"workloads[{i}]"
        if not isinstance(w, Mapping):
            ctx.bad(path, f"expected a workload mapping, got {type(w).__name__}")
            continue
        _unsupported(ctx, path, w, _WORKLOAD_FIELDS, _WORKLOAD_NEUTRAL)
        name, ns = (
            _str(ctx, f"{path}.name", w.get("name")),
            _str(ctx, f"{path}.namespace", w.get("namespace")),
        )
        node = _str(ctx, f"{path}.node", w.get("node"))
        sa = w.get("serviceAccount") or "default"
        proto = w.get("protocol", "TCP")
        if proto not in ("HBONE", "TCP"):
            ctx.bad(f"{path}.protocol", f"{proto!r}: expected HBONE or TCP")
        wtd = w.get("trustDomain") or td
        if wtd != td:
            ctx.bad(
                f"{path}.trustDomain",
                f"{wtd!r}: the mesh's trust domain is {td!r} (set trustDomain in the node map)",
            )
        ips = [str(x) for x in _list(ctx, f"{path}.workloadIps", w.get("workloadIps"))]
        if not ips:
            ctx.bad(f"{path}.workloadIps", "expected at least one IP (ztagent captures workloads by IP)")
        labels: dict[str, str] = {}
        if w.get("canonicalName"):
            labels["service.istio.io/canonical-name"] = str(w["canonicalName"])
        if w.get("canonicalRevision"):
            labels["service.istio.io/canonical-revision"] = str(w["canonicalRevision"])
        for j, ref in enumerate(_list(ctx, f"{path}.authorizationPolicies", w.get("authorizationPolicies"))):
            pns, _, pname = str(ref).partition("/")
            if not pname:
                ctx.bad(f"{path}.authorizationPolicies[{j}]", f"{ref!r}: expected namespace/name")
                continue
            if pns != ns:
                ctx.bad(
                    f"{path}.authorizationPolicies[{j}]",
                    f"{ref!r}: a WorkloadSelector policy selects workloads of its own namespace only",
                )
                continue
            attached.add(str(ref))
            labels[f"{POLICY_LABEL}/{pname}"] = "true"
        if name is None or ns is None or node is None:
            continue
        key = f"{ns}/{name}"
        identities[key] = f"spiffe://{td}/ns/{ns}/sa/{sa}"
        for ref, ports in _map(ctx, f"{path}.services", w.get("services")).items():
            sp = f"{path}.services[{ref}]"
            if ref not in by_ref:
                ctx.bad(sp, f"no service with namespace/hostname {ref!r} in services")
                continue
            _, svc = by_ref[ref]
            labels[f"{SERVICE_LABEL}/{svc.get('name')}"] = "true"
            members.setdefault(ref, []).append((key, _port_map(ctx, sp, ports), sp))
        workloads.append(
            {
                "name": name,
                "namespace": ns,
                "serviceAccount": sa,
                "node": node,
                "ips": ips,
                "labels": labels,
                "enrolled": proto == "HBONE",
            }
        )

    services: list[dict[str, Any]] = []
    for ref, (i, s) in by_ref.items():
        path = f"services[{i}]"
        _unsupported(ctx, path, s, _SERVICE_FIELDS, _SERVICE_NEUTRAL)
        name = _str(ctx, f"{path}.name", s.get("name"))
        vips = []
        for j, raw in enumerate(_list(ctx, f"{path}.vips", s.get("vips"))):
            vip = _vip(ctx, f"{path}.vips[{j}]", raw)
            if vip is not None:
                vips.append(vip)
        ports = _port_map(ctx, f"{path}.ports", s.get("ports"))
        if not ports:
            ctx.bad(f"{path}.ports", "expected at least one port: targetPort mapping")
        for key, wports, wp in members.get(ref, []):
            for port, target in wports.items():
                if port not in ports:
                    ctx.bad(f"{wp}[{port}]", f"service {ref} has no port {port}")
                elif ports[port] != target:
                    ctx.bad(
                        f"{wp}[{port}]",
                        f"{key} maps port {port} to {target}, the service to {ports[port]}: "
                        "per-endpoint target ports are not supported",
                    )
        ends = {identities[k] for k, _, _ in members.get(ref, [])}
        for j, san in enumerate(_list(ctx, f"{path}.subjectAltNames", s.get("subjectAltNames"))):
            if san not in ends:
                ctx.bad(
                    f"{path}.subjectAltNames[{j}]",
                    f"{san!r} is not the identity of one of the service's "
                    "workloads: ztagent expects each endpoint's own identity",
                )
        if name is None:
            continue
        services.append(
            {
                "name": name,
                "namespace": s["namespace"],
                "vips": vips,
                "ports": [{"port": p, "targetPort": t} for p, t in sorted(ports.items())],
                "selector": {f"{SERVICE_LABEL}/{name}": "true"},
            }
        )
    for i, s in enumerate(services_raw):
        if not isinstance(s, Mapping):
            ctx.bad(f"services[{i}]", f"expected a service mapping, got {type(s).__name__}")
        elif f"{s.get('namespace')}/{s.get('hostname')}" not in by_ref:
            ctx.bad(f"services[{i}]", "expected namespace and hostname (strings)")

    policies = [
        d
        for i, p in enumerate(_list(ctx, "policies", local.get("policies")))
        if (d := _policy(ctx, f"policies[{i}]", p, td, root_ns, attached)) is not None
    ]
    if ctx.issues or nctx.issues:
        raise ConfigError([*nctx.issues, *ctx.issues])
    mesh = {
        "apiVersion": API_VERSION,
        "kind": "MeshConfig",
        "trustDomain": td,
        "rootNamespace": root_ns,
        "nodes": list(nm["nodes"]),
        "workloads": workloads,
        "services": services,
    }
    return [mesh, *policies]


__all__ = ["POLICY_LABEL", "SERVICE_LABEL", "translate"]
