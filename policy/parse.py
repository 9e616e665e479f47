"""Parse Istio security policy documents (already loaded from YAML) into :mod:`policy.model`.

Documents are accepted verbatim: ``security.istio.io/v1`` or ``v1beta1``, kinds
AuthorizationPolicy, PeerAuthentication and RequestAuthentication. Validation follows istiod's
webhook (pkg/config/validation) plus the CRD schema: unknown fields are errors, because a typo
such as ``principal:`` for ``principals:`` would otherwise silently widen a policy.

Every error names the field path, e.g.
``spec.rules[0].from[1].source.ipBlocks[2]: invalid CIDR "10.0.0/33"``.

Invalid input never fails open. A document that is recognisably a policy but has errors is still
returned, carrying its ``errors`` (it is "poisoned"), with the widest fail-closed reading of the
parts that could not be parsed:

* an action that cannot be read is taken as DENY;
* a selector that cannot be read selects every workload in the namespace;
* a document without ``metadata.namespace`` takes ``default_namespace`` (as ``kubectl apply -n
  NS`` does); with no default either it is an error (:data:`NO_NAMESPACE_MESSAGE`) and the policy
  is made mesh-wide (namespace ``""``, treated as the root);
* the evaluators then enforce a poisoned ALLOW as "allows nothing" and a poisoned DENY/CUSTOM
  as "denies everything it selects" (see :mod:`policy.authz`), and a poisoned
  PeerAuthentication as STRICT (see :mod:`policy.peerauth`).

Only a document that is not a policy at all (not a mapping, unknown kind or apiVersion) has no
parsed form: :func:`parse_policy` raises :class:`PolicyParseError` for it.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, TypeVar

from kube import names
from policy.model import (
    Action,
    AuthorizationPolicy,
    Condition,
    FieldError,
    IPNetwork,
    JwtHeader,
    JwtRule,
    Meta,
    MtlsMode,
    Operation,
    PeerAuthentication,
    Policy,
    RequestAuthentication,
    Rule,
    Selector,
    ServiceAccountMatch,
    Source,
    StringMatch,
    TargetRef,
)

API_VERSIONS: Final = ("security.istio.io/v1", "security.istio.io/v1beta1")
API_GROUP: Final = "security.istio.io"

# The one message for a document that has no namespace and was given no default. mesh.config and
# lint use this text too, so the loader, the agent's log and `policy lint` say the same thing.
# What every loader says of a policy without a namespace and no default (lint, the CLI, the
# config file), so the message is one; each adds what it does meanwhile.
NO_NAMESPACE_HINT: Final = "no namespace: set metadata.namespace or pass -n / a default namespace"
NO_NAMESPACE_MESSAGE: Final = (
    f"{NO_NAMESPACE_HINT} (until then the policy is enforced mesh-wide, failing closed)"
)
KINDS: Final = ("AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication")

_T = TypeVar("_T")
_TOP_KEYS: Final = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})

# Condition keys istiod accepts (pkg/config/security ValidateAttribute), and how their values
# are checked. Map-style keys ("request.headers[x]") are matched by prefix.
_EXACT_KEYS: Final = {
    "source.ip": "ip",
    "remote.ip": "ip",
    "source.namespace": "string",
    "source.serviceAccount": "serviceaccount",
    "source.principal": "string",
    "source.trustDomain": "string",
    "request.auth.principal": "string",
    "request.auth.audiences": "string",
    "request.auth.presenter": "string",
    "destination.ip": "ip",
    "destination.port": "port",
    "connection.sni": "string",
}
_MAP_KEY_PREFIXES: Final = (
    "request.headers",
    "request.experimental.inline.headers",
    "request.auth.claims",
    "experimental.envoy.filters.",
)
_REPLACED_KEYS: Final = {
    "destination.namespace": "is replaced by the policy's metadata.namespace",
    "destination.name": "is deprecated (only supported in v1alpha1)",
    "destination.user": "is deprecated (only supported in v1alpha1)",
}



class PolicyParseError(ValueError):
    """The document is not a policy this package knows (so it has no fail-closed reading)."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = tuple(errors)
        super().__init__("; ".join(str(e) for e in self.errors))


@dataclass(frozen=True)
class DocumentIssue:
    """An error or warning of one document in a set, located by its index in the input."""

    document: int
    kind: str | None
    key: str | None  # "namespace/name" when known
    error: FieldError
    # The document is not a security.istio.io document at all (e.g. a Deployment in the same
    # `kubectl apply -f` bundle): still an error for the agent, but lint reports it as skipped.
    foreign: bool = False

    @property
    def path(self) -> str:
        return self.error.path

    @property
    def message(self) -> str:
        return self.error.message

    def __str__(self) -> str:
        where = f"document {self.document}"
        if self.kind:
            where += f" ({self.kind}"
            where += f" {self.key})" if self.key else ")"
        return f"{where}: {self.error}"


