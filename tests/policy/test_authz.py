"""L4 AuthorizationPolicy evaluation: table tests of Istio's semantics as the node agent applies them.

Each vector: policies (documents as an operator writes them), one connection, and the expected
verdict, deciding policies and reason code. Destination defaults: namespace ns2, labels
app=httpbin,version=v1, port 8080; source: cluster.local/ns/ns1/sa/sleep from 10.244.1.2.
"""

# Table rows keep each vector's YAML on one line, as an operator would write it inline.
# ruff: noqa: E501, UP031

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy import (
    CODE_ALLOW_MATCHED,
    CODE_CUSTOM_UNSUPPORTED,
    CODE_DENY_MATCHED,
    CODE_INVALID_POLICY,
    CODE_MTLS_REQUIRED,
    CODE_NO_ALLOW_MATCHED,
    CODE_NO_POLICY,
    Action,
    Connection,
    PolicyIndex,
    Verdict,
    evaluate,
    parse_policies,
)
from tests.policy.util import HTTPBIN_LABELS, SLEEP, authz, conn, index, peer

A, D = Verdict.ALLOW, Verdict.DENY

ALLOW_ALL = "rules: [{}]"
DENY_ALL = "{action: DENY, rules: [{}]}"


def allow_from(*principals: str) -> str:
    return "{rules: [{from: [{source: {principals: [%s]}}]}]}" % ", ".join(f'"{p}"' for p in principals)


