"""The policy corpus (tests/policy/corpus/): real-world-shaped Istio documents written for this project.

* ``valid/``: every document loads with 0 refusals when given a namespace the way ``kubectl apply
  -n`` does (most have no ``metadata.namespace``, as Istio's samples and tasks), and without one
  the only error is the namespace error, once per such document.
* ``invalid/``: every document gets the field-level errors named in its ``# expect:`` lines.
* together they use every field of the ``security.istio.io/v1`` API (checked against the field
  list below, taken from istio/api's protos: authorization_policy, peer_authentication,
  request_authentication, jwt, type/v1beta1 selector), every action, mTLS mode and ``when`` key.
* decisions match Istio's documented ambient (L4) semantics, in a table of (documents,
  connection) -> verdict, code.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from policy import (
    CODE_ALLOW_MATCHED,
    CODE_CUSTOM_UNSUPPORTED,
    CODE_DENY_MATCHED,
    CODE_MTLS_REQUIRED,
    CODE_NO_ALLOW_MATCHED,
    CODE_NO_POLICY,
    Connection,
    PolicyIndex,
    Verdict,
    parse_policies,
)
from policy.parse import NO_NAMESPACE_MESSAGE

CORPUS = Path(__file__).parent / "corpus"
VALID = sorted((CORPUS / "valid").glob("*.yaml"))
INVALID = sorted((CORPUS / "invalid").glob("*.yaml"))
NS = "foo"  # what `kubectl apply -n foo` would give the documents without a namespace


def load(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_corpus_is_there() -> None:
    assert len(VALID) >= 15 and len(INVALID) >= 20
    docs = [d for p in VALID for d in load(p)]
    assert len(docs) >= 40
    without_ns = [d for d in docs if "namespace" not in d.get("metadata", {})]
    assert len(without_ns) > len(docs) / 2  # as in Istio's own samples


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_documents_load_with_no_refusals(path: Path) -> None:
    docs = load(path)
    ps = parse_policies(docs, default_namespace=NS)
    assert ps.errors == (), [str(e) for e in ps.errors]
    assert len(list(ps)) == len(docs)
    for d, p in zip(docs, ps_in_document_order(ps, docs), strict=True):
        assert p.meta.namespace == d["metadata"].get("namespace", NS)
        assert p.meta.namespace_defaulted == ("namespace" not in d["metadata"])
    # Without a default namespace: exactly one error per namespace-less document, and the same one.
    bare = parse_policies(docs)
    expected = [i for i, d in enumerate(docs) if "namespace" not in d["metadata"]]
    assert [e.document for e in bare.errors] == expected
    assert {(e.path, e.message) for e in bare.errors} <= {("metadata.namespace", NO_NAMESPACE_MESSAGE)}


def ps_in_document_order(ps: Any, docs: list[Any]) -> list[Any]:
    by_key = {(p.kind, p.meta.name): p for p in ps}
    return [by_key[(d["kind"], d["metadata"]["name"])] for d in docs]


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_documents_get_field_errors(path: Path) -> None:
    expected = [
        line.removeprefix("# expect:").strip()
        for line in path.read_text().splitlines()
        if line.startswith("# expect:")
    ]
    assert expected, f"{path.name} has no '# expect:' line"
    ps = parse_policies(load(path), default_namespace=NS)
    errors = [str(e.error) for e in ps.errors]
    for want in expected:
        assert any(e.startswith(want) for e in errors), (want, errors)
    assert all(e.error.path for e in ps.errors), errors  # every error names its field
    assert len(errors) == len(expected), errors  # and nothing else is reported
    for p in ps:
        assert p.poisoned  # enforced fail-closed


# --------------------------------------------------------------------------------------------
# Coverage of the API

# Field paths of security.istio.io/v1 (istio/api protos), "[]" for list items.
_TARGET_REF = ("group", "kind", "name", "namespace")
_SOURCE = [
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
]
_OPERATION = ["hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths"]
_JWT = [
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
]
_META = {"metadata.name", "metadata.namespace", "metadata.annotations", "metadata.creationTimestamp"}
API_FIELDS: dict[str, set[str]] = {
    "AuthorizationPolicy": _META
    | {"spec.selector", "spec.selector.matchLabels", "spec.targetRef", "spec.targetRefs", "spec.rules"}
    | {f"spec.targetRef.{f}" for f in _TARGET_REF[:3]}
    | {f"spec.targetRefs[].{f}" for f in _TARGET_REF}
    | {"spec.rules[].from", "spec.rules[].from[].source", "spec.rules[].to", "spec.rules[].to[].operation"}
    | {f"spec.rules[].from[].source.{f}" for f in _SOURCE}
    | {f"spec.rules[].to[].operation.{f}" for f in _OPERATION}
    | {"spec.rules[].when", "spec.rules[].when[].key", "spec.rules[].when[].values"}
    | {"spec.rules[].when[].notValues", "spec.action", "spec.provider", "spec.provider.name"},
    "PeerAuthentication": _META
    | {"spec.selector", "spec.selector.matchLabels", "spec.mtls", "spec.mtls.mode"}
    | {"spec.portLevelMtls", "spec.portLevelMtls.*", "spec.portLevelMtls.*.mode"},
    "RequestAuthentication": _META
    | {"spec.selector", "spec.selector.matchLabels", "spec.targetRef", "spec.targetRefs", "spec.jwtRules"}
    | {f"spec.targetRef.{f}" for f in _TARGET_REF[:3]}
    | {f"spec.targetRefs[].{f}" for f in _TARGET_REF[:3]}
    | {f"spec.jwtRules[].{f}" for f in _JWT}
    | {"spec.jwtRules[].fromHeaders[].name", "spec.jwtRules[].fromHeaders[].prefix"}
    | {"spec.jwtRules[].outputClaimToHeaders[].header", "spec.jwtRules[].outputClaimToHeaders[].claim"},
}
_MAPS = {"metadata.annotations", "metadata.labels", "spec.selector.matchLabels"}  # free-form keys
WHEN_KEYS = {
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "source.trustDomain",
    "request.headers",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "request.auth.claims",
    "destination.ip",
    "destination.port",
    "connection.sni",
    "experimental.envoy.filters",
}


def _paths(v: Any, path: str = "") -> Iterator[str]:
    """Every field path in a document (mapping keys; list items as "[]")."""
    if path in _MAPS:
        return
    if isinstance(v, Mapping):
        for k, x in v.items():
            key = "*" if path == "spec.portLevelMtls" else str(k)
            sub = f"{path}.{key}" if path else key
            yield sub
            yield from _paths(x, sub)
    elif isinstance(v, list):
        for x in v:
            yield from _paths(x, f"{path}[]")


def test_corpus_covers_every_field_of_the_api() -> None:
    seen: dict[str, set[str]] = {k: set() for k in API_FIELDS}
    seen_valid: dict[str, set[str]] = {k: set() for k in API_FIELDS}
    actions, modes, keys = set(), set(), set()
    for path in [*VALID, *INVALID]:
        for d in load(path):
            kind = d["kind"]
            fields = {p for p in _paths(d) if p.startswith(("spec", "metadata."))}
            seen[kind] |= fields
            if path in VALID:
                seen_valid[kind] |= fields
            spec = d.get("spec") or {}
            if kind == "AuthorizationPolicy":
                actions.add(spec.get("action", "ALLOW"))
                for r in spec.get("rules") or ():
                    for c in (r or {}).get("when") or ():
                        keys.add(c["key"].split("[")[0])
            if kind == "PeerAuthentication":
                modes |= {m.get("mode", "UNSET") for m in [spec.get("mtls") or {}]}
                modes |= {(m or {}).get("mode", "UNSET") for m in (spec.get("portLevelMtls") or {}).values()}
    for kind, fields in API_FIELDS.items():
        assert fields - seen[kind] == set(), f"{kind}: fields the corpus never uses"
        # The valid corpus uses nothing else (the invalid one shows, e.g., that a jwtRules
        # `presence` is refused: it is not a JWTRule field).
        assert seen_valid[kind] - fields - {"metadata.labels", "spec"} == set(), f"{kind}: not in the API"
    assert {"ALLOW", "DENY", "AUDIT", "CUSTOM"} <= actions
    assert {"UNSET", "DISABLE", "PERMISSIVE", "STRICT"} <= modes
    expected_keys = {k.rstrip(".") for k in WHEN_KEYS}
    seen_keys = {
        ("experimental.envoy.filters" if k.startswith("experimental.envoy.filters") else k) for k in keys
    }
    assert expected_keys <= seen_keys, expected_keys - seen_keys


# --------------------------------------------------------------------------------------------
# Decisions (Istio's documented ambient semantics, as the destination node agent applies them)

_ALL: dict[tuple[str, str], Any] = {}


def doc(file: str, name: str) -> Any:
    if not _ALL:
        for p in VALID:
            for d in load(p):
                _ALL[(p.stem, d["metadata"]["name"])] = d
    return _ALL[(file, name)]


def conn(
    principal: str | None,
    labels: dict[str, str],
    *,
    ns: str = NS,
    port: int = 8080,
    src: str = "10.244.1.2",
    dst: str = "10.244.2.5",
) -> Connection:
    return Connection(
        source_principal=principal,
        source_ip=ipaddress.ip_address(src),
        destination_namespace=ns,
        destination_port=port,
        destination_labels=labels,
        destination_ip=ipaddress.ip_address(dst),
    )


A, D = Verdict.ALLOW, Verdict.DENY
SLEEP = "cluster.local/ns/default/sa/sleep"
HTTPBIN = {"app": "httpbin", "version": "v1"}
LEDGER = {"app": "ledger"}
TCP = {"app": "tcp-echo"}

# (id, [(file, name)], connection, verdict, code)
DECISIONS: list[tuple[str, list[tuple[str, str]], Connection, Verdict, str]] = [
    # "allow-nothing": an ALLOW without rules denies everything in its namespace ...
    (
        "allow-nothing",
        [("authz-http-basics", "allow-nothing")],
        conn(SLEEP, HTTPBIN),
        D,
        CODE_NO_ALLOW_MATCHED,
    ),
    # ... of the namespace it was applied to (-n foo), not elsewhere.
    (
        "allow-nothing-other-ns",
        [("authz-http-basics", "allow-nothing")],
        conn(SLEEP, HTTPBIN, ns="bar"),
        A,
        CODE_NO_POLICY,
    ),
    ("allow-all", [("authz-allow-all", "allow-all")], conn(None, HTTPBIN), A, CODE_ALLOW_MATCHED),
    # Root-namespace policy with a selector applies to matching workloads of every namespace.
    (
        "root-selector",
        [("authz-allow-all", "allow-nothing-v1")],
        conn(SLEEP, HTTPBIN, ns="bar"),
        D,
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "root-selector-no-match",
        [("authz-allow-all", "allow-nothing-v1")],
        conn(SLEEP, {"app": "x"}, ns="bar"),
        A,
        CODE_NO_POLICY,
    ),
    # ALLOW with HTTP fields (methods, paths, request.auth.claims): the rule is omitted at L4.
    (
        "allow-http-omitted",
        [("authz-http-basics", "httpbin")],
        conn(SLEEP, HTTPBIN),
        D,
        CODE_NO_ALLOW_MATCHED,
    ),
    # DENY with HTTP fields: dropped, L4 rest enforced (more restrictive than requested).
    (
        "deny-http-from-dev",
        [("authz-deny", "deny-dev-post")],
        conn("cluster.local/ns/dev/sa/x", HTTPBIN),
        D,
        CODE_DENY_MATCHED,
    ),
    (
        "deny-http-from-prod",
        [("authz-deny", "deny-dev-post")],
        conn("cluster.local/ns/prod/sa/x", HTTPBIN),
        A,
        CODE_NO_POLICY,
    ),
    # A plaintext peer never matches a positive identity field: a DENY on namespaces misses it.
    ("deny-ns-plaintext", [("authz-deny", "deny-dev-post")], conn(None, HTTPBIN), A, CODE_NO_POLICY),
    (
        "deny-port-8080",
        [("authz-deny", "deny-post-8080")],
        conn(SLEEP, HTTPBIN, port=8080),
        D,
        CODE_DENY_MATCHED,
    ),
    (
        "deny-port-9090",
        [("authz-deny", "deny-post-8080")],
        conn(SLEEP, HTTPBIN, port=9090),
        A,
        CODE_NO_POLICY,
    ),
    # ... and always satisfies a negative one.
    ("deny-not-ns-plaintext", [("authz-deny", "deny-not-foo")], conn(None, HTTPBIN), D, CODE_DENY_MATCHED),
    (
        "deny-not-ns-foo",
        [("authz-deny", "deny-not-foo")],
        conn("cluster.local/ns/foo/sa/a", HTTPBIN),
        A,
        CODE_NO_POLICY,
    ),
    # A DENY made of HTTP fields only denies every connection it selects.
    ("deny-http-only", [("authz-deny", "deny-path-headers")], conn(SLEEP, HTTPBIN), D, CODE_DENY_MATCHED),
    # A DENY without rules never matches.
    (
        "deny-without-rules",
        [("authz-deny-without-rules", "deny-nothing")],
        conn(SLEEP, HTTPBIN),
        A,
        CODE_NO_POLICY,
    ),
    ("tcp-9000", [("authz-tcp", "tcp-policy")], conn(SLEEP, TCP, port=9000), A, CODE_ALLOW_MATCHED),
    ("tcp-9002", [("authz-tcp", "tcp-policy")], conn(SLEEP, TCP, port=9002), D, CODE_NO_ALLOW_MATCHED),
    ("tcp-notports", [("authz-tcp", "tcp-deny-9002")], conn(SLEEP, TCP, port=9002), D, CODE_DENY_MATCHED),
    ("tcp-notports-9001", [("authz-tcp", "tcp-deny-9002")], conn(SLEEP, TCP, port=9001), A, CODE_NO_POLICY),
    (
        "ip-allowed",
        [("authz-tcp", "ip-allowlist")],
        conn(None, {"app": "db"}, src="10.244.1.7"),
        A,
        CODE_ALLOW_MATCHED,
    ),
    (
        "ip-excluded",
        [("authz-tcp", "ip-allowlist")],
        conn(None, {"app": "db"}, src="10.244.1.66"),
        D,
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "ip-when",
        [("authz-tcp", "ip-allowlist")],
        conn(None, {"app": "db"}, src="192.168.7.9", port=5432),
        A,
        CODE_ALLOW_MATCHED,
    ),
    (
        "ip-when-not",
        [("authz-tcp", "ip-allowlist")],
        conn(None, {"app": "db"}, src="192.168.7.13", port=5432),
        D,
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "ip-when-port",
        [("authz-tcp", "ip-allowlist")],
        conn(None, {"app": "db"}, src="192.168.7.9", port=5433),
        D,
        CODE_NO_ALLOW_MATCHED,
    ),
    # serviceAccounts: a bare name is the policy's own namespace (foo, from -n).
    (
        "sa-bare",
        [("authz-service-accounts", "allow-sleep-sa")],
        conn("cluster.local/ns/foo/sa/sleep", HTTPBIN),
        A,
        CODE_ALLOW_MATCHED,
    ),
    (
        "sa-bare-other-ns",
        [("authz-service-accounts", "allow-sleep-sa")],
        conn("cluster.local/ns/default/sa/sleep", HTTPBIN, src="192.0.2.1"),
        D,
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "sa-qualified",
        [("authz-service-accounts", "allow-sleep-sa")],
        conn("cluster.local/ns/other-ns/sa/curl", HTTPBIN),
        A,
        CODE_ALLOW_MATCHED,
    ),
    (
        "not-sa",
        [("authz-service-accounts", "allow-sleep-sa")],
        conn("cluster.local/ns/foo/sa/banned", HTTPBIN, src="10.1.1.1"),
        D,
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "not-sa-plaintext",
        [("authz-service-accounts", "allow-sleep-sa")],
        conn(None, HTTPBIN, src="10.1.1.1"),
        A,
        CODE_ALLOW_MATCHED,
    ),
    # trustDomains from the peer's SPIFFE ID: exact, suffix wildcard, negative; plaintext never.
    (
        "td-own",
        [("authz-trust-domains", "allow-own-trust-domain")],
        conn("cluster.local/ns/a/sa/b", LEDGER),
        A,
        CODE_ALLOW_MATCHED,
    ),
    (
        "td-suffix",
        [("authz-trust-domains", "allow-own-trust-domain")],
        conn("eu.corp.example/ns/a/sa/b", LEDGER),
        A,
        CODE_ALLOW_MATCHED,
    ),
    (
        "td-excluded",
        [("authz-trust-domains", "allow-own-trust-domain")],
        conn("legacy.corp.example/ns/a/sa/b", LEDGER),
        D,
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "td-other",
        [("authz-trust-domains", "allow-own-trust-domain")],
        conn("partner.example/ns/a/sa/b", LEDGER),
        D,
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "td-plaintext",
        [("authz-trust-domains", "allow-own-trust-domain")],
        conn(None, LEDGER),
        D,
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "td-when-deny",
        [("authz-trust-domains", "deny-partner-td")],
        conn("partner.example/ns/a/sa/b", LEDGER),
        D,
        CODE_DENY_MATCHED,
    ),
    (
        "td-when-deny-own",
        [("authz-trust-domains", "deny-partner-td")],
        conn("cluster.local/ns/a/sa/b", LEDGER),
        A,
        CODE_NO_POLICY,
    ),
    (
        "td-when-deny-plaintext",
        [("authz-trust-domains", "deny-partner-td")],
        conn(None, LEDGER),
        A,
        CODE_NO_POLICY,
    ),
    # CUSTOM at L4 fails closed (its HTTP paths are dropped: it matches everything it selects).
    ("custom", [("authz-custom-audit", "ext-authz")], conn(SLEEP, HTTPBIN), D, CODE_CUSTOM_UNSUPPORTED),
    # targetRef(s): a waypoint's policy, not applied by the node agent.
    (
        "custom-waypoint",
        [("authz-custom-audit", "ext-authz-waypoint")],
        conn(SLEEP, HTTPBIN),
        A,
        CODE_NO_POLICY,
    ),
    (
        "waypoint-allow",
        [("authz-waypoint", "waypoint-get-only")],
        conn(None, {"app": "productpage"}),
        A,
        CODE_NO_POLICY,
    ),
    # AUDIT and dry-run never change the verdict.
    ("audit", [("authz-custom-audit", "audit-profile")], conn(SLEEP, {"app": "myapi"}), A, CODE_NO_POLICY),
    ("dry-run", [("authz-dry-run", "dry-run-deny")], conn(SLEEP, HTTPBIN), A, CODE_NO_POLICY),
    (
        "v1beta1-any-but-untrusted",
        [("authz-v1beta1", "legacy-beta")],
        conn("cluster.local/ns/x/sa/y", {"app": "legacy"}),
        A,
        CODE_ALLOW_MATCHED,
    ),
    (
        "v1beta1-untrusted",
        [("authz-v1beta1", "legacy-beta")],
        conn("cluster.local/ns/untrusted/sa/y", {"app": "legacy"}),
        D,
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "v1beta1-plaintext",
        [("authz-v1beta1", "legacy-beta")],
        conn(None, {"app": "legacy"}),
        D,
        CODE_NO_ALLOW_MATCHED,
    ),
    # PeerAuthentication: mesh STRICT refuses plaintext; a namespace PERMISSIVE overrides it;
    # port-level DISABLE opens one port of a STRICT workload.
    (
        "mesh-strict",
        [("peer-authentication", "default")],
        conn(None, HTTPBIN, ns="bar"),
        D,
        CODE_MTLS_REQUIRED,
    ),
    (
        "mesh-strict-mtls",
        [("peer-authentication", "default")],
        conn(SLEEP, HTTPBIN, ns="bar"),
        A,
        CODE_NO_POLICY,
    ),
    (
        "ns-permissive",
        [("peer-authentication", "default"), ("peer-authentication", "namespace-permissive")],
        conn(None, HTTPBIN),
        A,
        CODE_NO_POLICY,
    ),
    (
        "workload-strict",
        [("peer-authentication", "namespace-permissive"), ("peer-authentication", "legacy-ports")],
        conn(None, {"app": "legacy"}, port=8080),
        D,
        CODE_MTLS_REQUIRED,
    ),
    (
        "port-disable",
        [("peer-authentication", "namespace-permissive"), ("peer-authentication", "legacy-ports")],
        conn(None, {"app": "legacy"}, port=9000),
        A,
        CODE_NO_POLICY,
    ),
    (
        "port-unset-inherits",
        [("peer-authentication", "default"), ("peer-authentication", "legacy-ports")],
        conn(None, {"app": "legacy"}, port=9002),
        D,
        CODE_MTLS_REQUIRED,
    ),
    (
        "workload-inherits",
        [("peer-authentication", "default"), ("peer-authentication", "inherit")],
        conn(None, {"app": "inherit"}),
        D,
        CODE_MTLS_REQUIRED,
    ),
]


@pytest.mark.parametrize(
    ("refs", "connection", "verdict", "code"), [pytest.param(*v[1:], id=v[0]) for v in DECISIONS]
)
def test_decisions_match_istio_ambient_semantics(
    refs: list[tuple[str, str]], connection: Connection, verdict: Verdict, code: str
) -> None:
    ps = parse_policies([doc(f, n) for f, n in refs], default_namespace=NS)
    assert ps.errors == ()
    d = PolicyIndex(ps).check(connection)
    assert (d.verdict, d.code) == (verdict, code), d.reason


def test_audit_and_dry_run_are_reported() -> None:
    ps = parse_policies(
        [doc("authz-custom-audit", "audit-profile"), doc("authz-dry-run", "dry-run-deny")],
        default_namespace=NS,
    )
    d = PolicyIndex(ps).check(conn(SLEEP, {"app": "myapi"}))
    assert d.audit == ("foo/audit-profile",)
    d = PolicyIndex(ps).check(conn(SLEEP, HTTPBIN))
    assert d.dry_run_verdict is D and [m.policy for m in d.dry_run] == ["foo/dry-run-deny"]