@dataclass(frozen=True)
class PolicySet:
    """Everything parsed from a sequence of documents, poisoned policies included."""

    authorization: tuple[AuthorizationPolicy, ...] = ()
    peer_authentication: tuple[PeerAuthentication, ...] = ()
    request_authentication: tuple[RequestAuthentication, ...] = ()
    errors: tuple[DocumentIssue, ...] = ()
    warnings: tuple[DocumentIssue, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors

    def __iter__(self) -> Any:
        yield from self.authorization
        yield from self.peer_authentication
        yield from self.request_authentication


# --------------------------------------------------------------------------------------------
# Context: collects errors and warnings for one document


class _Ctx:
    def __init__(self, default_namespace: str | None = None) -> None:
        self.default_namespace = default_namespace
        self.errors: list[FieldError] = []
        self.warnings: list[FieldError] = []

    def err(self, path: str, message: str) -> None:
        self.errors.append(FieldError(path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(FieldError(path, message))


def join_path(path: str, key: str | int) -> str:
    """A field path as errors name it: ``spec.rules[0].from`` (also used by mesh.config)."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def type_name(v: Any) -> str:
    """The YAML type of a value, for errors ("expected a list, got mapping")."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, Mapping):
        return "mapping"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (list, tuple)):
        return "list"
    if isinstance(v, int):
        return "integer"
    return type(v).__name__


def _q(s: str) -> str:
    """Quote a value the way Istio/Go messages do: "value"."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mapping(ctx: _Ctx, path: str, v: Any, allowed: Iterable[str]) -> Mapping[str, Any] | None:
    if not isinstance(v, Mapping):
        ctx.err(path, f"expected a mapping, got {type_name(v)}")
        return None
    allowed_set = set(allowed)
    for k in v:
        if not isinstance(k, str):
            ctx.err(path, f"key {k!r} is not a string")
        elif k not in allowed_set:
            ctx.err(join_path(path, k), f"unknown field (allowed: {', '.join(sorted(allowed_set))})")
    return v


def _list(ctx: _Ctx, path: str, v: Any) -> Sequence[Any] | None:
    if isinstance(v, (list, tuple)):
        return v
    ctx.err(path, f"expected a list, got {type_name(v)}")
    return None


def _string(ctx: _Ctx, path: str, v: Any) -> str | None:
    if not isinstance(v, str):
        ctx.err(path, f"expected a string, got {type_name(v)}")
        return None
    return v


def _strings(ctx: _Ctx, path: str, v: Any) -> list[tuple[str, str]]:
    """A list of non-empty strings -> [(path, value)]; bad items are reported and skipped."""
    if v is None:
        return []
    items = _list(ctx, path, v)
    if items is None:
        return []
    out = []
    for i, item in enumerate(items):
        p = join_path(path, i)
        if not isinstance(item, str):
            ctx.err(p, f"expected a string, got {type_name(item)}")
        elif item == "":
            ctx.err(p, "empty value not allowed")
        else:
            out.append((p, item))
    return out


def _string_matches(ctx: _Ctx, path: str, v: Any) -> tuple[StringMatch, ...]:
    return tuple(StringMatch.parse(s) for _, s in _strings(ctx, path, v))


def _ip_blocks(ctx: _Ctx, path: str, v: Any) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for p, s in _strings(ctx, path, v):
        net = parse_ip_block(s)
        if net is None:
            ctx.err(p, f"invalid CIDR {_q(s)}" if "/" in s else f"invalid IP address {_q(s)}")
        else:
            out.append(net)
    return tuple(out)


def parse_ip_block(s: str) -> IPNetwork | None:
    # Go's netip.ParsePrefix accepts host bits ("10.0.0.1/24" = 10.0.0.0/24), so strict=False;
    # but it rejects surrounding space, zones and a missing/oversized length, as we do.
    if s != s.strip() or "%" in s:
        return None
    try:
        if "/" in s:
            addr, _, bits = s.partition("/")
            if not (bits.isascii() and bits.isdigit()) or (len(bits) > 1 and bits[0] == "0"):
                return None
            ipaddress.ip_address(addr)  # refuse "10.0.0/8", which ip_network would also refuse
            return ipaddress.ip_network(s, strict=False)
        return ipaddress.ip_network(ipaddress.ip_address(s))
    except ValueError:
        return None


def _port(ctx: _Ctx, path: str, v: Any) -> int | None:
    # Istio declares ports as strings; a YAML integer is unambiguous, so it is accepted too.
    if isinstance(v, bool):
        ctx.err(path, f"invalid port: expected a number, got {type_name(v)}")
        return None
    if isinstance(v, int):
        n = v
    elif isinstance(v, str) and v.isdigit() and v.isascii():
        n = int(v)
    else:
        ctx.err(
            path,
            f"invalid port {_q(str(v))}: not a number"
            if isinstance(v, str)
            else f"invalid port: expected a number, got {type_name(v)}",
        )
        return None
    if not 0 <= n <= 65535:
        ctx.err(path, f"invalid port {n}: must be in 0..65535")
        return None
    return n


def _ports(ctx: _Ctx, path: str, v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    items = _list(ctx, path, v)
    if items is None:
        return ()
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str) and item == "":
            ctx.err(join_path(path, i), "empty value not allowed")
            continue
        n = _port(ctx, join_path(path, i), item)
        if n is not None:
            out.append(n)
    return tuple(out)


def _service_accounts(ctx: _Ctx, path: str, v: Any, policy_ns: str) -> tuple[ServiceAccountMatch, ...]:
    raw = _strings(ctx, path, v)
    if len(raw) > 16:
        ctx.err(path, f"may not have more than 16 values, found {len(raw)}")
    out = []
    for p, s in raw:
        if "*" in s:
            ctx.err(p, f"wildcard not allowed in {_q(s)}")
            continue
        if len(s) > 320:
            ctx.err(p, "value cannot exceed 320 characters")
            continue
        if s.count("/") > 1:
            ctx.err(p, f"expected format 'serviceAccount' or 'namespace/serviceAccount', found {_q(s)}")
            continue
        ns, sep, sa = s.partition("/")
        if not sep:
            # istiod's ambient conversion reads a bare name as a service account of the policy's
            # own namespace.
            if not policy_ns:
                continue  # no namespace: already an error of metadata.namespace (one is enough)
            ns, sa = policy_ns, s
        if not ns or not sa:
            ctx.err(p, f"expected format 'serviceAccount' or 'namespace/serviceAccount', found {_q(s)}")
            continue
        out.append(ServiceAccountMatch(ns, sa, s))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Shared pieces: metadata, selector, targetRefs


def _parse_bool_annotation(s: str) -> bool | None:
    # Go's strconv.ParseBool, which istiod uses for istio.io/dry-run.
    if s in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if s in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


def _timestamp(ctx: _Ctx, path: str, v: Any) -> datetime | None:
    if v is None:
        return None
    if isinstance(v, datetime):
        dt = v
    elif isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            ctx.err(path, f"invalid RFC 3339 timestamp {_q(v)}")
            return None
    else:
        ctx.err(path, f"expected an RFC 3339 timestamp, got {type_name(v)}")
        return None
    # PyYAML gives naive datetimes for "...Z": they are UTC.
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def valid_namespace(ns: str) -> bool:
    """A Kubernetes namespace name: an RFC 1123 label of at most 63 characters."""
    return names.NAMESPACE.check(ns) is None


def _meta(ctx: _Ctx, doc: Mapping[str, Any]) -> Meta:
    default_namespace = ctx.default_namespace
    raw = doc.get("metadata")
    name, namespace = "", ""
    defaulted = False
    annotations: dict[str, str] = {}
    created: datetime | None = None
    if raw is None:
        ctx.err("metadata", "required field is missing")
        if default_namespace is None:
            ctx.err("metadata.namespace", NO_NAMESPACE_MESSAGE)
        else:
            namespace, defaulted = default_namespace, True
    elif not isinstance(raw, Mapping):
        ctx.err("metadata", f"expected a mapping, got {type_name(raw)}")
    else:
        n = raw.get("name")
        if n is None:
            ctx.err("metadata.name", "required field is missing")
        elif not isinstance(n, str) or not n:
            ctx.err("metadata.name", f"expected a non-empty string, got {type_name(n)}")
        else:
            name = n
        ns = raw.get("namespace")
        if ns is None or ns == "":
            # kubectl reads a missing (or empty) namespace as "the one given with -n".
            if default_namespace is None:
                ctx.err("metadata.namespace", NO_NAMESPACE_MESSAGE)
            else:
                namespace, defaulted = default_namespace, True
        elif not isinstance(ns, str):
            ctx.err("metadata.namespace", f"expected a non-empty string, got {type_name(ns)}")
        elif not valid_namespace(ns):
            ctx.err("metadata.namespace", f"invalid namespace {_q(ns)}: must be an RFC 1123 label")
        else:
            namespace = ns
        ann = raw.get("annotations")
        if ann is not None:
            if not isinstance(ann, Mapping):
                ctx.err("metadata.annotations", f"expected a mapping, got {type_name(ann)}")
            else:
                for k, v in ann.items():
                    if not isinstance(k, str) or not isinstance(v, str):
                        ctx.err(
                            join_path("metadata.annotations", str(k)),
                            f"annotation values must be strings, got {type_name(v)}",
                        )
                    else:
                        annotations[k] = v
        created = _timestamp(ctx, "metadata.creationTimestamp", raw.get("creationTimestamp"))
    return Meta(
        name=name or "<unnamed>",
        namespace=namespace,
        annotations=MappingProxyType(annotations),
        creation_timestamp=created,
        namespace_defaulted=defaulted,
    )


def _selector(ctx: _Ctx, path: str, v: Any) -> Selector | None:
    """None if not set. A selector that cannot be read selects everything in scope (fail closed)."""
    if v is None:
        return None
    m = _mapping(ctx, path, v, ("matchLabels",))
    if m is None:
        return Selector()
    labels = m.get("matchLabels")
    if labels is None:
        return Selector()
    lp = join_path(path, "matchLabels")
    if not isinstance(labels, Mapping):
        ctx.err(lp, f"expected a mapping, got {type_name(labels)}")
        return Selector()
    out: dict[str, str] = {}
    bad = False
    for k, val in labels.items():
        p = join_path(lp, str(k))
        if not isinstance(k, str) or not isinstance(val, str):
            ctx.err(p, f"label keys and values must be strings, got {type_name(val)}")
            bad = True
        elif "*" in k or "*" in val:
            ctx.err(p, f"wildcard is not supported in selector: {_q(f'{k}={val}')}")
            bad = True
        elif not names.is_label_key(k):
            ctx.err(p, f"invalid label key {_q(k)}")
            bad = True
        elif not names.is_label_value(val):
            ctx.err(p, f"invalid label value {_q(val)}")
            bad = True
        else:
            out[k] = val
    if bad:
        return Selector()
    return Selector(MappingProxyType(out))


# istiod's allowedTargetRefs (pkg/config/validation): group and kind, not version. "" is core.
_TARGET_KINDS: Final = frozenset(
    {
        ("", "Service"),
        ("networking.istio.io", "ServiceEntry"),
        ("gateway.networking.k8s.io", "Gateway"),
        ("gateway.networking.k8s.io", "GatewayClass"),
    }
)


def _target_refs(ctx: _Ctx, spec: Mapping[str, Any]) -> tuple[TargetRef, ...]:
    """``targetRef`` / ``targetRefs`` (istio.type.v1beta1.PolicyTargetReference), checked as
    istiod's webhook does: name set, no cross-namespace namespace, a known group/kind."""
    refs: list[tuple[str, Any]] = []
    if spec.get("targetRef") is not None:
        refs.append(("spec.targetRef", spec["targetRef"]))
    if spec.get("targetRefs") is not None:
        items = _list(ctx, "spec.targetRefs", spec["targetRefs"])
        for i, r in enumerate(items or ()):
            refs.append((join_path("spec.targetRefs", i), r))
    out = []
    for path, r in refs:
        m = _mapping(ctx, path, r, ("group", "kind", "name", "namespace"))
        if m is None:
            continue
        ok = True
        fields: dict[str, str] = {}
        for k in ("group", "kind", "name", "namespace"):
            v = m.get(k)
            if v is None:
                fields[k] = ""
            elif not isinstance(v, str):
                ctx.err(join_path(path, k), f"expected a string, got {type_name(v)}")
                ok = False
            else:
                fields[k] = v
        if not ok:
            continue
        if not fields["name"]:
            ctx.err(join_path(path, "name"), "targetRef name must be set")
            ok = False
        if fields["namespace"]:
            ctx.err(
                join_path(path, "namespace"),
                "targetRef namespace must not be set; cross namespace referencing is not supported",
            )
            ok = False
        if (fields["group"], fields["kind"]) not in _TARGET_KINDS:
            allowed = ", ".join(f"{g or 'core'}/{k}" for g, k in sorted(_TARGET_KINDS))
            ctx.err(
                path,
                f"targetRef must be to one of {allowed} but was "
                f"{fields['group'] or 'core'}/{fields['kind'] or '<no kind>'}",
            )
            ok = False
        if ok:
            out.append(TargetRef(group=fields["group"], kind=fields["kind"], name=fields["name"]))
    if spec.get("targetRef") is not None and spec.get("targetRefs") is not None:
        ctx.err("spec.targetRefs", "at most one of targetRef and targetRefs may be set")
    if refs and spec.get("selector") is not None:
        ctx.err("spec.selector", "at most one of selector and targetRef(s) may be set")
    return tuple(out)


# --------------------------------------------------------------------------------------------
# AuthorizationPolicy

_SOURCE_FIELDS: Final = (
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "notRequestPrincipals",
    "namespaces",
    "notNamespaces",
    "serviceAccounts",
    "notServiceAccounts",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
    "trustDomains",
    "notTrustDomains",
)
_OPERATION_FIELDS: Final = (
    "hosts",
    "notHosts",
    "ports",
    "notPorts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
)


def _source(ctx: _Ctx, path: str, v: Any, policy_ns: str, action: Action) -> Source | None:
    m = _mapping(ctx, path, v, _SOURCE_FIELDS)
    if m is None:
        return None
    set_fields = [k for k in _SOURCE_FIELDS if m.get(k) is not None]
    if not set_fields:
        ctx.err(path, "`from.source` must not be empty")
        return None
    if any(m.get(k) is not None for k in ("serviceAccounts", "notServiceAccounts")) and any(
        m.get(k) is not None for k in ("principals", "notPrincipals", "namespaces", "notNamespaces")
    ):
        ctx.err(path, "cannot set serviceAccounts with namespaces or principals")
    if action is Action.CUSTOM:
        for k in (
            "principals",
            "notPrincipals",
            "requestPrincipals",
            "notRequestPrincipals",
            "namespaces",
            "notNamespaces",
            "serviceAccounts",
            "notServiceAccounts",
        ):
            if m.get(k) is not None:
                ctx.err(
                    join_path(path, k),
                    f"From.{k[0].upper()}{k[1:]} is currently not supported with CUSTOM action",
                )
    return Source(
        principals=_string_matches(ctx, join_path(path, "principals"), m.get("principals")),
        not_principals=_string_matches(ctx, join_path(path, "notPrincipals"), m.get("notPrincipals")),
        request_principals=_string_matches(
            ctx, join_path(path, "requestPrincipals"), m.get("requestPrincipals")
        ),
        not_request_principals=_string_matches(
            ctx, join_path(path, "notRequestPrincipals"), m.get("notRequestPrincipals")
        ),
        namespaces=_string_matches(ctx, join_path(path, "namespaces"), m.get("namespaces")),
        not_namespaces=_string_matches(ctx, join_path(path, "notNamespaces"), m.get("notNamespaces")),
        service_accounts=_service_accounts(
            ctx, join_path(path, "serviceAccounts"), m.get("serviceAccounts"), policy_ns
        ),
        not_service_accounts=_service_accounts(
            ctx, join_path(path, "notServiceAccounts"), m.get("notServiceAccounts"), policy_ns
        ),
        ip_blocks=_ip_blocks(ctx, join_path(path, "ipBlocks"), m.get("ipBlocks")),
        not_ip_blocks=_ip_blocks(ctx, join_path(path, "notIpBlocks"), m.get("notIpBlocks")),
        remote_ip_blocks=_ip_blocks(ctx, join_path(path, "remoteIpBlocks"), m.get("remoteIpBlocks")),
        not_remote_ip_blocks=_ip_blocks(
            ctx, join_path(path, "notRemoteIpBlocks"), m.get("notRemoteIpBlocks")
        ),
        trust_domains=_string_matches(ctx, join_path(path, "trustDomains"), m.get("trustDomains")),
        not_trust_domains=_string_matches(ctx, join_path(path, "notTrustDomains"), m.get("notTrustDomains")),
    )


def _operation(ctx: _Ctx, path: str, v: Any) -> Operation | None:
    m = _mapping(ctx, path, v, _OPERATION_FIELDS)
    if m is None:
        return None
    if not any(m.get(k) is not None for k in _OPERATION_FIELDS):
        ctx.err(path, "`to.operation` must not be empty")
        return None
    for k in ("paths", "notPaths"):
        for p, s in _strings(_Ctx(), join_path(path, k), m.get(k)):
            if ("{" in s or "}" in s) and not _valid_path_template(s):
                ctx.err(p, f"invalid or unsupported path template {_q(s)}")
    return Operation(
        hosts=_string_matches(ctx, join_path(path, "hosts"), m.get("hosts")),
        not_hosts=_string_matches(ctx, join_path(path, "notHosts"), m.get("notHosts")),
        ports=_ports(ctx, join_path(path, "ports"), m.get("ports")),
        not_ports=_ports(ctx, join_path(path, "notPorts"), m.get("notPorts")),
        methods=_string_matches(ctx, join_path(path, "methods"), m.get("methods")),
        not_methods=_string_matches(ctx, join_path(path, "notMethods"), m.get("notMethods")),
        paths=_string_matches(ctx, join_path(path, "paths"), m.get("paths")),
        not_paths=_string_matches(ctx, join_path(path, "notPaths"), m.get("notPaths")),
    )


def _valid_path_template(path: str) -> bool:
    # istiod: "{*}" matches one segment, "{**}" any number and must be the last operator; no other
    # braces are allowed.
    seen_any = False
    for glob in path.strip("/").split("/"):
        if glob in ("{*}", "{**}"):
            if seen_any:
                return False
            seen_any = glob == "{**}"
            continue
        if "{" in glob or "}" in glob:
            return False
    return True


def _condition(ctx: _Ctx, path: str, v: Any, action: Action) -> Condition | None:
    if v is None:
        ctx.err(path, "`when` condition must not be null")
        return None
    m = _mapping(ctx, path, v, ("key", "values", "notValues"))
    if m is None:
        return None
    key = m.get("key")
    if key is None or key == "":
        ctx.err(join_path(path, "key"), "`key` must not be empty")
        return None
    if not isinstance(key, str):
        ctx.err(join_path(path, "key"), f"expected a string, got {type_name(key)}")
        return None
    values = _strings(ctx, join_path(path, "values"), m.get("values"))
    not_values = _strings(ctx, join_path(path, "notValues"), m.get("notValues"))
    if m.get("values") is None and m.get("notValues") is None:
        ctx.err(path, f"at least one of `values` or `notValues` must be set for key {key}")
    kind = _EXACT_KEYS.get(key)
    kp = join_path(path, "key")
    if kind is None:
        if key in _REPLACED_KEYS:
            ctx.err(kp, f"attribute {key} {_REPLACED_KEYS[key]}")
            return None
        if key.startswith("destination.labels"):
            ctx.err(kp, f"attribute {key} is replaced by the workload selector")
            return None
        if not any(key.startswith(prefix) for prefix in _MAP_KEY_PREFIXES):
            ctx.err(kp, f"unknown attribute: {key}")
            return None
        if not (key.endswith("]") and 0 < key.find("[") < len(key) - 2):
            ctx.err(kp, f"bad key ({key}): should have format a[b]")
            return None
        kind = "string"
    if action is Action.CUSTOM and (
        key in ("source.namespace", "source.serviceAccount", "source.principal")
        or key.startswith("request.auth.")
    ):
        ctx.err(kp, f"{key} is currently not supported with CUSTOM action")
    for label, items in (("values", values), ("notValues", not_values)):
        for p, s in items:
            if kind == "ip" and parse_ip_block(s) is None:
                ctx.err(p, f"invalid CIDR {_q(s)}" if "/" in s else f"invalid IP address {_q(s)}")
            elif kind == "port":
                _port(ctx, p, s)
            elif kind == "serviceaccount":
                _service_accounts(ctx, join_path(path, label), [s], "x")
    return Condition(key=key, values=tuple(s for _, s in values), not_values=tuple(s for _, s in not_values))


def _wrapped_list(
    ctx: _Ctx, path: str, value: Any, key: str, inner: str, parse: Callable[[str, Any], _T | None]
) -> tuple[tuple[_T, ...], bool]:
    """``from: [{source: ...}]`` and ``to: [{operation: ...}]``: a non-empty list of mappings
    with one non-null ``inner`` key each. Returns what parsed and whether everything did."""
    lp = join_path(path, key)
    items = _list(ctx, lp, value)
    if items is not None and len(items) == 0:
        ctx.err(lp, f"`{key}` must not be empty")
    got: list[_T] = []
    ok = True
    for i, item in enumerate(items or ()):
        ip = join_path(lp, i)
        wm = _mapping(ctx, ip, item, (inner,))
        if wm is None:
            ok = False
            continue
        if wm.get(inner) is None:
            ctx.err(join_path(ip, inner), f"`{key}.{inner}` must not be null")
            ok = False
            continue
        parsed = parse(join_path(ip, inner), wm[inner])
        if parsed is None:
            ok = False
        else:
            got.append(parsed)
    return tuple(got), ok


def _rule(ctx: _Ctx, path: str, v: Any, policy_ns: str, action: Action) -> Rule | None:
    if v is None:
        ctx.err(path, "`rule` must not be null")
        return None
    m = _mapping(ctx, path, v, ("from", "to", "when"))
    if m is None:
        return None
    sources: tuple[Source, ...] | None = None
    operations: tuple[Operation, ...] | None = None
    conditions: tuple[Condition, ...] | None = None
    ok = True
    if m.get("from") is not None:
        sources, fine = _wrapped_list(
            ctx, path, m["from"], "from", "source", lambda p, v: _source(ctx, p, v, policy_ns, action)
        )
        ok = ok and fine
    if m.get("to") is not None:
        operations, fine = _wrapped_list(
            ctx, path, m["to"], "to", "operation", lambda p, v: _operation(ctx, p, v)
        )
        ok = ok and fine
    if m.get("when") is not None:
        wp = join_path(path, "when")
        items = _list(ctx, wp, m["when"])
        got_conds = []
        for i, item in enumerate(items or ()):
            c = _condition(ctx, join_path(wp, i), item, action)
            if c is None:
                ok = False
            else:
                got_conds.append(c)
        conditions = tuple(got_conds)
    if not ok:
        return None
    return Rule(sources=sources, operations=operations, conditions=conditions)


def _action(ctx: _Ctx, v: Any) -> Action:
    if v is None:
        return Action.ALLOW  # Istio's default
    if isinstance(v, str):
        try:
            return Action(v)
        except ValueError:
            pass
    allowed = ", ".join(a.value for a in Action)
    ctx.err(
        "spec.action",
        f"invalid action {_q(str(v))} (expected one of {allowed}); enforced as DENY until fixed",
    )
    return Action.DENY


def _authorization_policy(ctx: _Ctx, doc: Mapping[str, Any], api_version: str) -> AuthorizationPolicy:
    meta = _meta(ctx, doc)
    raw_spec = doc.get("spec")
    spec: Mapping[str, Any]
    if raw_spec is None:
        spec = {}  # "spec: {}" and a missing spec are the same thing: an ALLOW that matches nothing
    else:
        m = _mapping(
            ctx, "spec", raw_spec, ("selector", "targetRef", "targetRefs", "rules", "action", "provider")
        )
        spec = m if m is not None else {"action": "DENY", "rules": [{}]}  # unreadable: fail closed
    action = _action(ctx, spec.get("action"))
    selector = _selector(ctx, "spec.selector", spec.get("selector"))
    target_refs = _target_refs(ctx, spec)
    provider: str | None = None
    if spec.get("provider") is not None:
        pm = _mapping(ctx, "spec.provider", spec["provider"], ("name",))
        if pm is not None:
            name = pm.get("name")
            if isinstance(name, str) and name:
                provider = name
            elif action is Action.CUSTOM:
                ctx.err("spec.provider.name", "`provider.name` must not be empty")
        if action is not Action.CUSTOM:
            ctx.err("spec.provider", f"`provider` must not be with non CUSTOM action, found {action.value}")

    rules: tuple[Rule, ...] | None = None
    if spec.get("rules") is not None:
        items = _list(ctx, "spec.rules", spec["rules"])
        parsed = []
        for i, item in enumerate(items or ()):
            r = _rule(ctx, join_path("spec.rules", i), item, meta.namespace, action)
            if r is not None:
                parsed.append(r)
        # `rules: []` is what proto3 calls unset: it never matches (an allow-nothing ALLOW).
        rules = tuple(parsed) if items else None
    if rules is None and action is Action.CUSTOM:
        ctx.err(
            "spec.rules",
            "CUSTOM action without `rules` is meaningless as it will never be "
            "triggered; add an empty rule `{}` if you want it triggered for every connection",
        )
    if rules is None and action is Action.DENY:
        # Unset rules never match, so this DENY denies nothing: the data plane's reading (istiod
        # sends it to ztunnel as a policy without rules). Refusing it would make it fail closed,
        # i.e. deny everything it selects: the opposite of what it says.
        ctx.warn(
            "spec.rules",
            "DENY without `rules` never matches, so this policy has no effect (istiod's validating "
            "webhook refuses it); add `rules: [{}]` to deny every connection it selects",
        )
    if action is Action.CUSTOM and rules is not None and provider is None and spec.get("provider") is None:
        ctx.err("spec.provider.name", "`provider.name` must not be empty")

    dry_run = False
    raw_dry = meta.annotations.get("istio.io/dry-run")
    if raw_dry is not None:
        b = _parse_bool_annotation(raw_dry)
        if b is None:
            ctx.err(
                "metadata.annotations.istio.io/dry-run",
                f"invalid boolean {_q(raw_dry)}; the policy is enforced until fixed",
            )
        else:
            dry_run = b

    if target_refs:
        ctx.warn(
            "spec.targetRefs" if spec.get("targetRefs") is not None else "spec.targetRef",
            "policies attached with targetRef(s) are enforced by a waypoint or gateway, "
            "not by the node agent: ignored at L4",
        )
    for i, r in enumerate(rules or ()):
        http = r.http_fields()
        if not http or target_refs:
            continue
        found = ", ".join(http)
        if action is Action.ALLOW:
            ctx.warn(
                join_path("spec.rules", i),
                f"the node agent does not evaluate HTTP attributes (found: {found}); "
                "at L4 this ALLOW rule is omitted (allows nothing). Use a waypoint to enforce HTTP rules.",
            )
        elif action in (Action.DENY, Action.CUSTOM, Action.AUDIT):
            ctx.warn(
                join_path("spec.rules", i),
                f"the node agent does not evaluate HTTP attributes (found: {found}); "
                f"at L4 this {action.value} rule is enforced without them, which is more restrictive.",
            )

    return AuthorizationPolicy(
        meta=meta,
        action=action,
        selector=selector,
        target_refs=target_refs,
        rules=rules,
        provider=provider,
        dry_run=dry_run,
        api_version=api_version,
        errors=tuple(ctx.errors),
        warnings=tuple(ctx.warnings),
    )


# --------------------------------------------------------------------------------------------
# PeerAuthentication


def _mtls_mode(ctx: _Ctx, path: str, v: Any) -> MtlsMode:
    if v is None:
        return MtlsMode.UNSET
    m = _mapping(ctx, path, v, ("mode",))
    if m is None:
        return MtlsMode.STRICT
    mode = m.get("mode")
    if mode is None:
        return MtlsMode.UNSET
    if isinstance(mode, str):
        try:
            return MtlsMode(mode)
        except ValueError:
            pass
    allowed = ", ".join(x.value for x in MtlsMode)
    ctx.err(
        join_path(path, "mode"),
        f"invalid mode {_q(str(mode))} (expected one of {allowed}); enforced as STRICT until fixed",
    )
    return MtlsMode.STRICT


def _peer_authentication(ctx: _Ctx, doc: Mapping[str, Any], api_version: str) -> PeerAuthentication:
    meta = _meta(ctx, doc)
    raw_spec = doc.get("spec")
    spec: Mapping[str, Any] = {}
    if raw_spec is not None:
        m = _mapping(ctx, "spec", raw_spec, ("selector", "mtls", "portLevelMtls"))
        spec = m if m is not None else {"mtls": {"mode": "STRICT"}}
    selector = _selector(ctx, "spec.selector", spec.get("selector"))
    mode = _mtls_mode(ctx, "spec.mtls", spec.get("mtls"))
    ports: dict[int, MtlsMode] = {}
    raw_ports = spec.get("portLevelMtls")
    if raw_ports is not None:
        pp = "spec.portLevelMtls"
        if not isinstance(raw_ports, Mapping):
            ctx.err(pp, f"expected a mapping of port to mtls, got {type_name(raw_ports)}")
        else:
            if len(raw_ports) == 0:
                ctx.err(pp, "port level mTLS, if defined, must have at least one element")
            if selector is None or not selector.match_labels:
                ctx.err(pp, "mesh/namespace peer authentication cannot have port level mTLS")
            for k, v in raw_ports.items():
                kp = join_path(pp, str(k))
                n = _port(ctx, kp, k)
                if n is None:
                    continue
                if n == 0:
                    ctx.err(kp, "port must be in range 1..65535")
                    continue
                ports[n] = _mtls_mode(ctx, kp, v)
    return PeerAuthentication(
        meta=meta,
        mode=mode,
        selector=selector,
        port_level=MappingProxyType(ports),
        api_version=api_version,
        errors=tuple(ctx.errors),
        warnings=tuple(ctx.warnings),
    )


# --------------------------------------------------------------------------------------------
# RequestAuthentication (validated here; the waypoint enforces it)

_JWT_FIELDS: Final = (
    "issuer",
    "audiences",
    "jwksUri",
    "jwks",
    "fromHeaders",
    "fromParams",
    "fromCookies",
    "outputPayloadToHeader",
    "forwardOriginalToken",
    "outputClaimToHeaders",
    "timeout",
    "spaceDelimitedClaims",
)
# RFC 9110 token characters: what istiod's ValidateStrictHTTPHeaderName accepts (and no more).
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Go's time.ParseDuration grammar (what the CRD's duration() and istiod accept), e.g. "1m30s".
_GO_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+")
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS: Final = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """Seconds in a Go duration string ("10s", "1m30s", "500ms"), or None if it is not one."""
    if not _GO_DURATION.fullmatch(text):
        return None
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _GO_DURATION_PART.findall(text))


