"""Capture for bridge CNIs: an enrolled pod's host veth leaves the bridge and becomes a routed port.

A Linux bridge switches same-node pod-to-pod frames below IP, so the policy routing and the
``sk_lookup`` program of this package never see them (bpf/README.md, "Bridge CNIs"). For each
enrolled pod whose host veth is a bridge port, :func:`route_port` turns that one port into the
routed-veth shape the rest of capture already handles (ptp, Calico):

1. ``proxy_arp`` on the veth: the pod keeps its bridge-plugin addressing (subnet, gateway) and its
   ARP for the gateway or for any neighbour on the subnet is answered by the node with the veth's
   MAC, so every frame the pod sends ends at the node's IP layer with ``iif <veth>``;
2. a ``/32`` route to each pod IP via the veth (``proto 122``), more specific than the bridge's
   subnet route: the node, and every other pod, reaches the pod through the veth;
3. a proxy neighbour entry for each pod IP on the bridge: the pods still on the bridge (not
   enrolled) resolve the enrolled pod to the bridge's MAC, so their frames go up the node's IP
   layer too (and the inbound capture rule sees them);
4. the veth is taken off the bridge (``nomaster``), after 1-3 so that the pod is never unreachable,
   and after the capture enrolled it (the agent's order), so no frame of it is ever switched or
   routed uncaptured.

Why not the other ways (measured or tried here, kernel 6.18 with this VM's config):

- ``br_netfilter`` / ``bridge-nf-call-iptables`` hands bridged frames to the IP hooks, but not to
  routing: policy routing and ``sk_lookup`` (socket lookup in the local input path) never run, so
  nothing can be steered to the agent's listeners.
- ``nft`` bridge ``meta broute`` (pass a frame up on the port device) needs ``NFT_BRIDGE_META``,
  and ebtables' ``broute`` table ``BRIDGE_EBT_BROUTE``: neither is built into this kernel.
- A tc program on the veth that rewrites the destination MAC to the bridge's (or redirects into
  the bridge device) does reach IP, but with ``iif <bridge>`` for every pod: the per-pod source
  check (a pod IP may arrive only on its own veth, ``zt_pod_ips``) is lost, and a pod left on the
  bridge could then send as an enrolled pod. ``PACKET_LOOPBACK``, which the bridge passes up on the
  port, cannot be set from tc (``bpf_skb_change_type`` allows HOST..OTHERHOST only) and TCP drops
  anything but ``PACKET_HOST``.
- Rules inside the pod's namespace (Istio's in-pod mode) would need listeners in every pod, a
  second capture design.

The price: an enrolled pod on a bridge CNI is reached by routing (TTL - 1, the node's MAC) rather
than by switching, and non-IP L2 traffic between it and its bridge neighbours stops. IPv6 (NDP
proxying) is not done, as IPv6 is not captured at all (bpf/README.md).

Fail closed: the veth's removal from the bridge and its routes are kernel state that outlives the
agent, like the capture's rules. They go only with the veth (CNI DEL) or :func:`forget_port`.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from bpf.routing import RTPROT_ZTAGENT, _on_worker, check_ipv4, iproute

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
RT_SCOPE_LINK = 253
NTF_PROXY = 0x08
AF_INET = 2
ENOENT = 2


class BridgePortError(Exception):
    """The interface cannot be made a routed port; the message names it and why."""


@dataclass(frozen=True)
class HostPort:
    ifname: str
    ifindex: int
    kind: str | None  # "veth", "bridge", ...
    peer_ifindex: int | None  # a veth's peer (IFLA_LINK), in the peer's namespace
    master: str | None  # the bridge it is a port of, if any
    peer_netnsid: int | None = None  # the peer's namespace, as this one numbers it (IFLA_LINK_NETNSID)


IFLA_AF_SPEC = 26
IFLA_INET_CONF = 1
IPV4_DEVCONF_PROXY_ARP = 3  # include/uapi/linux/ip.h, 1-based like the kernel's attribute types
RTM_SETLINK = 19
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLMSG_ERROR = 2


def _nla(kind: int, payload: bytes) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + b"\0" * ((4 - len(payload) % 4) % 4)


def set_proxy_arp(ifindex: int, on: bool = True) -> None:
    """net.ipv4.conf.<dev>.proxy_arp over rtnetlink (RTM_SETLINK, IFLA_AF_SPEC / AF_INET /
    IFLA_INET_CONF), in this thread's network namespace.

    Not /proc/sys: a container runtime mounts it read-only in every unprivileged container, and
    the agent needs only CAP_NET_ADMIN for this. pyroute2 models IFLA_INET_CONF as the flat
    struct the kernel dumps, not the nested attributes it expects on a set, hence these bytes."""
    conf = _nla(IFLA_INET_CONF, _nla(IPV4_DEVCONF_PROXY_ARP, struct.pack("=I", 1 if on else 0)))
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, ifindex, 0, 0)
    body += _nla(IFLA_AF_SPEC | 0x8000, _nla(socket.AF_INET | 0x8000, conf))
    msg = struct.pack("=IHHII", 16 + len(body), RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        nl.settimeout(5)
        nl.bind((0, 0))
        nl.send(msg)
        reply = nl.recv(65536)
    _len, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", reply)
    if kind == NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", reply, 16)
        if err != 0:
            raise OSError(-err, f"setting proxy_arp on ifindex {ifindex}: {os.strerror(-err)}")


def _proxy_arp(ifindex: int, netns: str | None) -> None:
    if netns is None:
        set_proxy_arp(ifindex)
        return
    path = netns if netns.startswith("/") else f"/run/netns/{netns}"
    _in_netns_thread(path, lambda: set_proxy_arp(ifindex))


def _port(ipr: IPRoute, link: Any) -> HostPort:
    master = link.get("master")
    master_name = None
    if master:
        ml = ipr.get_links(master)
        master_name = str(ml[0].get("ifname")) if ml else None
    kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    peer = link.get("link")
    nsid = link.get("IFLA_LINK_NETNSID")
    return HostPort(str(link.get("ifname")), int(link["index"]), str(kind) if kind else None,
                    int(peer) if peer else None, master_name, int(nsid) if nsid is not None else None)


@_on_worker
def host_port(ifname: str, netns: str | None = None) -> HostPort | None:
    """What the node knows about one of its interfaces, or None if it has none by that name."""
    with iproute(netns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return None
        return _port(ipr, ipr.get_links(found[0])[0])


@_on_worker
def veths(netns: str | None = None) -> list[HostPort]:
    """The node's veths whose peer is in another namespace (pods' host ends)."""
    with iproute(netns) as ipr:
        ports = [_port(ipr, link) for link in ipr.get_links()]
    return [p for p in ports if p.kind == "veth" and p.peer_netnsid is not None]


@_on_worker
def netns_id(path: str, netns: str | None = None) -> int | None:
    """The id the node's namespace gives the namespace at ``path`` (RTM_GETNSID by fd), or None.

    With it a pod's veth is matched to the pod's namespace from the node's side (the veth's
    IFLA_LINK_NETNSID), without entering the pod's namespace (which needs CAP_SYS_ADMIN)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with iproute(netns) as ipr:
            res = ipr.get_netnsid(fd=fd)
    except NetlinkError:
        return None
    finally:
        os.close(fd)
    nsid = res.get("nsid") if res else None
    return int(nsid) if nsid is not None and int(nsid) >= 0 else None


