"""The node agent's side of ztagent-cni (cni/README.md): enroll pods the moment the runtime makes them.

The plugin (chained after the cluster's interface plugin) sends every ADD / DEL / CHECK over the
agent's Unix socket (``cni.server.CniServer``); :class:`CniEnrollment` is the ``CniHandler``.

ADD, in order, answering only once the outcome holds:

1. **Identify** the pod: namespace and name from the kubelet's ``CNI_ARGS``; the mesh config (the
   store) says whether it is enrolled, its identity and its IPs. What ADD answers when it cannot:

   - no ``K8S_POD_NAMESPACE``/``K8S_POD_NAME``: error (code 100). Not a Kubernetes pod: it cannot
     be named, so it is neither captured nor let run.
   - unknown to the config: error, retry (code 11). The config (or API) may not have caught up:
     the pod is held back until the config names it, enrolled or not.
   - placed on another node, or IPs that differ from the config's: error, retry. The config is
     wrong or late; a pod whose address is not its workload's would be taken for someone else.
     A config with no address for it yet (a Kubernetes source before kubelet reports the IP this
     ADD assigns) is not a mismatch: the runtime's addresses are enrolled.
   - ``enrolled: false``: not-enrolled. Decided: the pod is not in the mesh.

   A pod the agent cannot identify is therefore never captured *and* never started: no answer
   lets it run outside the mesh by default.
2. **Find its host interface** from the event's interfaces (the one without a sandbox that is a
   veth in this namespace, whose peer is the sandbox interface: checked, not guessed).
3. **Make sure its certificate exists** (fetched now if the config change that named it has not
   fetched it yet).
4. **Enroll it in capture** (``bpf.capture``: maps, rules, guard). On a bridge CNI the veth is then
   taken off the bridge and routed (``bpf.bridge``), so same-node traffic crosses the node's IP layer.
5. **Record** the attachment in a state file next to the socket, then answer ``enrolled``.

DEL undoes 4-5 (idempotent: an unknown attachment is ``not-enrolled``); CHECK verifies that the
attachment is still recorded, its veth present and enrolled.

**Reconciliation at start** (:meth:`CniEnrollment.reconcile`, before capture syncs, the socket is
served and readiness can turn green): recorded attachments whose network namespace or veth is gone
are dropped and un-enrolled (a recycled IP is never matched to a dead pod); pods that exist but are
not recorded (created while no agent or plugin was there) are found by scanning the runtime's
namespaces (``netns_dir``, default ``/var/run/netns``), matched to this node's workloads by their
IPs, and enrolled like an ADD.

Capture is driven through :class:`CniCapture`, a ``KernelCapture`` that enrolls only the config's
workloads the runtime has actually created (an attachment), on the interface the runtime reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

from agent.capture import Capture, KernelCapture
from cni.protocol import EnrollResult, PodEvent
from mesh.config import Workload
from mesh.store import WorkloadStore

if TYPE_CHECKING:
    from credentials.manager import CertificateManager

log = logging.getLogger("ztagent.cni")

DEFAULT_NETNS_DIR = "/var/run/netns"
STATE_NAME = "attachments.json"


@dataclass(frozen=True)
class PodAttachment:
    """One pod interface the runtime created and the agent has in capture (or decided about)."""

    container_id: str
    ifname: str
    netns: str | None
    workload: str  # "namespace/name"
    host_ifname: str
    ips: tuple[str, ...]
    bridge: str | None = None  # the bridge the veth was taken off (bridge CNIs)

    @property
    def key(self) -> tuple[str, str]:
        return (self.container_id, self.ifname)


class AgentView(Protocol):
    """What the handler needs of the node agent (``agent.supervisor.NodeAgent`` is one)."""

    node_name: str
    capture: Capture

    @property
    def store(self) -> WorkloadStore: ...

    @property
    def cert_manager(self) -> CertificateManager: ...


class Attachments:
    """The attachments, persisted to ``path`` (atomically, after every change)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.by_key: dict[tuple[str, str], PodAttachment] = {}

    def load(self) -> None:
        if self.path is None:
            return
        try:
            with open(self.path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            # Unreadable state: start empty; reconciliation still finds every pod by its netns.
            log.error(f"CNI attachment state {self.path} unreadable, rebuilding it: {exc}",
                      extra={"event": "cni_state_error"})
            return
        for item in raw.get("attachments", []):
            try:
                att = PodAttachment(**{**item, "ips": tuple(item["ips"])})
            except (TypeError, KeyError) as exc:
                log.error(f"CNI attachment state: skipping a bad entry {item!r}: {exc}")
                continue
            self.by_key[att.key] = att

    def save(self) -> None:
        if self.path is None:
            return
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o750, exist_ok=True)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"version": 1, "attachments": [asdict(a) for a in self.by_key.values()]}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def put(self, att: PodAttachment) -> None:
        self.by_key[att.key] = att
        self.save()

    def drop(self, key: tuple[str, str]) -> PodAttachment | None:
        att = self.by_key.pop(key, None)
        if att is not None:
            self.save()
        return att

    def for_workload(self, key: str) -> PodAttachment | None:
        # The newest attachment wins (a recreated sandbox before the old one's DEL).
        found = [a for a in self.by_key.values() if a.workload == key]
        return found[-1] if found else None


