"""One HTTP request's decision at a waypoint: RequestAuthentication, then L7 AuthorizationPolicy.

The same code answers the waypoint's requests and ``ztagent policy check`` (so an offline
explanation is the decision the proxy makes). No I/O: the ext_authz call (CUSTOM) is the
caller's; :func:`decide` returns ``pending_custom`` and the caller decides again with the
authorizer's :class:`~policy.l7.CustomOutcome`. Time is a parameter (``now``, epoch seconds).

Order, as Istio's waypoint filter chain runs it: ``jwt_authn`` (a bad token is 401, audience
mismatch 403, no token passes without a principal), then RBAC with the CUSTOM step first.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from mesh.model import Snapshot, Waypoint
from policy.authz import CompiledPolicy, Connection, Decision
from policy.authz import decide as decide_l4
from policy.jwt import AuthResult, JwksStore, JwtAuthenticator, rules_from_policy
from policy.l7 import (
    CustomOutcome,
    HttpRequest,
    L7Decision,
    L7PolicyIndex,
    PathRejected,
    RequestRejected,
    WaypointTarget,
    applies_to_waypoint,
    bad_request,
)
from policy.model import AuthorizationPolicy, IPAddress, RequestAuthentication

# Headers that claim who the caller is. A client must never be able to set them: the waypoint
# removes whatever arrives and sets its own from the verified mTLS peer (Envoy's
# ``forward_client_cert_details: SANITIZE_SET``, which Istio's waypoints use).
XFCC: Final = "x-forwarded-client-cert"
IDENTITY_HEADERS: Final = (XFCC, "x-ztagent-source-principal", "x-ztagent-request-principal")
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "upgrade",
        "trailer",
        "proxy-authenticate",
        "proxy-authorization",
    }
)


@dataclass(frozen=True)
class RequestFacts:
    """One request as it arrived: ``target`` is the request-target (path and query)."""

    method: str
    target: str
    authority: str
    headers: tuple[tuple[str, str], ...]  # lower-case names, in order, repeated names kept
    source_principal: str | None  # the verified mTLS peer (spiffe://...)
    source_ip: str | None
    destination_ip: str | None
    destination_port: int


@dataclass(frozen=True)
class Outcome:
    """What to do with the request: forward it (``status == 200``) or answer ``status``."""

    status: int
    body: str
    reason: str
    code: str
    policies: tuple[str, ...] = ()
    decision: L7Decision | None = None
    auth: AuthResult | None = None
    request: HttpRequest | None = None
    pending_custom: str | None = None
    upstream_target: str = ""  # the request-target to forward (normalized path, token params removed)
    upstream_headers: tuple[tuple[str, str], ...] = ()  # forwarded headers (identity headers reset)
    response_headers: tuple[tuple[str, str], ...] = ()  # e.g. www-authenticate on a 401

    @property
    def allowed(self) -> bool:
        return self.status == 200

    @property
    def request_principal(self) -> str | None:
        return self.auth.principal if self.auth is not None else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "decision": "ALLOW" if self.allowed else "DENY",
            "status": self.status,
            "reason": self.reason,
            "code": self.code,
            "policies": list(self.policies),
            "requestPrincipal": self.request_principal,
        }
        if self.decision is not None:
            d = self.decision.to_dict()
            out["audit"], out["dryRun"], out["dryRunDecision"] = d["audit"], d["dryRun"], d["dryRunDecision"]
        if self.pending_custom:
            out["pendingCustom"] = self.pending_custom
        if self.request is not None:
            out["normalizedPath"] = self.request.path
        return out


@dataclass
class WaypointPolicies:
    """The policies one waypoint enforces, compiled from a snapshot (rebuild on change; the JWKS
    stores are shared across rebuilds so a config reload keeps the keys already fetched)."""

    waypoint: Waypoint
    index: L7PolicyIndex
    request_authentications: tuple[RequestAuthentication, ...]
    root_namespace: str
    # Required (no default): an empty tuple here would let every TCP connection through.
    authorization: tuple[AuthorizationPolicy, ...]
    stores: dict[str, JwksStore] = field(default_factory=dict)
    _auth: dict[WaypointTarget, JwtAuthenticator] = field(default_factory=dict)
    _l4: dict[WaypointTarget, tuple[CompiledPolicy, ...]] = field(default_factory=dict)

    @classmethod
    def from_snapshot(
        cls, snap: Snapshot, waypoint: Waypoint, stores: dict[str, JwksStore] | None = None, now: float = 0.0
    ) -> WaypointPolicies:
        parsed = snap.parsed_policies
        authz = tuple(getattr(parsed, "authorization", ()))
        ras = tuple(getattr(parsed, "request_authentication", ()))
        out = cls(
            waypoint,
            L7PolicyIndex(authz, snap.root_namespace),
            ras,
            snap.root_namespace,
            authz,
            stores if stores is not None else {},
        )
        out.authenticator(out.target(None, None), now)  # build the waypoint-wide one eagerly
        return out

    def target(self, service_namespace: str | None, service_name: str | None) -> WaypointTarget:
        return WaypointTarget(self.waypoint.namespace, self.waypoint.name, service_namespace, service_name)

    def authenticator(self, target: WaypointTarget, now: float) -> JwtAuthenticator:
        a = self._auth.get(target)
        if a is None:
            chosen = [
                (ra, rules_from_policy(ra))
                for ra in self.request_authentications
                if applies_to_waypoint(ra, target, self.root_namespace)
            ]
            a = JwtAuthenticator.for_policies(chosen, self.stores, now=now)
            # Stores the authenticator created (inline JWKS, new URIs) are shared from now on.
            for k, s in a.stores.items():
                self.stores.setdefault(k, s)
            self._auth[target] = a
        return a

    def all_authenticators(self) -> Iterable[JwtAuthenticator]:
        return tuple(self._auth.values())

    def decide_tcp(self, target: WaypointTarget, conn: Connection) -> Decision:
        """Non-HTTP traffic at the waypoint: the policies bound to the target, read as L4
        policies (policy.authz, the node agent's evaluator: an ALLOW rule with HTTP fields
        matches nothing, a DENY with only HTTP fields denies everything it selects, CUSTOM
        fails closed), as Istio's waypoint applies its RBAC network filter to TCP."""
        sel = self._l4.get(target)
        if sel is None:
            sel = tuple(
                CompiledPolicy.compile(p)
                for p in self.authorization
                if p.target_refs and applies_to_waypoint(p, target, self.root_namespace)
            )
            self._l4[target] = sel
        return decide_l4(conn, sel)


