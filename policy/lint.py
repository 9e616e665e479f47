"""Foot-gun detection for a policy set (``ztagent policy lint``). Pure: findings from models.

Every finding has a stable code (kebab-case, listed in :data:`CODES`, never renamed or reused) and a
severity: ``error`` (the policy set is not what the agent will enforce as written), ``warning``
(legal Istio that is rarely what the author meant, or that behaves differently at the node agent
than the author may expect), ``info`` (worth knowing, normal in many meshes). The CLI fails at a
threshold (``--failure-threshold``, default ``error``) and can suppress codes (``--suppress``), as
``istioctl analyze`` does: see :func:`parse_suppression`, :func:`suppress` and :func:`failing`.

Codes (severity):

* ``invalid`` (error): a document with errors (enforced fail-closed until fixed). A document
  without a namespace and no default (``-n``) is one, with the loader's own message.
* ``not-a-policy`` (info): a document of another API (a Deployment in the same bundle); skipped.
* ``empty-allow`` (warning): an ALLOW without rules allows nothing (a default deny, not allow-all).
* ``deny-without-rules`` (warning): a DENY without rules never matches: it has no effect (and
  istiod's validating webhook refuses it).
* ``spiffe-prefix`` (warning): a principal written ``spiffe://...`` never matches.
* ``wildcard-trust-domain`` (warning): ``*/ns/...`` matches that identity from any trust domain.
* ``trust-domain-mismatch`` (warning): a principal or trustDomains entry naming another trust
  domain than the mesh's.
* ``allow-without-default-deny`` (warning): ALLOW policies that select some workloads while the rest
  of the namespace (no namespace- or mesh-wide ALLOW) still accepts everything.
* ``plaintext-bypass`` (warning): a rule that plaintext clients get around while plaintext is
  accepted (no STRICT): a DENY that names mTLS identities (a plaintext peer has none, so it is not
  denied), or an ALLOW whose identity fields are all negative (a plaintext peer satisfies them).
* ``permissive`` (info): plaintext still accepted (no STRICT PeerAuthentication in effect). Info,
  not warning: PERMISSIVE is Istio's default and the normal state while a mesh is adopted; it only
  turns a policy into a foot-gun in the cases ``plaintext-bypass`` reports, so a file holding one
  policy does not get a warning about the whole mesh.
* ``http-at-l4`` (warning): HTTP attributes in a policy the node agent enforces (no waypoint sees
  it): an ALLOW rule holding them allows nothing; in a DENY rule they are dropped.
* ``deny-http-only`` (warning): a DENY rule made only of HTTP attributes: at L4 it denies every
  connection the policy selects (fail closed; istiod's ambient conversion does the same for
  ztunnel, "more restrictive than requested").
* ``custom-at-l4`` (warning): a CUSTOM policy attached by selector. ztagent deliberately fails
  closed (a connection it matches is denied: ext-authz needs HTTP), where istiod sends no CUSTOM
  policy to ztunnel at all, which then ignores it.
* ``audit-at-l4`` (info): an AUDIT policy attached by selector: ztunnel does not support AUDIT
  (istiod drops it); the node agent reports its matches and never changes a verdict.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from policy.authz import compile_rule_l4
from policy.model import (
    DEFAULT_ROOT_NAMESPACE,
    EMPTY_LABELS,
    Action,
    AuthorizationPolicy,
    MatchKind,
    MtlsMode,
    RequestAuthentication,
    Rule,
    StringMatch,
)
from policy.parse import NO_NAMESPACE_MESSAGE, DocumentIssue, PolicySet
from policy.peerauth import PeerAuthIndex

ERROR, WARNING, INFO = "error", "warning", "info"
SEVERITIES: Final = (INFO, WARNING, ERROR)  # ascending
_RANK: Final = {s: i for i, s in enumerate(SEVERITIES)}


@dataclass(frozen=True)
class Code:
    name: str
    severity: str
    summary: str


CODES: Final[Mapping[str, Code]] = {
    c.name: c
    for c in (
        Code("invalid", ERROR, "a document with errors; enforced fail-closed until fixed"),
        Code("not-a-policy", INFO, "a document of another API; skipped"),
        Code("empty-allow", WARNING, "an ALLOW without rules allows nothing"),
        Code("deny-without-rules", WARNING, "a DENY without rules has no effect"),
        Code("spiffe-prefix", WARNING, 'a principal written "spiffe://..." never matches'),
        Code("wildcard-trust-domain", WARNING, '"*/ns/..." matches the identity from any trust domain'),
        Code("trust-domain-mismatch", WARNING, "names another trust domain than the mesh's"),
        Code("allow-without-default-deny", WARNING, "workloads no ALLOW selects accept everything"),
        Code("plaintext-bypass", WARNING, "plaintext clients get around this rule (no STRICT mTLS)"),
        Code("permissive", INFO, "plaintext is accepted (no STRICT PeerAuthentication)"),
        Code("http-at-l4", WARNING, "HTTP attributes in a policy only the node agent sees"),
        Code("deny-http-only", WARNING, "a DENY rule of HTTP attributes only denies everything selected"),
        Code("custom-at-l4", WARNING, "CUSTOM at the node agent fails closed; ztunnel ignores it"),
        Code("audit-at-l4", INFO, "AUDIT at the node agent only reports; ztunnel ignores it"),
    )
}


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str  # "error" | "warning" | "info"
    policy: str | None  # "Kind namespace/name" (or "document N ..."), None for mesh/namespace-wide
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


def finding(code: str, policy: str | None, path: str, message: str) -> Finding:
    """A finding with the severity its code is registered with."""
    return Finding(code, CODES[code].severity, policy, path, message)


@dataclass(frozen=True)
class WorkloadRef:
    """What lint needs to know about a workload (from the MeshConfig, when one is given)."""

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_LABELS)


# --------------------------------------------------------------------------------------------
# Thresholds and suppressions (the CLI's --failure-threshold and --suppress)


@dataclass(frozen=True)
class Suppression:
    """``CODE`` (everywhere) or ``CODE=GLOB``: only findings whose policy matches the shell-style
    glob, written ``Kind namespace/name`` or ``namespace/name`` (e.g. ``empty-allow=istio-system/*``)."""

    code: str
    glob: str | None = None

    def matches(self, f: Finding) -> bool:
        if f.code != self.code:
            return False
        if self.glob is None:
            return True
        if f.policy is None:
            return self.glob == "*"
        names = (f.policy, f.policy.split(" ", 1)[-1])
        return any(fnmatch.fnmatchcase(n, self.glob) for n in names)


def parse_suppression(text: str) -> Suppression:
    """``CODE`` or ``CODE=GLOB``; ``ValueError`` naming the known codes for an unknown code (a
    misspelt suppression must not silently suppress nothing)."""
    code, sep, glob = text.partition("=")
    code = code.strip()
    if code not in CODES:
        raise ValueError(f"unknown lint code {code!r} (known: {', '.join(CODES)})")
    if sep and not glob.strip():
        raise ValueError(f"{text!r}: empty policy glob after '='")
    return Suppression(code, glob.strip() if sep else None)


def suppress(findings: Iterable[Finding], suppressions: Sequence[Suppression]) -> list[Finding]:
    return [f for f in findings if not any(s.matches(f) for s in suppressions)]


def failing(findings: Iterable[Finding], threshold: str = ERROR) -> list[Finding]:
    """The findings at or above ``threshold`` (the ones that make ``lint`` exit 1)."""
    if threshold not in _RANK:
        raise ValueError(f"unknown severity {threshold!r} (expected one of {', '.join(SEVERITIES)})")
    return [f for f in findings if _RANK[f.severity] >= _RANK[threshold]]


# --------------------------------------------------------------------------------------------
# Checks


def _ref(p: AuthorizationPolicy | RequestAuthentication) -> str:
    return f"{p.kind} {p.key}"


def _principal_findings(p: AuthorizationPolicy, trust_domain: str | None) -> list[Finding]:
    out: list[Finding] = []
    locations: list[tuple[str, StringMatch]] = []
    tds: list[tuple[str, StringMatch]] = []
    for i, r in enumerate(p.rules or ()):
        for j, s in enumerate(r.sources or ()):
            for field_name, matches in (("principals", s.principals), ("notPrincipals", s.not_principals)):
                for k, m in enumerate(matches):
                    locations.append((f"spec.rules[{i}].from[{j}].source.{field_name}[{k}]", m))
            for k, m in enumerate(s.trust_domains):
                tds.append((f"spec.rules[{i}].from[{j}].source.trustDomains[{k}]", m))
        for j, c in enumerate(r.conditions or ()):
            if c.key == "source.principal":
                for label, vals in (("values", c.values), ("notValues", c.not_values)):
                    for k, v in enumerate(vals):
                        locations.append((f"spec.rules[{i}].when[{j}].{label}[{k}]", StringMatch.parse(v)))
            elif c.key == "source.trustDomain":
                for k, v in enumerate(c.values):
                    tds.append((f"spec.rules[{i}].when[{j}].values[{k}]", StringMatch.parse(v)))
    for path, m in locations:
        raw = m.raw
        if raw.startswith("spiffe://") or m.value.startswith("spiffe://"):
            out.append(
                finding(
                    "spiffe-prefix",
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
                finding(
                    "wildcard-trust-domain",
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
                    finding(
                        "trust-domain-mismatch",
                        _ref(p),
                        path,
                        f'"{raw}" names trust domain "{td_part}" but the mesh\'s is "{trust_domain}": '
                        "it never matches workloads of this mesh",
                    )
                )
    for path, m in tds:
        if trust_domain and m.kind is MatchKind.EXACT and m.value != trust_domain:
            out.append(
                finding(
                    "trust-domain-mismatch",
                    _ref(p),
                    path,
                    f'"{m.raw}" is not the mesh\'s trust domain "{trust_domain}": it matches only peers '
                    "of a federated trust domain",
                )
            )
    return out


def _enforced_at_node(p: AuthorizationPolicy) -> bool:
    return not p.dry_run and not p.for_waypoint


def _document_ref(kind: str | None, key: str | None, document: int) -> str:
    if kind and key:
        if key.startswith("/"):  # no namespace: "AuthorizationPolicy name (no namespace)"
            return f"{kind} {key[1:]} (no namespace)"
        return f"{kind} {key}"
    return f"document {document}" + (f" ({kind})" if kind else "")


def document_findings(issues: Iterable[DocumentIssue], file: str | None = None) -> list[Finding]:
    """The findings for documents that failed to parse: ``invalid``, or ``not-a-policy`` (once per
    document) for a document of another API. ``file`` names where they are, when known."""
    out: list[Finding] = []
    foreign_seen: set[int] = set()
    for e in issues:
        where = f"{file}, document {e.document}" if file else f"document {e.document}"
        if e.foreign:
            if e.document not in foreign_seen:
                foreign_seen.add(e.document)
                out.append(
                    finding(
                        "not-a-policy",
                        _document_ref(e.kind, None, e.document),
                        "",
                        f"not an Istio security policy (kind {e.kind}; {where}); skipped",
                    )
                )
            continue
        # The namespace message already says how the policy is enforced meanwhile.
        effect = "" if e.message == NO_NAMESPACE_MESSAGE else "; enforced fail-closed until fixed"
        out.append(
            finding(
                "invalid", _document_ref(e.kind, e.key, e.document), e.path, f"{e.message} ({where}{effect})"
            )
        )
    return out


def lint(
    policies: PolicySet,
    *,
    trust_domain: str | None = None,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    workloads: Sequence[WorkloadRef] = (),
    suppressions: Sequence[Suppression] = (),
) -> list[Finding]:
    """Findings for a parsed policy set. ``workloads`` (optional) makes namespace checks precise;
    ``suppressions`` drop findings (see :class:`Suppression`)."""
    out = document_findings(policies.errors)
    authz = [p for p in policies.authorization if not p.poisoned]
    for p in authz:
        out.extend(_policy_findings(p, root_namespace))
        out.extend(_principal_findings(p, trust_domain))
    for ra in policies.request_authentication:
        if not ra.target_refs and not ra.poisoned:
            out.append(
                finding(
                    "http-at-l4",
                    _ref(ra),
                    "spec.selector" if ra.selector else "",
                    "RequestAuthentication attached by selector is not enforced by the node agent (JWTs "
                    "are HTTP); attach it to a waypoint with targetRefs",
                )
            )

    out.extend(_default_deny_findings(authz, root_namespace, workloads))
    peer_idx = PeerAuthIndex(policies.peer_authentication, root_namespace)
    out.extend(_plaintext_bypass_findings(authz, peer_idx, root_namespace, workloads))
    out.extend(_permissive_findings(peer_idx, root_namespace, workloads))
    return suppress(out, suppressions)


def _policy_findings(p: AuthorizationPolicy, root_namespace: str) -> list[Finding]:
    out: list[Finding] = []
    if p.for_waypoint:
        return out
    scope = _scope(p, root_namespace)
    if p.action is Action.ALLOW and p.rules is None:
        out.append(
            finding(
                "empty-allow",
                _ref(p),
                "spec.rules",
                f"this ALLOW has no rules, so it allows nothing: every connection to {scope} is "
                "denied unless another ALLOW matches. That is the default-deny pattern; if you "
                "meant allow-all, write `rules: [{}]`",
            )
        )
    if p.action is Action.DENY and p.rules is None:
        out.append(
            finding(
                "deny-without-rules",
                _ref(p),
                "spec.rules",
                "this DENY has no rules, so it never matches and has no effect (istiod's validating "
                "webhook refuses it). To deny every connection to " + scope + ", write `rules: [{}]`",
            )
        )
    if p.action is Action.CUSTOM:
        out.append(
            finding(
                "custom-at-l4",
                _ref(p),
                "spec.action",
                f"CUSTOM (provider {p.provider or '?'}) attached by selector: ext-authz needs HTTP, so the "
                f"node agent deliberately fails closed and denies every connection to {scope} that the "
                "policy matches, whereas istiod sends no CUSTOM policy to ztunnel, which ignores it. "
                "Attach it to a waypoint with targetRefs",
            )
        )
    if p.action is Action.AUDIT:
        out.append(
            finding(
                "audit-at-l4",
                _ref(p),
                "spec.action",
                "AUDIT attached by selector: ztunnel does not support AUDIT (istiod drops it); the node "
                "agent reports its matches and never changes a verdict",
            )
        )
    for i, r in enumerate(p.rules or ()):
        http = r.http_fields()
        if not http:
            continue
        found = ", ".join(http)
        if p.action is not Action.ALLOW and compile_rule_l4(r, p.action) == ():
            out.append(
                finding(
                    "deny-http-only" if p.action is Action.DENY else "http-at-l4",
                    _ref(p),
                    f"spec.rules[{i}]",
                    f"this {p.action.value} rule holds only HTTP attributes ({found}), which the node "
                    f"agent cannot see: it matches every connection to {scope}"
                    + (
                        " and denies it (fail closed; istiod's ambient conversion does the same for "
                        "ztunnel). Scope it to ports, or attach it to a waypoint with targetRefs"
                        if p.action is Action.DENY
                        else ". Attach it to a waypoint with targetRefs"
                    ),
                )
            )
            continue
        effect = (
            "this ALLOW rule allows nothing"
            if p.action is Action.ALLOW
            else f"this {p.action.value} rule is enforced without them (more restrictive)"
        )
        out.append(
            finding(
                "http-at-l4",
                _ref(p),
                f"spec.rules[{i}]",
                f"HTTP attributes ({found}) in a policy attached by selector: the node "
                f"agent enforces it and no waypoint will see it, so {effect}. Attach it to a "
                "waypoint with targetRefs to enforce HTTP rules",
            )
        )
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
            finding(
                "allow-without-default-deny",
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


# Identity fields: what a plaintext peer (no certificate) never matches positively.
def _identity_fields(r: Rule) -> tuple[list[str], list[str]]:
    pos: list[str] = []
    neg: list[str] = []
    for s in r.sources or ():
        for name, vals in (
            ("principals", s.principals),
            ("namespaces", s.namespaces),
            ("serviceAccounts", s.service_accounts),
            ("trustDomains", s.trust_domains),
        ):
            if vals:
                pos.append(name)
        for name, vals in (
            ("notPrincipals", s.not_principals),
            ("notNamespaces", s.not_namespaces),
            ("notServiceAccounts", s.not_service_accounts),
            ("notTrustDomains", s.not_trust_domains),
        ):
            if vals:
                neg.append(name)
    for c in r.conditions or ():
        if c.key in ("source.principal", "source.namespace", "source.trustDomain"):
            if c.values:
                pos.append(f"when {c.key}")
            if c.not_values:
                neg.append(f"when {c.key} notValues")
    return list(dict.fromkeys(pos)), list(dict.fromkeys(neg))


def _plaintext_bypass_findings(
    authz: Iterable[AuthorizationPolicy],
    peer_idx: PeerAuthIndex,
    root_namespace: str,
    workloads: Sequence[WorkloadRef],
) -> list[Finding]:
    out: list[Finding] = []
    for p in authz:
        if not _enforced_at_node(p) or p.action not in (Action.ALLOW, Action.DENY):
            continue
        open_to_plaintext = _plaintext_reaches(p, peer_idx, root_namespace, workloads)
        if open_to_plaintext is None:
            continue
        for i, r in enumerate(p.rules or ()):
            if p.action is Action.ALLOW and r.http_fields():
                continue  # omitted at L4 (http-at-l4 says so)
            pos, neg = _identity_fields(r)
            if p.action is Action.DENY and pos:
                out.append(
                    finding(
                        "plaintext-bypass",
                        _ref(p),
                        f"spec.rules[{i}]",
                        f"this DENY rule names mTLS identities ({', '.join(pos)}), which a plaintext "
                        f"client does not have, and plaintext is accepted ({open_to_plaintext}): a "
                        "plaintext client is not denied. Set PeerAuthentication STRICT, or deny "
                        "plaintext too (a DENY rule with `notPrincipals: ['*']`)",
                    )
                )
            elif p.action is Action.ALLOW and neg and not pos:
                out.append(
                    finding(
                        "plaintext-bypass",
                        _ref(p),
                        f"spec.rules[{i}]",
                        f"this ALLOW rule only excludes identities ({', '.join(neg)}); a plaintext client "
                        f"has none, satisfies it and is allowed, and plaintext is accepted "
                        f"({open_to_plaintext}). Add `principals: ['*']` to require mTLS, or set STRICT",
                    )
                )
    return out


def _plaintext_reaches(
    p: AuthorizationPolicy, peer_idx: PeerAuthIndex, root_namespace: str, workloads: Sequence[WorkloadRef]
) -> str | None:
    """How plaintext reaches a workload the policy selects (a description), or None if it cannot."""
    labels = p.selector.match_labels if p.selector is not None else EMPTY_LABELS
    if workloads:
        for w in workloads:
            if p.meta.namespace not in (w.namespace, root_namespace):
                continue
            if p.selector is not None and not p.selector.matches(w.labels):
                continue
            d = peer_idx.effective(w.namespace, w.labels, 0)
            if not d.strict:
                return f"{w.namespace}/{w.name}: {d.describe()}"
        return None
    ns = "\0any-namespace" if p.meta.namespace == root_namespace else p.meta.namespace
    d = peer_idx.effective(ns, labels, 0)
    return None if d.strict else d.describe()


def _permissive_findings(
    idx: PeerAuthIndex, root_namespace: str, workloads: Sequence[WorkloadRef]
) -> list[Finding]:
    if not workloads:
        d = idx.effective("\0any-namespace", EMPTY_LABELS, 0)
        if d.strict:
            return []
        return [
            finding(
                "permissive",
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
        finding(
            "permissive",
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
