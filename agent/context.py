"""The narrow context the proxies run in.

The outbound and inbound handlers (:mod:`agent.outbound`, :mod:`agent.inbound`) see only this:
the current view of the mesh, certificates by identity, the HBONE client, upstream connects,
the connection tracker and the node's name and HBONE port. The data-plane worker implements it
(:class:`agent.worker.DataPlaneWorker`); unit tests implement it with fakes, which is how every
fail-closed branch of the proxies is tested without a two-agent mesh.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Protocol

from agent.metrics import AgentMetrics
from agent.tracking import ConnectionTracker
from identity.spiffe import SpiffeId
from identity.svid import WorkloadCredential
from mesh.config import IPAddress
from mesh.store import WorkloadStore
from tunnel.client import OutboundTarget
from tunnel.relay import TunnelStream


class ProxyContext(Protocol):
    node_name: str
    hbone_port: int
    metrics: AgentMetrics
    connections: ConnectionTracker

    @property
    def store(self) -> WorkloadStore:
        """The current view of the mesh (replaced when the config changes)."""
        ...

    def credential(self, spiffe_id: SpiffeId) -> WorkloadCredential:
        """The certificate to present for ``spiffe_id``; raises LookupError when there is none."""
        ...

    async def establish(self, target: OutboundTarget, reset_local: Callable[[], None]) -> TunnelStream:
        """An HBONE CONNECT stream after its 200 (raises tunnel.client.TunnelError)."""
        ...

    async def connect_upstream(self, ip: str, port: int, source_ip: IPAddress | None) -> socket.socket:
        """A connected socket to a local pod or a passthrough destination (raises OSError)."""
        ...

    def is_own_listener(self, addr: tuple[str, int]) -> bool:
        """Whether ``addr`` is one of the agent's own capture listeners (a loop)."""
        ...