@_on_worker
def direct_ips(ifindex: int, netns: str | None = None) -> list[str]:
    """IPv4 host routes (/32, no gateway) out of ``ifindex``: a routed pod's addresses."""
    with iproute(netns) as ipr:
        out = []
        for r in ipr.get_routes(family=AF_INET, oif=ifindex):
            if r["dst_len"] == 32 and not r.get("gateway") and r.get("table") in (None, 254) and r.get("dst"):
                out.append(str(r.get("dst")))
    return sorted(set(out))


def _in_netns_thread(netns_path: str, fn: Callable[[], T], timeout: float = 10.0) -> T:
    """Run ``fn`` on a thread that entered the network namespace at ``netns_path`` (setns)."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns_path}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, name="ztagent-netns", daemon=True)
    t.start()
    t.join(timeout)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    if "value" not in box:
        raise TimeoutError(f"work in {netns_path} did not finish in {timeout}s")
    return box["value"]  # type: ignore[return-value]


def _inside(netns_path: str, fn: Callable[[IPRoute], T], timeout: float = 10.0) -> T:
    """Run ``fn`` with a netlink socket opened inside another network namespace.

    Not pyroute2's ``IPRoute(netns=...)``: that forks a helper process, and in the agent (whose
    event loop handles SIGTERM through a wakeup fd the fork inherits) the helper's own SIGTERM on
    exit reached the agent's loop as if the agent had been asked to stop. A thread that setns()-es
    alone is enough: a socket stays in the namespace it was created in."""

    def run() -> T:
        loop = asyncio.SelectorEventLoop()
        try:
            ipr = IPRoute(use_event_loop=loop)
            try:
                return fn(ipr)
            finally:
                ipr.close()
        finally:
            loop.close()

    return _in_netns_thread(netns_path, run, timeout)


_libc = ctypes.CDLL(None, use_errno=True)


def sandbox_links(netns_path: str) -> dict[str, tuple[int, int | None]]:
    """Interfaces inside a pod's namespace: name -> (ifindex, peer ifindex in the node)."""

    def read(ipr: IPRoute) -> dict[str, tuple[int, int | None]]:
        out: dict[str, tuple[int, int | None]] = {}
        for link in ipr.get_links():
            name = link.get("ifname")
            if name and name != "lo":
                peer = link.get("link")
                out[str(name)] = (int(link["index"]), int(peer) if peer else None)
        return out

    return _inside(netns_path, read)


