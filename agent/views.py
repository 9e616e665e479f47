"""The node agent's admin views: pure functions of the supervisor's state.

The supervisor (the composition root) gathers its state and hands it here; nothing in this
module reads a clock, a socket or a file (time comes in as ``now``), so each view is testable on
a plain store and a plain certificate manager.

Two families of views:

* ztagent's own (``status``, ``certs_list``, ``workloads``, ``policies``): what ``ztagent
  status`` and the admin JSON have always shown.
* ztunnel's (``ztunnel_dump`` and its parts): ``/config_dump`` in the shape of ztunnel's admin
  endpoint (``workloads``, ``services``, ``policies``, ``certificates``, ``workloadState``, camelCase,
  as istioctl's ``pkg/config/xds/configdump`` types read it), so ``istioctl ztunnel-config ...
  --file`` and scripts written for ztunnel read ours.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.records import ConnectionRecord, Direction, Path
from credentials.manager import CredentialStatus
from identity.bundle import TrustBundleSet
from mesh.config import MeshConfig, Service, Workload, thaw
from mesh.store import WorkloadStore, describe_workloads
from policy import PolicySet

# Labels that bind a workload (or its namespace) to a waypoint (Istio ambient).
USE_WAYPOINT = "istio.io/use-waypoint"
CANONICAL_NAME = "service.istio.io/canonical-name"
CANONICAL_REVISION = "service.istio.io/canonical-revision"


@dataclass(frozen=True)
class ConfigState:
    """What the supervisor knows about its config source (see supervisor._ConfigState)."""

    source: str | None
    digest: str | None
    loaded_at: float | None
    refused: Sequence[str]
    refused_at: float | None
    stale: Mapping[str, Sequence[object]]  # policy key -> issues of its refused update


class TrackerView(Protocol):
    """The parts of a worker's connection tracker the views read."""

    @property
    def open(self) -> Mapping[int, ConnectionRecord]: ...
    @property
    def totals(self) -> Mapping[str, int]: ...


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


# -- ztagent's views ----------------------------------------------------------------------------


