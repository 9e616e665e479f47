"""Connections from the agent to local pods (and to passthrough destinations).

Upstream connections to a pod keep the original source IP when the kernel lets us (bind to the
source with IP_TRANSPARENT; the capture routing returns the pod's replies to us). Otherwise they
come from the node, and the log says so once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

from agent.capture import IP_TRANSPARENT, IPV6_TRANSPARENT, SOL_IP, SOL_IPV6
from mesh.config import IPAddress
from tunnel.relay import connect_numeric, reset_if_abandoned, set_keepalive

log = logging.getLogger("ztagent.upstream")

UPSTREAM_CONNECT_TIMEOUT = 10.0


class UpstreamConnector:
    """Connects to local pods, preserving the source IP where possible."""

    def __init__(self, *, transparent: bool) -> None:
        self.transparent = transparent
        self._warned = False

    async def connect(self, ip: str, port: int, source_ip: IPAddress | None = None) -> socket.socket:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        reset_if_abandoned(sock)  # the pod sees a reset, not a clean close, if the agent dies
        set_keepalive(sock)
        try:
            if source_ip is not None and (source_ip.version == 6) == (family == socket.AF_INET6):
                self._bind_source(sock, source_ip)
            await asyncio.wait_for(connect_numeric(loop, sock, (ip, port)), UPSTREAM_CONNECT_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        return sock

    def _bind_source(self, sock: socket.socket, source_ip: IPAddress) -> None:
        try:
            if self.transparent:
                if source_ip.version == 4:
                    sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
                else:
                    sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
            sock.bind((str(source_ip), 0))
        except OSError as exc:
            # Not a local address and no IP_TRANSPARENT (no capture routing, or no CAP_NET_ADMIN):
            # the pod sees the node's address instead. Correct, only less informative.
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.EPERM, errno.EACCES, errno.EADDRINUSE):
                raise
            if not self._warned:
                self._warned = True
                log.warning(
                    f"cannot keep source IP {source_ip} on connections to pods ({exc.strerror}); "
                    "pods will see the node's address",
                    extra={"event": "source_ip_not_preserved"},
                )


__all__ = ["UPSTREAM_CONNECT_TIMEOUT", "UpstreamConnector"]
