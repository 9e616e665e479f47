"""The sk_lookup program's verdict logic on synthetic lookups (BPF_PROG_TEST_RUN, kernel >= 5.9).

BPF_PROG_TEST_RUN cannot set ingress_ifindex, so the program is compiled with
-DZT_TEST_INGRESS_IFINDEX=<n> to pin the arriving interface; everything else is the production
program. The assigned socket is identified by the cookie the kernel reports.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bpf import abi, syscall
from bpf.loader import compile_program, map_fd
from tests.kernel.nsutil import requires_bcc

pytestmark = [pytest.mark.kernel, requires_bcc]

POD_IF = 7  # an enrolled pod's veth
OTHER_POD_IF = 8
NODE_IF = 3  # the node link
LO = 1
POD = "10.244.1.2"
OTHER_POD = "10.244.1.5"
REMOTE = "10.250.0.2"


def ip(a: str) -> int:
    return int.from_bytes(socket.inet_aton(a), "little")  # the struct field holds network order bytes


@dataclass
class Prog:
    module: Any
    fd: int
    cookies: dict[int, int]  # slot -> cookie of the listener placed there

    def run(self, src: str, dst: str, dport: int, proto: int = socket.IPPROTO_TCP,
            family: int = socket.AF_INET) -> tuple[int, int | None]:
        ctx = syscall.SkLookupCtx(family=family, protocol=proto, remote_ip4=ip(src), local_ip4=ip(dst),
                                  remote_port=socket.htons(40000), local_port=dport)
        if family == socket.AF_INET6:
            ctx.remote_ip6[3] = 1
            ctx.local_ip6[3] = 2
        verdict, cookie = syscall.prog_test_run_sk_lookup(self.fd, ctx)
        slot = next((s for s, c in self.cookies.items() if c == cookie), None) if cookie else None
        return verdict, slot

    def counter(self, idx: int) -> int:
        raw = syscall.map_lookup(map_fd(self.module, abi.MAP_COUNTERS), idx.to_bytes(4, "little"), 8, "c")
        return int.from_bytes(raw or b"", "little")

    def empty_slot(self, slot: int) -> None:
        syscall.map_delete(map_fd(self.module, abi.MAP_LISTENERS), slot.to_bytes(4, "little"), "listeners")


@pytest.fixture(scope="module")
def listeners() -> Iterator[dict[int, socket.socket]]:
    socks = {}
    for slot in range(abi.SLOT_COUNT):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        socks[slot] = s
    yield socks
    for s in socks.values():
        s.close()


def make_prog(ifindex: int, listeners: dict[int, socket.socket], extra: tuple[str, ...] = ()) -> Prog:
    module, fn = compile_program([f"-DZT_TEST_INGRESS_IFINDEX={ifindex}", *extra])
    pod_ips = map_fd(module, abi.MAP_POD_IPS)
    for addr, ifx in ((POD, POD_IF), (OTHER_POD, OTHER_POD_IF)):
        syscall.map_update(pod_ips, socket.inet_aton(addr), bytes(abi.PodIpValue(ifindex=ifx)), "pod_ips")
    for ifx in (POD_IF, OTHER_POD_IF):
        key = ifx.to_bytes(4, "little")
        syscall.map_update(map_fd(module, abi.MAP_IFACES), key, bytes(abi.IfaceValue()), "ifaces")
    cookies = {}
    for slot, s in listeners.items():
        syscall.map_update(map_fd(module, abi.MAP_LISTENERS), slot.to_bytes(4, "little"),
                           s.fileno().to_bytes(8, "little"), "listeners")
        cookies[slot] = syscall.socket_cookie(s.fileno())
    return Prog(module, fn.fd, cookies)


@pytest.fixture(scope="module")
def progs(listeners: dict[int, socket.socket]) -> Iterator[dict[int, Prog]]:
    out = {ifx: make_prog(ifx, listeners) for ifx in (POD_IF, NODE_IF, LO)}
    yield out
    for p in out.values():
        p.module.cleanup()


PASS, DROP = abi.SK_PASS, abi.SK_DROP
OUT, IN, HB = abi.SLOT_OUTBOUND, abi.SLOT_INBOUND, abi.SLOT_HBONE

CASES = [
    # (arriving ifindex, src, dst, dport, proto, expected verdict, expected slot, why)
    (POD_IF, POD, REMOTE, 80, 6, PASS, OUT, "pod-originated TCP to anything goes outbound"),
    (POD_IF, POD, OTHER_POD, 15008, 6, PASS, OUT, "even to another pod's HBONE port"),
    (POD_IF, "10.244.1.99", REMOTE, 80, 6, DROP, None, "foreign source on a pod's veth"),
    (POD_IF, OTHER_POD, REMOTE, 80, 6, DROP, None, "another pod's address on this pod's veth"),
    (NODE_IF, REMOTE, POD, 8080, 6, PASS, IN, "plaintext towards an enrolled pod goes inbound"),
    (NODE_IF, REMOTE, POD, 15008, 6, PASS, HB, "pod ip:15008 goes to the HBONE listener"),
    (NODE_IF, POD, OTHER_POD, 8080, 6, DROP, None, "an enrolled pod's address from the node link"),
    (NODE_IF, REMOTE, "10.250.0.1", 15008, 6, PASS, None, "to the node itself: not ours"),
    (NODE_IF, REMOTE, "10.244.9.9", 80, 6, PASS, None, "to an unenrolled address: not ours"),
    (NODE_IF, REMOTE, POD, 53, 17, PASS, None, "UDP is not captured"),
    (LO, POD, OTHER_POD, 8080, 6, PASS, IN, "loopback is exempt from the spoof check"),
]


@pytest.mark.parametrize(("ifx", "src", "dst", "dport", "proto", "verdict", "slot", "why"), CASES,
                         ids=[c[-1] for c in CASES])
def test_verdict(progs: dict[int, Prog], ifx: int, src: str, dst: str, dport: int, proto: int,
                 verdict: int, slot: int | None, why: str) -> None:
    assert progs[ifx].run(src, dst, dport, proto) == (verdict, slot), why


def test_ipv6_is_not_ours(progs: dict[int, Prog]) -> None:
    assert progs[POD_IF].run(POD, REMOTE, 80, family=socket.AF_INET6) == (PASS, None)


def test_counters_follow_verdicts(listeners: dict[int, socket.socket]) -> None:
    p = make_prog(POD_IF, listeners)
    try:
        p.run(POD, REMOTE, 80)
        p.run("10.244.1.99", REMOTE, 80)
        p.run(POD, REMOTE, 80, proto=socket.IPPROTO_UDP)
        got = (p.counter(abi.CNT_OUTBOUND), p.counter(abi.CNT_DROP_SPOOF), p.counter(abi.CNT_PASS))
        assert got == (1, 1, 1)
    finally:
        p.module.cleanup()


def test_empty_slot_drops_never_passes(listeners: dict[int, socket.socket]) -> None:
    # Agent down: captured traffic must not fall through to a normal lookup (fail closed).
    p = make_prog(NODE_IF, listeners)
    try:
        p.empty_slot(IN)
        assert p.run(REMOTE, POD, 8080) == (DROP, None)
        assert p.counter(abi.CNT_DROP_NO_LISTENER) == 1
        assert p.run(REMOTE, POD, 15008) == (PASS, HB)  # other slots unaffected
    finally:
        p.module.cleanup()


def test_hbone_port_comes_from_cflags(listeners: dict[int, socket.socket]) -> None:
    p = make_prog(NODE_IF, listeners, ("-DZT_HBONE_PORT=15999",))
    try:
        assert p.run(REMOTE, POD, 15999) == (PASS, HB)
        assert p.run(REMOTE, POD, 15008) == (PASS, IN)
    finally:
        p.module.cleanup()


def test_established_socket_is_refused_by_assign(listeners: dict[int, socket.socket]) -> None:
    # A connected (non-listening) socket in a slot: bpf_sk_assign refuses it and the lookup drops.
    p = make_prog(NODE_IF, listeners)
    srv = listeners[OUT]
    cli = socket.create_connection(srv.getsockname(), timeout=2)
    try:
        syscall.map_update(map_fd(p.module, abi.MAP_LISTENERS), IN.to_bytes(4, "little"),
                           cli.fileno().to_bytes(8, "little"), "listeners")
        assert p.run(REMOTE, POD, 8080) == (DROP, None)
        assert p.counter(abi.CNT_DROP_ASSIGN) == 1
    finally:
        cli.close()
        p.module.cleanup()
