"""The capture API the node agent uses (no BCC import: compiling happens in a child process).

    cap = Capture(pin_dir="/sys/fs/bpf/ztagent/node-a", table=DEFAULT_TABLE)
    cap.install()                                     # load+attach+pin once, or reuse sound pins
    cap.set_listeners(outbound_fd, inbound_fd, hbone_fd)  # IP_TRANSPARENT listening TCP sockets
    cap.enroll(EnrolledPod("ns1/sleep", "vethab12cd", ("10.244.1.2",)))
    ...
    cap.detach()       # clean agent stop: program and maps gone, routing rules kept (fail closed)
    cap.uninstall()    # operator's explicit removal of everything, rules included

A crashed agent leaves the pinned link and maps: the listener sockets close with the process, their
sockmap slots empty, and captured traffic is dropped until a restarted agent calls install() (which
reuses the pins) and set_listeners() again. `CaptureBackend` is the interface the agent codes
against; `bpf.fake.FakeCapture` implements it without a kernel.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from bpf import abi, syscall
from bpf.guard import Guard, GuardError
from bpf.pinned import PinnedCapture, StalePins, detach_stale_link, remove_pins
from bpf.routing import Routing, check_ipv4, pod_rules

DEFAULT_TABLE = 15001
DEFAULT_PIN_ROOT = "/sys/fs/bpf/ztagent"
PIN_ROOT_ENV = "ZTAGENT_BPF_PIN_ROOT"  # overrides DEFAULT_PIN_ROOT (the lab gives each lab its own)
SYS_BPFFS = "/sys/fs/bpf"
LOADER_TIMEOUT_S = 120.0

SOL_IP = 0
IP_TRANSPARENT = 19
SOL_IPV6 = 41
IPV6_TRANSPARENT = 75


class CaptureError(Exception):
    """Capture could not do what was asked; the message names the object at fault. No state changed
    unless the message says so."""


@dataclass(frozen=True)
class EnrolledPod:
    name: str  # for messages and status, e.g. "ns1/sleep"
    host_ifname: str  # the pod's veth end in the node's namespace
    ips: tuple[str, ...]  # IPv4 addresses; each may only arrive on host_ifname


@dataclass
class CaptureStatus:
    attached: bool
    pin_dir: str
    table: int
    link_id: int | None = None
    prog_id: int | None = None
    hbone_port: int | None = None
    listeners: dict[str, bool] = field(default_factory=dict)  # slot name -> listener present
    pod_ips: dict[str, str] = field(default_factory=dict)  # ip -> host ifname (or "#<ifindex>")
    counters: dict[str, int] = field(default_factory=dict)
    rules: list[str] = field(default_factory=list)
    table_route: bool = False
    # The fast-reset guard (bpf/guard.py): installed, this process marks SYNs as served, and how
    # many SYNs it has reset while no agent served.
    guard: dict[str, object] = field(default_factory=dict)


@runtime_checkable
class CaptureBackend(Protocol):
    def install(self) -> None: ...

    def set_listeners(
        self, outbound_fd: int | None, inbound_fd: int | None, hbone_fd: int | None
    ) -> None: ...

    def enroll(self, pod: EnrolledPod) -> None: ...

    def unenroll(self, pod: EnrolledPod) -> None: ...

    def close(self) -> None: ...

    def detach(self) -> None: ...

    def uninstall(self) -> None: ...

    def status(self) -> CaptureStatus: ...


def default_pin_dir(node: str) -> str:
    """$ZTAGENT_BPF_PIN_ROOT/<node>, default /sys/fs/bpf/ztagent/<node>."""
    return os.path.join(os.environ.get(PIN_ROOT_ENV) or DEFAULT_PIN_ROOT, node)


def validate_pod(pod: EnrolledPod) -> tuple[str, ...]:
    """Normalised IPs of a pod, or ValueError naming the field at fault."""
    if not pod.name:
        raise ValueError("EnrolledPod.name is empty")
    if not pod.host_ifname or len(pod.host_ifname) > 15 or "/" in pod.host_ifname or " " in pod.host_ifname:
        raise ValueError(f"pod {pod.name}: host_ifname {pod.host_ifname!r} is not an interface name")
    if not pod.ips:
        raise ValueError(f"pod {pod.name}: no ips")
    ips = tuple(check_ipv4(ip, f"pod {pod.name} ips") for ip in pod.ips)
    if len(set(ips)) != len(ips):
        raise ValueError(f"pod {pod.name}: duplicate ips {list(pod.ips)}")
    return ips


def check_listener(fd: int, slot: str) -> None:
    """A listener must be a listening TCP socket with IP_TRANSPARENT (it answers for foreign addresses)."""
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError as e:
        raise CaptureError(f"{slot} listener fd {fd} is not a socket: {e.strerror}") from e
    with s:
        if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
            raise CaptureError(f"{slot} listener fd {fd} is not a TCP/IP socket")
        if not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise CaptureError(f"{slot} listener fd {fd} is not listening (call listen() first)")
        if s.family == socket.AF_INET:
            transparent = s.getsockopt(SOL_IP, IP_TRANSPARENT)
        else:
            transparent = s.getsockopt(SOL_IPV6, IPV6_TRANSPARENT)
        if not transparent:
            raise CaptureError(f"{slot} listener fd {fd} lacks IP_TRANSPARENT: it could not answer "
                               "for the original destination address")


class Capture:
    """sk_lookup + policy-routing capture in one network namespace (bpf/README.md)."""

    def __init__(self, pin_dir: str, table: int = DEFAULT_TABLE, netns: str | None = None,
                 hbone_port: int = abi.HBONE_PORT) -> None:
        """`netns`: None for the calling process's namespace (the agent runs inside the node's),
        or a name under /run/netns (tests, the lab)."""
        self.pin_dir = os.path.abspath(pin_dir)
        self.netns = netns
        self.hbone_port = hbone_port
        self.routing = Routing(table, netns)
        self.guard = Guard(None if netns is None else self._netns_path())
        self._pinned: PinnedCapture | None = None

    @property
    def table(self) -> int:
        return self.routing.table

    def _netns_path(self) -> str:
        if self.netns is None:
            return f"/proc/{os.getpid()}/ns/net"
        return self.netns if self.netns.startswith("/") else f"/run/netns/{self.netns}"

    def _netns_ino(self) -> int:
        return os.stat(self._netns_path()).st_ino

    # --- lifecycle ------------------------------------------------------------------------------

    def install(self) -> None:
        """Make the capture program attached and its maps pinned; idempotent.

        Sound pins from a previous run (same ABI, still attached to this namespace) are reused, so a
        restarted agent keeps every enrollment. Stale pins (other ABI, detached link, half-done
        load) are removed and the program is loaded afresh by a child process.
        """
        if self._pinned is not None:
            return
        ensure_bpffs(self.pin_dir)
        netns_ino = self._netns_ino()
        try:
            pinned = PinnedCapture.open(self.pin_dir, netns_ino)
        except StalePins:
            pinned = self._load_fresh(netns_ino)
        if pinned.hbone_port != self.hbone_port:
            # Compiled-in port differs from what this agent serves: reload rather than mis-steer.
            pinned.close()
            pinned = self._load_fresh(netns_ino)
        self._pinned = pinned
        self.routing.ensure_table()
        try:
            self.guard.install()
        except GuardError as e:
            raise CaptureError(f"fast-reset guard (nftables table ip ztagent): {e}") from e

    def _load_fresh(self, netns_ino: int) -> PinnedCapture:
        detach_stale_link(self.pin_dir, netns_ino)
        remove_pins(self.pin_dir)
        self._run_loader()
        try:
            return PinnedCapture.open(self.pin_dir, netns_ino)
        except StalePins as e:
            raise CaptureError(f"loader finished but pins in {self.pin_dir} are unusable: {e}") from e

    def _run_loader(self) -> None:
        cmd = [sys.executable, "-m", "bpf.loader", "load", "--pin-dir", self.pin_dir,
               "--netns", self._netns_path(), "--hbone-port", str(self.hbone_port)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LOADER_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as e:
            raise CaptureError(f"eBPF loader did not finish in {LOADER_TIMEOUT_S}s") from e
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            # The verifier's reason (on Linux < 5.17: "invalid bpf_context access" for ingress_ifindex)
            # comes before BCC's traceback; without it the error says only "Permission denied".
            why = [ln.strip() for ln in lines[:-5] if "invalid" in ln or "unknown func" in ln][-2:]
            raise CaptureError("eBPF loader failed: " + " | ".join(why + lines[-5:]))
        json.loads(proc.stdout)  # the loader's report; malformed output means something else ran

    def _require(self) -> PinnedCapture:
        if self._pinned is None:
            raise CaptureError("capture not installed: call install() first")
        return self._pinned

    def close(self) -> None:
        """Drop this process's fds; pins, link and rules stay (what a crash leaves). The guard's
        owned table goes with its socket, so captured SYNs are reset from now on."""
        self.guard.close()
        if self._pinned is not None:
            self._pinned.close()
            self._pinned = None

    def detach(self) -> None:
        """Clean stop: detach the program and remove the pins and maps. Routing rules stay, so
        enrolled pods' TCP keeps ending locally with no listener: it fails instead of leaking, and
        the guard resets new connections at once."""
        try:
            self.guard.unmark_serving()
        except GuardError:
            self.guard.close()  # closing the socket removes the owned table all the same
        if self._pinned is None:
            try:
                self._pinned = PinnedCapture.open(self.pin_dir, self._netns_ino())
            except StalePins:
                remove_pins(self.pin_dir)
                return
        self._pinned.detach()
        self._pinned = None

    def uninstall(self) -> None:
        """Remove everything: link, maps, pins, every rule and the table route. Enrolled pods'
        traffic flows uncaptured afterwards; use only to take capture off the node."""
        self.detach()
        self.routing.remove_all()
        try:
            self.guard.remove()
        except GuardError as e:
            raise CaptureError(f"cannot remove the fast-reset guard: {e}") from e
        finally:
            self.guard.close()

    # --- listeners and pods ----------------------------------------------------------------------

    def host_ifname_for(self, ips: tuple[str, ...]) -> str:
        """The host-side veth of the local pod owning `ips`, found by the node's routes (every IP must
        be directly routed out of the same interface); CaptureError if it is not a local pod."""
        names = {ip: self.routing.direct_route_ifname(check_ipv4(ip, "host_ifname_for")) for ip in ips}
        found = set(names.values())
        if not ips or None in found or len(found) != 1:
            raise CaptureError(f"{list(ips)} are not the addresses of one local pod (direct routes: {names})")
        return str(found.pop())

    def set_listeners(self, outbound_fd: int | None, inbound_fd: int | None, hbone_fd: int | None) -> None:
        """Put the agent's listeners into their slots; None empties a slot (its traffic is dropped)."""
        pinned = self._require()
        slots = ((abi.SLOT_OUTBOUND, outbound_fd), (abi.SLOT_INBOUND, inbound_fd), (abi.SLOT_HBONE, hbone_fd))
        for slot, fd in slots:  # validate all before changing any
            if fd is not None:
                check_listener(fd, abi.SLOT_NAMES[slot])
        serving = any(fd is not None for _, fd in slots)
        if not serving:
            # Every slot is being emptied: reset new connections instead of dropping them.
            self.guard.unmark_serving()
        for slot, fd in slots:
            try:
                pinned.set_listener(slot, fd)
            except syscall.BpfError as e:
                raise CaptureError(f"{abi.SLOT_NAMES[slot]} listener: {e}") from e
        if serving:
            # This process feeds the capture: SYNs pass the guard until it exits (or empties the
            # slots). A slot it leaves empty drops its traffic, as before.
            try:
                self.guard.mark_serving()
            except GuardError as e:
                raise CaptureError(f"fast-reset guard: cannot mark this agent as serving: {e}") from e

    def enroll(self, pod: EnrolledPod) -> None:
        """Capture a pod's TCP; idempotent. Live connections of the pod are reset by this."""
        pinned = self._require()
        try:
            ips = validate_pod(pod)
        except ValueError as e:
            raise CaptureError(str(e)) from e
        ifindex = self.routing.ifindex(pod.host_ifname)
        if ifindex is None:
            raise CaptureError(f"pod {pod.name}: no interface {pod.host_ifname} in the node namespace")
        stale: set[int] = set()
        for ip in ips:
            owner = pinned.pod_ip_ifindex(ip)
            if owner is not None and owner != ifindex:
                owner_name = self.routing.ifname(owner)
                if owner_name is not None:
                    raise CaptureError(f"pod {pod.name}: ip {ip} is already enrolled on {owner_name}")
                # Its interface is gone (the pod was recreated, its veth got a new ifindex): take over.
                stale.add(owner)
        # Maps before rules: once the rules steer the pod's traffic, the program must know the pod.
        pinned.add_iface(ifindex)
        for ip in ips:
            pinned.add_pod_ip(ip, ifindex)
        still_used = set(pinned.pod_ips().values())
        for old in stale - still_used:
            pinned.del_iface(old)
        self.routing.add(pod_rules(self.table, pod.host_ifname, ips))
        try:
            self.guard.add_pods(ips)
        except GuardError as e:
            raise CaptureError(f"pod {pod.name}: captured, but the fast-reset guard refused it: {e}") from e

    def unenroll(self, pod: EnrolledPod) -> None:
        """Stop capturing a pod (its traffic flows directly afterwards); idempotent."""
        pinned = self._require()
        try:
            ips = validate_pod(pod)
        except ValueError as e:
            raise CaptureError(str(e)) from e
        self.routing.delete(pod_rules(self.table, pod.host_ifname, ips))
        try:
            self.guard.remove_pods(ips)
        except GuardError as e:
            raise CaptureError(f"pod {pod.name}: cannot remove it from the fast-reset guard: {e}") from e
        ifindex = self.routing.ifindex(pod.host_ifname)
        for ip in ips:
            owner = pinned.pod_ip_ifindex(ip)
            if owner is not None and (ifindex is None or owner == ifindex):
                ifindex = owner
                pinned.del_pod_ip(ip)
        if ifindex is not None and ifindex not in pinned.pod_ips().values():
            pinned.del_iface(ifindex)

    def status(self) -> CaptureStatus:
        st = CaptureStatus(attached=False, pin_dir=self.pin_dir, table=self.table)
        st.rules = [str(r) for r in self.routing.rules()]
        st.table_route = self.routing.has_table_route()
        st.guard = {"installed": self.guard.installed(), "serving": self.guard.serving,
                    "resetSyns": self.guard.rejected()}
        pinned = self._pinned
        opened = False
        if pinned is None:
            try:
                pinned = PinnedCapture.open(self.pin_dir, self._netns_ino())
                opened = True
            except StalePins:
                return st
        try:
            st.attached = True
            st.link_id = pinned.link.id
            st.prog_id = pinned.link.prog_id
            st.hbone_port = pinned.hbone_port
            st.listeners = {name: pinned.listener_cookie(slot) is not None
                            for slot, name in abi.SLOT_NAMES.items()}
            st.pod_ips = {ip: self.routing.ifname(ix) or f"#{ix}" for ip, ix in pinned.pod_ips().items()}
            st.counters = pinned.counters()
        finally:
            if opened:
                pinned.close()
        return st

    def counters(self) -> dict[str, int]:
        return self._require().counters()