# (id, policies, connection, verdict, deciding policies, code)
VECTORS: list[tuple[str, list[dict[str, Any]], Connection, Verdict, tuple[str, ...], str]] = [
    # ---- evaluation order and empty forms
    ("no-policies-allow", [], conn(), A, (), CODE_NO_POLICY),
    (
        "empty-spec-allow-nothing",
        [authz("ns2", "allow-nothing", {})],
        conn(),
        D,
        ("ns2/allow-nothing",),
        CODE_NO_ALLOW_MATCHED,
    ),
    ("missing-spec-allow-nothing", [authz("ns2", "x")], conn(), D, ("ns2/x",), CODE_NO_ALLOW_MATCHED),
    (
        "empty-rules-list-allow-nothing",
        [authz("ns2", "x", "rules: []")],
        conn(),
        D,
        ("ns2/x",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "explicit-allow-empty-rules",
        [authz("ns2", "x", "{action: ALLOW}")],
        conn(),
        D,
        ("ns2/x",),
        CODE_NO_ALLOW_MATCHED,
    ),
    ("allow-all-empty-rule", [authz("ns2", "all", ALLOW_ALL)], conn(), A, ("ns2/all",), CODE_ALLOW_MATCHED),
    (
        "allow-all-plaintext",
        [authz("ns2", "all", ALLOW_ALL)],
        conn(None),
        A,
        ("ns2/all",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "deny-before-allow",
        [authz("ns2", "all", ALLOW_ALL), authz("ns2", "deny", DENY_ALL)],
        conn(),
        D,
        ("ns2/deny",),
        CODE_DENY_MATCHED,
    ),
    (
        "deny-not-matching-then-allow",
        [
            authz("ns2", "all", ALLOW_ALL),
            authz("ns2", "deny", "{action: DENY, rules: [{to: [{operation: {ports: ['9']}}]}]}"),
        ],
        conn(),
        A,
        ("ns2/all",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "deny-only-no-match-default-allow",
        [authz("ns2", "deny", "{action: DENY, rules: [{to: [{operation: {ports: ['9']}}]}]}")],
        conn(),
        A,
        (),
        CODE_NO_POLICY,
    ),
    (
        "custom-before-deny",
        [
            authz("ns2", "deny", DENY_ALL),
            authz("ns2", "ext", "{action: CUSTOM, provider: {name: opa}, rules: [{}]}"),
        ],
        conn(),
        D,
        ("ns2/ext",),
        CODE_CUSTOM_UNSUPPORTED,
    ),
    (
        "custom-http-only-fails-closed",
        [
            authz(
                "ns2",
                "ext",
                "{action: CUSTOM, provider: {name: opa}, rules: [{to: [{operation: {paths: ['/admin*']}}]}]}",
            )
        ],
        conn(),
        D,
        ("ns2/ext",),
        CODE_CUSTOM_UNSUPPORTED,
    ),
    (
        "custom-l4-remainder-not-matching",
        [
            authz(
                "ns2",
                "ext",
                "{action: CUSTOM, provider: {name: opa}, rules: [{to: [{operation: {ports: ['9090'], paths: ['/a']}}]}]}",
            )
        ],
        conn(),
        A,
        (),
        CODE_NO_POLICY,
    ),
    (
        "two-allows-one-matches",
        [authz("ns2", "a", allow_from("td/ns/x/sa/y")), authz("ns2", "b", allow_from(SLEEP))],
        conn(),
        A,
        ("ns2/b",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "two-allows-none-matches",
        [authz("ns2", "a", allow_from("td/ns/x/sa/y")), authz("ns2", "b", allow_from("q"))],
        conn(),
        D,
        ("ns2/a", "ns2/b"),
        CODE_NO_ALLOW_MATCHED,
    ),
    # ---- scope: namespaces, selectors, root namespace
    ("other-namespace-ignored", [authz("ns3", "allow-nothing", {})], conn(), A, (), CODE_NO_POLICY),
    (
        "selector-not-matching",
        [authz("ns2", "x", {"selector": {"matchLabels": {"app": "other"}}})],
        conn(),
        A,
        (),
        CODE_NO_POLICY,
    ),
    (
        "selector-subset-matches",
        [authz("ns2", "x", {"selector": {"matchLabels": {"app": "httpbin"}}})],
        conn(),
        D,
        ("ns2/x",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "selector-all-labels-match",
        [authz("ns2", "x", {"selector": {"matchLabels": HTTPBIN_LABELS}})],
        conn(),
        D,
        ("ns2/x",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "selector-extra-label-not-on-workload",
        [authz("ns2", "x", {"selector": {"matchLabels": {**HTTPBIN_LABELS, "tier": "db"}}})],
        conn(),
        A,
        (),
        CODE_NO_POLICY,
    ),
    (
        "selector-empty-matchlabels-selects-all",
        [authz("ns2", "x", {"selector": {"matchLabels": {}}})],
        conn(),
        D,
        ("ns2/x",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "root-namespace-mesh-wide",
        [authz("istio-system", "allow-nothing", {})],
        conn(),
        D,
        ("istio-system/allow-nothing",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "root-selector-all-namespaces",
        [authz("istio-system", "x", {"selector": {"matchLabels": {"app": "httpbin"}}})],
        conn(ns="ns9"),
        D,
        ("istio-system/x",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "root-selector-not-matching",
        [authz("istio-system", "x", {"selector": {"matchLabels": {"app": "zzz"}}})],
        conn(),
        A,
        (),
        CODE_NO_POLICY,
    ),
    (
        "root-deny-ns-allow",
        [authz("istio-system", "deny", DENY_ALL), authz("ns2", "all", ALLOW_ALL)],
        conn(),
        D,
        ("istio-system/deny",),
        CODE_DENY_MATCHED,
    ),
    (
        "root-allow-nothing-ns-allow-matches",
        [authz("istio-system", "nothing", {}), authz("ns2", "s", allow_from(SLEEP))],
        conn(),
        A,
        ("ns2/s",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "workload-in-root-namespace",
        [authz("istio-system", "nothing", {})],
        conn(ns="istio-system"),
        D,
        ("istio-system/nothing",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "targetref-policy-not-at-l4",
        [
            authz(
                "ns2",
                "gw",
                {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "wp"}]},
            )
        ],
        conn(),
        A,
        (),
        CODE_NO_POLICY,
    ),
    # ---- principals
    ("principal-exact", [authz("ns2", "p", allow_from(SLEEP))], conn(), A, ("ns2/p",), CODE_ALLOW_MATCHED),
    (
        "principal-spiffe-prefix-in-connection",
        [authz("ns2", "p", allow_from(SLEEP))],
        conn("spiffe://" + SLEEP),
        A,
        ("ns2/p",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "principal-exact-mismatch",
        [authz("ns2", "p", allow_from("cluster.local/ns/ns1/sa/other"))],
        conn(),
        D,
        ("ns2/p",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "principal-written-with-spiffe-never-matches",
        [authz("ns2", "p", allow_from("spiffe://" + SLEEP))],
        conn(),
        D,
        ("ns2/p",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "principal-values-or",
        [authz("ns2", "p", allow_from("a/b", SLEEP))],
        conn(),
        A,
        ("ns2/p",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "principal-prefix",
        [authz("ns2", "p", allow_from("cluster.local/ns/ns1/*"))],
        conn(),
        A,
        ("ns2/p",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "principal-prefix-mismatch",
        [authz("ns2", "p", allow_from("cluster.local/ns/ns3/*"))],
        conn(),
        D,
        ("ns2/p",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "principal-suffix",
        [authz("ns2", "p", allow_from("*/sa/sleep"))],
        conn(),
        A,
        ("ns2/p",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "principal-suffix-other-trust-domain",
        [authz("ns2", "p", allow_from("*/sa/sleep"))],
        conn("evil.example/ns/ns1/sa/sleep"),
        A,
        ("ns2/p",),
        CODE_ALLOW_MATCHED,
    ),
    ("principal-presence", [authz("ns2", "p", allow_from("*"))], conn(), A, ("ns2/p",), CODE_ALLOW_MATCHED),
    (
        "principal-presence-plaintext",
        [authz("ns2", "p", allow_from("*"))],
        conn(None),
        D,
        ("ns2/p",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "principal-plaintext-never-positive",
        [authz("ns2", "p", allow_from(SLEEP))],
        conn(None),
        D,
        ("ns2/p",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "not-principals-excludes",
        [authz("ns2", "p", "{rules: [{from: [{source: {notPrincipals: ['%s']}}]}]}" % SLEEP)],
        conn(),
        D,
        ("ns2/p",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "not-principals-other-matches",
        [authz("ns2", "p", "{rules: [{from: [{source: {notPrincipals: ['x/y']}}]}]}")],
        conn(),
        A,
        ("ns2/p",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "not-principals-plaintext-satisfies",
        [authz("ns2", "p", "{rules: [{from: [{source: {notPrincipals: ['*']}}]}]}")],
        conn(None),
        A,
        ("ns2/p",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "deny-not-principals-star-refuses-plaintext",
        [authz("ns2", "mtls", "{action: DENY, rules: [{from: [{source: {notPrincipals: ['*']}}]}]}")],
        conn(None),
        D,
        ("ns2/mtls",),
        CODE_DENY_MATCHED,
    ),
    (
        "deny-not-principals-star-admits-mtls",
        [authz("ns2", "mtls", "{action: DENY, rules: [{from: [{source: {notPrincipals: ['*']}}]}]}")],
        conn(),
        A,
        (),
        CODE_NO_POLICY,
    ),
    # ---- namespaces
    (
        "namespace-match",
        [authz("ns2", "n", "{rules: [{from: [{source: {namespaces: [ns1]}}]}]}")],
        conn(),
        A,
        ("ns2/n",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "namespace-mismatch",
        [authz("ns2", "n", "{rules: [{from: [{source: {namespaces: [ns3]}}]}]}")],
        conn(),
        D,
        ("ns2/n",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "namespace-prefix",
        [authz("ns2", "n", "{rules: [{from: [{source: {namespaces: ['ns*']}}]}]}")],
        conn(),
        A,
        ("ns2/n",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "namespace-suffix",
        [authz("ns2", "n", "{rules: [{from: [{source: {namespaces: ['*1']}}]}]}")],
        conn(),
        A,
        ("ns2/n",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "namespace-presence-plaintext",
        [authz("ns2", "n", "{rules: [{from: [{source: {namespaces: ['*']}}]}]}")],
        conn(None),
        D,
        ("ns2/n",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "namespace-from-non-istio-id-absent",
        [authz("ns2", "n", "{rules: [{from: [{source: {namespaces: ['*']}}]}]}")],
        conn("example.org/workload/one"),
        D,
        ("ns2/n",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "not-namespaces-excludes",
        [authz("ns2", "n", "{action: DENY, rules: [{from: [{source: {notNamespaces: [ns2]}}]}]}")],
        conn(),
        D,
        ("ns2/n",),
        CODE_DENY_MATCHED,
    ),
    (
        "not-namespaces-same-ns-passes",
        [authz("ns2", "n", "{action: DENY, rules: [{from: [{source: {notNamespaces: [ns1]}}]}]}")],
        conn(),
        A,
        (),
        CODE_NO_POLICY,
    ),
    (
        "not-namespaces-plaintext-satisfies",
        [authz("ns2", "n", "{action: DENY, rules: [{from: [{source: {notNamespaces: [ns1]}}]}]}")],
        conn(None),
        D,
        ("ns2/n",),
        CODE_DENY_MATCHED,
    ),
    # ---- serviceAccounts
    (
        "service-account-ns-form",
        [authz("ns2", "s", "{rules: [{from: [{source: {serviceAccounts: [ns1/sleep]}}]}]}")],
        conn(),
        A,
        ("ns2/s",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "service-account-bare-is-policy-namespace",
        [authz("ns2", "s", "{rules: [{from: [{source: {serviceAccounts: [sleep]}}]}]}")],
        conn(),
        D,
        ("ns2/s",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "service-account-bare-same-namespace",
        [authz("ns2", "s", "{rules: [{from: [{source: {serviceAccounts: [sleep]}}]}]}")],
        conn("cluster.local/ns/ns2/sa/sleep"),
        A,
        ("ns2/s",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "service-account-any-trust-domain",
        [authz("ns2", "s", "{rules: [{from: [{source: {serviceAccounts: [ns1/sleep]}}]}]}")],
        conn("other.td/ns/ns1/sa/sleep"),
        A,
        ("ns2/s",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "service-account-plaintext",
        [authz("ns2", "s", "{rules: [{from: [{source: {serviceAccounts: [ns1/sleep]}}]}]}")],
        conn(None),
        D,
        ("ns2/s",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "not-service-accounts",
        [authz("ns2", "s", "{action: DENY, rules: [{from: [{source: {notServiceAccounts: [ns1/sleep]}}]}]}")],
        conn(),
        A,
        (),
        CODE_NO_POLICY,
    ),
    (
        "not-service-accounts-plaintext",
        [authz("ns2", "s", "{action: DENY, rules: [{from: [{source: {notServiceAccounts: [ns1/sleep]}}]}]}")],
        conn(None),
        D,
        ("ns2/s",),
        CODE_DENY_MATCHED,
    ),
    # ---- ipBlocks
    (
        "ip-block-cidr",
        [authz("ns2", "i", "{rules: [{from: [{source: {ipBlocks: [10.244.1.0/24]}}]}]}")],
        conn(),
        A,
        ("ns2/i",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "ip-block-single",
        [authz("ns2", "i", "{rules: [{from: [{source: {ipBlocks: [10.244.1.2]}}]}]}")],
        conn(),
        A,
        ("ns2/i",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "ip-block-mismatch",
        [authz("ns2", "i", "{rules: [{from: [{source: {ipBlocks: [10.244.9.0/24]}}]}]}")],
        conn(),
        D,
        ("ns2/i",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "ip-block-host-bits-accepted",
        [authz("ns2", "i", "{rules: [{from: [{source: {ipBlocks: [10.244.1.77/24]}}]}]}")],
        conn(),
        A,
        ("ns2/i",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "ip-block-plaintext-ok",
        [authz("ns2", "i", "{rules: [{from: [{source: {ipBlocks: [10.244.1.0/24]}}]}]}")],
        conn(None),
        A,
        ("ns2/i",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "ip-block-ipv6",
        [authz("ns2", "i", "{rules: [{from: [{source: {ipBlocks: ['fd00::/64']}}]}]}")],
        conn(src="fd00::5"),
        A,
        ("ns2/i",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "ip-block-v4-vs-v6",
        [authz("ns2", "i", "{rules: [{from: [{source: {ipBlocks: ['fd00::/64']}}]}]}")],
        conn(),
        D,
        ("ns2/i",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "not-ip-blocks-deny",
        [authz("ns2", "i", "{action: DENY, rules: [{from: [{source: {notIpBlocks: [10.244.0.0/16]}}]}]}")],
        conn(src="192.168.1.1"),
        D,
        ("ns2/i",),
        CODE_DENY_MATCHED,
    ),
    (
        "not-ip-blocks-inside",
        [authz("ns2", "i", "{action: DENY, rules: [{from: [{source: {notIpBlocks: [10.244.0.0/16]}}]}]}")],
        conn(),
        A,
        (),
        CODE_NO_POLICY,
    ),
    (
        "unknown-source-ip-allow-fails-closed",
        [authz("ns2", "i", "{rules: [{from: [{source: {notIpBlocks: [10.9.0.0/16]}}]}]}")],
        conn(src=None),
        D,
        ("ns2/i",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "unknown-source-ip-deny-fails-closed",
        [authz("ns2", "i", "{action: DENY, rules: [{from: [{source: {ipBlocks: [10.9.0.0/16]}}]}]}")],
        conn(src=None),
        D,
        ("ns2/i",),
        CODE_DENY_MATCHED,
    ),
    # ---- ports
    (
        "port-match",
        [authz("ns2", "p", "{rules: [{to: [{operation: {ports: ['8080']}}]}]}")],
        conn(),
        A,
        ("ns2/p",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "port-int-accepted",
        [authz("ns2", "p", "{rules: [{to: [{operation: {ports: [8080]}}]}]}")],
        conn(),
        A,
        ("ns2/p",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "port-mismatch",
        [authz("ns2", "p", "{rules: [{to: [{operation: {ports: ['9090']}}]}]}")],
        conn(),
        D,
        ("ns2/p",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "not-ports",
        [authz("ns2", "p", "{rules: [{to: [{operation: {notPorts: ['8080']}}]}]}")],
        conn(),
        D,
        ("ns2/p",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "not-ports-other",
        [authz("ns2", "p", "{rules: [{to: [{operation: {notPorts: ['9090']}}]}]}")],
        conn(),
        A,
        ("ns2/p",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "to-operations-or",
        [authz("ns2", "p", "{rules: [{to: [{operation: {ports: ['1']}}, {operation: {ports: ['8080']}}]}]}")],
        conn(),
        A,
        ("ns2/p",),
        CODE_ALLOW_MATCHED,
    ),
    # ---- AND / OR structure
    (
        "fields-and-port-fails",
        [
            authz(
                "ns2",
                "p",
                "{rules: [{from: [{source: {principals: ['%s']}}], to: [{operation: {ports: ['1']}}]}]}"
                % SLEEP,
            )
        ],
        conn(),
        D,
        ("ns2/p",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "fields-and-both-match",
        [
            authz(
                "ns2",
                "p",
                "{rules: [{from: [{source: {principals: ['%s']}}], to: [{operation: {ports: ['8080']}}]}]}"
                % SLEEP,
            )
        ],
        conn(),
        A,
        ("ns2/p",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "source-fields-and",
        [
            authz(
                "ns2", "p", "{rules: [{from: [{source: {principals: ['%s'], ipBlocks: [1.2.3.4]}}]}]}" % SLEEP
            )
        ],
        conn(),
        D,
        ("ns2/p",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "sources-or",
        [
            authz(
                "ns2", "p", "{rules: [{from: [{source: {principals: [x]}}, {source: {namespaces: [ns1]}}]}]}"
            )
        ],
        conn(),
        A,
        ("ns2/p",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "rules-or",
        [
            authz(
                "ns2",
                "p",
                "{rules: [{from: [{source: {principals: [x]}}]}, {to: [{operation: {ports: ['8080']}}]}]}",
            )
        ],
        conn(),
        A,
        ("ns2/p",),
        CODE_ALLOW_MATCHED,
    ),
    # ---- when (L4 keys)
    (
        "when-source-ip",
        [authz("ns2", "w", "{rules: [{when: [{key: source.ip, values: [10.244.1.0/24]}]}]}")],
        conn(),
        A,
        ("ns2/w",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "when-source-ip-not-values",
        [authz("ns2", "w", "{rules: [{when: [{key: source.ip, notValues: [10.244.1.0/24]}]}]}")],
        conn(),
        D,
        ("ns2/w",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "when-source-namespace",
        [authz("ns2", "w", "{rules: [{when: [{key: source.namespace, values: [ns1]}]}]}")],
        conn(),
        A,
        ("ns2/w",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "when-source-principal",
        [authz("ns2", "w", "{rules: [{when: [{key: source.principal, values: ['*/sa/sleep']}]}]}")],
        conn(),
        A,
        ("ns2/w",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "when-source-principal-plaintext",
        [authz("ns2", "w", "{rules: [{when: [{key: source.principal, values: ['*']}]}]}")],
        conn(None),
        D,
        ("ns2/w",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "when-destination-ip",
        [authz("ns2", "w", "{rules: [{when: [{key: destination.ip, values: [10.244.2.0/24]}]}]}")],
        conn(),
        A,
        ("ns2/w",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "when-destination-ip-unknown",
        [authz("ns2", "w", "{rules: [{when: [{key: destination.ip, values: [10.244.2.0/24]}]}]}")],
        conn(dst=None),
        D,
        ("ns2/w",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "when-destination-port",
        [authz("ns2", "w", "{rules: [{when: [{key: destination.port, values: ['8080']}]}]}")],
        conn(),
        A,
        ("ns2/w",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "when-destination-port-not",
        [authz("ns2", "w", "{rules: [{when: [{key: destination.port, notValues: ['8080']}]}]}")],
        conn(),
        D,
        ("ns2/w",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "when-conditions-and",
        [
            authz(
                "ns2",
                "w",
                "{rules: [{when: [{key: source.namespace, values: [ns1]}, {key: destination.port, values: ['1']}]}]}",
            )
        ],
        conn(),
        D,
        ("ns2/w",),
        CODE_NO_ALLOW_MATCHED,
    ),
    # ---- HTTP-only fields at L4
    (
        "allow-methods-dropped",
        [authz("ns2", "h", "{rules: [{to: [{operation: {methods: [GET]}}]}]}")],
        conn(),
        D,
        ("ns2/h",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "allow-paths-with-principal-dropped",
        [
            authz(
                "ns2",
                "h",
                "{rules: [{from: [{source: {principals: ['%s']}}], to: [{operation: {paths: ['/x']}}]}]}"
                % SLEEP,
            )
        ],
        conn(),
        D,
        ("ns2/h",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "allow-http-rule-dropped-l4-rule-kept",
        [
            authz(
                "ns2",
                "h",
                "{rules: [{to: [{operation: {methods: [GET]}}]}, {from: [{source: {principals: ['%s']}}]}]}"
                % SLEEP,
            )
        ],
        conn(),
        A,
        ("ns2/h",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "allow-request-principals-dropped",
        [authz("ns2", "h", "{rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}")],
        conn(),
        D,
        ("ns2/h",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "allow-remote-ip-dropped",
        [authz("ns2", "h", "{rules: [{from: [{source: {remoteIpBlocks: [0.0.0.0/0]}}]}]}")],
        conn(),
        D,
        ("ns2/h",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "allow-when-header-dropped",
        [authz("ns2", "h", "{rules: [{when: [{key: 'request.headers[x-a]', values: [b]}]}]}")],
        conn(),
        D,
        ("ns2/h",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "allow-when-sni-dropped",
        [authz("ns2", "h", "{rules: [{when: [{key: connection.sni, values: ['*']}]}]}")],
        conn(),
        D,
        ("ns2/h",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "allow-when-service-account-key-is-not-l4",
        [authz("ns2", "h", "{rules: [{when: [{key: source.serviceAccount, values: [ns1/sleep]}]}]}")],
        conn(),
        D,
        ("ns2/h",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "deny-methods-only-denies-all",
        [authz("ns2", "h", "{action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]}")],
        conn(),
        D,
        ("ns2/h",),
        CODE_DENY_MATCHED,
    ),
    (
        "deny-methods-and-port-scoped",
        [
            authz(
                "ns2", "h", "{action: DENY, rules: [{to: [{operation: {methods: [POST], ports: ['8080']}}]}]}"
            )
        ],
        conn(),
        D,
        ("ns2/h",),
        CODE_DENY_MATCHED,
    ),
    (
        "deny-methods-and-other-port",
        [
            authz(
                "ns2", "h", "{action: DENY, rules: [{to: [{operation: {methods: [POST], ports: ['9090']}}]}]}"
            )
        ],
        conn(),
        A,
        (),
        CODE_NO_POLICY,
    ),
    (
        "deny-request-principals-only-denies-all",
        [authz("ns2", "h", "{action: DENY, rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}")],
        conn(),
        D,
        ("ns2/h",),
        CODE_DENY_MATCHED,
    ),
    (
        "deny-http-source-or-l4-source",
        [
            authz(
                "ns2",
                "h",
                "{action: DENY, rules: [{from: [{source: {requestPrincipals: ['*']}}, {source: {namespaces: [zz]}}]}]}",
            )
        ],
        conn(),
        D,
        ("ns2/h",),
        CODE_DENY_MATCHED,
    ),
    (
        "deny-l4-from-with-http-to",
        [
            authz(
                "ns2",
                "h",
                "{action: DENY, rules: [{from: [{source: {namespaces: [ns3]}}], to: [{operation: {paths: ['/admin']}}]}]}",
            )
        ],
        conn(),
        A,
        (),
        CODE_NO_POLICY,
    ),
    (
        "deny-l4-from-with-http-to-matching-source",
        [
            authz(
                "ns2",
                "h",
                "{action: DENY, rules: [{from: [{source: {namespaces: [ns1]}}], to: [{operation: {paths: ['/admin']}}]}]}",
            )
        ],
        conn(),
        D,
        ("ns2/h",),
        CODE_DENY_MATCHED,
    ),
    (
        "deny-when-header-dropped",
        [authz("ns2", "h", "{action: DENY, rules: [{when: [{key: 'request.headers[x]', values: [y]}]}]}")],
        conn(),
        D,
        ("ns2/h",),
        CODE_DENY_MATCHED,
    ),
    # ---- invalid documents fail closed
    (
        "invalid-deny-denies-all",
        [authz("ns2", "bad", "{action: DENY, rules: [{from: [{source: {ipBlocks: [10.0.0/33]}}]}]}")],
        conn(),
        D,
        ("ns2/bad",),
        CODE_INVALID_POLICY,
    ),
    (
        "invalid-deny-typo-field",
        [authz("ns2", "bad", "{action: DENY, rules: [{from: [{source: {principal: [x]}}]}]}")],
        conn(),
        D,
        ("ns2/bad",),
        CODE_INVALID_POLICY,
    ),
    (
        "invalid-deny-other-namespace",
        [authz("ns3", "bad", "{action: DENY, rules: [{from: [{source: {ipBlocks: [x]}}]}]}")],
        conn(),
        A,
        (),
        CODE_NO_POLICY,
    ),
    (
        # Issue 17: a DENY without rules is valid and never matches (it used to be refused as
        # invalid and so denied everything it selected).
        "deny-without-rules-is-a-no-op",
        [authz("ns2", "noop", "{action: DENY}")],
        conn(),
        A,
        (),
        CODE_NO_POLICY,
    ),
    (
        "invalid-deny-denies-everything-selected",
        [authz("ns2", "bad", "{action: DENY, rules: [{from: [{source: {ipBlocks: [nope]}}]}]}")],
        conn(),
        D,
        ("ns2/bad",),
        CODE_INVALID_POLICY,
    ),
    (
        "invalid-allow-allows-nothing",
        [
            authz(
                "ns2",
                "bad",
                "{rules: [{from: [{source: {principals: ['%s'], ipBlocks: [300.1.1.1]}}]}]}" % SLEEP,
            )
        ],
        conn(),
        D,
        ("ns2/bad",),
        CODE_NO_ALLOW_MATCHED,
    ),
    (
        "invalid-allow-beside-valid-allow",
        [
            authz("ns2", "bad", "{rules: [{from: [{source: {ipBlocks: [x]}}]}]}"),
            authz("ns2", "ok", allow_from(SLEEP)),
        ],
        conn(),
        A,
        ("ns2/ok",),
        CODE_ALLOW_MATCHED,
    ),
    (
        "invalid-action-is-deny",
        [authz("ns2", "bad", "{action: PERMIT, rules: [{}]}")],
        conn(),
        D,
        ("ns2/bad",),
        CODE_INVALID_POLICY,
    ),
    (
        "invalid-selector-selects-namespace",
        [authz("ns2", "bad", {"action": "DENY", "rules": [{}], "selector": {"matchLabels": {"app": ["x"]}}})],
        conn(),
        D,
        ("ns2/bad",),
        CODE_INVALID_POLICY,
    ),
    (
        "invalid-missing-namespace-is-mesh-wide",
        [
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "bad"},
                "spec": {"action": "DENY", "rules": [{}]},
            }
        ],
        conn(ns="anywhere"),
        D,
        ("/bad",),
        CODE_INVALID_POLICY,
    ),
    (
        "invalid-dry-run-value-enforced",
        [authz("ns2", "bad", DENY_ALL, dry_run="yes")],
        conn(),
        D,
        ("ns2/bad",),
        CODE_INVALID_POLICY,
    ),
    ("invalid-spec-not-mapping", [authz("ns2", "bad", ["x"])], conn(), D, ("ns2/bad",), CODE_INVALID_POLICY),
    # ---- AUDIT and dry-run never change the verdict
    (
        "audit-does-not-deny",
        [authz("ns2", "aud", "{action: AUDIT, rules: [{}]}")],
        conn(),
        A,
        (),
        CODE_NO_POLICY,
    ),
    (
        "audit-not-counted-as-allow",
        [authz("ns2", "aud", "{action: AUDIT, rules: [{}]}"), authz("ns2", "n", {})],
        conn(),
        D,
        ("ns2/n",),
        CODE_NO_ALLOW_MATCHED,
    ),
    ("dry-run-deny", [authz("ns2", "dry", DENY_ALL, dry_run="true")], conn(), A, (), CODE_NO_POLICY),
    ("dry-run-allow-not-present", [authz("ns2", "dry", {}, dry_run="true")], conn(), A, (), CODE_NO_POLICY),
    (
        "dry-run-false-enforced",
        [authz("ns2", "d", DENY_ALL, dry_run="false")],
        conn(),
        D,
        ("ns2/d",),
        CODE_DENY_MATCHED,
    ),
    (
        "dry-run-custom",
        [authz("ns2", "c", "{action: CUSTOM, provider: {name: x}, rules: [{}]}", dry_run="true")],
        conn(),
        A,
        (),
        CODE_NO_POLICY,
    ),
]


@pytest.mark.parametrize(
    ("policies", "connection", "verdict", "deciding", "code"),
    [pytest.param(*v[1:], id=v[0]) for v in VECTORS],
)
def test_l4_vectors(
    policies: list[dict[str, Any]],
    connection: Connection,
    verdict: Verdict,
    deciding: tuple[str, ...],
    code: str,
) -> None:
    ps = parse_policies(policies)
    d = PolicyIndex(ps).evaluate(connection)
    assert (d.verdict, d.policies, d.code) == (verdict, deciding, code), d.reason
    # The unindexed scan is the reference semantics: both must agree on every vector.
    ref = evaluate(connection, ps.authorization)
    assert (ref.verdict, ref.policies, ref.code, ref.reason) == (d.verdict, d.policies, d.code, d.reason)


def test_vector_ids_unique() -> None:
    ids = [v[0] for v in VECTORS]
    assert len(ids) == len(set(ids))


def test_ipv4_mapped_addresses_match_ipv4_blocks() -> None:
    idx = index(authz("ns2", "d", "{action: DENY, rules: [{from: [{source: {ipBlocks: [10.244.1.0/24]}}]}]}"))
    c = conn(src="::ffff:10.244.1.2", dst="::ffff:10.244.2.5")
    assert str(c.source_ip) == "10.244.1.2" and str(c.destination_ip) == "10.244.2.5"
    assert idx.evaluate(c).verdict is D


def test_audit_and_dry_run_are_reported() -> None:
    idx = index(
        authz("ns2", "aud", "{action: AUDIT, rules: [{}]}"),
        authz("ns2", "dry-deny", DENY_ALL, dry_run="true"),
        authz("ns2", "dry-allow", allow_from("nobody/ns/x/sa/y"), dry_run="true"),
        authz("ns2", "aud-miss", "{action: AUDIT, rules: [{to: [{operation: {ports: ['1']}}]}]}"),
    )
    d = idx.evaluate(conn())
    assert d.verdict is A and d.code == CODE_NO_POLICY
    assert d.audit == ("ns2/aud",)
    assert [(m.policy, m.action) for m in d.dry_run] == [("ns2/dry-deny", Action.DENY)]
    assert d.dry_run_verdict is D  # enforcing the dry-run set would deny
    js = d.to_dict()
    assert js["dryRun"] == [{"policy": "ns2/dry-deny", "action": "DENY"}] and js["dryRunDecision"] == "DENY"


def test_dry_run_allow_shadow_verdict() -> None:
    idx = index(authz("ns2", "dry", allow_from(SLEEP), dry_run="true"))
    assert idx.evaluate(conn()).dry_run_verdict is A
    assert idx.evaluate(conn("td/ns/x/sa/y")).dry_run_verdict is D
    assert idx.evaluate(conn("td/ns/x/sa/y")).verdict is A


def test_invalid_policy_reason_names_field() -> None:
    d = index(
        authz("ns2", "bad", "{action: DENY, rules: [{from: [{source: {ipBlocks: [1.2.3.4, 10.0.0/33]}}]}]}")
    ).evaluate(conn())
    assert 'spec.rules[0].from[0].source.ipBlocks[1]: invalid CIDR "10.0.0/33"' in d.reason
    assert "fail closed" in d.reason


def test_custom_reason_states_choice() -> None:
    d = index(authz("ns2", "ext", "{action: CUSTOM, provider: {name: opa}, rules: [{}]}")).evaluate(conn())
    assert "ext-authz is not supported" in d.reason and "opa" in d.reason


# ---- PeerAuthentication combined with authorization (PolicyIndex.check)


def test_check_strict_refuses_plaintext_before_authz() -> None:
    idx = index(peer("ns2", "strict", "{mtls: {mode: STRICT}}"), authz("ns2", "all", ALLOW_ALL))
    d = idx.check(conn(None))
    assert (d.verdict, d.policies, d.code) == (D, ("ns2/strict",), CODE_MTLS_REQUIRED)
    assert "plaintext" in d.reason
    ok = idx.check(conn())
    assert ok.verdict is A and ok.mtls is not None and ok.mtls.strict


def test_check_permissive_admits_plaintext_then_authz_decides() -> None:
    idx = index(
        peer("istio-system", "mesh", "{mtls: {mode: PERMISSIVE}}"), authz("ns2", "p", allow_from(SLEEP))
    )
    d = idx.check(conn(None))
    assert (d.verdict, d.code) == (D, CODE_NO_ALLOW_MATCHED)
    assert d.mtls is not None and d.mtls.policy == "istio-system/mesh"
    assert idx.check(conn()).verdict is A


def test_check_port_level_permissive_exception() -> None:
    idx = index(
        peer("istio-system", "mesh", "{mtls: {mode: STRICT}}"),
        peer(
            "ns2",
            "legacy-port",
            "{selector: {matchLabels: {app: httpbin}}, portLevelMtls: {9000: {mode: PERMISSIVE}}}",
        ),
    )
    assert idx.check(conn(None, port=9000)).verdict is A
    d = idx.check(conn(None, port=8080))
    assert (d.verdict, d.policies) == (D, ("istio-system/mesh",))


def test_trust_domain_comes_from_the_spiffe_id_whatever_its_path() -> None:
    assert conn("spiffe://prod.example/ns/a/sa/b").source_trust_domain == "prod.example"
    odd = conn("spiffe://prod.example/custom/workload")  # not Istio-shaped: no namespace/SA
    assert (odd.source_trust_domain, odd.source_namespace, odd.source_service_account) == (
        "prod.example",
        "",
        "",
    )
    assert conn(None).source_trust_domain == ""
    idx = index(authz("ns2", "td", "{rules: [{from: [{source: {trustDomains: [prod.example]}}]}]}"))
    assert idx.evaluate(odd).verdict is A  # trustDomains needs no Istio-shaped path
    assert idx.evaluate(conn(None)).verdict is D  # plaintext never matches a positive trustDomains


# ---- properties


_NAMESPACES = ["istio-system", "ns1", "ns2", "ns3"]
_LABELS = [{}, {"app": "httpbin"}, {"app": "sleep"}, {"app": "httpbin", "version": "v1"}]
_SOURCES = [
    {"principals": [SLEEP]},
    {"principals": ["cluster.local/ns/ns3/*"]},
    {"notPrincipals": ["*"]},
    {"namespaces": ["ns1"]},
    {"notNamespaces": ["ns1"]},
    {"serviceAccounts": ["ns1/sleep"]},
    {"ipBlocks": ["10.244.1.0/24"]},
    {"notIpBlocks": ["10.244.1.0/24"]},
    {"requestPrincipals": ["*"]},
    {"trustDomains": ["cluster.local"]},
    {"notTrustDomains": ["other.*"]},
]
_OPS = [
    {"ports": ["8080"]},
    {"notPorts": ["8080"]},
    {"methods": ["GET"]},
    {"ports": ["9090"], "paths": ["/x"]},
]
_WHEN = [
    {"key": "source.ip", "values": ["10.244.0.0/16"]},
    {"key": "destination.port", "notValues": ["9090"]},
    {"key": "request.headers[x]", "values": ["y"]},
    {"key": "source.trustDomain", "notValues": ["cluster.local"]},
]


@st.composite
def _policy_doc(draw: st.DrawFn, n: int) -> dict[str, Any]:
    ns = draw(st.sampled_from(_NAMESPACES))
    spec: dict[str, Any] = {"action": draw(st.sampled_from(["ALLOW", "ALLOW", "DENY", "AUDIT", "CUSTOM"]))}
    if spec["action"] == "CUSTOM":
        spec["provider"] = {"name": "ext"}
    labels = draw(st.sampled_from([*_LABELS, None]))
    if labels is not None:
        spec["selector"] = {"matchLabels": labels}
    if draw(st.booleans()) or spec["action"] != "ALLOW":
        rules = []
        for _ in range(draw(st.integers(0 if spec["action"] == "ALLOW" else 1, 3))):
            rule: dict[str, Any] = {}
            if draw(st.booleans()):
                rule["from"] = [
                    {"source": s} for s in draw(st.lists(st.sampled_from(_SOURCES), min_size=1, max_size=2))
                ]
            if draw(st.booleans()):
                rule["to"] = [
                    {"operation": o} for o in draw(st.lists(st.sampled_from(_OPS), min_size=1, max_size=2))
                ]
            if draw(st.booleans()):
                rule["when"] = draw(st.lists(st.sampled_from(_WHEN), min_size=1, max_size=2))
            rules.append(rule)
        spec["rules"] = rules
    dry = draw(st.sampled_from([None, None, None, "true"]))
    return authz(ns, f"p{n}", spec, dry_run=dry)


@st.composite
def _policy_docs(draw: st.DrawFn) -> list[dict[str, Any]]:
    k = draw(st.integers(0, 8))
    return [draw(_policy_doc(i)) for i in range(k)]


_CONNS = st.builds(
    conn,
    st.sampled_from([SLEEP, None, "cluster.local/ns/ns3/sa/x", "other.td/ns/ns1/sa/sleep"]),
    src=st.sampled_from(["10.244.1.2", "10.9.9.9", None]),
    ns=st.sampled_from(_NAMESPACES),
    port=st.sampled_from([8080, 9090]),
    labels=st.sampled_from(_LABELS),
)


@settings(max_examples=300, deadline=None)
@given(_policy_docs(), _CONNS)
def test_index_agrees_with_linear_scan(documents: list[dict[str, Any]], connection: Connection) -> None:
    ps = parse_policies(documents)  # some are invalid (e.g. CUSTOM with principals): poisoned, still compared
    got = PolicyIndex(ps).evaluate(connection)
    ref = evaluate(connection, ps.authorization)
    assert got == ref


@settings(max_examples=200, deadline=None)
@given(_policy_docs(), _CONNS, st.randoms(use_true_random=False))
def test_policy_order_does_not_matter(
    documents: list[dict[str, Any]], connection: Connection, rnd: random.Random
) -> None:
    first = PolicyIndex(parse_policies(documents)).evaluate(connection)
    shuffled = list(documents)
    rnd.shuffle(shuffled)
    assert PolicyIndex(parse_policies(shuffled)).evaluate(connection) == first


@settings(max_examples=200, deadline=None)
@given(_policy_docs(), _CONNS)
def test_dry_run_and_audit_never_change_the_verdict(
    documents: list[dict[str, Any]], connection: Connection
) -> None:
    """Removing every AUDIT and dry-run policy leaves the verdict and deciding policies unchanged."""
    with_extra = PolicyIndex(parse_policies(documents)).evaluate(connection)
    kept = [d for d in documents if d["spec"].get("action") != "AUDIT" and "annotations" not in d["metadata"]]
    without = PolicyIndex(parse_policies(kept)).evaluate(connection)
    assert (with_extra.verdict, with_extra.policies, with_extra.code) == (
        without.verdict,
        without.policies,
        without.code,
    )


@settings(max_examples=200, deadline=None)
@given(_policy_docs(), _CONNS)
def test_adding_a_deny_never_turns_deny_into_allow(
    documents: list[dict[str, Any]], connection: Connection
) -> None:
    before = PolicyIndex(parse_policies(documents)).evaluate(connection)
    extra = authz(
        connection.destination_namespace,
        "zz-extra-deny",
        "{action: DENY, rules: [{to: [{operation: {ports: ['8080']}}]}]}",
    )
    after = PolicyIndex(parse_policies([*documents, extra])).evaluate(connection)
    if before.verdict is D:
        assert after.verdict is D
