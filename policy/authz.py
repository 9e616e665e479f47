"""L4 authorization as the destination node agent applies it (Istio ambient / ztunnel semantics).

Evaluation order, Istio's documented steps (AuthorizationPolicy reference):

1. CUSTOM policies that match -> deny. ext-authz needs an HTTP-aware proxy; the node agent has
   none, so a matching CUSTOM policy fails closed (istiod would skip the policy for ztunnel, i.e.
   fail open; we refuse to). Its HTTP fields are dropped first, so usually it matches everything
   it selects: put CUSTOM policies on a waypoint (targetRefs).
2. DENY policies that match -> deny.
3. No ALLOW policies select the workload -> allow.
4. Any ALLOW policy matches -> allow.
5. Otherwise deny.

AUDIT policies and dry-run policies (annotation ``istio.io/dry-run: "true"``) never change the
verdict; they are reported as matched, and dry-run ALLOWs do not count as present. A dry-run
verdict (what would happen if the dry-run policies were enforced) is reported as well.

Matching: rules OR'ed; within a rule ``from`` (any source), ``to`` (any operation) and every
``when`` AND'ed; within a source/operation fields AND'ed, values OR'ed, ``not*`` = none may match.
Unset ``rules`` never match; ``rules: [{}]`` always matches. Principals compare against the SPIFFE
ID without ``spiffe://``; trust domain, namespace and service account come from the peer's SPIFFE
ID (``<td>/ns/<ns>/sa/<sa>``; the trust domain is its first segment whatever the path's shape). A
plaintext peer (no identity) never matches a positive identity field (principals, namespaces,
serviceAccounts, trustDomains and their ``when`` keys) and always satisfies a negative one.

HTTP-only attributes (hosts, methods, paths and their negations, requestPrincipals,
remoteIpBlocks, and every ``when`` key except the L4 ones in :data:`policy.model.L4_CONDITION_KEYS`)
cannot be evaluated on a connection. An ALLOW rule containing one is dropped (allows nothing). In a
DENY/CUSTOM/AUDIT rule they are dropped and the L4 remainder is enforced, so a DENY rule made only
of HTTP fields denies everything its policy selects.

An unknown source or destination IP (``None``) is evaluated fail-closed: IP fields and IP
conditions do not match for ALLOW and do match for DENY/CUSTOM.

Scope: a policy in the root namespace applies mesh-wide (its selector, if any, matched against
workloads of every namespace); other policies apply to their namespace; ``selector.matchLabels``
must be a subset of the workload's labels. Policies attached with targetRef(s) belong to a
waypoint and are not applied here. :class:`PolicyIndex` groups policies by namespace so a decision
reads only the root namespace's and the destination namespace's policies.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from policy.model import (
    DEFAULT_ROOT_NAMESPACE,
    EMPTY_LABELS,
    Action,
    AuthorizationPolicy,
    IPAddress,
    IPNetwork,
    PeerAuthentication,
    Policy,
    Rule,
    StringMatch,
)
from policy.parse import PolicySet, parse_ip_block
from policy.peerauth import MtlsDecision, PeerAuthIndex

_SPIFFE = "spiffe://"


# --------------------------------------------------------------------------------------------
# Inputs and outputs


@dataclass(frozen=True, slots=True)
class Connection:
    """One connection as the destination agent sees it.

    ``source_principal`` is the peer's SPIFFE ID in Istio principal form (``td/ns/a/sa/b``; a
    leading ``spiffe://`` is accepted and removed), or ``None`` for a plaintext peer. Pass the
    identity package's ``SpiffeId.principal``. IPs may be ``None`` when unknown (fail closed).
    """

    source_principal: str | None
    source_ip: IPAddress | None
    destination_namespace: str
    destination_port: int
    destination_labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_LABELS)
    destination_ip: IPAddress | None = None
    # Derived from source_principal in __post_init__: "" when absent (or, for namespace and
    # service account, when the SPIFFE path is not Istio-shaped).
    source_trust_domain: str = field(init=False, default="")
    source_namespace: str = field(init=False, default="")
    source_service_account: str = field(init=False, default="")

    def __post_init__(self) -> None:
        # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; policy CIDRs are written in
        # IPv4, and a DENY on 10.0.0.0/8 must not be dodged by the mapped form.
        for name in ("source_ip", "destination_ip"):
            ip = getattr(self, name)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                object.__setattr__(self, name, ip.ipv4_mapped)
        p = self.source_principal
        if p is None:
            return
        if p.startswith(_SPIFFE):
            p = p[len(_SPIFFE) :]
            object.__setattr__(self, "source_principal", p)
        # Istio's identity shape: <trust-domain>/ns/<namespace>/sa/<service-account>.
        parts = p.split("/")
        object.__setattr__(self, "source_trust_domain", parts[0])
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa" and parts[2] and parts[4]:
            object.__setattr__(self, "source_namespace", parts[2])
            object.__setattr__(self, "source_service_account", parts[4])

    @property
    def plaintext(self) -> bool:
        return self.source_principal is None


class Verdict(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"


# Stable, low-cardinality reason codes for metrics labels and scripts.
CODE_NO_POLICY = "no-policy"  # allow: no ALLOW policy selects the workload
CODE_ALLOW_MATCHED = "allow-matched"
CODE_DENY_MATCHED = "deny-matched"
CODE_NO_ALLOW_MATCHED = "no-allow-matched"
CODE_CUSTOM_UNSUPPORTED = "custom-unsupported"
CODE_INVALID_POLICY = "invalid-policy"  # a poisoned DENY/CUSTOM decided
CODE_MTLS_REQUIRED = "mtls-required"  # PeerAuthentication STRICT and the peer is plaintext


@dataclass(frozen=True)
class PolicyMatch:
    """A policy that matched without deciding (AUDIT, or dry-run of any action)."""

    policy: str  # "namespace/name"
    action: Action


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    policies: tuple[str, ...]  # the deciding policies ("namespace/name"); empty for a default allow
    reason: str
    code: str
    audit: tuple[str, ...] = ()  # AUDIT policies that matched
    dry_run: tuple[PolicyMatch, ...] = ()  # dry-run policies that matched
    dry_run_verdict: Verdict | None = None  # the verdict if dry-run policies were enforced
    mtls: MtlsDecision | None = None  # set by PolicyIndex.check

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "decision": self.verdict.value,
            "policies": list(self.policies),
            "reason": self.reason,
            "code": self.code,
            "audit": list(self.audit),
            "dryRun": [{"policy": m.policy, "action": m.action.value} for m in self.dry_run],
            "dryRunDecision": self.dry_run_verdict.value if self.dry_run_verdict else None,
        }
        if self.mtls is not None:
            out["mtls"] = {"mode": self.mtls.mode.value, "policy": self.mtls.policy, "level": self.mtls.level}
        return out


# --------------------------------------------------------------------------------------------
# Compiled L4 form


def _principal_matches(m: StringMatch, principal: str | None) -> bool:
    return principal is not None and m.matches(principal)


@dataclass(frozen=True, slots=True)
class L4Match:
    """Fields AND'ed; within a field values OR'ed; a ``not_`` field must match none. Empty = all."""

    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[tuple[str, str], ...] = ()
    not_service_accounts: tuple[tuple[str, str], ...] = ()
    trust_domains: tuple[StringMatch, ...] = ()
    not_trust_domains: tuple[StringMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    ports: frozenset[int] = frozenset()
    not_ports: frozenset[int] = frozenset()

    def matches(self, c: Connection, unknown_ip_matches: bool) -> bool:
        if self.ports and c.destination_port not in self.ports:
            return False
        if self.not_ports and c.destination_port in self.not_ports:
            return False
        p = c.source_principal
        if self.principals and not any(_principal_matches(m, p) for m in self.principals):
            return False
        if self.not_principals and any(_principal_matches(m, p) for m in self.not_principals):
            return False
        # A plaintext peer has no namespace / service account: positive fields fail, negative pass.
        ns = c.source_namespace
        if self.namespaces and not (ns and any(m.matches(ns) for m in self.namespaces)):
            return False
        if self.not_namespaces and ns and any(m.matches(ns) for m in self.not_namespaces):
            return False
        if self.service_accounts or self.not_service_accounts:
            sa = (ns, c.source_service_account)
            if self.service_accounts and not (ns and sa in self.service_accounts):
                return False
            if self.not_service_accounts and ns and sa in self.not_service_accounts:
                return False
        td = c.source_trust_domain
        if self.trust_domains and not (td and any(m.matches(td) for m in self.trust_domains)):
            return False
        if self.not_trust_domains and td and any(m.matches(td) for m in self.not_trust_domains):
            return False
        src = self.source_ips or self.not_source_ips
        if src and not _ip_ok(c.source_ip, self.source_ips, self.not_source_ips, unknown_ip_matches):
            return False
        dst = self.destination_ips or self.not_destination_ips
        return not dst or _ip_ok(
            c.destination_ip, self.destination_ips, self.not_destination_ips, unknown_ip_matches
        )


def _ip_ok(
    ip: IPAddress | None, pos: tuple[IPNetwork, ...], neg: tuple[IPNetwork, ...], unknown: bool
) -> bool:
    if ip is None:
        return unknown
    if pos and not any(ip in n for n in pos):
        return False
    return not (neg and any(ip in n for n in neg))


_MATCH_ALL = L4Match()
# A rule is a tuple of clauses (AND); a clause is a tuple of matches (OR).
L4Rule = tuple[tuple[L4Match, ...], ...]


def _values_to_ips(values: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    out = []
    for v in values:
        n = parse_ip_block(v)  # validated at parse time; a poisoned policy never gets here
        if n is not None:
            out.append(n)
    return tuple(out)


def _condition_match(key: str, values: tuple[str, ...], negative: bool) -> dict[str, Any]:
    pre = "not_" if negative else ""
    if key == "source.ip":
        return {f"{pre}source_ips": _values_to_ips(values)}
    if key == "destination.ip":
        return {f"{pre}destination_ips": _values_to_ips(values)}
    if key == "destination.port":
        return {f"{pre}ports": frozenset(int(v) for v in values if v.isascii() and v.isdigit())}
    if key == "source.namespace":
        return {f"{pre}namespaces": tuple(StringMatch.parse(v) for v in values)}
    if key == "source.trustDomain":
        return {f"{pre}trust_domains": tuple(StringMatch.parse(v) for v in values)}
    assert key == "source.principal"
    return {f"{pre}principals": tuple(StringMatch.parse(v) for v in values)}


def compile_rule_l4(rule: Rule, action: Action) -> L4Rule | None:
    """The L4 form of one rule, or ``None`` if it can never match at L4 (ALLOW with HTTP fields)."""
    if action is Action.ALLOW and rule.http_fields():
        return None
    clauses: list[tuple[L4Match, ...]] = []
    if rule.sources is not None:
        clauses.append(
            tuple(
                L4Match(
                    principals=s.principals,
                    not_principals=s.not_principals,
                    namespaces=s.namespaces,
                    not_namespaces=s.not_namespaces,
                    service_accounts=tuple((m.namespace, m.service_account) for m in s.service_accounts),
                    not_service_accounts=tuple(
                        (m.namespace, m.service_account) for m in s.not_service_accounts
                    ),
                    trust_domains=s.trust_domains,
                    not_trust_domains=s.not_trust_domains,
                    source_ips=s.ip_blocks,
                    not_source_ips=s.not_ip_blocks,
                )
                for s in rule.sources
            )
        )
    if rule.operations is not None:
        clauses.append(
            tuple(
                L4Match(ports=frozenset(o.ports), not_ports=frozenset(o.not_ports)) for o in rule.operations
            )
        )
    for c in rule.conditions or ():
        if not c.is_l4:
            continue  # only reachable for DENY/CUSTOM/AUDIT: the HTTP part is dropped
        kw: dict[str, Any] = {}
        if c.values:
            kw.update(_condition_match(c.key, c.values, False))
        if c.not_values:
            kw.update(_condition_match(c.key, c.not_values, True))
        clauses.append((L4Match(**kw),))
    # Drop clauses holding a match-everything alternative: they cannot fail.
    return tuple(cl for cl in clauses if _MATCH_ALL not in cl)


@dataclass(frozen=True)
class CompiledPolicy:
    """An AuthorizationPolicy ready for L4 evaluation."""

    policy: AuthorizationPolicy
    key: str
    namespace: str
    action: Action
    dry_run: bool
    selector: Mapping[str, str] | None  # None: whole namespace (or mesh, in the root namespace)
    # The selector's (key, value) pairs: "selects" is then a set-subset test against the labels.
    selector_items: frozenset[tuple[str, str]]
    rules: tuple[L4Rule, ...]  # empty: never matches
    match_all: bool  # a poisoned DENY/CUSTOM/AUDIT: matches every connection it selects

    @classmethod
    def compile(cls, p: AuthorizationPolicy) -> CompiledPolicy:
        rules: list[L4Rule] = []
        match_all = False
        if p.poisoned:
            match_all = p.action is not Action.ALLOW
        else:
            for r in p.rules or ():
                cr = compile_rule_l4(r, p.action)
                if cr is not None:
                    rules.append(cr)
        sel = p.selector.match_labels if p.selector is not None and p.selector.match_labels else None
        items = frozenset(sel.items()) if sel is not None else frozenset()
        return cls(p, p.key, p.meta.namespace, p.action, p.dry_run, sel, items, tuple(rules), match_all)

    def selects(self, namespace: str, labels: Mapping[str, str], root_namespace: str) -> bool:
        if self.namespace not in (namespace, root_namespace, ""):
            return False
        if self.selector is None:
            return True
        return all(labels.get(k) == v for k, v in self.selector.items())

    def matches(self, c: Connection) -> bool:
        if self.match_all:
            return True
        unknown_ip = self.action is not Action.ALLOW  # fail closed on unknown IPs
        for rule in self.rules:
            for clause in rule:
                for m in clause:
                    if m.matches(c, unknown_ip):
                        break
                else:
                    break  # no alternative of this clause matched: the rule fails
            else:
                return True
        return False

    def invalid_note(self) -> str:
        first = self.policy.errors[0] if self.policy.errors else None
        return f"{self.key} is invalid ({first})" if first else self.key


# --------------------------------------------------------------------------------------------
# Decision


def decide(conn: Connection, selected: Sequence[CompiledPolicy]) -> Decision:
    """Istio's evaluation order over the policies that select the destination."""
    audit: list[str] = []
    dry: list[PolicyMatch] = []
    has_dry = False
    for p in selected:
        if p.dry_run:
            has_dry = True
            if p.matches(conn):
                dry.append(PolicyMatch(p.key, p.action))
        elif p.action is Action.AUDIT and p.matches(conn):
            audit.append(p.key)
    verdict = _enforce(conn, selected, enforce_dry_run=False)
    dry_verdict = _enforce(conn, selected, enforce_dry_run=True).verdict if has_dry else None
    if audit or dry or has_dry:
        return Decision(
            verdict.verdict,
            verdict.policies,
            verdict.reason,
            verdict.code,
            tuple(audit),
            tuple(dry),
            dry_verdict,
        )
    return verdict


