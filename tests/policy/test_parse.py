"""Parsing: Istio documents accepted verbatim; every error names its field path; nothing fails open."""

# Table rows keep each vector's YAML on one line, as an operator would write it inline.
# ruff: noqa: E501

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from policy import (
    Action,
    AuthorizationPolicy,
    MtlsMode,
    PeerAuthentication,
    PolicyParseError,
    RequestAuthentication,
    parse_policies,
    parse_policy,
)
from policy.model import MatchKind
from policy.parse import NO_NAMESPACE_MESSAGE
from tests.policy.util import authz, docs, peer

ISTIO_EXAMPLE = """
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
  annotations:
    istio.io/dry-run: "true"
  creationTimestamp: "2024-05-01T10:00:00Z"
  resourceVersion: "123"
  uid: 0f3e
spec:
  selector:
    matchLabels:
      app: httpbin
      version: v1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["test"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*"]
    - operation:
        methods: ["POST"]
        paths: ["/data"]
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
status: {}
"""


def test_istio_reference_example_parses_verbatim() -> None:
    (doc,) = docs(ISTIO_EXAMPLE)
    p = parse_policy(doc)
    assert isinstance(p, AuthorizationPolicy)
    assert not p.errors
    assert p.key == "foo/httpbin" and p.api_version == "security.istio.io/v1beta1"
    assert p.dry_run is True
    assert p.meta.creation_timestamp == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    assert p.selector is not None and dict(p.selector.match_labels) == {"app": "httpbin", "version": "v1"}
    assert p.action is Action.ALLOW
    assert p.rules is not None
    (rule,) = p.rules
    assert rule.sources is not None and len(rule.sources) == 2
    assert rule.sources[0].principals[0].raw == "cluster.local/ns/default/sa/sleep"
    assert rule.operations is not None and rule.operations[0].paths[0].kind is MatchKind.PREFIX
    assert rule.conditions is not None and rule.conditions[0].key == "request.auth.claims[iss]"
    # HTTP attributes in a node-enforced ALLOW are legal but worth a warning.
    assert any("HTTP attributes" in w.message and w.path == "spec.rules[0]" for w in p.warnings)


