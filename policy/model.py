"""The Istio security policy model, as parsed from ``security.istio.io/v1`` (and v1beta1) YAML.

The types mirror Istio's API one to one (field names in snake_case) so that a policy can be
printed back, linted and evaluated at L4 (node agent) or, later, L7 (waypoint) from the same
object. Everything is frozen: a parsed policy set can be shared between threads and compared.

A document that fails validation is still returned, marked ``poisoned`` with its errors: the
evaluators give a poisoned policy a fail-closed meaning (an ALLOW that allows nothing, a DENY
that denies everything it selects) so a caller that chooses to enforce a broken policy set never
fails open, and a caller that refuses the set can still report every error.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import ClassVar, Final

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_ROOT_NAMESPACE: Final = "istio-system"
DRY_RUN_ANNOTATION: Final = "istio.io/dry-run"

EMPTY_LABELS: Final[Mapping[str, str]] = MappingProxyType({})


@dataclass(frozen=True)
class FieldError:
    """One problem in one document, located by its field path.

    ``str()`` gives e.g. ``spec.rules[0].from[1].source.ipBlocks[2]: invalid CIDR "10.0.0/33"``.
    """

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


class MtlsMode(enum.Enum):
    UNSET = "UNSET"
    DISABLE = "DISABLE"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"  # "abc*"
    SUFFIX = "suffix"  # "*abc"
    PRESENCE = "presence"  # "*": any non-empty value


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Istio's string match: ``*`` = present (non-empty), ``x*`` prefix, ``*x`` suffix, else exact."""

    kind: MatchKind
    value: str  # the literal part (without the '*')
    raw: str  # as written, for messages and lint

    @classmethod
    def parse(cls, raw: str) -> StringMatch:
        if raw == "*":
            return cls(MatchKind.PRESENCE, "", raw)
        if raw.startswith("*"):
            return cls(MatchKind.SUFFIX, raw[1:], raw)
        if raw.endswith("*"):
            return cls(MatchKind.PREFIX, raw[:-1], raw)
        return cls(MatchKind.EXACT, raw, raw)

    def matches(self, value: str) -> bool:
        k = self.kind
        if k is MatchKind.EXACT:
            return value == self.value
        if k is MatchKind.PREFIX:
            return value.startswith(self.value)
        if k is MatchKind.SUFFIX:
            return value.endswith(self.value)
        return value != ""


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    """``serviceAccounts`` entry: ``ns/sa``, or a bare ``sa`` meaning the policy's own namespace."""

    namespace: str
    service_account: str
    raw: str


@dataclass(frozen=True)
class Source:
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    request_principals: tuple[StringMatch, ...] = ()
    not_request_principals: tuple[StringMatch, ...] = ()
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    ip_blocks: tuple[IPNetwork, ...] = ()
    not_ip_blocks: tuple[IPNetwork, ...] = ()
    remote_ip_blocks: tuple[IPNetwork, ...] = ()
    not_remote_ip_blocks: tuple[IPNetwork, ...] = ()
    # From the peer certificate's SPIFFE ID (``spiffe://<trust-domain>/...``), like principals.
    trust_domains: tuple[StringMatch, ...] = ()
    not_trust_domains: tuple[StringMatch, ...] = ()

    def http_fields(self) -> tuple[str, ...]:
        """Names of the fields set here that only an HTTP-aware proxy can evaluate."""
        out = []
        for name in (
            "request_principals",
            "not_request_principals",
            "remote_ip_blocks",
            "not_remote_ip_blocks",
        ):
            if getattr(self, name):
                out.append(_camel(name))
        return tuple(out)