def certs_list(statuses: Iterable[CredentialStatus], now: dt.datetime) -> list[dict[str, Any]]:
    """Every managed identity with its certificate (if any) and renewal state."""
    out = []
    for st in statuses:
        c = st.credential
        entry: dict[str, Any] = {
            "identity": str(st.spiffe_id),
            "nextAction": st.next_action.isoformat(),
            "consecutiveFailures": st.consecutive_failures,
            "lastError": st.last_error or None,
            "lastErrorReason": st.last_error_reason or None,
            "failingSince": st.failing_since.isoformat() if st.failing_since else None,
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


def status(
    *,
    version: str,
    node: str,
    started_at: float,
    now: float,
    ready: tuple[bool, list[str]],
    config: ConfigState | None,
    store: WorkloadStore | None,
    certs: list[dict[str, Any]],
    capture: dict[str, Any],
    tunnels: dict[str, Any] | None,
    tracker: TrackerView | None,
    recent_denials: Iterable[dict[str, Any]],
    addresses: dict[str, Any],
) -> dict[str, Any]:
    """``/status``: one screen of node health; ``healthy`` is false when anything is wrong."""
    ok, reasons = ready
    problems = list(reasons)
    stale = config.stale if config is not None else {}
    for key, issues in sorted(stale.items()):
        problems.append(f"policy {key}: update refused, last good version in force: {issues[0]}")
    if config is not None and config.refused:
        problems.append(
            f"last config update refused ({len(config.refused)} errors); serving the previous config"
        )
    by_id = {c["identity"]: c for c in certs}
    workloads = [
        {
            "name": w.name,
            "namespace": w.namespace,
            "spiffeId": str(w.spiffe_id),
            "ips": [str(i) for i in w.ips],
            "cert": by_id.get(str(w.spiffe_id)),
        }
        for w in (store.local_enrolled if store is not None else ())
    ]
    for c in by_id.values():
        if c.get("consecutiveFailures"):
            problems.append(f"certificate renewal failing for {c['identity']}: {c.get('lastError')}")
    return {
        "version": version,
        "node": node,
        "startedAt": _iso(started_at),
        "uptimeSeconds": round(now - started_at, 1),
        "healthy": not problems,
        "ready": ok,
        "problems": problems,
        "capture": capture,
        "config": {
            "source": config.source if config else None,
            "digest": config.digest if config else None,
            "loadedAt": _iso(config.loaded_at) if config and config.loaded_at is not None else None,
            "errors": list(config.refused) if config else [],
            "stalePolicies": {k: [str(i) for i in v] for k, v in sorted(stale.items())},
            "refusedAt": _iso(config.refused_at) if config and config.refused_at else None,
        },
        "workloads": workloads,
        "tunnels": tunnels if tunnels is not None else {"inbound": 0, "outbound": 0, "pooledConnections": 0},
        "connections": (
            {"open": len(tracker.open), **tracker.totals}
            if tracker is not None
            else {"open": 0, "opened": 0, "closed": 0, "denied": 0}
        ),
        "recentDenials": list(recent_denials),
        "addresses": addresses,
    }


def workloads(store: WorkloadStore | None) -> list[dict[str, Any]]:
    return describe_workloads(store) if store is not None else []


def policies(cfg: MeshConfig | None, store: WorkloadStore | None) -> list[dict[str, Any]]:
    """Every policy document, where it came from, and which local workloads it selects."""
    if cfg is None or store is None:
        return []
    local = store.local_enrolled
    index = store.policy_index
    out: list[dict[str, Any]] = []
    for doc in cfg.policies:
        selects = []
        if doc.kind == "AuthorizationPolicy":
            key = f"{doc.namespace}/{doc.name}"
            selects = [w.key for w in local if any(p.key == key for p in index.select(w.namespace, w.labels))]
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


def config_dump(cfg: MeshConfig | None, store: WorkloadStore | None) -> dict[str, Any]:
    """ztagent's description of the serving config (the extra keys of ``/config_dump``)."""
    if cfg is None or store is None:
        return {}
    return {
        "source": cfg.source,
        "digest": cfg.digest,
        "trustDomain": cfg.trust_domain.name,
        "rootNamespace": cfg.root_namespace,
        "nodes": [
            {"name": n.name, "address": str(n.address), "podCIDR": str(n.pod_cidr) if n.pod_cidr else None}
            for n in cfg.nodes
        ],
        "policyDocuments": [thaw(p.raw) for p in cfg.policies],
    }


# -- ztunnel's shapes ---------------------------------------------------------------------------


def workload_uid(w: Workload, cluster_id: str) -> str:
    """ztunnel's workload UID as istiod writes it for a pod: ``cluster//Pod/namespace/name``."""
    return f"{cluster_id}//Pod/{w.namespace}/{w.name}"


def waypoint_of(w: Workload) -> str | None:
    return w.labels.get(USE_WAYPOINT) or None


def ztunnel_workload(w: Workload, store: WorkloadStore, cluster_id: str) -> dict[str, Any]:
    labels = w.labels
    app = labels.get("app.kubernetes.io/name") or labels.get("app")
    version = labels.get("app.kubernetes.io/version") or labels.get("version")
    out: dict[str, Any] = {
        "uid": workload_uid(w, cluster_id),
        "workloadIps": [str(i) for i in w.ips],
        "protocol": "HBONE" if w.enrolled else "TCP",
        "name": w.name,
        "namespace": w.namespace,
        "serviceAccount": w.service_account,
        "workloadName": w.name,
        "workloadType": "pod",
        "canonicalName": labels.get(CANONICAL_NAME) or app or w.name,
        "canonicalRevision": labels.get(CANONICAL_REVISION) or version or "latest",
        "clusterId": cluster_id,
        "trustDomain": w.spiffe_id.trust_domain.name,
        "node": w.node,
        "status": "Healthy",
        "hostname": "",
        "capacity": 1,
        "services": [s.key for s in store.services_of(w)],
    }
    wp = waypoint_of(w)
    if wp is not None:
        # ztunnel names the waypoint by its address; the mesh model binds it by name.
        out["waypoint"] = {"destination": f"{w.namespace}/{wp}"}
    return out


def ztunnel_service(s: Service, store: WorkloadStore, cluster_id: str) -> dict[str, Any]:
    ports = {str(p.port): p.target_port for p in s.ports}
    host = s.hostname
    endpoints = {}
    for w in store.endpoints(s):
        uid = workload_uid(w, cluster_id)
        endpoints[uid] = {
            "workloadUid": uid,
            "service": f"{s.namespace}/{host}",
            "port": {str(p.port): p.target_port for p in s.ports},
        }
    families = {"IPv6" if v.version == 6 else "IPv4" for v in s.vips}
    return {
        "name": s.name,
        "namespace": s.namespace,
        "hostname": host,
        "vips": [f"/{v}" for v in s.vips],  # ztunnel writes network/address; no network here
        "ports": ports,
        "endpoints": endpoints,
        "ipFamilies": "Dual" if len(families) > 1 else (families.pop() if families else "IPv4"),
    }


def _string_match(value: str) -> dict[str, Any]:
    """Istio's string syntax (``*``, ``prefix*``, ``*suffix``) as ztunnel's StringMatch."""
    if value == "*":
        return {"Presence": {}}
    if value.endswith("*"):
        return {"Prefix": value[:-1]}
    if value.startswith("*"):
        return {"Suffix": value[1:]}
    return {"Exact": value}


_Conv = Callable[[Any], Any]
_SOURCE_FIELDS: dict[str, tuple[str, _Conv]] = {
    "principals": ("principals", _string_match),
    "notPrincipals": ("notPrincipals", _string_match),
    "namespaces": ("namespaces", _string_match),
    "notNamespaces": ("notNamespaces", _string_match),
    "ipBlocks": ("sourceIps", str),
    "notIpBlocks": ("notSourceIps", str),
    "remoteIpBlocks": ("sourceIps", str),
    "notRemoteIpBlocks": ("notSourceIps", str),
}
_OPERATION_FIELDS = {"ports": "destinationPorts", "notPorts": "notDestinationPorts"}
_WHEN_KEYS: dict[str, tuple[str, _Conv]] = {
    "source.principal": ("principals", _string_match),
    "source.namespace": ("namespaces", _string_match),
    "source.ip": ("sourceIps", str),
    "remote.ip": ("sourceIps", str),
    "destination.ip": ("destinationIps", str),
    "destination.port": ("destinationPorts", int),
}


def _rule_clauses(rule: Mapping[str, Any]) -> list[list[dict[str, Any]]]:
    """One AuthorizationPolicy rule as ztunnel's AND-of-ORs: one clause for ``from`` (any source
    matches), one for ``to`` (any operation matches), one per ``when`` condition."""
    clauses: list[list[dict[str, Any]]] = []
    sources = []
    for entry in rule.get("from") or ():
        src = entry.get("source") or {}
        m: dict[str, Any] = {}
        for key, (name, conv) in _SOURCE_FIELDS.items():
            if key in src:
                m.setdefault(name, []).extend(conv(v) for v in src[key])
        sources.append(m)
    if sources:
        clauses.append(sources)
    operations = []
    for entry in rule.get("to") or ():
        op = entry.get("operation") or {}
        m = {name: [int(p) for p in op[key]] for key, name in _OPERATION_FIELDS.items() if key in op}
        operations.append(m)
    if operations:
        clauses.append(operations)
    for cond in rule.get("when") or ():
        known = _WHEN_KEYS.get(str(cond.get("key")))
        if known is None:
            continue  # L7 keys: enforced by a waypoint, not by the node (as in ztunnel)
        name, conv = known
        m = {}
        if cond.get("values"):
            m[name] = [conv(v) for v in cond["values"]]
        if cond.get("notValues"):
            m["not" + name[0].upper() + name[1:]] = [conv(v) for v in cond["notValues"]]
        clauses.append([m])
    return clauses


def ztunnel_policy(doc_raw: Mapping[str, Any], root_namespace: str) -> dict[str, Any] | None:
    """An AuthorizationPolicy as ztunnel's RBAC view (name, namespace, scope, action, rules)."""
    if doc_raw.get("kind") != "AuthorizationPolicy":
        return None
    meta = doc_raw.get("metadata") or {}
    spec = doc_raw.get("spec") or {}
    ns = str(meta.get("namespace") or "")
    if ns == root_namespace:
        scope = "Global"
    elif spec.get("selector") or spec.get("targetRefs") or spec.get("targetRef"):
        scope = "WorkloadSelector"
    else:
        scope = "Namespace"
    action = str(spec.get("action") or "ALLOW").capitalize()
    return {
        "name": meta.get("name"),
        "namespace": ns,
        "scope": scope,
        "action": action,
        "rules": [_rule_clauses(r) for r in spec.get("rules") or ()],
    }


def _pem_cert(cert: x509.Certificate) -> dict[str, str]:
    return {
        "pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "serialNumber": format(cert.serial_number, "x"),
        "validFrom": cert.not_valid_before_utc.isoformat(),
        "expirationTime": cert.not_valid_after_utc.isoformat(),
    }


def ztunnel_certificates(
    statuses: Iterable[CredentialStatus], bundles: TrustBundleSet, now: dt.datetime
) -> list[dict[str, Any]]:
    """ztunnel's ``certificates``: identity, state, leaf chain and the roots that verify it."""
    out = []
    for st in statuses:
        c = st.credential
        if c is not None and c.not_after > now:
            state = "Available"
        elif c is not None:
            state = "Unavailable: certificate expired"
        elif st.last_error:
            state = f"Unavailable: {st.last_error}"
        else:
            state = "Initializing"
        bundle = bundles.for_domain(st.spiffe_id.trust_domain)
        out.append(
            {
                "identity": str(st.spiffe_id),
                "state": state,
                "certChain": [_pem_cert(x) for x in c.chain] if c is not None else [],
                "rootCerts": [_pem_cert(x) for x in bundle.roots] if bundle is not None else [],
            }
        )
    return out


def connection_entry(r: ConnectionRecord) -> dict[str, Any]:
    """One open connection as ztunnel's workloadState lists it (src, originalDst, actualDst,
    protocol), plus ztagent's identity, bytes and age."""
    src = str(r.source_ip) if r.source_ip is not None else None
    if src is None and r.source_workload is not None and r.source_workload.ips:
        src = str(r.source_workload.ips[0])
    sent, received = r.read_bytes()
    return {
        "id": r.id,
        "direction": r.direction.value,
        "src": src,
        "originalDst": f"{r.destination[0]}:{r.destination[1]}",
        "actualDst": f"{r.destination[0]}:{r.destination[1]}",
        "protocol": "HBONE" if r.path is Path.HBONE else "TCP",
        "path": r.path.value,
        "sourceWorkload": r.source_workload.key if r.source_workload is not None else None,
        "sourcePrincipal": r.source_principal,
        "destinationWorkload": r.destination_key,
        "destinationPrincipal": r.destination_principal,
        "destinationService": r.service.key if r.service is not None else None,
        "security": r.security.value,
        "bytesSent": sent,
        "bytesReceived": received,
    }


def connections(tracker: TrackerView | None, now_monotonic: float) -> list[dict[str, Any]]:
    """Every open connection of this node, oldest first."""
    if tracker is None:
        return []
    out = []
    for r in sorted(tracker.open.values(), key=lambda r: r.id):
        entry = connection_entry(r)
        entry["ageSeconds"] = round(now_monotonic - r.opened, 1)
        out.append(entry)
    return out


def workload_state(
    store: WorkloadStore, cluster_id: str, tracker: TrackerView | None, certs_ready: set[str]
) -> dict[str, Any]:
    """ztunnel's ``workloadState``: each local enrolled workload, its state and connections."""
    out: dict[str, Any] = {}
    by_workload: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in tracker.open.values() if tracker is not None else ():
        w = r.destination_workload if r.direction is Direction.INBOUND else r.source_workload
        if w is None:
            continue
        side = "inbound" if r.direction is Direction.INBOUND else "outbound"
        e = connection_entry(r)
        by_workload.setdefault(w.key, {"inbound": [], "outbound": []})[side].append(
            {k: e[k] for k in ("src", "originalDst", "actualDst", "protocol")}
        )
    for w in store.local_enrolled:
        out[workload_uid(w, cluster_id)] = {
            "state": "Up" if str(w.spiffe_id) in certs_ready else "Pending",
            "connections": by_workload.get(w.key, {"inbound": [], "outbound": []}),
            "info": {
                "name": w.name,
                "namespace": w.namespace,
                "trustDomain": w.spiffe_id.trust_domain.name,
                "serviceAccount": w.service_account,
            },
        }
    return out


def ztunnel_dump(
    cfg: MeshConfig | None,
    store: WorkloadStore | None,
    *,
    cluster_id: str,
    statuses: Sequence[CredentialStatus],
    bundles: TrustBundleSet | None,
    tracker: TrackerView | None,
    now: dt.datetime,
) -> dict[str, Any]:
    """``/config_dump`` as ztunnel's admin endpoint shapes it (istioctl reads these keys)."""
    if cfg is None or store is None:
        return {}
    certs_ready = {
        str(s.spiffe_id) for s in statuses if s.credential is not None and s.credential.not_after > now
    }
    pols = [ztunnel_policy(thaw(d.raw), cfg.root_namespace) for d in cfg.policies]
    return {
        "workloads": [ztunnel_workload(w, store, cluster_id) for w in store.workloads],
        "services": [ztunnel_service(s, store, cluster_id) for s in cfg.services],
        "policies": [p for p in pols if p is not None],
        "certificates": ztunnel_certificates(statuses, bundles or TrustBundleSet(), now),
        "workloadState": workload_state(store, cluster_id, tracker, certs_ready),
    }


__all__ = [
    "ConfigState",
    "certs_list",
    "config_dump",
    "connections",
    "policies",
    "status",
    "workload_uid",
    "workloads",
    "ztunnel_dump",
]