def _jwt_rule(ctx: _Ctx, path: str, v: Any) -> JwtRule | None:
    m = _mapping(ctx, path, v, _JWT_FIELDS)
    if m is None:
        return None
    issuer = m.get("issuer", "")
    if not isinstance(issuer, str):
        ctx.err(join_path(path, "issuer"), f"expected a string, got {type_name(issuer)}")
        issuer = ""
    jwks_uri = m.get("jwksUri")
    if jwks_uri is not None:
        jwks_uri = _string(ctx, join_path(path, "jwksUri"), jwks_uri)
        if jwks_uri is not None and not (jwks_uri.startswith("http://") or jwks_uri.startswith("https://")):
            ctx.err(
                join_path(path, "jwksUri"), f"URI scheme of {_q(jwks_uri)} is not supported (http or https)"
            )
    if not issuer and not jwks_uri:
        ctx.err(path, "issuer or jwksUri must be non-empty string")
    jwks = m.get("jwks")
    if jwks is not None:
        jwks = _string(ctx, join_path(path, "jwks"), jwks)
    if jwks is not None and not _jwks_parses(jwks):
        ctx.err(join_path(path, "jwks"), "jwks parse error: not a JSON Web Key Set (a JSON object with keys)")
    headers = []
    hp_list = join_path(path, "fromHeaders")
    raw_headers = _list(ctx, hp_list, m["fromHeaders"]) if m.get("fromHeaders") is not None else None
    for i, h in enumerate(raw_headers or ()):
        hp = join_path(hp_list, i)
        if h is None:
            ctx.err(hp, "location header name must be non-null")
            continue
        hm = _mapping(ctx, hp, h, ("name", "prefix"))
        if hm is None:
            continue
        name = hm.get("name")
        if not isinstance(name, str) or not name:
            ctx.err(join_path(hp, "name"), "location header name must be non-empty string")
            continue
        prefix = hm.get("prefix", "")
        if prefix is None:
            prefix = ""
        if not isinstance(prefix, str):
            ctx.err(join_path(hp, "prefix"), f"expected a string, got {type_name(prefix)}")
            continue
        headers.append(JwtHeader(name, prefix))
    claims = []
    cp_list = join_path(path, "outputClaimToHeaders")
    raw_claims = (
        _list(ctx, cp_list, m["outputClaimToHeaders"]) if m.get("outputClaimToHeaders") is not None else None
    )
    seen_headers: set[str] = set()
    for i, c in enumerate(raw_claims or ()):
        cp = join_path(cp_list, i)
        if c is None:
            ctx.err(cp, "outputClaimToHeaders must not be null")
            continue
        cm = _mapping(ctx, cp, c, ("header", "claim"))
        if cm is None:
            continue
        header, claim = cm.get("header"), cm.get("claim")
        if not isinstance(header, str) or not header or not isinstance(claim, str) or not claim:
            ctx.err(cp, "outputClaimToHeaders header and claim value must be non-empty string")
            continue
        if not _HEADER_NAME.fullmatch(header):
            ctx.err(join_path(cp, "header"), f"invalid HTTP header name {_q(header)}")
            continue
        if header.lower() in seen_headers:
            ctx.err(join_path(cp, "header"), f"header {_q(header)} is set twice (headers must be unique)")
            continue
        seen_headers.add(header.lower())
        claims.append((header, claim))
    timeout: float | None = None
    if m.get("timeout") is not None:
        t = m["timeout"]
        secs = parse_duration(t) if isinstance(t, str) else None
        if secs is None:
            ctx.err(join_path(path, "timeout"), f'invalid duration {t!r} (e.g. "5s", "1m30s", "500ms")')
        elif secs < 0.001:
            ctx.err(join_path(path, "timeout"), f"duration {t!r} must be at least 1ms")
        else:
            timeout = secs
    fwd = m.get("forwardOriginalToken", False)
    if not isinstance(fwd, bool):
        ctx.err(join_path(path, "forwardOriginalToken"), f"expected a boolean, got {type_name(fwd)}")
        fwd = False
    out_hdr = m.get("outputPayloadToHeader")
    if out_hdr is not None:
        out_hdr = _string(ctx, join_path(path, "outputPayloadToHeader"), out_hdr)
    sdc_path = join_path(path, "spaceDelimitedClaims")
    space_delimited = tuple(s for _, s in _strings(ctx, sdc_path, m.get("spaceDelimitedClaims")))
    if len(space_delimited) > 64:
        ctx.err(sdc_path, f"may not have more than 64 items, found {len(space_delimited)}")
    audiences = [a for _, a in _strings(ctx, join_path(path, "audiences"), m.get("audiences"))]
    return JwtRule(
        issuer=issuer,
        audiences=tuple(audiences),
        jwks_uri=jwks_uri,
        jwks=jwks,
        from_headers=tuple(headers),
        from_params=tuple(s for _, s in _strings(ctx, join_path(path, "fromParams"), m.get("fromParams"))),
        from_cookies=tuple(s for _, s in _strings(ctx, join_path(path, "fromCookies"), m.get("fromCookies"))),
        output_payload_to_header=out_hdr,
        forward_original_token=fwd,
        output_claim_to_headers=tuple(claims),
        timeout_seconds=timeout,
        space_delimited_claims=space_delimited,
    )


