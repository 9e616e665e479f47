"""PeerAuthentication precedence, inheritance, age ordering and port-level overrides (table tests)."""

# Table rows keep each vector's YAML on one line, as an operator would write it inline.
# ruff: noqa: UP031

from __future__ import annotations

from typing import Any

import pytest

from policy import MtlsMode, PeerAuthIndex, effective_mtls, parse_policies
from tests.policy.util import HTTPBIN_LABELS, peer

S, P, DIS = MtlsMode.STRICT, MtlsMode.PERMISSIVE, MtlsMode.DISABLE
WL = "{selector: {matchLabels: {app: httpbin}}, %s}"


def mesh(mode: str, name: str = "default", **kw: Any) -> dict[str, Any]:
    return peer("istio-system", name, "{mtls: {mode: %s}}" % mode, **kw)


def nsp(mode: str, name: str = "default", ns: str = "ns2", **kw: Any) -> dict[str, Any]:
    return peer(ns, name, "{mtls: {mode: %s}}" % mode, **kw)


def wl(body: str, name: str = "wl", ns: str = "ns2", **kw: Any) -> dict[str, Any]:
    return peer(ns, name, WL % body, **kw)


# (id, policies, port, expected mode, deciding policy, level)
VECTORS: list[tuple[str, list[dict[str, Any]], int, MtlsMode, str | None, str]] = [
    ("default-permissive", [], 8080, P, None, "default"),
    ("mesh-strict", [mesh("STRICT")], 8080, S, "istio-system/default", "mesh"),
    ("mesh-unset-is-default", [mesh("UNSET")], 8080, P, None, "default"),
    ("mesh-empty-spec-is-default", [peer("istio-system", "x", {})], 8080, P, None, "default"),
    ("mesh-disable", [mesh("DISABLE")], 8080, DIS, "istio-system/default", "mesh"),
    ("namespace-overrides-mesh", [mesh("STRICT"), nsp("PERMISSIVE")], 8080, P, "ns2/default", "namespace"),
    (
        "namespace-unset-inherits-mesh",
        [mesh("STRICT"), nsp("UNSET")],
        8080,
        S,
        "istio-system/default",
        "mesh",
    ),
    ("other-namespace-ignored", [nsp("STRICT", ns="ns3")], 8080, P, None, "default"),
    (
        "workload-overrides-namespace",
        [nsp("STRICT"), wl("mtls: {mode: PERMISSIVE}")],
        8080,
        P,
        "ns2/wl",
        "workload",
    ),
    (
        "workload-unset-inherits-namespace",
        [nsp("STRICT"), wl("mtls: {mode: UNSET}")],
        8080,
        S,
        "ns2/default",
        "namespace",
    ),
    (
        "workload-no-mtls-inherits",
        [mesh("STRICT"), peer("ns2", "wl", WL % "portLevelMtls: {9000: {mode: DISABLE}}")],
        8080,
        S,
        "istio-system/default",
        "mesh",
    ),
    (
        "workload-selector-not-matching",
        [nsp("PERMISSIVE"), peer("ns2", "wl", "{selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}}")],
        8080,
        P,
        "ns2/default",
        "namespace",
    ),
    (
        "workload-selector-subset",
        [peer("ns2", "wl", "{selector: {matchLabels: {version: v1}}, mtls: {mode: STRICT}}")],
        8080,
        S,
        "ns2/wl",
        "workload",
    ),
    (
        "root-selector-policy-ignored",
        [peer("istio-system", "sel", WL % "mtls: {mode: STRICT}")],
        8080,
        P,
        None,
        "default",
    ),
    (
        "port-level-permissive-under-strict",
        [wl("mtls: {mode: STRICT}, portLevelMtls: {9000: {mode: PERMISSIVE}}")],
        9000,
        P,
        "ns2/wl",
        "port",
    ),
    (
        "port-level-other-port-keeps-workload",
        [wl("mtls: {mode: STRICT}, portLevelMtls: {9000: {mode: PERMISSIVE}}")],
        8080,
        S,
        "ns2/wl",
        "workload",
    ),
    (
        "port-level-strict-under-permissive-mesh",
        [mesh("PERMISSIVE"), wl("portLevelMtls: {8080: {mode: STRICT}}")],
        8080,
        S,
        "ns2/wl",
        "port",
    ),
    (
        "port-level-disable-under-strict-mesh",
        [mesh("STRICT"), wl("portLevelMtls: {8080: {mode: DISABLE}}")],
        8080,
        DIS,
        "ns2/wl",
        "port",
    ),
    (
        "port-level-unset-inherits",
        [mesh("STRICT"), wl("portLevelMtls: {8080: {mode: UNSET}}")],
        8080,
        S,
        "istio-system/default",
        "mesh",
    ),
    (
        "port-level-keyed-by-workload-port",
        [mesh("STRICT"), wl("portLevelMtls: {80: {mode: PERMISSIVE}}")],
        8080,
        S,
        "istio-system/default",
        "mesh",
    ),
    (
        "oldest-mesh-wins",
        [
            mesh("PERMISSIVE", "newer", created="2024-02-01T00:00:00Z"),
            mesh("STRICT", "older", created="2024-01-01T00:00:00Z"),
        ],
        8080,
        S,
        "istio-system/older",
        "mesh",
    ),
    (
        "oldest-namespace-wins",
        [
            nsp("STRICT", "b", created="2024-03-01T00:00:00Z"),
            nsp("DISABLE", "a", created="2023-03-01T00:00:00Z"),
        ],
        8080,
        DIS,
        "ns2/a",
        "namespace",
    ),
    (
        "oldest-workload-wins",
        [
            wl("mtls: {mode: PERMISSIVE}", "z", created="2020-01-01T00:00:00Z"),
            wl("mtls: {mode: STRICT}", "a", created="2021-01-01T00:00:00Z"),
        ],
        8080,
        P,
        "ns2/z",
        "workload",
    ),
    ("same-age-name-breaks-tie", [nsp("PERMISSIVE", "b"), nsp("STRICT", "a")], 8080, S, "ns2/a", "namespace"),
    (
        "timestamp-beats-missing",
        [nsp("PERMISSIVE", "a"), nsp("STRICT", "b", created="2024-01-01T00:00:00Z")],
        8080,
        S,
        "ns2/b",
        "namespace",
    ),
    # invalid documents fail closed (STRICT at their level)
    ("invalid-mode-is-strict", [nsp("PERMISSIV")], 8080, S, "ns2/default", "namespace"),
    (
        "invalid-port-level-policy-is-strict",
        [mesh("PERMISSIVE"), peer("ns2", "bad", "{portLevelMtls: {8080: {mode: PERMISSIVE}}}")],
        8080,
        S,
        "ns2/bad",
        "namespace",
    ),
    (
        "invalid-workload-ignores-port-overrides",
        [wl("mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}, bogus: 1")],
        8080,
        S,
        "ns2/wl",
        "workload",
    ),
]


