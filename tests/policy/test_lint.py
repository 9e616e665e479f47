"""policy.lint: each foot-gun is reported once, where it is, and correct policy is left alone."""

from __future__ import annotations

from typing import Any

import pytest

from policy import parse_policies
from policy.lint import (
    CODES,
    Finding,
    Suppression,
    WorkloadRef,
    failing,
    lint,
    parse_suppression,
    suppress,
)
from policy.parse import NO_NAMESPACE_MESSAGE
from tests.policy.util import authz, peer

STRICT_MESH = peer("istio-system", "default", "{mtls: {mode: STRICT}}")
DEFAULT_DENY = authz("istio-system", "deny-all-by-default", "{action: ALLOW}")


def run(
    *docs: dict[str, Any], workloads: tuple[WorkloadRef, ...] = (), td: str = "cluster.local"
) -> list[Finding]:
    return lint(parse_policies(docs), trust_domain=td, workloads=workloads)


def codes(findings: list[Finding]) -> list[tuple[str, str | None, str]]:
    return [(f.code, f.policy, f.path) for f in findings]


# (id, policy documents besides STRICT_MESH, expected (code, policy, path) findings)
CASES: list[tuple[str, list[dict[str, Any]], list[tuple[str, str | None, str]]]] = [
    ("nothing-to-say", [], []),
    (
        "empty-spec-allow",
        [authz("ns2", "x", {})],
        [("empty-allow", "AuthorizationPolicy ns2/x", "spec.rules")],
    ),
    ("allow-all-is-fine", [authz("ns2", "x", "rules: [{}]")], []),
    (
        # Issue 17: valid and a no-op (it was reported `invalid`, and so enforced as deny-all).
        "empty-deny-is-a-no-op-not-empty-allow",
        [authz("ns2", "x", "{action: DENY}")],
        [("deny-without-rules", "AuthorizationPolicy ns2/x", "spec.rules")],
    ),
    (
        "deny-http-only-denies-everything-selected",
        [authz("ns2", "x", "{action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]}")],
        [("deny-http-only", "AuthorizationPolicy ns2/x", "spec.rules[0]")],
    ),
    (
        "deny-http-with-ports-is-http-at-l4",
        [authz("ns2", "x", "{action: DENY, rules: [{to: [{operation: {methods: [POST], ports: ['80']}}]}]}")],
        [("http-at-l4", "AuthorizationPolicy ns2/x", "spec.rules[0]")],
    ),
    (
        "custom-at-l4",
        [
            authz(
                "ns2",
                "x",
                "{action: CUSTOM, provider: {name: opa}, rules: [{to: [{operation: {ports: ['80']}}]}]}",
            )
        ],
        [("custom-at-l4", "AuthorizationPolicy ns2/x", "spec.action")],
    ),
    (
        "audit-at-l4",
        [authz("ns2", "x", "{action: AUDIT, rules: [{}]}")],
        [("audit-at-l4", "AuthorizationPolicy ns2/x", "spec.action")],
    ),
    (
        "trust-domains-other-td",
        [authz("ns2", "x", "{rules: [{from: [{source: {trustDomains: [partner.example]}}]}]}")],
        [
            (
                "trust-domain-mismatch",
                "AuthorizationPolicy ns2/x",
                "spec.rules[0].from[0].source.trustDomains[0]",
            )
        ],
    ),
    (
        "trust-domains-own-td-is-fine",
        [authz("ns2", "x", "{rules: [{from: [{source: {trustDomains: [cluster.local]}}]}]}")],
        [],
    ),
    (
        "spiffe-prefix",
        [
            authz(
                "ns2",
                "x",
                "{rules: [{from: [{source: {notPrincipals: ['spiffe://cluster.local/ns/a/sa/b']}}]}]}",
            )
        ],
        [("spiffe-prefix", "AuthorizationPolicy ns2/x", "spec.rules[0].from[0].source.notPrincipals[0]")],
    ),
    (
        "spiffe-prefix-in-when",
        [
            authz(
                "ns2",
                "x",
                "{rules: [{when: [{key: source.principal, values: ['spiffe://cluster.local/ns/a/sa/b']}]}]}",
            )
        ],
        [("spiffe-prefix", "AuthorizationPolicy ns2/x", "spec.rules[0].when[0].values[0]")],
    ),
    (
        "wildcard-td",
        [authz("ns2", "x", "{rules: [{from: [{source: {principals: ['*/ns/a/sa/b']}}]}]}")],
        [
            (
                "wildcard-trust-domain",
                "AuthorizationPolicy ns2/x",
                "spec.rules[0].from[0].source.principals[0]",
            )
        ],
    ),
    (
        "presence-wildcard-is-fine",
        [authz("ns2", "x", "{rules: [{from: [{source: {principals: ['*']}}]}]}")],
        [],
    ),
    (
        "own-td-prefix-is-fine",
        [authz("ns2", "x", "{rules: [{from: [{source: {principals: ['cluster.local/ns/a/*']}}]}]}")],
        [],
    ),
    (
        "td-mismatch",
        [authz("ns2", "x", "{rules: [{from: [{source: {principals: ['prod/ns/a/sa/b']}}]}]}")],
        [
            (
                "trust-domain-mismatch",
                "AuthorizationPolicy ns2/x",
                "spec.rules[0].from[0].source.principals[0]",
            )
        ],
    ),
    (
        "http-in-selector-policy",
        [authz("ns2", "x", "{rules: [{to: [{operation: {paths: ['/a']}}]}]}")],
        [("http-at-l4", "AuthorizationPolicy ns2/x", "spec.rules[0]")],
    ),
    (
        "http-in-waypoint-policy-is-fine",
        [
            authz(
                "ns2",
                "x",
                {
                    "targetRefs": [
                        {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}
                    ],
                    "rules": [{"to": [{"operation": {"paths": ["/a"]}}]}],
                },
            )
        ],
        [],
    ),
    (
        "request-authentication-by-selector",
        [
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "RequestAuthentication",
                "metadata": {"name": "r", "namespace": "ns2"},
                "spec": {"selector": {"matchLabels": {"app": "x"}}, "jwtRules": [{"issuer": "i"}]},
            }
        ],
        [("http-at-l4", "RequestAuthentication ns2/r", "spec.selector")],
    ),
    (
        "selector-allow-without-default-deny",
        [authz("ns2", "x", "{selector: {matchLabels: {app: a}}, rules: [{}]}")],
        [("allow-without-default-deny", None, "")],
    ),
    (
        "selector-allow-with-namespace-default-deny",
        [
            authz("ns2", "x", "{selector: {matchLabels: {app: a}}, rules: [{}]}"),
            authz("ns2", "dd", "{action: ALLOW}"),
        ],
        [("empty-allow", "AuthorizationPolicy ns2/dd", "spec.rules")],
    ),
    (
        "selector-allow-with-mesh-default-deny",
        [authz("ns2", "x", "{selector: {matchLabels: {app: a}}, rules: [{}]}"), DEFAULT_DENY],
        [("empty-allow", "AuthorizationPolicy istio-system/deny-all-by-default", "spec.rules")],
    ),
    (
        "dry-run-allow-does-not-count",
        [authz("ns2", "x", "{selector: {matchLabels: {app: a}}, rules: [{}]}", dry_run="true")],
        [],
    ),
]