def sandbox_ipv4(netns_path: str) -> dict[str, list[str]]:
    """IPv4 addresses inside a pod's namespace, by interface (lo excluded)."""

    def read(ipr: IPRoute) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        names = {int(link["index"]): str(link.get("ifname")) for link in ipr.get_links()}
        for a in ipr.get_addr(family=AF_INET):
            name = names.get(int(a["index"]), "")
            if name and name != "lo":
                out.setdefault(name, []).append(str(a.get("address")))
        return out

    return _inside(netns_path, read)


def route_port(host_ifname: str, ips: tuple[str, ...], netns: str | None = None) -> str | None:
    """Make a bridged pod veth a routed port (module docstring); idempotent. Returns the bridge it
    was (or had been) a port of, or None if it is no bridge port (nothing to do: routed already)."""
    ips = tuple(check_ipv4(ip, f"route_port {host_ifname} ips") for ip in ips)
    port = host_port(host_ifname, netns)
    if port is None:
        raise BridgePortError(f"no interface {host_ifname} in the node namespace")
    if port.kind != "veth":
        raise BridgePortError(f"{host_ifname} is a {port.kind or 'plain'} interface, not a pod's veth")
    if port.master is None:
        return None
    _proxy_arp(port.ifindex, netns)
    _route(port, port.master, ips, netns)
    return port.master


@_on_worker
def _route(port: HostPort, bridge: str, ips: tuple[str, ...], netns: str | None) -> None:
    with iproute(netns) as ipr:
        br = ipr.link_lookup(ifname=bridge)
        for ip in ips:
            ipr.route("replace", dst=f"{ip}/32", oif=port.ifindex, scope=RT_SCOPE_LINK,
                      proto=RTPROT_ZTAGENT, family=AF_INET)
            if br:
                try:
                    ipr.neigh("add", dst=ip, ifindex=br[0], flags=NTF_PROXY, family=AF_INET)
                except NetlinkError as e:
                    if e.code != 17:  # EEXIST
                        raise
        ipr.link("set", index=port.ifindex, master=0)


@_on_worker
def forget_port(bridge: str | None, ips: tuple[str, ...], netns: str | None = None) -> None:
    """Remove what :func:`route_port` put on the bridge for ``ips`` (the proxy neighbour entries;
    the routes and the sysctl go with the veth). Idempotent; a bridge that is gone is fine."""
    if not bridge:
        return
    with iproute(netns) as ipr:
        br = ipr.link_lookup(ifname=bridge)
        if not br:
            return
        for ip in ips:
            try:
                ipr.neigh("del", dst=ip, ifindex=br[0], flags=NTF_PROXY, family=AF_INET)
            except NetlinkError as e:
                if e.code != ENOENT:
                    raise


@_on_worker
def proxy_entries(bridge: str, netns: str | None = None) -> list[str]:
    """The proxy neighbour entries on ``bridge`` (tests, status)."""
    with iproute(netns) as ipr:
        br = ipr.link_lookup(ifname=bridge)
        if not br:
            return []
        out = []
        for n in ipr.get_neighbours(family=AF_INET, ifindex=br[0], flags=NTF_PROXY):
            if n.get("dst"):
                out.append(str(n.get("dst")))
        return out