def test_string_match_forms() -> None:
    (doc,) = docs("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: m, namespace: ns}
        spec:
          rules:
          - from:
            - source: {principals: ["*", "a*", "*b", "c"]}
    """)
    p = parse_policy(doc)
    assert isinstance(p, AuthorizationPolicy) and p.rules and p.rules[0].sources
    kinds = [(m.kind, m.value) for m in p.rules[0].sources[0].principals]
    assert kinds == [
        (MatchKind.PRESENCE, ""),
        (MatchKind.PREFIX, "a"),
        (MatchKind.SUFFIX, "b"),
        (MatchKind.EXACT, "c"),
    ]


def _spec_errors(spec: Any, kind: str = "AuthorizationPolicy") -> list[str]:
    doc = authz("ns", "p", spec) if kind == "AuthorizationPolicy" else peer("ns", "p", spec)
    return [str(e) for e in parse_policy(doc).errors]


# (id, spec, expected error string exactly as printed)
ERROR_VECTORS: list[tuple[str, str, str]] = [
    (
        "bad-cidr",
        "{rules: [{from: [{}, {source: {ipBlocks: [1.2.3.4, 5.6.7.8, 10.0.0/33]}}]}]}",
        'spec.rules[0].from[1].source.ipBlocks[2]: invalid CIDR "10.0.0/33"',
    ),
    (
        "bad-cidr-length",
        "{rules: [{from: [{source: {notIpBlocks: [10.0.0.0/33]}}]}]}",
        'spec.rules[0].from[0].source.notIpBlocks[0]: invalid CIDR "10.0.0.0/33"',
    ),
    (
        "bad-ip",
        "{rules: [{from: [{source: {ipBlocks: [10.0.0.256]}}]}]}",
        'spec.rules[0].from[0].source.ipBlocks[0]: invalid IP address "10.0.0.256"',
    ),
    (
        "bad-remote-ip",
        "{rules: [{from: [{source: {remoteIpBlocks: [nope]}}]}]}",
        'spec.rules[0].from[0].source.remoteIpBlocks[0]: invalid IP address "nope"',
    ),
    (
        "unknown-source-field",
        "{rules: [{from: [{source: {principal: [a]}}]}]}",
        "spec.rules[0].from[0].source.principal: unknown field (allowed: ipBlocks, namespaces, notIpBlocks, "
        "notNamespaces, notPrincipals, notRemoteIpBlocks, notRequestPrincipals, notServiceAccounts, "
        "notTrustDomains, principals, remoteIpBlocks, requestPrincipals, serviceAccounts, trustDomains)",
    ),
    (
        "unknown-spec-field",
        "{action: ALLOW, rule: [{}]}",
        "spec.rule: unknown field (allowed: action, provider, rules, selector, targetRef, targetRefs)",
    ),
    (
        "empty-source",
        "{rules: [{from: [{source: {}}]}]}",
        "spec.rules[0].from[0].source: `from.source` must not be empty",
    ),
    (
        "null-source",
        "{rules: [{from: [{source: null}]}]}",
        "spec.rules[0].from[0].source: `from.source` must not be null",
    ),
    ("empty-from", "{rules: [{from: []}]}", "spec.rules[0].from: `from` must not be empty"),
    ("empty-to", "{rules: [{to: []}]}", "spec.rules[0].to: `to` must not be empty"),
    (
        "empty-operation",
        "{rules: [{to: [{operation: {}}]}]}",
        "spec.rules[0].to[0].operation: `to.operation` must not be empty",
    ),
    (
        "bad-port",
        "{rules: [{to: [{operation: {ports: ['80', 'http']}}]}]}",
        'spec.rules[0].to[0].operation.ports[1]: invalid port "http": not a number',
    ),
    (
        "port-range",
        "{rules: [{to: [{operation: {notPorts: [70000]}}]}]}",
        "spec.rules[0].to[0].operation.notPorts[0]: invalid port 70000: must be in 0..65535",
    ),
    (
        "empty-principal",
        "{rules: [{from: [{source: {principals: ['']}}]}]}",
        "spec.rules[0].from[0].source.principals[0]: empty value not allowed",
    ),
    (
        "principal-not-string",
        "{rules: [{from: [{source: {principals: [{a: b}]}}]}]}",
        "spec.rules[0].from[0].source.principals[0]: expected a string, got mapping",
    ),
    (
        "principals-not-list",
        "{rules: [{from: [{source: {principals: abc}}]}]}",
        "spec.rules[0].from[0].source.principals: expected a list, got string",
    ),
    (
        "sa-with-principals",
        "{rules: [{from: [{source: {serviceAccounts: [a/b], principals: [x]}}]}]}",
        "spec.rules[0].from[0].source: cannot set serviceAccounts with namespaces or principals",
    ),
    (
        "sa-wildcard",
        "{rules: [{from: [{source: {serviceAccounts: ['ns/*']}}]}]}",
        'spec.rules[0].from[0].source.serviceAccounts[0]: wildcard not allowed in "ns/*"',
    ),
    (
        "sa-format",
        "{rules: [{from: [{source: {serviceAccounts: [a/b/c]}}]}]}",
        "spec.rules[0].from[0].source.serviceAccounts[0]: expected format 'serviceAccount' or "
        "'namespace/serviceAccount', found \"a/b/c\"",
    ),
    (
        "sa-empty-ns",
        "{rules: [{from: [{source: {notServiceAccounts: [/b]}}]}]}",
        "spec.rules[0].from[0].source.notServiceAccounts[0]: expected format 'serviceAccount' or "
        "'namespace/serviceAccount', found \"/b\"",
    ),
    (
        "when-no-values",
        "{rules: [{when: [{key: source.ip}]}]}",
        "spec.rules[0].when[0]: at least one of `values` or `notValues` must be set for key source.ip",
    ),
    (
        "when-unknown-key",
        "{rules: [{when: [{key: source.ipaddr, values: [x]}]}]}",
        "spec.rules[0].when[0].key: unknown attribute: source.ipaddr",
    ),
    (
        "when-bad-ip",
        "{rules: [{when: [{key: destination.ip, notValues: [1.2.3]}]}]}",
        'spec.rules[0].when[0].notValues[0]: invalid IP address "1.2.3"',
    ),
    (
        "when-bad-port",
        "{rules: [{when: [{key: destination.port, values: [eighty]}]}]}",
        'spec.rules[0].when[0].values[0]: invalid port "eighty": not a number',
    ),
    (
        "when-destination-namespace",
        "{rules: [{when: [{key: destination.namespace, values: [x]}]}]}",
        "spec.rules[0].when[0].key: attribute destination.namespace is replaced by the policy's metadata.namespace",
    ),
    (
        "when-bad-map-key",
        "{rules: [{when: [{key: 'request.headers[]', values: [x]}]}]}",
        "spec.rules[0].when[0].key: bad key (request.headers[]): should have format a[b]",
    ),
    (
        "when-empty-key",
        "{rules: [{when: [{key: '', values: [x]}]}]}",
        "spec.rules[0].when[0].key: `key` must not be empty",
    ),
    ("null-rule", "{rules: [null]}", "spec.rules[0]: `rule` must not be null"),
    (
        "bad-action",
        "{action: permit, rules: [{}]}",
        'spec.action: invalid action "permit" (expected one of ALLOW, DENY, AUDIT, CUSTOM); enforced as DENY until fixed',
    ),
    (
        "custom-without-rules",
        "{action: CUSTOM, provider: {name: x}}",
        "spec.rules: CUSTOM action without `rules` is meaningless as it will never be triggered; add an empty "
        "rule `{}` if you want it triggered for every connection",
    ),
    (
        "custom-without-provider",
        "{action: CUSTOM, rules: [{}]}",
        "spec.provider.name: `provider.name` must not be empty",
    ),
    (
        "provider-without-custom",
        "{action: DENY, provider: {name: x}, rules: [{}]}",
        "spec.provider: `provider` must not be with non CUSTOM action, found DENY",
    ),
    (
        "custom-with-principals",
        "{action: CUSTOM, provider: {name: x}, rules: [{from: [{source: {principals: [a]}}]}]}",
        "spec.rules[0].from[0].source.principals: From.Principals is currently not supported with CUSTOM action",
    ),
    (
        "selector-wildcard",
        "{selector: {matchLabels: {app: '*'}}}",
        'spec.selector.matchLabels.app: wildcard is not supported in selector: "app=*"',
    ),
    (
        "selector-bad-value",
        "{selector: {matchLabels: {app: 'a b'}}}",
        'spec.selector.matchLabels.app: invalid label value "a b"',
    ),
    (
        "selector-unknown-field",
        "{selector: {labels: {app: x}}}",
        "spec.selector.labels: unknown field (allowed: matchLabels)",
    ),
    (
        "selector-and-targetref",
        "{selector: {matchLabels: {a: b}}, targetRef: {kind: Gateway, name: g}}",
        "spec.selector: at most one of selector and targetRef(s) may be set",
    ),
    (
        "bad-path-template",
        "{rules: [{to: [{operation: {paths: ['/a/{**}/b/{*}']}}]}]}",
        'spec.rules[0].to[0].operation.paths[0]: invalid or unsupported path template "/a/{**}/b/{*}"',
    ),
    ("spec-not-mapping", "[a]", "spec: expected a mapping, got list"),
]


@pytest.mark.parametrize(("spec", "expected"), [pytest.param(s, e, id=i) for i, s, e in ERROR_VECTORS])
def test_error_names_field(spec: str, expected: str) -> None:
    import yaml

    errors = _spec_errors(yaml.safe_load(spec))
    assert expected in errors, errors


def test_every_error_is_reported_not_just_the_first() -> None:
    errors = _spec_errors({"rules": [{"from": [{"source": {"ipBlocks": ["x", "y"], "principals": [""]}}]}]})
    assert len(errors) == 3


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"namespace": "ns"}, "metadata.name: required field is missing"),
        # Issue 17: one message, shared with mesh.config and lint (it was "required field is missing").
        ({"name": "p"}, f"metadata.namespace: {NO_NAMESPACE_MESSAGE}"),
        ({"name": "p", "namespace": 5}, "metadata.namespace: expected a non-empty string, got integer"),
        (
            {"name": "p", "namespace": "ns", "annotations": {"istio.io/dry-run": "maybe"}},
            'metadata.annotations.istio.io/dry-run: invalid boolean "maybe"; the policy is enforced until fixed',
        ),
        (
            {"name": "p", "namespace": "ns", "creationTimestamp": "yesterday"},
            'metadata.creationTimestamp: invalid RFC 3339 timestamp "yesterday"',
        ),
    ],
)
def test_metadata_errors(meta: dict[str, Any], expected: str) -> None:
    doc = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": meta, "spec": {}}
    errs = [str(e) for e in parse_policy(doc).errors]
    assert any(e.startswith(expected) for e in errs), errs


def test_unknown_top_level_field() -> None:
    doc = authz("ns", "p", {})
    doc["sepc"] = {"action": "DENY"}
    assert [str(e) for e in parse_policy(doc).errors] == [
        "sepc: unknown field (allowed: apiVersion, kind, metadata, spec, status)"
    ]


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ("not a mapping", "expected a policy document (mapping), got string"),
        ({"apiVersion": "security.istio.io/v1", "kind": "Sidecar"}, "kind: unsupported kind 'Sidecar'"),
        (
            {"apiVersion": "security.istio.io/v2", "kind": "PeerAuthentication"},
            "apiVersion: unsupported apiVersion",
        ),
    ],
)
def test_not_a_policy_raises(doc: Any, expected: str) -> None:
    with pytest.raises(PolicyParseError) as exc:
        parse_policy(doc)
    assert expected in str(exc.value)


def test_parse_policies_collects_documents_and_locates_errors() -> None:
    stream = docs("""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: a, namespace: ns}
        spec: {}
        ---
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: default, namespace: istio-system}
        spec: {mtls: {mode: STRICT}}
        ---
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {name: jwt, namespace: ns}
        spec:
          jwtRules:
          - issuer: https://issuer.example
            jwksUri: https://issuer.example/jwks
            audiences: [api]
            fromHeaders: [{name: x-token, prefix: "Bearer "}]
            timeout: 5s
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: a, namespace: ns}
        spec: {action: DENY, rules: [{from: [{source: {ipBlocks: [bad]}}]}]}
        ---
        kind: Gateway
        apiVersion: networking.istio.io/v1
    """)
    ps = parse_policies([*stream[:3], None, *stream[3:]])
    assert [p.key for p in ps.authorization] == ["ns/a", "ns/a"]
    assert [p.mode for p in ps.peer_authentication] == [MtlsMode.STRICT]
    (ra,) = ps.request_authentication
    assert isinstance(ra, RequestAuthentication) and ra.jwt_rules[0].timeout_seconds == 5.0
    assert ra.jwt_rules[0].from_headers[0].prefix == "Bearer "
    msgs = [str(e) for e in ps.errors]
    assert msgs == [
        'document 4 (AuthorizationPolicy ns/a): spec.rules[0].from[0].source.ipBlocks[0]: invalid IP address "bad"',
        "document 4 (AuthorizationPolicy ns/a): metadata.name: duplicate AuthorizationPolicy ns/a (also document 0)",
        "document 5 (Gateway): kind: unsupported kind 'Gateway' (expected one of AuthorizationPolicy, "
        "PeerAuthentication, RequestAuthentication)",
        "document 5 (Gateway): apiVersion: unsupported apiVersion 'networking.istio.io/v1' "
        "(expected security.istio.io/v1 or security.istio.io/v1beta1)",
    ]
    assert not ps.ok


def test_frozen_inputs_are_accepted() -> None:
    """mesh/config hands over read-only mappings and tuples."""
    from types import MappingProxyType

    doc = MappingProxyType(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": MappingProxyType({"name": "p", "namespace": "ns"}),
            "spec": MappingProxyType(
                {
                    "rules": (
                        MappingProxyType(
                            {"to": (MappingProxyType({"operation": MappingProxyType({"ports": ("80",)})}),)}
                        ),
                    )
                }
            ),
        }
    )
    p = parse_policy(doc)
    assert not p.errors and isinstance(p, AuthorizationPolicy) and p.rules is not None


# ---- PeerAuthentication and RequestAuthentication validation


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            "{mtls: {mode: strict}}",
            'spec.mtls.mode: invalid mode "strict" (expected one of UNSET, DISABLE, PERMISSIVE, STRICT); '
            "enforced as STRICT until fixed",
        ),
        (
            "{portLevelMtls: {8080: {mode: STRICT}}}",
            "spec.portLevelMtls: mesh/namespace peer authentication cannot have port level mTLS",
        ),
        (
            "{selector: {matchLabels: {a: b}}, portLevelMtls: {}}",
            "spec.portLevelMtls: port level mTLS, if defined, must have at least one element",
        ),
        (
            "{selector: {matchLabels: {a: b}}, portLevelMtls: {0: {mode: STRICT}}}",
            "spec.portLevelMtls.0: port must be in range 1..65535",
        ),
        (
            "{selector: {matchLabels: {a: b}}, portLevelMtls: {http: {mode: STRICT}}}",
            'spec.portLevelMtls.http: invalid port "http": not a number',
        ),
        ("{mtls: {mode: STRICT, extra: 1}}", "spec.mtls.extra: unknown field (allowed: mode)"),
    ],
)
def test_peer_authentication_errors(spec: str, expected: str) -> None:
    import yaml

    assert expected in _spec_errors(yaml.safe_load(spec), "PeerAuthentication")


def test_peer_authentication_port_keys_int_or_string() -> None:
    p = parse_policy(
        peer(
            "ns",
            "p",
            {
                "selector": {"matchLabels": {"a": "b"}},
                "portLevelMtls": {8080: {"mode": "DISABLE"}, "9090": {"mode": "STRICT"}},
            },
        )
    )
    assert isinstance(p, PeerAuthentication) and not p.errors
    assert dict(p.port_level) == {8080: MtlsMode.DISABLE, 9090: MtlsMode.STRICT}


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"audiences": ["a"]}, "spec.jwtRules[0]: issuer or jwksUri must be non-empty string"),
        (
            {"issuer": "i", "jwksUri": "ftp://x"},
            'spec.jwtRules[0].jwksUri: URI scheme of "ftp://x" is not supported',
        ),
        (
            {"issuer": "i", "fromHeaders": [{"prefix": "B"}]},
            "spec.jwtRules[0].fromHeaders[0].name: location header name must be non-empty string",
        ),
        ({"issuer": "i", "timeout": "soon"}, "spec.jwtRules[0].timeout: invalid duration 'soon'"),
        ({"issuer": "i", "audience": ["x"]}, "spec.jwtRules[0].audience: unknown field"),
    ],
)
def test_request_authentication_errors(rule: dict[str, Any], expected: str) -> None:
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "r", "namespace": "ns"},
        "spec": {"jwtRules": [rule]},
    }
    errs = [str(e) for e in parse_policy(doc).errors]
    assert any(e.startswith(expected) for e in errs), errs


def test_warnings_for_target_refs_and_http_deny() -> None:
    p = parse_policy(
        authz(
            "ns",
            "w",
            {
                "targetRefs": [{"kind": "Service", "group": "", "name": "httpbin"}],
                "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}],
            },
        )
    )
    assert not p.errors and isinstance(p, AuthorizationPolicy) and p.for_waypoint
    assert [w.path for w in p.warnings] == ["spec.targetRefs"]
    d = parse_policy(
        authz("ns", "d", {"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})
    )
    assert any("more restrictive" in w.message for w in d.warnings)