@pytest.mark.parametrize(("docs", "expected"), [pytest.param(d, e, id=i) for i, d, e in CASES])
def test_lint_cases(docs: list[dict[str, Any]], expected: list[tuple[str, str | None, str]]) -> None:
    assert codes(run(STRICT_MESH, *docs)) == expected


def test_permissive_without_workloads_is_about_the_mesh() -> None:
    (f,) = run()
    assert f.code == "permissive" and "PERMISSIVE (mesh default" in f.message
    # Issue 17: info, so a file with one policy in it does not fail CI on the mesh's mTLS mode.
    assert f.severity == "info" and failing([f]) == [] and failing([f], "info") == [f]


def test_plaintext_bypass_of_identity_deny_when_permissive() -> None:
    deny = authz("ns2", "d", "{action: DENY, rules: [{from: [{source: {namespaces: [untrusted]}}]}]}")
    (f, _) = run(deny)
    assert (f.code, f.severity, f.path) == ("plaintext-bypass", "warning", "spec.rules[0]")
    assert "plaintext client is not denied" in f.message
    assert run(STRICT_MESH, deny) == []  # STRICT: plaintext never gets to the DENY
    negative_allow = authz("ns2", "a", "{rules: [{from: [{source: {notNamespaces: [untrusted]}}]}]}")
    assert [x.code for x in run(negative_allow)] == ["plaintext-bypass", "permissive"]
    # An ALLOW that requires an identity cannot be satisfied by plaintext: nothing to say.
    assert [x.code for x in run(authz("ns2", "a", "{rules: [{from: [{source: {principals: ['*']}}]}]}"))] == [
        "permissive"
    ]