@pytest.mark.parametrize(
    ("policies", "port", "mode", "deciding", "level"),
    [pytest.param(*v[1:], id=v[0]) for v in VECTORS],
)
def test_mtls_vectors(
    policies: list[dict[str, Any]], port: int, mode: MtlsMode, deciding: str | None, level: str
) -> None:
    ps = parse_policies(policies)
    d = effective_mtls(ps.peer_authentication, "ns2", HTTPBIN_LABELS, port)
    assert (d.mode, d.policy, d.level) == (mode, deciding, level), d.describe()
    assert d.strict is (mode is MtlsMode.STRICT)  # DISABLE behaves as PERMISSIVE at the node
    assert d.invalid is any(p.poisoned and p.key == deciding for p in ps.peer_authentication)


def test_custom_root_namespace() -> None:
    ps = parse_policies([peer("mesh-root", "default", "{mtls: {mode: STRICT}}")])
    assert PeerAuthIndex(ps.peer_authentication, "mesh-root").effective("ns2", {}, 80).strict
    assert not PeerAuthIndex(ps.peer_authentication).effective("ns2", {}, 80).strict


def test_describe_says_where_the_mode_comes_from() -> None:
    ps = parse_policies([mesh("STRICT")])
    assert effective_mtls(ps.peer_authentication, "ns2", {}, 1).describe() == (
        "STRICT from PeerAuthentication istio-system/default (mesh level)"
    )
    assert "mesh default" in effective_mtls((), "ns2", {}, 1).describe()