class CniCapture(KernelCapture):
    """Kernel capture that enrolls a config workload only once the runtime created it, on the
    interface the runtime reported (not found by a route: on a bridge the route names the bridge)."""

    def __init__(self, base: KernelCapture, attachments: Attachments, node_netns: str | None = None) -> None:
        super().__init__(base.node, backend=base._backend, hbone_port=base.hbone_port)
        self.attachments = attachments
        self.node_netns = node_netns
        self._routed: set[tuple[str, str]] = set()  # attachments whose veth is known to be off a bridge

    def sync(self, workloads: Sequence[Workload]) -> None:
        """Enroll the attached ones among ``workloads`` (also after a config change made a recorded
        pod enrolled), then route the veths of the enrolled ones off their bridges: only now, with
        rules and maps in place, so no frame of theirs is ever switched or routed uncaptured."""
        from bpf import bridge

        attached = []
        for w in workloads:
            att = self.attachments.for_workload(w.key)
            if att is None:
                continue
            if not any(ip.version == 4 for ip in w.ips):  # the config has no address yet: the runtime's
                w = dataclasses.replace(w, ips=tuple(ipaddress.ip_address(ip) for ip in att.ips))
            attached.append(w)
        super().sync(attached)
        self._routed &= set(self.attachments.by_key)
        for key in list(self.enrolled):
            att = self.attachments.for_workload(key)
            if att is None or att.key in self._routed:
                continue
            try:
                br = bridge.route_port(att.host_ifname, att.ips, self.node_netns)
            except Exception as exc:
                self.enroll_errors[key] = f"cannot route {att.host_ifname} off its bridge: {exc}"
                log.error(f"{key}: {self.enroll_errors[key]}",
                          extra={"event": "capture_error", "workload": key})
                continue
            if br is not None and br != att.bridge:
                self.attachments.put(PodAttachment(**{**asdict(att), "bridge": br}))
            self._routed.add(att.key)
            self.enroll_errors.pop(key, None)
        for key in list(self.enroll_errors):  # a pod the runtime no longer has is no readiness problem
            if self.attachments.for_workload(key) is None:
                del self.enroll_errors[key]

    def _ifname(self, ips: tuple[str, ...]) -> str:
        for att in self.attachments.by_key.values():
            if set(att.ips) & set(ips):
                return att.host_ifname
        raise LookupError(f"no pod attachment holds {list(ips)}")

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["cni"] = [
            {"workload": a.workload, "containerId": a.container_id, "ifname": a.ifname, "netns": a.netns,
             "hostInterface": a.host_ifname, "ips": list(a.ips), "bridge": a.bridge}
            for a in self.attachments.by_key.values()
        ]
        return out


def _ipv4(addresses: Sequence[str]) -> tuple[str, ...]:
    out = []
    for a in addresses:
        ip = ipaddress.ip_interface(a).ip
        if ip.version == 4:
            out.append(str(ip))
    return tuple(sorted(out))


