"""The agent's side of traffic capture: listener sockets, enrollment, original destinations.

Two modes:

* ``bpf``: bpf.capture (sk_lookup + policy routing, bpf/README.md). The agent opens its three
  listeners with IP_TRANSPARENT and hands their fds over; each enrolled local pod is enrolled
  by its host-side interface, found from the node's route to the pod IP (a routed-veth CNI and
  the lab install one /32 route per pod). ``getsockname()`` of an accepted socket is the
  original destination. The anti-spoofing (a pod IP may only arrive on its own interface) is
  done by the program, so the peer IP identifies the source pod.
* ``none``: nothing is steered. The agent only receives connections addressed to its own
  listeners. For tests on loopback, ``static`` captures declare "connections accepted on
  LISTEN are treated as captured with original destination ORIG"; everything after that is the
  same code path as real capture. Peer IPs are trusted as-is in this mode (no anti-spoofing):
  it is for tests and development, never for a node with untrusted pods.
"""

from __future__ import annotations

import abc
import ipaddress
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mesh.config import Workload
from tunnel.relay import reset_if_abandoned, set_keepalive

if TYPE_CHECKING:  # bpf.capture pulls in pyroute2: import it only where capture is used
    from bpf.capture import CaptureBackend, EnrolledPod

log = logging.getLogger("ztagent.capture")

SOL_IP = 0
IP_TRANSPARENT = 19
SOL_IPV6 = 41
IPV6_TRANSPARENT = 75

Address = tuple[str, int]


@dataclass(frozen=True)
class StaticCapture:
    """Connections accepted on ``listen`` are handled as if captured towards ``original`` by the
    ``role`` listener: "outbound" (15001, from a local pod) or "inbound" (15006, plaintext from
    outside the mesh to a local pod)."""

    listen: Address
    original: Address
    role: str = "outbound"

    @classmethod
    def parse(cls, text: str) -> StaticCapture:
        """``[out:|in:]LISTEN=ORIG``, both ``ip:port`` (e.g. ``in:127.0.0.1:0=10.244.1.2:80``)."""
        role = "outbound"
        for prefix, r in (("out:", "outbound"), ("in:", "inbound")):
            if text.startswith(prefix):
                role, text = r, text[len(prefix) :]
        left, sep, right = text.partition("=")
        if not sep:
            raise ValueError(f"static capture {text!r}: expected [out:|in:]LISTEN_IP:PORT=ORIGINAL_IP:PORT")
        return cls(parse_address(left, "listen"), parse_address(right, "original destination"), role)


def parse_address(text: str, what: str = "address") -> Address:
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} {text!r}: expected IP:PORT")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{what} {text!r}: {host!r} is not an IP address") from None
    return host, int(port)


