"""Capture end to end in real namespaces: pods' TCP steered to the node agent's listeners.

Each test builds two nodes (a, b) with pods c (enrolled) and u (unenrolled) on a, s (enrolled) and v
(unenrolled) on b, real servers in s and v, and runs tests/kernel/listener_proc.py as the agent inside
the node namespaces. A reply line says who answered: 'outbound dst=...' (agent listener) or
'real s dst=...' (the pod's own server).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bpf import abi, syscall
from bpf.capture import Capture, CaptureError, EnrolledPod
from bpf.routing import RTPROT_ZTAGENT
from tests.kernel.conftest import REPO, SERVER_PORT, Mesh, talk
from tests.kernel.nsutil import in_netns, requires_bcc, socket_in

pytestmark = [pytest.mark.kernel, requires_bcc]

S = ("10.244.2.2", SERVER_PORT)  # enrolled server on node b
V = ("10.244.2.3", SERVER_PORT)  # unenrolled server on node b


def both_agents(mesh: Mesh, **kw: bool) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    return mesh.start_agent("a", ("ns1/c",), **kw), mesh.start_agent("b", ("ns2/s",), **kw)


def test_outbound_reaches_agent_with_original_destination(mesh: Mesh) -> None:
    both_agents(mesh)
    c = mesh.pod_ns("ns1/c")
    assert talk(c, S) == "outbound dst=10.244.2.2:8080 src=10.244.1.2"
    # Any destination, routable or not, unenrolled too: all of the pod's TCP goes to its agent.
    assert talk(c, ("192.0.2.77", 443)) == "outbound dst=192.0.2.77:443 src=10.244.1.2"
    assert talk(c, V) == "outbound dst=10.244.2.3:8080 src=10.244.1.2"
    assert mesh.servers["s"].seen == [] and mesh.servers["v"].seen == []
    assert mesh.capture("a").status().counters["outbound"] == 3


def test_inbound_plaintext_and_hbone_to_enrolled_pod(mesh: Mesh) -> None:
    both_agents(mesh)
    # Plaintext from an unenrolled pod on another node towards an enrolled pod: inbound listener.
    assert talk(mesh.pod_ns("ns1/u"), S) == "inbound dst=10.244.2.2:8080 src=10.244.1.3"
    # A peer agent (node a's own namespace) dialling <pod ip>:15008: the HBONE listener.
    assert talk(mesh.node_ns("a"), (S[0], 15008)) == "hbone dst=10.244.2.2:15008 src=10.250.0.1"
    # An unenrolled pod on the same node as the enrolled server is captured inbound as well.
    assert talk(mesh.pod_ns("ns2/v"), S) == "inbound dst=10.244.2.2:8080 src=10.244.2.3"
    assert mesh.servers["s"].seen == []
    counters = mesh.capture("b").status().counters
    assert counters["inbound"] == 2 and counters["hbone"] == 1


def test_unenrolled_pods_and_agent_own_connections_untouched(mesh: Mesh) -> None:
    both_agents(mesh)
    assert talk(mesh.pod_ns("ns1/u"), V) == "real v dst=10.244.2.3:8080 src=10.244.1.3"
    # The agent's onward connection from the node's namespace to the enrolled pod is not captured.
    assert talk(mesh.node_ns("b"), S) == "real s dst=10.244.2.2:8080 src=10.250.0.2"
    # UDP is not captured: a datagram from the enrolled pod reaches the real destination.
    got = socket_in(mesh.pod_ns("ns2/v"), type=__import__("socket").SOCK_DGRAM)
    try:
        got.bind(("0.0.0.0", 9999))
        got.settimeout(3)
        snd = socket_in(mesh.pod_ns("ns1/c"), type=__import__("socket").SOCK_DGRAM)
        with snd:
            snd.sendto(b"udp", ("10.244.2.3", 9999))
        assert got.recvfrom(16)[0] == b"udp"
    finally:
        got.close()


def test_spoofed_sources_dropped(mesh: Mesh) -> None:
    mesh.start_agent("a", ("ns1/c", "ns1/d"))
    c, u = mesh.pod_ns("ns1/c"), mesh.pod_ns("ns1/u")
    from pyroute2 import IPRoute

    # The enrolled pod gives itself a foreign address and uses it as its source.
    with IPRoute(netns=c) as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address="10.244.1.99", prefixlen=32)
    # The unenrolled pod claims enrolled pod c's address towards enrolled pod d.
    with IPRoute(netns=u) as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address="10.244.1.2", prefixlen=32)
    assert talk(c, S, timeout=1.0, src="10.244.1.99") == "timeout"
    assert talk(u, ("10.244.1.4", 8080), timeout=1.0, src="10.244.1.2") == "timeout"
    assert talk(c, S) == "outbound dst=10.244.2.2:8080 src=10.244.1.2"  # the real address still works
    assert mesh.capture("a").status().counters["drop_spoof"] >= 2


def test_killed_agent_fails_closed_and_restart_recovers(mesh: Mesh) -> None:
    agent_a, agent_b = both_agents(mesh)
    c, u = mesh.pod_ns("ns1/c"), mesh.pod_ns("ns1/u")
    link_before = mesh.capture("a").status().link_id
    mesh.stop(agent_a, signal.SIGKILL)
    mesh.stop(agent_b, signal.SIGKILL)
    # Pinned link and maps survive the crash, the listener slots emptied with the process.
    st = mesh.capture("a").status()
    assert st.attached and st.link_id == link_before and not any(st.listeners.values())
    # No plaintext around the agent, and no silent drop either: the guard resets the SYN.
    started = time.monotonic()
    assert talk(c, S, timeout=1.0) == "refused"  # outbound
    refused_after = time.monotonic() - started
    assert talk(u, S, timeout=1.0) == "refused"  # inbound to the enrolled server
    assert talk(mesh.node_ns("a"), (S[0], 15008), timeout=1.0) == "refused"  # HBONE to it
    assert mesh.servers["s"].seen == []
    guard_a, guard_b = mesh.capture("a").status().guard, mesh.capture("b").status().guard
    assert guard_a["installed"] and guard_a["resetSyns"] >= 1
    assert guard_b["installed"] and guard_b["resetSyns"] >= 2
    print(f"refused {refused_after * 1000:.1f} ms after the SYN, with no agent on the node")
    # Restart: the same pins are reused (no reload) and traffic flows to the new listeners.
    both_agents(mesh)
    assert mesh.capture("a").status().link_id == link_before
    assert talk(c, S) == "outbound dst=10.244.2.2:8080 src=10.244.1.2"
    assert talk(u, S) == "inbound dst=10.244.2.2:8080 src=10.244.1.3"


def test_clean_stop_detaches_but_keeps_pods_closed(mesh: Mesh) -> None:
    agent_a, _ = both_agents(mesh, detach_on_term=True)
    mesh.stop(agent_a, signal.SIGTERM)
    assert agent_a.returncode == 0
    st = mesh.capture("a").status()
    assert not st.attached and st.rules  # program and pins gone, routing rules kept
    assert talk(mesh.pod_ns("ns1/c"), S, timeout=1.0) in ("timeout", "refused", "reset")
    assert mesh.servers["s"].seen == []
    mesh.start_agent("a", ("ns1/c",))  # reloads and re-enrolls
    assert talk(mesh.pod_ns("ns1/c"), S) == "outbound dst=10.244.2.2:8080 src=10.244.1.2"


def test_enroll_unenroll_at_runtime_touches_only_that_pod(mesh: Mesh) -> None:
    mesh.start_agent("a", ("ns1/c",))
    cap = mesh.capture("a")
    cap.install()
    u = mesh.pod("ns1/u")
    pod_u = EnrolledPod("ns1/u", str(u["host_ifname"]), tuple(u["ips"]))  # type: ignore[arg-type]
    assert talk(mesh.pod_ns("ns1/u"), V) == "real v dst=10.244.2.3:8080 src=10.244.1.3"
    cap.enroll(pod_u)
    cap.enroll(pod_u)  # idempotent
    assert talk(mesh.pod_ns("ns1/u"), V) == "outbound dst=10.244.2.3:8080 src=10.244.1.3"
    cap.unenroll(pod_u)
    assert talk(mesh.pod_ns("ns1/u"), V) == "real v dst=10.244.2.3:8080 src=10.244.1.3"
    assert talk(mesh.pod_ns("ns1/c"), V) == "outbound dst=10.244.2.3:8080 src=10.244.1.2"
    assert "10.244.1.3" not in cap.status().pod_ips


def test_bad_input_fails_loud_and_changes_nothing(mesh: Mesh) -> None:
    mesh.start_agent("a", ("ns1/c",))
    cap = mesh.capture("a")
    cap.install()
    before = cap.status()
    c = mesh.pod("ns1/c")
    with pytest.raises(CaptureError, match="no interface nope0"):
        cap.enroll(EnrolledPod("x/y", "nope0", ("10.244.1.50",)))
    with pytest.raises(CaptureError, match="not an IPv4 address"):
        cap.enroll(EnrolledPod("x/y", str(c["host_ifname"]), ("fd00::1",)))
    u = mesh.pod("ns1/u")
    with pytest.raises(CaptureError, match="already enrolled"):
        cap.enroll(EnrolledPod("ns1/u", str(u["host_ifname"]), ("10.244.1.2",)))
    plain = socket_in(mesh.node_ns("a"))  # listening but not IP_TRANSPARENT
    plain.bind(("127.0.0.1", 0))
    plain.listen()
    with plain, pytest.raises(CaptureError, match=r"inbound listener .* lacks IP_TRANSPARENT"):
        cap.set_listeners(None, plain.fileno(), None)
    after = cap.status()
    assert (after.listeners, after.pod_ips, after.rules) == (before.listeners, before.pod_ips, before.rules)
    assert all(after.listeners.values())


def test_stale_pins_replaced_and_uninstall_leaves_nothing(mesh: Mesh) -> None:
    # Pins whose link belonged to a namespace that is gone (a recreated node) are stale: reloaded.
    gone = f"{mesh.lab}-gone"
    subprocess.run(["ip", "netns", "add", gone], check=True)
    try:
        old = Capture(mesh.pin_dir("a"), netns=gone)
        old.install()
        old_link = old.status().link_id
        old.close()
    finally:
        subprocess.run(["ip", "netns", "del", gone], check=True)
    agent_a = mesh.start_agent("a", ("ns1/c",))
    cap = mesh.capture("a")
    link_a = cap.status().link_id
    assert link_a not in (None, old_link)
    assert talk(mesh.pod_ns("ns1/c"), S) == "outbound dst=10.244.2.2:8080 src=10.244.1.2"
    # Uninstall after a crash: everything goes, and the pod's traffic flows directly again.
    mesh.stop(agent_a, signal.SIGKILL)
    cap.uninstall()
    st = cap.status()
    assert not st.attached and st.rules == [] and not st.table_route

    def leftovers() -> list[str]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            rules = [r for r in ipr.get_rules(family=2) if r.get("protocol") == RTPROT_ZTAGENT]
            routes = ipr.get_routes(family=2, table=cap.table)
        return [str(r) for r in rules] + [str(r) for r in routes]

    assert in_netns(mesh.node_ns("a"), leftovers) == []
    links = json.loads(subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True,
                                      check=True).stdout or "[]")
    assert not [lk for lk in links if lk.get("id") in (link_a, old_link)]
    assert not os.path.exists(mesh.pin_dir("a"))
    assert talk(mesh.pod_ns("ns1/c"), S) == "real s dst=10.244.2.2:8080 src=10.244.1.2"


def test_listener_socket_cookie_is_what_the_map_holds(mesh: Mesh) -> None:
    # The sockmap slot holds exactly the socket handed over (checked by SO_COOKIE), and None empties it.
    cap = mesh.capture("a")
    cap.install()
    from tests.kernel.nsutil import transparent_listener

    lst = transparent_listener(mesh.node_ns("a"))
    with lst:
        cap.set_listeners(lst.fileno(), None, None)
        pinned = cap._require()
        assert pinned.listener_cookie(abi.SLOT_OUTBOUND) == syscall.socket_cookie(lst.fileno())
        assert pinned.listener_cookie(abi.SLOT_INBOUND) is None
        cap.set_listeners(None, None, None)
        assert pinned.listener_cookie(abi.SLOT_OUTBOUND) is None
    cap.uninstall()


def test_host_ifname_found_by_route(mesh: Mesh) -> None:
    cap = mesh.capture("a")
    assert cap.host_ifname_for(("10.244.1.2",)) == mesh.pod("ns1/c")["host_ifname"]
    with pytest.raises(CaptureError, match="not the addresses of one local pod"):
        cap.host_ifname_for(("10.244.2.2",))  # a pod on the other node: routed via a gateway
    with pytest.raises(CaptureError, match="not the addresses of one local pod"):
        cap.host_ifname_for(("10.244.1.2", "10.244.1.3"))  # two different pods


def test_api_usable_inside_a_running_uvloop_loop(mesh: Mesh) -> None:
    # The agent calls capture from its uvloop event loop; pyroute2's sync API would otherwise try to
    # drive that running loop (or a uvloop one, which cannot open netlink sockets).
    import asyncio

    import uvloop

    c = mesh.pod("ns1/c")

    async def main() -> list[str]:
        cap = Capture(mesh.pin_dir("a"), netns=mesh.node_ns("a"))
        try:
            cap.install()
            cap.enroll(EnrolledPod("ns1/c", cap.host_ifname_for(("10.244.1.2",)), ("10.244.1.2",)))
            return cap.status().rules
        finally:
            cap.close()

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        rules = asyncio.run(main())
    finally:
        asyncio.set_event_loop_policy(None)
    assert f"15002: iif {c['host_ifname']} ipproto tcp lookup 15001" in rules
    mesh.capture("a").uninstall()


def test_reenroll_after_the_pod_interface_was_recreated(mesh: Mesh) -> None:
    # A recreated pod gets a new veth (same name, new ifindex): enrolling it again takes over its IP
    # from the vanished interface instead of refusing or leaving the old ifindex in the maps.
    from pyroute2 import IPRoute

    ns = mesh.node_ns("a")
    cap = mesh.capture("a")
    cap.install()

    def make_link() -> int:
        with IPRoute(netns=ns) as ipr:
            ipr.link("add", ifname="zdummy0", kind="veth", peer="zdummy0p")
            return int(ipr.link_lookup(ifname="zdummy0")[0])

    first = make_link()
    pod = EnrolledPod("ns9/re", "zdummy0", ("10.244.1.77",))
    cap.enroll(pod)
    with IPRoute(netns=ns) as ipr:
        ipr.link("del", index=first)
    second = make_link()
    assert second != first
    cap.enroll(pod)
    pinned = cap._require()
    assert pinned.pod_ip_ifindex("10.244.1.77") == second
    assert first not in pinned.ifaces() and second in pinned.ifaces()
    assert cap.status().pod_ips["10.244.1.77"] == "zdummy0"
    cap.uninstall()


def test_install_refuses_a_private_bpffs_under_ip_netns_exec(mesh: Mesh) -> None:
    # `ip netns exec` remounts /sys privately: pins made there would die with the agent, so install()
    # must refuse (and say how to start the agent) rather than mount a throwaway bpffs.
    code = ("from bpf.capture import Capture, CaptureError\n"
            "try:\n    Capture('/sys/fs/bpf/ztagent-test-private/a').install()\n"
            "except CaptureError as e:\n    print('refused:', e)\n")
    out = subprocess.run(["ip", "netns", "exec", mesh.node_ns("a"), sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60, cwd=str(REPO),
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.startswith("refused:") and "nsenter" in out.stdout, out.stdout + out.stderr
    assert not os.path.exists("/sys/fs/bpf/ztagent-test-private")


def test_changed_hbone_port_reloads_the_program(mesh: Mesh) -> None:
    cap = mesh.capture("a")
    cap.install()
    first = cap.status()
    cap.close()
    other = Capture(mesh.pin_dir("a"), netns=mesh.node_ns("a"), hbone_port=15999)
    mesh.captures.append(other)
    other.install()
    st = other.status()
    assert st.hbone_port == 15999 and st.link_id != first.link_id
    links = json.loads(subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True,
                                      check=True).stdout or "[]")
    assert not [lk for lk in links if lk.get("id") == first.link_id]  # the old one was detached
    other.uninstall()