class CniEnrollment:
    """The ``cni.server.CniHandler`` of the node agent (module docstring)."""

    def __init__(self, agent: AgentView, *, state_path: str | None, netns_dir: str = DEFAULT_NETNS_DIR,
                 node_netns: str | None = None) -> None:
        self.agent = agent
        self.netns_dir = netns_dir
        self.node_netns = node_netns  # None: this process's namespace (the agent runs in the node's)
        self.attachments = Attachments(state_path)
        self.capture: Capture = agent.capture
        if isinstance(agent.capture, KernelCapture):
            self.capture = CniCapture(agent.capture, self.attachments, node_netns)
        self.reconciled = False

    # -- identification -------------------------------------------------------------------------

    def _identify(self, ev: PodEvent) -> Workload | EnrollResult:
        ns, name = ev.pod.namespace, ev.pod.name
        if not ns or not name:
            return EnrollResult.error(
                f"container {ev.container_id} has no K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS: the "
                "node agent cannot identify it, so it is neither captured nor started (fail closed)")
        w = self.agent.store.by_name(ns, name)
        if w is None:
            return EnrollResult.error(
                f"pod {ns}/{name} is not in the mesh config (enrolled or not): held back until the "
                "config names it", retry=True)
        if w.node != self.agent.node_name:
            return EnrollResult.error(
                f"pod {ns}/{name}: the mesh config places it on node {w.node}, not {self.agent.node_name}",
                retry=True)
        got = _ipv4([p.address for p in ev.ips])
        want = tuple(sorted(str(ip) for ip in w.ips if ip.version == 4))
        if not got:
            return EnrollResult.error(f"pod {ns}/{name}: the runtime reported no IPv4 address for it")
        # No address in the config yet is what a Kubernetes source shows until kubelet reports the
        # pod's IP, which it learns from this very ADD: the runtime's addresses are enrolled then.
        if want and got != want:
            return EnrollResult.error(
                f"pod {ns}/{name}: the runtime gave it {list(got)}, the mesh config says {list(want)}: "
                "its traffic would be taken for another workload's", retry=True)
        return w

    def _host_port(self, ev: PodEvent) -> str | EnrollResult:
        from bpf import bridge

        if not ev.netns:
            return EnrollResult.error(f"container {ev.container_id}: ADD without a network namespace")
        nsid = bridge.netns_id(ev.netns, self.node_netns)
        if nsid is None:
            return EnrollResult.error(f"container {ev.container_id}: the node has no veth into the pod's "
                                      f"network namespace {ev.netns}", retry=True)
        candidates = [i.name for i in ev.interfaces if not i.sandbox]
        for name in candidates:
            port = bridge.host_port(name, self.node_netns)
            # The veth's other end is in the pod's namespace (checked from the node's side).
            if port is not None and port.kind == "veth" and port.peer_netnsid == nsid:
                return name
        return EnrollResult.error(
            f"container {ev.container_id}: none of the host interfaces the runtime reported "
            f"({', '.join(candidates) or 'none'}) is a veth into {ev.netns}")

    # -- CniHandler -----------------------------------------------------------------------------

    async def add(self, ev: PodEvent) -> EnrollResult:
        t0 = time.monotonic()
        res = await self._add(ev)
        log.info(f"CNI ADD {ev.pod.namespace}/{ev.pod.name}: {res.status} in "
                 f"{(time.monotonic() - t0) * 1e3:.1f} ms", extra={"event": "cni_add", "status": res.status})
        return res

    async def _add(self, ev: PodEvent) -> EnrollResult:
        if not self.reconciled:
            return EnrollResult.error("the node agent is still reconciling", retry=True)
        w = self._identify(ev)
        if isinstance(w, EnrollResult):
            return w
        host = self._host_port(ev)
        if not w.enrolled:
            if not isinstance(host, EnrollResult):
                # Recorded, so that a config change enrolling it later finds its interface.
                self.attachments.put(PodAttachment(ev.container_id, ev.ifname, ev.netns, w.key, host,
                                                   _ipv4([p.address for p in ev.ips])))
            return EnrollResult.not_enrolled(f"{w.key} is not enrolled in the mesh config")
        if isinstance(host, EnrollResult):
            return host
        problem = await self._ensure_certificate(w)
        if problem is not None:
            return problem
        att = PodAttachment(ev.container_id, ev.ifname, ev.netns, w.key, host,
                            _ipv4([p.address for p in ev.ips]))
        return self._enroll(att)

    async def _ensure_certificate(self, w: Workload) -> EnrollResult | None:
        certs = self.agent.cert_manager
        if w.spiffe_id not in certs.identities():
            await certs.add_identity(w.spiffe_id)
        try:
            certs.current(w.spiffe_id)
        except Exception as exc:
            return EnrollResult.error(f"no certificate for {w.spiffe_id} yet: {exc}", retry=True)
        return None

    def _enroll(self, att: PodAttachment) -> EnrollResult:
        t0 = time.monotonic()
        self.attachments.put(att)
        cap = self.capture
        if isinstance(cap, KernelCapture):
            cap.sync(self.agent.store.local_enrolled)  # maps, rules, guard; then off the bridge
            problem = cap.enroll_errors.get(att.workload)
            if att.workload not in cap.enrolled or problem:
                self.attachments.drop(att.key)
                cap.sync(self.agent.store.local_enrolled)
                return EnrollResult.error(f"{att.workload}: capture failed: {problem or 'not enrolled'}",
                                          retry=True)
            att = self.attachments.by_key.get(att.key, att)
        took = (time.monotonic() - t0) * 1e3
        log.info(f"CNI: {att.workload} enrolled on {att.host_ifname} in {took:.1f} ms"
                 + (f" (routed off bridge {att.bridge})" if att.bridge else ""),
                 extra={"event": "cni_enrolled", "workload": att.workload, "interface": att.host_ifname,
                        "container": att.container_id})
        return EnrollResult.enrolled(f"{att.workload} captured on {att.host_ifname}")

    async def del_(self, ev: PodEvent) -> EnrollResult:
        att = self.attachments.by_key.get(ev.key)
        if att is None:
            return EnrollResult.not_enrolled("no such attachment")
        self._forget(att)
        return EnrollResult.not_enrolled(f"{att.workload} un-enrolled")

    def _forget(self, att: PodAttachment) -> None:
        from bpf import bridge
        from bpf.capture import EnrolledPod

        self.attachments.drop(att.key)
        cap = self.capture
        if isinstance(cap, KernelCapture):
            still = self.attachments.for_workload(att.workload)
            cap.sync(self.agent.store.local_enrolled)
            if still is None and cap.installed:
                # Also what an earlier agent left in the pinned maps and rules (sync knows only its own).
                with contextlib.suppress(Exception):
                    cap.backend.unenroll(EnrolledPod(att.workload, att.host_ifname, att.ips))
            bridge.forget_port(att.bridge, att.ips, self.node_netns)
        log.info(f"CNI: {att.workload} un-enrolled ({att.host_ifname})",
                 extra={"event": "cni_unenrolled", "workload": att.workload, "container": att.container_id})

    async def check(self, ev: PodEvent) -> EnrollResult:
        from bpf import bridge

        att = self.attachments.by_key.get(ev.key)
        if att is None:
            w = self._identify(ev)
            if isinstance(w, EnrollResult):
                return w
            if not w.enrolled:
                return EnrollResult.not_enrolled(f"{w.key} is not enrolled in the mesh config")
            return EnrollResult.error(f"{w.key}: container {ev.container_id} is not in capture")
        known = self.agent.store.by_name(*att.workload.split("/", 1))
        if known is None or not known.enrolled:
            return EnrollResult.not_enrolled(f"{att.workload} is not enrolled in the mesh config")
        cap = self.capture
        if isinstance(cap, KernelCapture):
            if att.workload not in cap.enrolled:
                return EnrollResult.error(f"{att.workload} is recorded but not enrolled in capture")
            port = bridge.host_port(att.host_ifname, self.node_netns)
            if port is None or port.master is not None:
                return EnrollResult.error(f"{att.workload}: host interface {att.host_ifname} is "
                                          + ("gone" if port is None else f"back on bridge {port.master}"))
        return EnrollResult.enrolled(f"{att.workload} captured on {att.host_ifname}")

    # -- reconciliation -------------------------------------------------------------------------

    def reconcile(self) -> dict[str, list[str]]:
        """Drop attachments whose sandbox is gone, adopt pods that exist but are not recorded; then
        the caller syncs capture. Returns what it did (for the log and tests)."""
        from bpf import bridge

        self.attachments.load()
        dropped, adopted = [], []
        for att in list(self.attachments.by_key.values()):
            alive = bool(att.netns) and os.path.exists(str(att.netns))
            if alive:
                port = bridge.host_port(att.host_ifname, self.node_netns)
                nsid = bridge.netns_id(str(att.netns), self.node_netns)
                alive = port is not None and nsid is not None and port.peer_netnsid == nsid
            if not alive:
                self._forget(att)
                dropped.append(f"{att.workload} ({att.container_id})")
        adopted = self._adopt_unrecorded()
        self.reconciled = True
        if isinstance(self.capture, KernelCapture):
            self.capture.sync(self.agent.store.local_enrolled)
        log.info(f"CNI reconciled: {len(self.attachments.by_key)} attachments, dropped {dropped or 'none'}, "
                 f"adopted {adopted or 'none'}", extra={"event": "cni_reconciled"})
        return {"dropped": dropped, "adopted": adopted}

    def _adopt_unrecorded(self) -> list[str]:
        """Pods that exist but were never ADDed through us: each node veth into a namespace under
        ``netns_dir`` whose addresses are a local workload's. The addresses come from the
        node's /32 routes (routed CNIs) or, for a bridge port, from inside the pod's namespace
        (setns: needs CAP_SYS_ADMIN; skipped with a log line where it is not granted)."""
        from bpf import bridge

        known = {os.path.realpath(a.netns) for a in self.attachments.by_key.values() if a.netns}
        try:
            entries = sorted(os.listdir(self.netns_dir))
        except FileNotFoundError:
            return []
        by_nsid: dict[int, str] = {}
        for entry in entries:
            path = os.path.join(self.netns_dir, entry)
            nsid = bridge.netns_id(path, self.node_netns) if os.path.realpath(path) not in known else None
            if nsid is not None:
                by_nsid.setdefault(nsid, path)
        # Not-enrolled pods too: recorded, a later config change can enroll them where they are.
        store = self.agent.store
        local = {str(ip): w for w in store.on_node(store.local_node) for ip in w.ips if ip.version == 4}
        have = {a.workload for a in self.attachments.by_key.values()}
        adopted = []
        for port in bridge.veths(self.node_netns):
            pod_ns = by_nsid.get(port.peer_netnsid) if port.peer_netnsid is not None else None
            if pod_ns is None:
                continue
            ips = bridge.direct_ips(port.ifindex, self.node_netns)
            if not ips and port.master is not None:
                try:
                    ips = [ip for found in bridge.sandbox_ipv4(pod_ns).values() for ip in found]
                except OSError as exc:
                    log.warning(f"CNI reconcile: cannot read the addresses in {pod_ns} ({exc}); "
                                f"a pod behind {port.ifname} is not adopted")
                    continue
            owners = {local[ip].key for ip in ips if ip in local}
            if len(owners) != 1:
                continue
            w = next(local[ip] for ip in ips if ip in local)
            if w.key in have:
                continue
            att = PodAttachment(f"netns:{os.path.basename(pod_ns)}", "eth0", pod_ns, w.key, port.ifname,
                                tuple(str(ip) for ip in w.ips if ip.version == 4))
            self.attachments.put(att)
            have.add(w.key)
            adopted.append(f"{w.key} ({pod_ns})")
        return adopted


def state_path_for(socket_path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(socket_path)) or ".", STATE_NAME)
