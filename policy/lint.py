"""Foot-gun detection for a policy set (``ztagent policy lint``). Pure: findings from models.

Each check names a mistake that is legal Istio but rarely what the author meant, or that silently
behaves differently at the node agent than at a waypoint:

* ``invalid``: a document with errors (enforced fail-closed until fixed);
* ``empty-allow``: an ALLOW without rules allows nothing (it is a default deny, not allow-all);
* ``spiffe-prefix``: a principal written ``spiffe://...`` never matches (principals omit it);
* ``wildcard-trust-domain``: ``*/ns/...`` matches that identity from any trust domain;
* ``trust-domain-mismatch``: a principal naming another trust domain than the mesh's;
* ``allow-without-default-deny``: ALLOW policies that select some workloads while the rest of the
  namespace (no namespace- or mesh-wide ALLOW) still accepts everything;
* ``permissive``: plaintext still accepted (no STRICT PeerAuthentication in effect);
* ``http-at-l4``: HTTP attributes in a policy the node agent enforces (no waypoint sees it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from policy.model import (
    DEFAULT_ROOT_NAMESPACE,
    EMPTY_LABELS,
    Action,
    AuthorizationPolicy,
    MatchKind,
    MtlsMode,
    RequestAuthentication,
    StringMatch,
)
from policy.parse import PolicySet
from policy.peerauth import PeerAuthIndex

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str  # "error" | "warning"
    policy: str | None  # "Kind namespace/name", None for mesh/namespace-wide findings
    path: str  # field path inside the policy ("" when not about one field)
    message: str

    def __str__(self) -> str:
        where = self.policy or "mesh"
        if self.path:
            where += f" {self.path}"
        return f"{self.severity.upper()} {self.code} {where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "policy": self.policy,
            "path": self.path,
            "message": self.message,
        }


@dataclass(frozen=True)
class WorkloadRef:
    """What lint needs to know about a workload (from the MeshConfig, when one is given)."""

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_LABELS)


def _ref(p: AuthorizationPolicy | RequestAuthentication) -> str:
    return f"{p.kind} {p.key}"


def _principal_findings(p: AuthorizationPolicy, trust_domain: str | None) -> list[Finding]:
    out: list[Finding] = []
    locations: list[tuple[str, StringMatch]] = []
    for i, r in enumerate(p.rules or ()):
        for j, s in enumerate(r.sources or ()):
            for field_name, matches in (("principals", s.principals), ("notPrincipals", s.not_principals)):
                for k, m in enumerate(matches):
                    locations.append((f"spec.rules[{i}].from[{j}].source.{field_name}[{k}]", m))
        for j, c in enumerate(r.conditions or ()):
            if c.key == "source.principal":
                for label, vals in (("values", c.values), ("notValues", c.not_values)):
                    for k, v in enumerate(vals):
                        locations.append((f"spec.rules[{i}].when[{j}].{label}[{k}]", StringMatch.parse(v)))
    for path, m in locations:
        raw = m.raw
        if raw.startswith("spiffe://") or m.value.startswith("spiffe://"):
            out.append(
                Finding(
                    "spiffe-prefix",
                    WARNING,
                    _ref(p),
                    path,
                    f'"{raw}" never matches: principals are written without "spiffe://" '
                    f'(e.g. "{raw.removeprefix("spiffe://")}")',
                )
            )
            continue
        if m.kind is MatchKind.SUFFIX and "/ns/" in raw:
            td = trust_domain or "<trust-domain>"
            out.append(
                Finding(
                    "wildcard-trust-domain",
                    WARNING,
                    _ref(p),
                    path,
                    f'"{raw}" matches this identity from any trust domain; write "{td}{m.value}" '
                    "(or use serviceAccounts)",
                )
            )
            continue
        if trust_domain and m.kind in (MatchKind.EXACT, MatchKind.PREFIX) and "/" in m.value:
            td_part = m.value.split("/", 1)[0]
            if td_part != trust_domain:
                out.append(
                    Finding(
                        "trust-domain-mismatch",
                        WARNING,
                        _ref(p),
                        path,
                        f'"{raw}" names trust domain "{td_part}" but the mesh\'s is "{trust_domain}": '
                        "it never matches workloads of this mesh",
                    )
                )
    return out


def _enforced_at_node(p: AuthorizationPolicy) -> bool:
    return not p.dry_run and not p.for_waypoint


def lint(
    policies: PolicySet,
    *,
    trust_domain: str | None = None,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    workloads: Sequence[WorkloadRef] = (),
) -> list[Finding]:
    """Findings for a parsed policy set. ``workloads`` (optional) makes namespace checks precise."""
    out: list[Finding] = []
    for e in policies.errors:
        pol = f"{e.kind} {e.key}" if e.kind and e.key else (e.kind or f"document {e.document}")
        out.append(
            Finding(
                "invalid",
                ERROR,
                pol,
                e.path,
                f"{e.message} (document {e.document}; enforced fail-closed until fixed)",
            )
        )

    authz = [p for p in policies.authorization if not p.poisoned]
    for p in authz:
        if p.action is Action.ALLOW and p.rules is None and not p.for_waypoint:
            scope = _scope(p, root_namespace)
            out.append(
                Finding(
                    "empty-allow",
                    WARNING,
                    _ref(p),
                    "spec.rules",
                    f"this ALLOW has no rules, so it allows nothing: every connection to {scope} is "
                    "denied unless another ALLOW matches. That is the default-deny pattern; if you "
                    "meant allow-all, write `rules: [{}]`",
                )
            )
        out.extend(_principal_findings(p, trust_domain))
        if not p.for_waypoint:
            for i, r in enumerate(p.rules or ()):
                http = r.http_fields()
                if not http:
                    continue
                effect = (
                    "this ALLOW rule allows nothing"
                    if p.action is Action.ALLOW
                    else f"this {p.action.value} rule is enforced without them (more restrictive)"
                )
                out.append(
                    Finding(
                        "http-at-l4",
                        WARNING,
                        _ref(p),
                        f"spec.rules[{i}]",
                        f"HTTP attributes ({', '.join(http)}) in a policy attached by selector: the node "
                        f"agent enforces it and no waypoint will see it, so {effect}. Attach it to a "
                        "waypoint with targetRefs to enforce HTTP rules",
                    )
                )
    for ra in policies.request_authentication:
        if not ra.target_refs and not ra.poisoned:
            out.append(
                Finding(
                    "http-at-l4",
                    WARNING,
                    _ref(ra),
                    "spec.selector" if ra.selector else "",
                    "RequestAuthentication attached by selector is not enforced by the node agent (JWTs "
                    "are HTTP); attach it to a waypoint with targetRefs",
                )
            )

    out.extend(_default_deny_findings(authz, root_namespace, workloads))
    out.extend(_permissive_findings(policies, root_namespace, workloads))
    return out


def _scope(p: AuthorizationPolicy, root_namespace: str) -> str:
    where = "every namespace" if p.meta.namespace == root_namespace else f"namespace {p.meta.namespace}"
    if p.selector is not None and p.selector.match_labels:
        labels = ",".join(f"{k}={v}" for k, v in p.selector.match_labels.items())
        return f"workloads with {labels} in {where}"
    return f"all workloads in {where}"


def _default_deny_findings(
    authz: Iterable[AuthorizationPolicy], root_namespace: str, workloads: Sequence[WorkloadRef]
) -> list[Finding]:
    allows = [p for p in authz if p.action is Action.ALLOW and _enforced_at_node(p)]
    wide = {p.meta.namespace for p in allows if p.selector is None or not p.selector.match_labels}
    if root_namespace in wide:
        return []  # a mesh-wide ALLOW covers every workload
    out = []
    by_ns: dict[str, list[AuthorizationPolicy]] = {}
    for p in allows:
        by_ns.setdefault(p.meta.namespace, []).append(p)
    for ns, ps in sorted(by_ns.items()):
        if ns in wide:
            continue
        if ns == root_namespace:
            sel_ps = ps  # root selector policies cover matching workloads of every namespace
            uncovered = [w for w in workloads if not any(_selects(p, w) for p in sel_ps)]
        else:
            uncovered = [w for w in workloads if w.namespace == ns and not any(_selects(p, w) for p in ps)]
        if workloads and not uncovered:
            continue
        names = ", ".join(p.key for p in ps)
        who = (
            f"workloads {', '.join(f'{w.namespace}/{w.name}' for w in uncovered)}"
            if uncovered
            else f"other workloads in {'the mesh' if ns == root_namespace else 'namespace ' + ns}"
        )
        out.append(
            Finding(
                "allow-without-default-deny",
                WARNING,
                None,
                "",
                f"ALLOW policies {names} select only some workloads; {who} have no ALLOW policy and "
                f"accept every connection. Add a default deny (an AuthorizationPolicy with `spec: {{}}`) "
                f"in {ns} or in {root_namespace}",
            )
        )
    return out


def _selects(p: AuthorizationPolicy, w: WorkloadRef) -> bool:
    return p.selector is None or p.selector.matches(w.labels)


def _permissive_findings(
    policies: PolicySet, root_namespace: str, workloads: Sequence[WorkloadRef]
) -> list[Finding]:
    idx = PeerAuthIndex(policies.peer_authentication, root_namespace)
    if not workloads:
        d = idx.effective("\0any-namespace", EMPTY_LABELS, 0)
        if d.strict:
            return []
        return [
            Finding(
                "permissive",
                WARNING,
                None,
                "",
                f"mesh-wide mTLS is {d.describe()}: plaintext is accepted unless a namespace or workload "
                f"sets STRICT. Add a PeerAuthentication with mode STRICT in {root_namespace} once every "
                "client is in the mesh",
            )
        ]
    by_ns: dict[str, list[str]] = {}
    for w in workloads:
        d = idx.effective(w.namespace, w.labels, 0)
        ports = [p for p in _port_overrides(idx, w) if p[1] is not MtlsMode.STRICT]
        if not d.strict:
            by_ns.setdefault(w.namespace, []).append(f"{w.name} ({d.describe()})")
        elif ports:
            by_ns.setdefault(w.namespace, []).append(
                f"{w.name} ports {', '.join(str(p) for p, _ in ports)} (port-level {ports[0][1].value})"
            )
    return [
        Finding(
            "permissive",
            WARNING,
            None,
            "",
            f"namespace {ns}: plaintext accepted by {'; '.join(items)}. Set mode STRICT once every client "
            "is in the mesh",
        )
        for ns, items in sorted(by_ns.items())
    ]


def _port_overrides(idx: PeerAuthIndex, w: WorkloadRef) -> list[tuple[int, MtlsMode]]:
    p = idx.workload_policy(w.namespace, w.labels)
    if p is None or p.poisoned:
        return []
    return sorted((port, m) for port, m in p.port_level.items() if m is not MtlsMode.UNSET)