@dataclass(frozen=True)
class Operation:
    hosts: tuple[StringMatch, ...] = ()
    not_hosts: tuple[StringMatch, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[StringMatch, ...] = ()
    not_methods: tuple[StringMatch, ...] = ()
    paths: tuple[StringMatch, ...] = ()
    not_paths: tuple[StringMatch, ...] = ()

    def http_fields(self) -> tuple[str, ...]:
        out = []
        for name in ("hosts", "not_hosts", "methods", "not_methods", "paths", "not_paths"):
            if getattr(self, name):
                out.append(_camel(name))
        return tuple(out)


# The `when` keys the node agent evaluates at L4: ztunnel's (istio pilot's ambient conversion,
# l4WhenAttributes) plus ``source.trustDomain``, which, like ``source.principal``, is read from
# the peer certificate's SPIFFE ID. Every other valid key (request.*, remote.ip, connection.sni,
# source.serviceAccount, experimental.*) needs a proxy that sees more than the connection.
L4_CONDITION_KEYS: Final = frozenset(
    {
        "source.ip",
        "source.namespace",
        "source.principal",
        "source.trustDomain",
        "destination.ip",
        "destination.port",
    }
)


@dataclass(frozen=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()

    @property
    def is_l4(self) -> bool:
        return self.key in L4_CONDITION_KEYS


@dataclass(frozen=True)
class Rule:
    """``from`` sources OR'ed, ``to`` operations OR'ed, ``when`` conditions AND'ed; the three AND'ed.

    ``None`` means the list is not set (matches anything); validation refuses an empty list.
    """

    sources: tuple[Source, ...] | None = None
    operations: tuple[Operation, ...] | None = None
    conditions: tuple[Condition, ...] | None = None

    def http_fields(self) -> tuple[str, ...]:
        out: list[str] = []
        for s in self.sources or ():
            out.extend(s.http_fields())
        for o in self.operations or ():
            out.extend(o.http_fields())
        for c in self.conditions or ():
            if not c.is_l4:
                out.append(f"when {c.key}")
        return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class Selector:
    """``spec.selector.matchLabels``; empty labels select every workload in scope."""

    match_labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_LABELS)

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items())


@dataclass(frozen=True)
class TargetRef:
    group: str
    kind: str
    name: str
    namespace: str | None = None


@dataclass(frozen=True)
class Meta:
    name: str
    namespace: str
    annotations: Mapping[str, str] = field(default_factory=lambda: EMPTY_LABELS)
    creation_timestamp: datetime | None = None
    namespace_defaulted: bool = False  # the namespace came from the default (kubectl's -n)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class AuthorizationPolicy:
    meta: Meta
    action: Action
    selector: Selector | None = None
    target_refs: tuple[TargetRef, ...] = ()
    rules: tuple[Rule, ...] | None = None  # None: `rules` not set (never matches)
    provider: str | None = None
    dry_run: bool = False
    api_version: str = "security.istio.io/v1"
    # Fail-closed bookkeeping: a poisoned policy is enforced as "allow nothing" (ALLOW) or
    # "deny everything selected" (DENY, CUSTOM), whatever its rules say.
    errors: tuple[FieldError, ...] = ()
    warnings: tuple[FieldError, ...] = ()

    kind: ClassVar[str] = "AuthorizationPolicy"

    @property
    def key(self) -> str:
        return self.meta.key

    @property
    def poisoned(self) -> bool:
        return bool(self.errors)

    @property
    def for_waypoint(self) -> bool:
        """Policies attached with targetRef(s) are enforced by a waypoint/gateway, never at the node."""
        return bool(self.target_refs)


@dataclass(frozen=True)
class PeerAuthentication:
    meta: Meta
    mode: MtlsMode = MtlsMode.UNSET
    selector: Selector | None = None
    port_level: Mapping[int, MtlsMode] = field(default_factory=lambda: MappingProxyType({}))
    api_version: str = "security.istio.io/v1"
    errors: tuple[FieldError, ...] = ()
    warnings: tuple[FieldError, ...] = ()

    kind: ClassVar[str] = "PeerAuthentication"

    @property
    def key(self) -> str:
        return self.meta.key

    @property
    def poisoned(self) -> bool:
        return bool(self.errors)


@dataclass(frozen=True)
class JwtHeader:
    name: str
    prefix: str = ""


@dataclass(frozen=True)
class JwtRule:
    issuer: str
    audiences: tuple[str, ...] = ()
    jwks_uri: str | None = None
    jwks: str | None = None
    from_headers: tuple[JwtHeader, ...] = ()
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    output_payload_to_header: str | None = None
    forward_original_token: bool = False
    output_claim_to_headers: tuple[tuple[str, str], ...] = ()  # (header, claim)
    timeout_seconds: float | None = None
    space_delimited_claims: tuple[str, ...] = ()


@dataclass(frozen=True)
class RequestAuthentication:
    """Parsed and validated here; enforced by the waypoint (L7), never at the node agent."""

    meta: Meta
    selector: Selector | None = None
    target_refs: tuple[TargetRef, ...] = ()
    jwt_rules: tuple[JwtRule, ...] = ()
    api_version: str = "security.istio.io/v1"
    errors: tuple[FieldError, ...] = ()
    warnings: tuple[FieldError, ...] = ()

    kind: ClassVar[str] = "RequestAuthentication"

    @property
    def key(self) -> str:
        return self.meta.key

    @property
    def poisoned(self) -> bool:
        return bool(self.errors)


Policy = AuthorizationPolicy | PeerAuthentication | RequestAuthentication


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(p.capitalize() for p in rest)
