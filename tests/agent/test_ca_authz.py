"""The CA's authorization rule as a table: (calling node, requested identity) -> verdict + reason."""

from __future__ import annotations

import pytest

from caserver.authz import Placement, authorize
from credentials.identities import NodeNameError, node_identity, node_of
from identity.spiffe import SpiffeId, TrustDomain
from mesh.config import parse_config
from tests.agent.test_ca_helpers import config_text

TD = TrustDomain("cluster.local")
PLACEMENT = Placement.from_config(
    parse_config(
        config_text(
            [
                ("sleep", "ns1", "sleep", "node-a"),
                ("sleep-2", "ns1", "sleep", "node-b"),  # one service account on two nodes
                ("httpbin", "ns2", "httpbin", "node-b"),
                ("legacy", "ns3", "legacy", "node-a", False),
            ]
        )
    )
)


def sid(s: str) -> SpiffeId:
    return SpiffeId.parse(s)


CASES = [
    # node, requested, allowed, fragment of the reason
    ("node-a", "spiffe://cluster.local/ns/ns1/sa/sleep", True, "runs as"),
    ("node-b", "spiffe://cluster.local/ns/ns1/sa/sleep", True, "runs as"),
    ("node-b", "spiffe://cluster.local/ns/ns2/sa/httpbin", True, "runs as"),
    (
        "node-a",
        "spiffe://cluster.local/ns/ns2/sa/httpbin",
        False,
        "placed on node 'node-a' (it runs on node-b)",
    ),
    ("node-a", "spiffe://cluster.local/ns/ns3/sa/legacy", False, "no enrolled workload runs as it"),
    ("node-a", "spiffe://cluster.local/ns/ns9/sa/ghost", False, "no enrolled workload runs as it"),
    ("node-a", "spiffe://cluster.local/ns/ztagent-system/sa/ztagent/node/node-a", True, "own identity"),
    (
        "node-a",
        "spiffe://cluster.local/ns/ztagent-system/sa/ztagent/node/node-b",
        False,
        "another node's identity",
    ),
    ("node-a", "spiffe://other.example/ns/ns1/sa/sleep", False, "outside the mesh's trust domain"),
    ("node-a", "spiffe://cluster.local/some/other/path", False, "not a workload identity"),
    ("node-a", "spiffe://cluster.local/ns/ns1/sa/sleep/extra", False, "not a workload identity"),
    ("node-z", "spiffe://cluster.local/ns/ns1/sa/sleep", False, "node 'node-z' is not in the mesh config"),
    # A node removed from the config cannot renew even its own node certificate.
    (
        "node-z",
        "spiffe://cluster.local/ns/ztagent-system/sa/ztagent/node/node-z",
        False,
        "node 'node-z' is not in the mesh config",
    ),
]


@pytest.mark.parametrize(("node", "requested", "allowed", "reason"), CASES)
def test_authorization_table(node: str, requested: str, allowed: bool, reason: str) -> None:
    d = authorize(PLACEMENT, node, sid(requested))
    assert d.allowed is allowed
    assert reason in d.reason


@pytest.mark.parametrize(
    ("spiffe_id", "node"),
    [
        ("spiffe://cluster.local/ns/ztagent-system/sa/ztagent/node/node-a", "node-a"),
        (
            "spiffe://cluster.local/ns/ztagent-system/sa/ztagent/node/ip-10-0-0-1.ec2.internal",
            "ip-10-0-0-1.ec2.internal",
        ),
        ("spiffe://cluster.local/ns/ztagent-system/sa/ztagent", None),  # the DaemonSet's workload ID
        ("spiffe://cluster.local/ns/ztagent-system/sa/ztagent/node/Node-A", None),  # not DNS-1123
        ("spiffe://cluster.local/ns/ztagent-system/sa/ztagent/node/a/b", None),
        ("spiffe://other.example/ns/ztagent-system/sa/ztagent/node/node-a", None),  # other trust domain
        ("spiffe://cluster.local/ns/kube-system/sa/ztagent/node/node-a", None),
    ],
)
def test_node_identity_scheme(spiffe_id: str, node: str | None) -> None:
    s = sid(spiffe_id)
    assert node_of(s, TD) == node
    if node is not None:
        assert node_identity(TD, node) == s
    # A node identity is never an Istio workload identity.
    assert s.namespace is None or node is None


@pytest.mark.parametrize("bad", ["", "Node-A", "a/b", "-a", "a" * 254, "node_a"])
def test_bad_node_names_are_refused(bad: str) -> None:
    with pytest.raises(NodeNameError, match="DNS-1123"):
        node_identity(TD, bad)
