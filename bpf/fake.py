"""In-memory CaptureBackend for agent tests without root or a kernel.

It enforces the same preconditions and errors as bpf.capture.Capture (install first, listener
sockets must be listening TCP with IP_TRANSPARENT unless `check_sockets=False`, IPv4 only, an IP
belongs to one interface) and records what a kernel would hold, so tests can assert on it. It
steers no traffic: tests that need real steering are in tests/kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bpf import abi
from bpf.capture import CaptureBackend, CaptureError, CaptureStatus, EnrolledPod, check_listener, validate_pod
from bpf.routing import pod_rules


@dataclass
class FakeCapture:
    pin_dir: str = "/fake/bpffs/ztagent"
    table: int = 15001
    interfaces: set[str] | None = None  # None: any interface name exists
    check_sockets: bool = True
    installed: bool = False
    listeners: dict[str, int | None] = field(default_factory=dict)
    pods: dict[str, EnrolledPod] = field(default_factory=dict)  # by host_ifname
    rules_kept: bool = False  # True after detach(): what the kernel would keep (fail closed)
    calls: list[str] = field(default_factory=list)

    def install(self) -> None:
        self.calls.append("install")
        self.installed = True

    def _require(self) -> None:
        if not self.installed:
            raise CaptureError("capture not installed: call install() first")

    def set_listeners(self, outbound_fd: int | None, inbound_fd: int | None, hbone_fd: int | None) -> None:
        self._require()
        slots = {"outbound": outbound_fd, "inbound": inbound_fd, "hbone": hbone_fd}
        if self.check_sockets:
            for name, fd in slots.items():
                if fd is not None:
                    check_listener(fd, name)
        self.calls.append("set_listeners")
        self.listeners = slots

    def enroll(self, pod: EnrolledPod) -> None:
        self._require()
        try:
            ips = validate_pod(pod)
        except ValueError as e:
            raise CaptureError(str(e)) from e
        if self.interfaces is not None and pod.host_ifname not in self.interfaces:
            raise CaptureError(f"pod {pod.name}: no interface {pod.host_ifname} in the node namespace")
        for other in self.pods.values():
            if other.host_ifname != pod.host_ifname and set(other.ips) & set(ips):
                raise CaptureError(f"pod {pod.name}: ip {sorted(set(other.ips) & set(ips))[0]} is already "
                                   f"enrolled on {other.host_ifname}")
        self.calls.append(f"enroll {pod.name}")
        self.pods[pod.host_ifname] = EnrolledPod(pod.name, pod.host_ifname, ips)

    def unenroll(self, pod: EnrolledPod) -> None:
        self._require()
        self.calls.append(f"unenroll {pod.name}")
        self.pods.pop(pod.host_ifname, None)

    def close(self) -> None:
        """What a crash leaves: pins, maps and rules stay; this process just lets go."""
        self.calls.append("close")
        self.installed = False

    def detach(self) -> None:
        self.calls.append("detach")
        self.installed = False
        self.listeners = {}
        self.rules_kept = bool(self.pods)

    def uninstall(self) -> None:
        self.calls.append("uninstall")
        self.installed = False
        self.listeners = {}
        self.pods = {}
        self.rules_kept = False

    def status(self) -> CaptureStatus:
        rules = [str(r) for p in self.pods.values() for r in pod_rules(self.table, p.host_ifname, p.ips)]
        return CaptureStatus(
            attached=self.installed,
            pin_dir=self.pin_dir,
            table=self.table,
            hbone_port=abi.HBONE_PORT if self.installed else None,
            listeners={k: v is not None for k, v in self.listeners.items()},
            pod_ips={ip: p.host_ifname for p in self.pods.values() for ip in p.ips},
            rules=sorted(rules),
            table_route=self.installed or bool(self.pods),
        )


def _conforms(c: CaptureBackend) -> None:  # static check that the fake implements the Protocol
    pass


_conforms(FakeCapture())