def _jwks_parses(text: str) -> bool:
    # istiod parses inline JWKS with a JWK library; here the shape is checked (a JSON object
    # with a list of key objects): the waypoint, which uses the keys, validates them fully.
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    keys = doc.get("keys") if isinstance(doc, dict) else None
    return isinstance(keys, list) and all(isinstance(k, dict) for k in keys)


def _request_authentication(ctx: _Ctx, doc: Mapping[str, Any], api_version: str) -> RequestAuthentication:
    meta = _meta(ctx, doc)
    raw_spec = doc.get("spec")
    spec: Mapping[str, Any] = {}
    if raw_spec is not None:
        m = _mapping(ctx, "spec", raw_spec, ("selector", "targetRef", "targetRefs", "jwtRules"))
        spec = m if m is not None else {}
    selector = _selector(ctx, "spec.selector", spec.get("selector"))
    target_refs = _target_refs(ctx, spec)
    rules = []
    if spec.get("jwtRules") is not None:
        for i, r in enumerate(_list(ctx, "spec.jwtRules", spec["jwtRules"]) or ()):
            jr = _jwt_rule(ctx, join_path("spec.jwtRules", i), r)
            if jr is not None:
                rules.append(jr)
    return RequestAuthentication(
        meta=meta,
        selector=selector,
        target_refs=target_refs,
        jwt_rules=tuple(rules),
        api_version=api_version,
        errors=tuple(ctx.errors),
        warnings=tuple(ctx.warnings),
    )