def tcp_connection(
    source_principal: str | None,
    source_ip: IPAddress | None,
    namespace: str,
    port: int,
    destination_ip: IPAddress | None,
) -> Connection:
    return Connection(
        source_principal=source_principal,
        source_ip=source_ip,
        destination_namespace=namespace,
        destination_port=port,
        destination_ip=destination_ip,
    )


def _split_target(target: str) -> tuple[str, str | None]:
    path, sep, query = target.partition("?")
    return path, (query if sep else None)


def _drop_params(query: str | None, names: Sequence[str]) -> str | None:
    if query is None or not names:
        return query
    drop = set(names)
    kept = [p for p in query.split("&") if urllib.parse.unquote_plus(p.partition("=")[0]) not in drop]
    return "&".join(kept) if kept else None


def forwarded_headers(
    facts: RequestFacts, auth: AuthResult | None, waypoint_id: str, extra_remove: Iterable[str] = ()
) -> tuple[tuple[str, str], ...]:
    """The headers sent upstream: hop-by-hop and identity headers removed, what
    RequestAuthentication asks removed or added applied, and ``x-forwarded-client-cert`` set to
    the verified caller (``By`` = the waypoint, ``URI`` = the mTLS peer), never to a claim."""
    remove = set(IDENTITY_HEADERS) | set(HOP_BY_HOP) | {h.lower() for h in extra_remove}
    if auth is not None:
        remove |= set(auth.remove_headers)
    out = [(n, v) for n, v in facts.headers if n not in remove and not n.startswith(":")]
    if auth is not None:
        out.extend(auth.add_headers)
    if facts.source_principal:
        out.append((XFCC, f"By={waypoint_id};URI={facts.source_principal}"))
    return tuple(out)


def decide(
    policies: WaypointPolicies,
    target: WaypointTarget,
    facts: RequestFacts,
    now: float,
    custom: CustomOutcome | None = None,
) -> Outcome:
    """RequestAuthentication, then the L7 policy, for one request. Pure."""
    _path, query = _split_target(facts.target)
    auth = policies.authenticator(target, now).authenticate(facts.headers, query, now)
    if not auth.ok:
        extra = (("www-authenticate", auth.www_authenticate),) if auth.www_authenticate else ()
        return Outcome(
            auth.status,
            auth.reason,
            auth.reason,
            "jwt-" + str(auth.status),
            auth=auth,
            response_headers=extra,
        )
    try:
        req = HttpRequest.create(
            method=facts.method,
            path=facts.target,
            host=facts.authority,
            headers=facts.headers,
            source_principal=facts.source_principal,
            source_ip=facts.source_ip,
            destination_ip=facts.destination_ip,
            destination_port=facts.destination_port,
            jwt_claims=auth.claims,
        )
    except (RequestRejected, PathRejected, ValueError) as exc:
        d = bad_request(str(exc))
        return Outcome(d.status, "Bad Request", d.reason, d.code, decision=d, auth=auth)
    d = policies.index.evaluate(req, target, custom)
    up_query = _drop_params(req.query, auth.remove_params)
    up_target = req.path if up_query is None else f"{req.path}?{up_query}"
    if d.pending_custom is not None:
        return Outcome(
            d.status, d.body, d.reason, d.code, d.policies, d, auth, req, d.pending_custom, up_target
        )
    if not d.allowed:
        return Outcome(d.status, d.body, d.reason, d.code, d.policies, d, auth, req)
    hdrs = forwarded_headers(facts, auth, str(policies.waypoint.spiffe_id))
    return Outcome(200, "", d.reason, d.code, d.policies, d, auth, req, None, up_target, hdrs)


def headers_of(pairs: Iterable[tuple[bytes | str, bytes | str]]) -> tuple[tuple[str, str], ...]:
    """Lower-case str header pairs from a parser's bytes (latin-1, as HTTP field values are)."""
    out = []
    for n, v in pairs:
        ns = n.decode("latin-1") if isinstance(n, bytes) else n
        vs = v.decode("latin-1") if isinstance(v, bytes) else v
        out.append((ns.lower(), vs))
    return tuple(out)


def header(headers: Mapping[str, str] | Sequence[tuple[str, str]], name: str) -> str | None:
    items = headers.items() if isinstance(headers, Mapping) else headers
    for n, v in items:
        if n == name:
            return v
    return None


__all__ = [
    "IDENTITY_HEADERS",
    "XFCC",
    "Outcome",
    "RequestFacts",
    "WaypointPolicies",
    "decide",
    "forwarded_headers",
    "header",
    "headers_of",
    "tcp_connection",
]