def _enforce(conn: Connection, selected: Sequence[CompiledPolicy], enforce_dry_run: bool) -> Decision:
    custom: list[CompiledPolicy] = []
    denies: list[CompiledPolicy] = []
    allows: list[CompiledPolicy] = []
    for p in selected:
        if p.dry_run and not enforce_dry_run:
            continue
        a = p.action
        if a is Action.ALLOW:
            allows.append(p)
        elif a is Action.DENY:
            if p.matches(conn):
                denies.append(p)
        elif a is Action.CUSTOM and p.matches(conn):
            custom.append(p)
    if custom:
        names = tuple(p.key for p in custom)
        providers = ", ".join(sorted({p.policy.provider or "?" for p in custom}))
        return Decision(
            Verdict.DENY,
            names,
            f"CUSTOM policy {', '.join(names)} (provider {providers}) matched; ext-authz is not supported "
            "by the node agent, so it fails closed (attach CUSTOM policies to a waypoint)",
            CODE_CUSTOM_UNSUPPORTED,
        )
    if denies:
        names = tuple(p.key for p in denies)
        invalid = [p for p in denies if p.policy.poisoned]
        if invalid and len(invalid) == len(denies):
            return Decision(
                Verdict.DENY,
                names,
                "DENY policy "
                + "; ".join(p.invalid_note() for p in invalid)
                + " and denies everything it selects (fail closed)",
                CODE_INVALID_POLICY,
            )
        return Decision(Verdict.DENY, names, f"DENY policy {', '.join(names)} matched", CODE_DENY_MATCHED)
    if not allows:
        return Decision(
            Verdict.ALLOW, (), "no ALLOW policy selects the destination (default allow)", CODE_NO_POLICY
        )
    matched = tuple(p.key for p in allows if p.matches(conn))
    if matched:
        return Decision(
            Verdict.ALLOW, matched, f"ALLOW policy {', '.join(matched)} matched", CODE_ALLOW_MATCHED
        )
    names = tuple(p.key for p in allows)
    reason = f"no ALLOW policy matched (ALLOW policies selecting the destination: {', '.join(names)})"
    invalid = [p for p in allows if p.policy.poisoned]
    if invalid:
        reason += "; invalid and allowing nothing: " + "; ".join(p.invalid_note() for p in invalid)
    return Decision(Verdict.DENY, names, reason, CODE_NO_ALLOW_MATCHED)