# --------------------------------------------------------------------------------------------
# Entry points


def _check_default_namespace(default_namespace: str | None) -> None:
    if default_namespace is not None and not valid_namespace(default_namespace):
        raise ValueError(f"default namespace {default_namespace!r} is not a valid namespace name")


def parse_policy(doc: Mapping[str, Any], *, default_namespace: str | None = None) -> Policy:
    """Parse one document (a YAML-loaded mapping); see the module docstring for error handling.

    ``default_namespace`` is given to a document without ``metadata.namespace``, as
    ``kubectl apply -n NS`` does; without one such a document gets the field error
    :data:`NO_NAMESPACE_MESSAGE` (and is enforced fail-closed). Raises :class:`PolicyParseError`
    only when ``doc`` is not a recognisable policy document, and ``ValueError`` when
    ``default_namespace`` is not a valid namespace name.
    """
    _check_default_namespace(default_namespace)
    if not isinstance(doc, Mapping):
        raise PolicyParseError(
            [FieldError("", f"expected a policy document (mapping), got {type_name(doc)}")]
        )
    kind = doc.get("kind")
    api = doc.get("apiVersion")
    problems = []
    if kind is None:
        problems.append(FieldError("kind", "required field is missing"))
    elif kind not in KINDS:
        problems.append(FieldError("kind", f"unsupported kind {kind!r} (expected one of {', '.join(KINDS)})"))
    if api is None:
        problems.append(FieldError("apiVersion", "required field is missing"))
    elif api not in API_VERSIONS:
        problems.append(
            FieldError("apiVersion", f"unsupported apiVersion {api!r} (expected {' or '.join(API_VERSIONS)})")
        )
    if problems:
        raise PolicyParseError(problems)
    ctx = _Ctx(default_namespace)
    for k in doc:
        if k not in _TOP_KEYS:
            ctx.err(str(k), f"unknown field (allowed: {', '.join(sorted(_TOP_KEYS))})")
    assert isinstance(api, str)
    if kind == "AuthorizationPolicy":
        return _authorization_policy(ctx, doc, api)
    if kind == "PeerAuthentication":
        return _peer_authentication(ctx, doc, api)
    return _request_authentication(ctx, doc, api)


