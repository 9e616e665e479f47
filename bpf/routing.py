"""Policy routing that makes captured TCP local to the node, so the sk_lookup program sees it.

Per enrolled pod (all tagged with protocol RTPROT_ZTAGENT so `uninstall` finds them after a crash):

    15000: from all to <pod ip> iif lo lookup main            the node's own traffic to the pod
                                                               (the agent's onward connections) is
                                                               routed normally, never captured
    15001: from all to <pod ip> ipproto tcp lookup <table>     anything else towards the pod (other
                                                               nodes, HBONE, unenrolled pods) is local
    15002: from all iif <host veth> ipproto tcp lookup <table> everything the pod sends is local
    table <table>: local default dev lo

These rules are the fail-closed guarantee: while they exist the pod's TCP can only end at a local
socket, never at its real destination. They are removed only when a pod is un-enrolled or capture is
uninstalled, never on shutdown or crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

T = TypeVar("T")
NETLINK_TIMEOUT_S = 30.0

RTPROT_ZTAGENT = 122  # unassigned in /etc/iproute2/rt_protos; marks rules and routes capture owns
PREF_LOCAL_OUT = 15000
PREF_TO_POD = 15001
PREF_FROM_POD = 15002
MAIN_TABLE = 254
IPPROTO_TCP = 6
AF_INET = 2
EEXIST = 17
ENOENT = 2


@dataclass(frozen=True, order=True)
class Rule:
    priority: int
    table: int
    iifname: str | None
    dst: str | None
    ip_proto: int | None

    def spec(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"priority": self.priority, "table": self.table, "family": AF_INET}
        if self.iifname is not None:
            kw["iifname"] = self.iifname
        if self.dst is not None:
            kw["dst"] = self.dst
            kw["dst_len"] = 32
        if self.ip_proto is not None:
            kw["ip_proto"] = self.ip_proto
        return kw

    def __str__(self) -> str:
        parts = [f"{self.priority}:"]
        if self.dst:
            parts.append(f"to {self.dst}")
        if self.iifname:
            parts.append(f"iif {self.iifname}")
        if self.ip_proto == IPPROTO_TCP:
            parts.append("ipproto tcp")
        parts.append(f"lookup {self.table}")
        return " ".join(parts)


def pod_rules(table: int, host_ifname: str, ips: tuple[str, ...]) -> list[Rule]:
    rules: list[Rule] = []
    for ip in ips:
        rules.append(Rule(PREF_LOCAL_OUT, MAIN_TABLE, "lo", ip, None))
        rules.append(Rule(PREF_TO_POD, table, None, ip, IPPROTO_TCP))
    rules.append(Rule(PREF_FROM_POD, table, host_ifname, None, IPPROTO_TCP))
    return rules


# pyroute2's synchronous API drives an asyncio loop: the caller's if one is running (then it fails
# with "this event loop is already running"), else a new one from the loop policy (uvloop in the
# agent, which cannot open netlink sockets). So every netlink call runs on one private thread with a
# plain selector loop, whatever the caller's thread or loop.
_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ztagent-netlink")
_local = threading.local()


def _worker_loop() -> asyncio.AbstractEventLoop:
    loop = getattr(_local, "loop", None)
    if loop is None:
        loop = _local.loop = asyncio.SelectorEventLoop()
    return loop


def on_netlink_thread(fn: Callable[[], T]) -> T:
    return _worker.submit(fn).result(timeout=NETLINK_TIMEOUT_S)


@contextlib.contextmanager
def iproute(netns: str | None = None) -> Iterator[IPRoute]:
    """An IPRoute usable only on the netlink thread (inside a function given to on_netlink_thread)."""
    kw: dict[str, Any] = {"use_event_loop": _worker_loop()}
    if netns:
        kw["netns"] = netns
    ipr = IPRoute(**kw)
    try:
        yield ipr
    finally:
        ipr.close()


def _on_worker(method: Callable[..., T]) -> Callable[..., T]:
    def wrapper(*args: Any, **kwargs: Any) -> T:
        if threading.current_thread().name.startswith("ztagent-netlink"):
            return method(*args, **kwargs)
        return on_netlink_thread(lambda: method(*args, **kwargs))

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


class Routing:
    """Rules and the local route of one capture table, in one network namespace.

    Public methods may be called from any thread, including from inside a running event loop."""

    def __init__(self, table: int, netns: str | None = None) -> None:
        if not 0 < table < 2**32 or table in (253, 254, 255):
            raise ValueError(f"route table {table} is reserved or out of range")
        self.table = table
        self.netns = netns

    def _ipr(self) -> contextlib.AbstractContextManager[IPRoute]:
        return iproute(self.netns)

    @_on_worker
    def ifindex(self, ifname: str) -> int | None:
        with self._ipr() as ipr:
            found = ipr.link_lookup(ifname=ifname)
        return int(found[0]) if found else None

    @_on_worker
    def ifname(self, ifindex: int) -> str | None:
        with self._ipr() as ipr:
            try:
                links = ipr.get_links(ifindex)
            except NetlinkError:
                return None
        return str(links[0].get("ifname")) if links else None

    @_on_worker
    def direct_route_ifname(self, ip: str) -> str | None:
        """The interface a directly connected (gateway-less) route sends `ip` out of, or None.

        On a routed-veth node this is the pod's host-side veth, whatever the CNI named it."""
        with self._ipr() as ipr:
            try:
                routes = ipr.route("get", dst=ip)
            except NetlinkError:
                return None
            if not routes or routes[0].get("gateway") or routes[0]["type"] != 1:  # RTN_UNICAST
                return None
            oif = routes[0].get("oif")
            links = ipr.get_links(oif) if oif else []
        return str(links[0].get("ifname")) if links else None

    @_on_worker
    def ensure_table(self) -> None:
        with self._ipr() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            try:
                ipr.route("add", dst="default", type="local", oif=lo, table=self.table,
                          proto=RTPROT_ZTAGENT, family=AF_INET, scope="host")
            except NetlinkError as e:
                if e.code != EEXIST:
                    raise

    @_on_worker
    def has_table_route(self) -> bool:
        with self._ipr() as ipr:
            return bool(ipr.get_routes(family=AF_INET, table=self.table))

    @_on_worker
    def rules(self) -> list[Rule]:
        """The rules this capture owns (tagged, and pointing at its table or at main from its range)."""
        out: list[Rule] = []
        with self._ipr() as ipr:
            for r in ipr.get_rules(family=AF_INET):
                if r.get("protocol") != RTPROT_ZTAGENT:
                    continue
                table = int(r.get("table") or r["table"])
                prio = int(r.get("priority") or 0)
                if table != self.table and not (table == MAIN_TABLE and prio == PREF_LOCAL_OUT):
                    continue
                dst = r.get("dst") if r["dst_len"] == 32 else None
                out.append(Rule(prio, table, r.get("iifname"), dst, r.get("ip_proto")))
        return sorted(out)

    @_on_worker
    def add(self, rules: list[Rule]) -> None:
        existing = set(self.rules())
        with self._ipr() as ipr:
            for rule in rules:
                if rule in existing:
                    continue
                ipr.rule("add", protocol=RTPROT_ZTAGENT, **rule.spec())

    @_on_worker
    def delete(self, rules: list[Rule]) -> None:
        existing = set(self.rules())
        with self._ipr() as ipr:
            for rule in rules:
                if rule not in existing:
                    continue
                try:
                    ipr.rule("del", protocol=RTPROT_ZTAGENT, **rule.spec())
                except NetlinkError as e:
                    if e.code != ENOENT:
                        raise

    @_on_worker
    def remove_all(self) -> None:
        """Delete every rule this capture owns and flush its table (uninstall only: fails open)."""
        self.delete(self.rules())
        with self._ipr() as ipr:
            for route in ipr.get_routes(family=AF_INET, table=self.table):
                dst = route.get("dst")
                ipr.route("del", table=self.table, dst=f"{dst}/{route['dst_len']}" if dst else "default",
                          type=route["type"], scope=route["scope"], proto=route["proto"],
                          oif=route.get("oif"), family=AF_INET)


def check_ipv4(ip: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(ip))
    except ValueError:
        raise ValueError(f"{what}: {ip!r} is not an IPv4 address (only IPv4 is captured)") from None
