"""Who may obtain which certificate: the CA's authorization rule, as a pure function.

A node agent gets a certificate for identity X only if the mesh config places an enrolled
workload running as X (``spiffe://<td>/ns/<namespace>/sa/<serviceAccount>``) on that node, or if
X is the node's own identity (so an agent can renew its node credential) -- both only while the
node itself is in the config, so a removed node's credentials lapse. Everything else is
refused with a reason that names the node and the identity, so an operator reading the CA's log
or the agent's error knows which placement is missing.

This is the same rule istiod applies to ztunnel's ``ImpersonatedIdentity`` requests (the node's
service account may impersonate only service accounts of pods scheduled on its node).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from credentials.identities import node_identity, node_of
from identity.spiffe import SpiffeId, TrustDomain
from mesh.config import MeshConfig


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


@dataclass(frozen=True)
class Placement:
    """The part of the mesh config the CA needs: which identities run on which node."""

    trust_domain: TrustDomain
    nodes: frozenset[str]
    identities_by_node: Mapping[str, frozenset[SpiffeId]]
    digest: str = ""

    @classmethod
    def from_config(cls, cfg: MeshConfig) -> Placement:
        by_node: dict[str, set[SpiffeId]] = {}
        for w in cfg.workloads:
            # Only enrolled workloads talk through the agent; a non-mesh pod needs no certificate.
            if w.enrolled:
                by_node.setdefault(w.node, set()).add(w.spiffe_id)
        return cls(
            trust_domain=cfg.trust_domain,
            nodes=frozenset(n.name for n in cfg.nodes),
            identities_by_node={k: frozenset(v) for k, v in by_node.items()},
            digest=cfg.digest,
        )

    def nodes_running(self, spiffe_id: SpiffeId) -> list[str]:
        return sorted(n for n, ids in self.identities_by_node.items() if spiffe_id in ids)


def authorize(placement: Placement, node: str, requested: SpiffeId) -> Decision:
    """May ``node`` (already authenticated) obtain a certificate for ``requested``?"""
    td = placement.trust_domain
    if requested.trust_domain != td:
        return Decision(False, f"{requested} is outside the mesh's trust domain {td}")
    # Membership first: a node removed from the config must not keep renewing even its own
    # certificate, or its credential would outlive its removal forever.
    if node not in placement.nodes:
        return Decision(False, f"node {node!r} is not in the mesh config")
    if requested == node_identity(td, node):
        return Decision(True, "the node's own identity")
    if node_of(requested, td) is not None:
        return Decision(False, f"{requested} is another node's identity")
    if requested.namespace is None or requested.service_account is None:
        return Decision(False, f"{requested} is not a workload identity (spiffe://{td}/ns/<ns>/sa/<sa>)")
    if requested in placement.identities_by_node.get(node, frozenset()):
        return Decision(True, f"a workload on node {node!r} runs as {requested}")
    elsewhere = placement.nodes_running(requested)
    where = f" (it runs on {', '.join(elsewhere)})" if elsewhere else " (no enrolled workload runs as it)"
    return Decision(
        False,
        f"no enrolled workload with service account {requested.service_account!r} in namespace "
        f"{requested.namespace!r} is placed on node {node!r}{where}",
    )
