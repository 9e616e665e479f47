"""The identity scheme of the CA's own clients: node agents and the CA server itself.

Node identity: ``spiffe://<td>/ns/ztagent-system/sa/ztagent/node/<node>``. It starts like the
agent DaemonSet's workload identity (namespace ``ztagent-system``, service account ``ztagent``)
so operators recognise it, and the extra ``/node/<node>`` segments do two jobs: they say which
node is calling (the CA authorizes per node), and they make the ID *not* an Istio workload ID
(those are exactly ``/ns/<ns>/sa/<sa>``), so no workload identity can ever pass as a node and no
node credential can be used as a workload's.

CA server: its TLS certificate carries the DNS name :data:`CA_SERVER_NAME` (gRPC clients check
the server by DNS name, as they check istiod's ``istiod.istio-system.svc``) plus the SPIFFE ID
``spiffe://<td>/ns/ztagent-system/sa/ztagent-ca``.
"""

from __future__ import annotations

import re
from typing import Final

from identity.spiffe import SpiffeId, TrustDomain

NODE_NAMESPACE: Final = "ztagent-system"
NODE_SERVICE_ACCOUNT: Final = "ztagent"
CA_SERVICE_ACCOUNT: Final = "ztagent-ca"
CA_SERVER_NAME: Final = "ztagent-ca.ztagent-system.svc"
# The CreateCertificate metadata key with which a node agent names the workload identity it asks
# for (istio pkg/security; ztunnel sets it, istiod checks the node may impersonate it).
IMPERSONATED_IDENTITY: Final = "ImpersonatedIdentity"

_NODE_PREFIX: Final = f"/ns/{NODE_NAMESPACE}/sa/{NODE_SERVICE_ACCOUNT}/node/"
# Kubernetes node names are DNS-1123 subdomains; we also bound the length so the ID stays small.
_NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


class NodeNameError(ValueError):
    pass


def check_node_name(node: str) -> str:
    if not isinstance(node, str) or not _NODE_NAME.fullmatch(node):
        raise NodeNameError(
            f"node name {node!r} is not a DNS-1123 subdomain (lowercase a-z, 0-9, '-', '.', at most 253)"
        )
    return node


def node_identity(trust_domain: TrustDomain, node: str) -> SpiffeId:
    return SpiffeId(trust_domain, _NODE_PREFIX + check_node_name(node))


def node_of(spiffe_id: SpiffeId, trust_domain: TrustDomain) -> str | None:
    """The node name if ``spiffe_id`` is a node identity of ``trust_domain``, else None."""
    if spiffe_id.trust_domain != trust_domain or not spiffe_id.path.startswith(_NODE_PREFIX):
        return None
    node = spiffe_id.path[len(_NODE_PREFIX) :]
    return node if _NODE_NAME.fullmatch(node) else None


def ca_server_identity(trust_domain: TrustDomain) -> SpiffeId:
    return SpiffeId.for_workload(trust_domain, NODE_NAMESPACE, CA_SERVICE_ACCOUNT)