def make_listener(
    host: str, port: int, *, transparent: bool, backlog: int = 1024, app_facing: bool = False
) -> socket.socket:
    """A listening TCP socket; ``transparent`` sets IP_TRANSPARENT (answers for foreign addresses).

    Every listener gets TCP keepalive; ``app_facing`` ones (15001, 15006) also SO_LINGER 0, so an
    app's connection is reset, not closed cleanly, if the agent dies. Accepted sockets inherit
    both from the listener."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            if family == socket.AF_INET:
                sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
            else:
                sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        set_keepalive(sock)
        if app_facing:
            reset_if_abandoned(sock)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def host_interface_for(ip: str) -> str | None:
    """The node-side interface the node routes ``ip`` through (the pod's host veth), or None."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=ip)
        except Exception:  # no route: the pod is not wired to this node (yet)
            return None
        for r in routes:
            oif = r.get_attr("RTA_OIF")
            if oif is None:
                continue
            links = ipr.get_links(oif)
            if links:
                name = links[0].get_attr("IFLA_IFNAME")
                return str(name) if name else None
    return None


class Capture(abc.ABC):
    """How traffic reaches this agent's listeners: a typed backend per mode.

    ``steers_traffic`` decides the agent's listener layout: when the kernel steers pod traffic
    to the agent, it listens once on wildcard IP_TRANSPARENT sockets; when nothing steers, it
    serves HBONE on each local pod IP itself (tests, development)."""

    mode: str
    steers_traffic: bool

    @property
    def transparent(self) -> bool:
        """Whether sockets may bind non-local (original source) addresses."""
        return self.steers_traffic

    def install(self) -> None:  # noqa: B027 - a no-op unless the capture steers traffic
        """Attach (idempotent); raises with a message that names what is missing."""

    def set_listeners(  # noqa: B027 - a no-op unless the capture steers traffic
        self, outbound: socket.socket | None, inbound: socket.socket | None, hbone: socket.socket | None
    ) -> None:
        """Hand the listening sockets to the steering program."""

    def sync(self, workloads: Sequence[Workload]) -> None:  # noqa: B027 - as install
        """Enroll exactly ``workloads`` (the local enrolled ones); failures are kept per workload."""

    @abc.abstractmethod
    def ready(self) -> tuple[bool, str]: ...

    @abc.abstractmethod
    def status(self) -> dict[str, Any]: ...

    def stop(self) -> None:  # noqa: B027 - as install
        """Clean stop (see KernelCapture.stop)."""


class NullCapture(Capture):
    """``--capture none``: nothing is steered; connections reach the agent only when addressed to
    its listeners (static captures on loopback, tests). Peer IPs are trusted as-is."""

    mode = "none"
    steers_traffic = False

    def ready(self) -> tuple[bool, str]:
        return True, "disabled (--capture none): nothing is steered to the agent"

    def status(self) -> dict[str, Any]:
        return {"mode": self.mode, "state": "disabled", "detail": self.ready()[1], "enrolled": []}


class KernelCapture(Capture):
    """``--capture bpf``: bpf.capture (sk_lookup + policy routing); owns the backend and tracks
    what is enrolled."""

    mode = "bpf"
    steers_traffic = True

    def __init__(self, node: str, *, backend: CaptureBackend | None = None, hbone_port: int = 15008) -> None:
        self.node = node
        self.hbone_port = hbone_port
        self._backend = backend
        self.installed = False
        self.listeners_set = False
        self.error: str | None = None
        self.enrolled: dict[str, EnrolledPod] = {}  # workload key -> pod
        self.enroll_errors: dict[str, str] = {}

    @property
    def backend(self) -> CaptureBackend:
        assert self._backend is not None, "capture not installed"
        return self._backend

    def install(self) -> None:
        if self._backend is None:
            from bpf.capture import Capture as BpfCapture
            from bpf.capture import default_pin_dir

            self._backend = BpfCapture(default_pin_dir(self.node), hbone_port=self.hbone_port)
        try:
            self._backend.install()
        except Exception as exc:
            self.error = f"install failed: {exc}"
            raise
        self.installed = True

    def set_listeners(
        self, outbound: socket.socket | None, inbound: socket.socket | None, hbone: socket.socket | None
    ) -> None:
        self.backend.set_listeners(
            outbound.fileno() if outbound else None,
            inbound.fileno() if inbound else None,
            hbone.fileno() if hbone else None,
        )
        self.listeners_set = True

    def sync(self, workloads: Sequence[Workload]) -> None:
        """Enroll exactly ``workloads`` (the local enrolled ones); failures are kept per workload."""
        from bpf.capture import EnrolledPod

        wanted = {w.key: w for w in workloads}
        for key in list(self.enrolled):
            if key not in wanted:
                pod = self.enrolled.pop(key)
                try:
                    self.backend.unenroll(pod)
                    log.info(f"unenrolled {key}", extra={"event": "capture_unenrolled", "workload": key})
                except Exception as exc:
                    self.enroll_errors[key] = f"unenroll failed: {exc}"
                    log.error(
                        f"unenroll {key} failed: {exc}", extra={"event": "capture_error", "workload": key}
                    )
        for key, w in wanted.items():
            ips = tuple(str(ip) for ip in w.ips if ip.version == 4)
            try:
                ifname = self._ifname(ips)
            except Exception as exc:
                self.enroll_errors[key] = f"cannot find the pod's interface: {exc}"
                log.error(
                    f"cannot enroll {key}: {self.enroll_errors[key]}",
                    extra={"event": "capture_error", "workload": key},
                )
                continue
            pod = EnrolledPod(key, ifname, ips)
            if self.enrolled.get(key) == pod:
                continue
            try:
                if key in self.enrolled:
                    self.backend.unenroll(self.enrolled.pop(key))
                self.backend.enroll(pod)
            except Exception as exc:
                self.enroll_errors[key] = str(exc)
                log.error(f"cannot enroll {key}: {exc}", extra={"event": "capture_error", "workload": key})
                continue
            self.enrolled[key] = pod
            self.enroll_errors.pop(key, None)
            log.info(
                f"enrolled {key} on {ifname}",
                extra={"event": "capture_enrolled", "workload": key, "interface": ifname, "ips": list(ips)},
            )

    def _ifname(self, ips: tuple[str, ...]) -> str:
        finder = getattr(self._backend, "host_ifname_for", None)
        if finder is not None:
            return str(finder(ips))
        name = host_interface_for(ips[0]) if ips else None
        if name is None:
            raise LookupError(f"no route to {ips[0] if ips else '(no IPv4 address)'} in the node namespace")
        return name

    def ready(self) -> tuple[bool, str]:
        if not self.installed:
            return False, self.error or "eBPF capture not installed"
        if not self.listeners_set:
            return False, "listeners not handed to the capture program"
        if self.enroll_errors:
            return False, "; ".join(f"{k}: {v}" for k, v in sorted(self.enroll_errors.items()))
        return True, f"attached, {len(self.enrolled)} pods enrolled"

    def status(self) -> dict[str, Any]:
        ok, detail = self.ready()
        out: dict[str, Any] = {
            "mode": self.mode,
            "state": "attached" if ok else "not-ready",
            "detail": detail,
            "enrolled": sorted(self.enrolled),
        }
        if self._backend is not None and self.installed:
            try:
                st = self._backend.status()
                out["kernel"] = {
                    "attached": st.attached,
                    "listeners": st.listeners,
                    "podIps": st.pod_ips,
                    "counters": st.counters,
                }
            except Exception as exc:
                out["kernel"] = {"error": str(exc)}
        return out

    def stop(self) -> None:
        """Clean stop: detach the program and drop its maps and pins (the capture contract's
        ``detach``), keeping the routing rules, so enrolled pods' TCP keeps ending at the node with
        no listener: it fails instead of leaking, until a restarted agent installs again. A crash
        leaves the pins instead; the restart then reuses them."""
        if self._backend is not None and self.installed:
            try:
                self._backend.detach()
            except Exception as exc:
                log.error(f"capture detach failed: {exc}", extra={"event": "capture_error"})
            close = getattr(self._backend, "close", None)
            if close is not None:
                close()


def make_capture(
    mode: str, node: str, *, backend: CaptureBackend | None = None, hbone_port: int = 15008
) -> Capture:
    """The capture for ``--capture MODE``; ValueError for an unknown mode."""
    if mode == "bpf":
        return KernelCapture(node, backend=backend, hbone_port=hbone_port)
    if mode == "none":
        return NullCapture()
    raise ValueError(f"capture mode {mode!r}: expected bpf or none")
