"""mesh/parse.py beyond tests/agent/test_config.py: waypoints, default namespaces, the
Kubernetes name rule of each kind, label errors that say why."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from mesh.config import ConfigError as ReexportedConfigError
from mesh.config import MeshConfig, parse_config
from mesh.errors import ConfigError
from mesh.model import Snapshot, WaypointFor

BASE = textwrap.dedent(
    """\
    apiVersion: ztagent.io/v1alpha1
    kind: MeshConfig
    trustDomain: cluster.local
    nodes:
      - {name: node-a, address: 10.250.0.1, podCIDR: 10.244.1.0/24}
    workloads:
      - {name: web, namespace: ns1, node: node-a, ips: [10.244.1.2], labels: {app: web}}
    services:
      - {name: web, namespace: ns1, vips: [10.96.0.10], ports: [{port: 80}], selector: {app: web}}
    """
)


def _issues(text: str, **kw: object) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, file="m.yaml", **kw)  # type: ignore[arg-type]
    return [str(i) for i in ei.value.issues]


def test_the_old_import_path_still_names_the_same_things() -> None:
    assert MeshConfig is Snapshot and ReexportedConfigError is ConfigError


def test_waypoints_are_parsed_with_istio_defaults() -> None:
    cfg = parse_config(
        BASE
        + textwrap.dedent(
            """\
            waypoints:
              - {name: waypoint, namespace: ns1, addresses: [10.96.0.20]}
              - {name: wp2, namespace: ns1, serviceAccount: wp-sa, addresses: [10.96.0.21, "fd00::1"],
                 hbonePort: 15009, for: all}
            """
        )
    )
    a, b = cfg.waypoints
    assert (a.key, a.service_account, a.hbone_port, a.traffic_for) == (
        "ns1/waypoint",
        "waypoint",
        15008,
        WaypointFor.SERVICE,
    )
    assert str(a.spiffe_id) == "spiffe://cluster.local/ns/ns1/sa/waypoint"
    assert b.addresses == (ipaddress.ip_address("10.96.0.21"), ipaddress.ip_address("fd00::1"))
    assert (b.service_account, b.hbone_port, b.traffic_for) == ("wp-sa", 15009, WaypointFor.ALL)


@pytest.mark.parametrize(
    ("waypoint", "expected"),
    [
        (
            "{name: w, namespace: ns1, addresses: []}",
            "waypoints[0].addresses: a waypoint needs at least one address",
        ),
        ("{name: w, namespace: ns1, addresses: [x]}", "waypoints[0].addresses[0]: 'x' is not an IP"),
        ("{name: w, namespace: ns1, addresses: [10.0.0.1], for: pods}", "waypoints[0].for: expected one of"),
        ("{name: w, namespace: ns1, addresses: [10.0.0.1], hbonePort: 0}", "waypoints[0].hbonePort: port 0"),
        ("{name: W, namespace: ns1, addresses: [10.0.0.1]}", "waypoints[0].name: 'W' is not a valid name"),
        ("{name: w, namespace: ns1, addresses: [10.0.0.1], mode: x}", "waypoints[0].mode: unknown field"),
    ],
)
def test_bad_waypoints_are_refused_naming_the_field(waypoint: str, expected: str) -> None:
    msgs = _issues(BASE + f"waypoints:\n  - {waypoint}\n")
    assert any(m.startswith("m.yaml: document 0 (MeshConfig): ") and expected in m for m in msgs), msgs


def test_duplicate_waypoints_are_refused() -> None:
    wp = "  - {name: w, namespace: ns1, addresses: [10.0.0.1]}\n"
    assert any(
        "waypoints[1].name: duplicate waypoint ns1/w" in m for m in _issues(BASE + "waypoints:\n" + wp + wp)
    )


def test_default_namespace_fills_in_missing_namespaces_only() -> None:
    text = BASE.replace("namespace: ns1, node", "node").replace(
        "name: web, namespace: ns1, vips", "name: web, vips"
    )
    text += textwrap.dedent(
        """\
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p}
        spec: {}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: q, namespace: other}
        spec: {}
        """
    )
    # Without a default the namespace is required, as before.
    msgs = _issues(text)
    assert any("workloads[0].namespace: required field is missing" in m for m in msgs), msgs
    assert any("services[0].namespace: required field is missing" in m for m in msgs), msgs
    assert any("document 1 (AuthorizationPolicy): metadata.namespace:" in m for m in msgs), msgs
    cfg = parse_config(text, default_namespace="team-a")
    assert [w.key for w in cfg.workloads] == ["team-a/web"]
    assert [s.key for s in cfg.services] == ["team-a/web"]
    assert [p.key for p in cfg.policies] == ["AuthorizationPolicy/team-a/p", "AuthorizationPolicy/other/q"]
    # The policy parser saw the defaulted namespace too: nothing poisoned.
    assert cfg.policy_errors == () and cfg.policies[0].raw["metadata"]["namespace"] == "team-a"
    with pytest.raises(ValueError, match="default_namespace"):
        parse_config(text, default_namespace="Team_A")


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # Services are RFC 1035 labels in Kubernetes (their name is a DNS label of the FQDN).
        (
            "name: web, namespace: ns1, vips",
            "name: 1web, namespace: ns1, vips",
            "services[0].name: '1web' is not a valid service name",
        ),
        (
            "name: web, namespace: ns1, vips",
            "name: web.v1, namespace: ns1, vips",
            "services[0].name: 'web.v1' is not a valid service name",
        ),
        (
            "labels: {app: web}",
            "labels: {/app: web}",
            "workloads[0].labels./app: '/app' is not a valid label key (has an empty prefix",
        ),
        (
            "labels: {app: web}",
            "labels: {app: -web}",
            "workloads[0].labels.app: '-web' is not a valid label value (must be empty",
        ),
        (
            "selector: {app: web}",
            "selector: {app: 'a b'}",
            "services[0].selector.app: 'a b' is not a valid label value",
        ),
    ],
)
def test_kubernetes_name_rules_per_kind(old: str, new: str, expected: str) -> None:
    assert old in BASE
    msgs = _issues(BASE.replace(old, new, 1))
    assert any(expected in m for m in msgs), msgs


def test_workload_names_may_be_subdomains_but_service_names_may_not() -> None:
    cfg = parse_config(BASE.replace("name: web, namespace: ns1, node", "name: web.v1, namespace: ns1, node"))
    assert cfg.workloads[0].name == "web.v1"