def is_foreign_document(doc: Any) -> bool:
    """A Kubernetes-shaped document of another API group (a Deployment, a ConfigMap, ...), as
    found beside policies in ``kubectl apply -f`` bundles. Not one with a typo in its kind: a
    document of group security.istio.io, or of one of our kinds, is never foreign."""
    if not isinstance(doc, Mapping):
        return False
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if not isinstance(kind, str) or not kind or not isinstance(api, str) or not api:
        return False
    return kind not in KINDS and api.split("/", 1)[0] != API_GROUP


def parse_policies(
    docs: Iterable[Mapping[str, Any] | None], *, default_namespace: str | None = None
) -> PolicySet:
    """Parse a stream of documents (``None`` entries, i.e. empty YAML documents, are skipped).

    ``default_namespace`` as for :func:`parse_policy` (``kubectl apply -n``). Errors and warnings
    of every document are collected with the document's index; duplicate ``kind namespace/name``
    pairs are errors (the later one would silently replace the first).
    """
    _check_default_namespace(default_namespace)
    authz: list[AuthorizationPolicy] = []
    peer: list[PeerAuthentication] = []
    req: list[RequestAuthentication] = []
    errors: list[DocumentIssue] = []
    warnings: list[DocumentIssue] = []
    seen: dict[tuple[str, str], int] = {}
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        try:
            pol = parse_policy(doc, default_namespace=default_namespace)
        except PolicyParseError as exc:
            kind = doc.get("kind") if isinstance(doc, Mapping) else None
            foreign = is_foreign_document(doc)
            for e in exc.errors:
                errors.append(DocumentIssue(index, kind if isinstance(kind, str) else None, None, e, foreign))
            continue
        for e in pol.errors:
            errors.append(DocumentIssue(index, pol.kind, pol.key, e))
        for w in pol.warnings:
            warnings.append(DocumentIssue(index, pol.kind, pol.key, w))
        ident = (pol.kind, pol.key)
        if ident in seen:
            errors.append(
                DocumentIssue(
                    index,
                    pol.kind,
                    pol.key,
                    FieldError(
                        "metadata.name", f"duplicate {pol.kind} {pol.key} (also document {seen[ident]})"
                    ),
                )
            )
        else:
            seen[ident] = index
        if isinstance(pol, AuthorizationPolicy):
            authz.append(pol)
        elif isinstance(pol, PeerAuthentication):
            peer.append(pol)
        else:
            req.append(pol)
    return PolicySet(tuple(authz), tuple(peer), tuple(req), tuple(errors), tuple(warnings))