def test_suppressions_and_thresholds() -> None:
    found = run(STRICT_MESH, authz("ns2", "x", {}), authz("ns3", "y", {}))
    assert [f.code for f in found] == ["empty-allow", "empty-allow"]
    assert suppress(found, [parse_suppression("empty-allow")]) == []
    kept = suppress(found, [parse_suppression("empty-allow=ns2/*")])
    assert [f.policy for f in kept] == ["AuthorizationPolicy ns3/y"]
    kept = suppress(found, [parse_suppression("empty-allow=AuthorizationPolicy ns3/y")])
    assert [f.policy for f in kept] == ["AuthorizationPolicy ns2/x"]
    assert (
        lint(parse_policies([STRICT_MESH, authz("ns2", "x", {})]), suppressions=[Suppression("empty-allow")])
        == []
    )
    assert failing(found) == [] and failing(found, "warning") == found
    with pytest.raises(ValueError, match="unknown lint code 'empty-alow'"):
        parse_suppression("empty-alow")
    with pytest.raises(ValueError, match="unknown severity"):
        failing(found, "fatal")


def test_every_code_is_registered_once_with_a_severity() -> None:
    assert all(c.severity in ("error", "warning", "info") for c in CODES.values())
    assert len(CODES) == len({c.name for c in CODES.values()})
    import policy.lint as mod

    assert all(f"``{name}``" in (mod.__doc__ or "") for name in CODES)  # documented in the module


def test_foreign_documents_are_skipped_not_invalid_and_never_called_mesh() -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}
    (f,) = lint(parse_policies([cm, STRICT_MESH]))
    assert (f.code, f.severity, f.policy) == ("not-a-policy", "info", "document 0 (ConfigMap)")
    # A document without kind is an error, located by its index (it used to print as "mesh kind").
    (g,) = lint(
        parse_policies([{"apiVersion": "security.istio.io/v1", "metadata": {"name": "x"}}, STRICT_MESH])
    )
    assert (g.code, g.policy, g.path) == ("invalid", "document 0", "kind")
    assert not str(g).startswith("ERROR invalid mesh")
    # A typo in the kind of a security.istio.io document is an error, not skipped.
    typo = {"apiVersion": "security.istio.io/v1", "kind": "AuthorisationPolicy", "metadata": {"name": "x"}}
    assert {x.code for x in lint(parse_policies([typo, STRICT_MESH]))} == {"invalid"}


def test_missing_namespace_says_what_the_loader_says() -> None:
    doc = authz("ns2", "x", "rules: [{}]")
    del doc["metadata"]["namespace"]
    (f,) = lint(parse_policies([doc, STRICT_MESH]))
    assert (f.code, f.severity, f.path) == ("invalid", "error", "metadata.namespace")
    assert f.message.startswith(NO_NAMESPACE_MESSAGE)
    assert lint(parse_policies([doc, STRICT_MESH], default_namespace="ns2")) == []


def test_permissive_names_open_workloads_and_ports() -> None:
    wls = (
        WorkloadRef("ns1", "a", {"app": "a"}),
        WorkloadRef("ns2", "b", {"app": "b"}),
        WorkloadRef("ns3", "c", {"app": "c"}),
    )
    findings = run(
        peer("ns1", "default", "{mtls: {mode: STRICT}}"),
        peer("ns3", "default", "{mtls: {mode: STRICT}}"),
        peer(
            "ns3",
            "c-legacy",
            "{selector: {matchLabels: {app: c}}, portLevelMtls: {9000: {mode: PERMISSIVE}}}",
        ),
        workloads=wls,
    )
    msgs = {f.message.split(":")[0]: f.message for f in findings if f.code == "permissive"}
    assert set(msgs) == {"namespace ns2", "namespace ns3"}
    assert "b (PERMISSIVE" in msgs["namespace ns2"]
    assert "c ports 9000 (port-level PERMISSIVE)" in msgs["namespace ns3"]


def test_default_deny_names_uncovered_workloads() -> None:
    wls = (WorkloadRef("ns2", "a", {"app": "a"}), WorkloadRef("ns2", "b", {"app": "b"}))
    (f,) = run(
        STRICT_MESH, authz("ns2", "x", "{selector: {matchLabels: {app: a}}, rules: [{}]}"), workloads=wls
    )
    assert (
        f.code == "allow-without-default-deny" and "workloads ns2/b" in f.message and "ns2/a" not in f.message
    )
    # Once every workload of the namespace is selected there is nothing left open.
    assert (
        run(
            STRICT_MESH,
            authz("ns2", "x", "{selector: {matchLabels: {app: a}}, rules: [{}]}"),
            authz("ns2", "y", "{selector: {matchLabels: {app: b}}, rules: [{}]}"),
            workloads=wls,
        )
        == []
    )


def test_invalid_documents_are_errors() -> None:
    (f, *_) = run(STRICT_MESH, authz("ns2", "x", "{rules: [{from: [{source: {ipBlocks: [nope]}}]}]}"))
    assert (f.code, f.severity, f.path) == ("invalid", "error", "spec.rules[0].from[0].source.ipBlocks[0]")
    assert str(f).startswith(
        "ERROR invalid AuthorizationPolicy ns2/x spec.rules[0].from[0].source.ipBlocks[0]: "
    )