def evaluate(
    conn: Connection,
    policies: Iterable[AuthorizationPolicy | CompiledPolicy],
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
) -> Decision:
    """Decide by scanning every policy (no index): simple, and the benchmark's reference."""
    selected = []
    for p in policies:
        cp = p if isinstance(p, CompiledPolicy) else CompiledPolicy.compile(p)
        if cp.policy.for_waypoint:
            continue
        if cp.selects(conn.destination_namespace, conn.destination_labels, root_namespace):
            selected.append(cp)
    # Same order as PolicyIndex.select: root-namespace policies first, then by namespace/name.
    selected.sort(key=lambda p: (p.namespace not in (root_namespace, ""), p.key))
    return decide(conn, selected)


def plaintext_refused(conn: Connection, mtls: MtlsDecision) -> Decision:
    assert mtls.policy is not None
    return Decision(
        Verdict.DENY,
        (mtls.policy,),
        f"PeerAuthentication {mtls.policy} requires mTLS ({mtls.level} level STRICT) on port "
        f"{conn.destination_port}; the connection is plaintext",
        CODE_MTLS_REQUIRED,
        mtls=mtls,
    )


# --------------------------------------------------------------------------------------------
# Index


class PolicyIndex:
    """Policies grouped for per-connection decisions at the destination agent.

    A decision for a workload in namespace N reads only the root namespace's policies and N's:
    its cost does not grow with policies elsewhere in the mesh. Immutable: build a new index on
    each policy change (cheap: one compile per policy) and swap it in.
    """

    def __init__(
        self,
        policies: PolicySet | Iterable[Policy],
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
    ) -> None:
        self.root_namespace = root_namespace
        authz: list[AuthorizationPolicy] = []
        peer: list[PeerAuthentication] = []
        for p in policies:
            if isinstance(p, AuthorizationPolicy):
                authz.append(p)
            elif isinstance(p, PeerAuthentication):
                peer.append(p)
        self.authorization_policies: tuple[AuthorizationPolicy, ...] = tuple(authz)
        self.peer_authentications: tuple[PeerAuthentication, ...] = tuple(peer)
        compiled = sorted(
            (CompiledPolicy.compile(p) for p in authz if not p.for_waypoint), key=lambda c: c.key
        )
        root: list[CompiledPolicy] = []
        by_ns: dict[str, list[CompiledPolicy]] = {}
        for cp in compiled:
            # An unknown namespace ("" after a parse error) is treated as the root: fail closed.
            if cp.namespace in (root_namespace, ""):
                root.append(cp)
            else:
                by_ns.setdefault(cp.namespace, []).append(cp)
        self._root = tuple(root)
        self._by_ns = {ns: tuple(ps) for ns, ps in by_ns.items()}
        self._peer = PeerAuthIndex(peer, root_namespace)

    def select(self, namespace: str, labels: Mapping[str, str]) -> list[CompiledPolicy]:
        """The policies that apply to a workload, in a stable (namespace/name) order."""
        items = labels.items()  # a set-like view: `frozenset <= view` is a C-level subset test
        out = [p for p in self._root if p.selector_items <= items]
        if namespace != self.root_namespace:
            out.extend(p for p in self._by_ns.get(namespace, ()) if p.selector_items <= items)
        return out

    def evaluate(self, conn: Connection) -> Decision:
        """AuthorizationPolicy only (no PeerAuthentication)."""
        return decide(conn, self.select(conn.destination_namespace, conn.destination_labels))

    def mtls(self, namespace: str, labels: Mapping[str, str], port: int) -> MtlsDecision:
        return self._peer.effective(namespace, labels, port)

    def check(self, conn: Connection) -> Decision:
        """Everything the destination agent decides for a new connection: PeerAuthentication
        (STRICT refuses plaintext), then AuthorizationPolicy."""
        mtls = self._peer.effective(
            conn.destination_namespace, conn.destination_labels, conn.destination_port
        )
        if conn.plaintext and mtls.strict:
            return plaintext_refused(conn, mtls)
        d = self.evaluate(conn)
        return Decision(d.verdict, d.policies, d.reason, d.code, d.audit, d.dry_run, d.dry_run_verdict, mtls)