def _same_mount_ns_as_init() -> bool:
    try:
        return os.readlink("/proc/self/ns/mnt") == os.readlink("/proc/1/ns/mnt")
    except OSError:
        return False


def ensure_bpffs(pin_dir: str) -> None:
    """Make sure pin_dir can be created on a bpffs whose pins outlive this process.

    `ip netns exec` remounts /sys in a private mount namespace, hiding /sys/fs/bpf: a bpffs mounted
    there would vanish with the process and take the pins (and the fail-closed state) with it, so
    that case is refused with an explanation instead of silently mounting.
    """
    probe = os.path.abspath(pin_dir)
    while not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    if syscall.is_bpffs(probe):
        os.makedirs(pin_dir, exist_ok=True)
        return
    if (pin_dir + "/").startswith(SYS_BPFFS + "/") and _same_mount_ns_as_init():
        syscall.mount_bpffs(SYS_BPFFS)
        os.makedirs(pin_dir, exist_ok=True)
        return
    raise CaptureError(
        f"{pin_dir} is not on a bpffs shared with the host: pins there would die with this process. "
        "Mount bpffs in the host mount namespace (mount -t bpf bpf /sys/fs/bpf) and start the agent "
        "with `nsenter --net=/run/netns/<node>` rather than `ip netns exec` (which remounts /sys)."
    )
