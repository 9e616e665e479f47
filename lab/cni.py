"""`ztagent lab up --cni ptp|bridge`: pods made by Debian's real CNI plugins, as a runtime makes them.

Instead of the lab's own veth wiring (lab/topology.py), each pod's network comes from a real
conflist on its node: ``ptp`` (routed veth, Calico-like) or ``bridge`` (a ``cni0`` Linux bridge
holding the gateway), both with ``host-local`` IPAM over the node's podCIDR, and ``ztagent-cni``
chained after them by ``cni.install`` exactly as the DaemonSet's init container does on a node.
The plugins are exec'd by :class:`CniRuntime` the way SPEC.md 1.0.0 section 3 says a runtime
does (libcni; Debian ships no ``cnitool``), inside the node's namespace, with the kubelet's
``CNI_ARGS`` (``K8S_POD_NAMESPACE``, ``K8S_POD_NAME``, ...) plus ``IP=<the config's IP>`` so that
host-local hands out the address the mesh config names.

Pods are added only once the node agents serve their CNI sockets: the agent enrolls each pod
during its ADD, before the runtime gets a result (cni/README.md). Per node, under the lab's
directory: ``cni/<node>/{bin,net.d,ipam,cache}`` and the agent's socket ``cni/<node>/cni.sock``.

    CniRuntime(conflist, cni_path, cache_dir, node_netns).add(Attachment(...)) -> result
    .check(att); .delete(att)       # DEL in reverse order with the cached result

The runtime: ADD runs ``plugins`` in order; each gets the plugin object minus ``capabilities``,
plus the list's ``cniVersion`` and ``name``, ``runtimeConfig`` (the capabilities it declares that
the runtime supplies) and, from the second plugin on, ``prevResult``. The first error halts. The
final result is cached on disk (needed for CHECK and DEL). DEL runs the plugins in reverse with the
cached result as ``prevResult`` (none if ADD failed), then drops the cache; CHECK runs them in order,
unless ``disableCheck``.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REF_PLUGINS = "/usr/lib/cni"
SHAPES = ("ptp", "bridge")
BRIDGE_NAME = "cni0"


class CniPluginError(Exception):
    def __init__(self, plugin: str, command: str, error: dict[str, Any], stderr: str) -> None:
        super().__init__(f"{plugin} {command} failed: {error} (stderr: {stderr.strip()})")
        self.plugin = plugin
        self.command = command
        self.error = error
        self.stderr = stderr

    @property
    def code(self) -> int:
        return int(self.error.get("code", -1))


@dataclass(frozen=True)
class Attachment:
    container_id: str
    netns: str | None
    ifname: str = "eth0"
    args: tuple[tuple[str, str], ...] = ()  # CNI_ARGS pairs
    capability_args: dict[str, Any] = field(default_factory=dict)

    def cni_args(self) -> str:
        return ";".join(f"{k}={v}" for k, v in self.args)


@dataclass
class CniRuntime:
    conflist: dict[str, Any]
    cni_path: list[str]
    cache_dir: Path
    node_netns: str | None = None
    timeout_s: float = 60.0
    timings: list[tuple[str, str, float]] = field(default_factory=list)  # (plugin, command, seconds)

    @classmethod
    def from_conf_dir(cls, conf_dir: Path, **kw: Any) -> CniRuntime:
        """Load the network configuration the way containerd does: the first file by name."""
        files = sorted(p for p in conf_dir.iterdir() if p.suffix in (".conf", ".conflist", ".json"))
        if not files:
            raise FileNotFoundError(f"no network configuration in {conf_dir}")
        obj = json.loads(files[0].read_text())
        if "plugins" not in obj:  # a single-plugin .conf is a one-entry list (libcni ConfListFromConf)
            obj = {"cniVersion": obj["cniVersion"], "name": obj["name"], "plugins": [obj]}
        return cls(conflist=obj, **kw)

    @property
    def name(self) -> str:
        return str(self.conflist["name"])

    def _cache(self, att: Attachment) -> Path:
        return self.cache_dir / f"{self.name}-{att.container_id}-{att.ifname}.json"

    def cached_result(self, att: Attachment) -> dict[str, Any] | None:
        p = self._cache(att)
        return json.loads(p.read_text()) if p.exists() else None

    def _find(self, ptype: str) -> str:
        for d in self.cni_path:
            exe = os.path.join(d, ptype)
            if os.access(exe, os.X_OK):
                return exe
        raise FileNotFoundError(f"failed to find plugin {ptype!r} in path {self.cni_path}")

    def _derive(self, plugin: dict[str, Any], att: Attachment, prev: dict[str, Any] | None) -> dict[str, Any]:
        conf = {k: v for k, v in plugin.items() if k != "capabilities"}
        conf["cniVersion"] = self.conflist["cniVersion"]
        conf["name"] = self.name
        caps = plugin.get("capabilities") or {}
        runtime_config = {k: v for k, v in att.capability_args.items() if caps.get(k)}
        if runtime_config:
            conf["runtimeConfig"] = runtime_config
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def _exec(self, command: str, plugin: dict[str, Any], att: Attachment,
              prev: dict[str, Any] | None) -> dict[str, Any] | None:
        ptype = plugin["type"]
        exe = self._find(ptype)
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": att.container_id,
            "CNI_IFNAME": att.ifname,
            "CNI_ARGS": att.cni_args(),
            "CNI_PATH": ":".join(self.cni_path),
        }
        if att.netns is not None:
            env["CNI_NETNS"] = att.netns
        argv = [exe] if self.node_netns is None else ["ip", "netns", "exec", self.node_netns, exe]
        stdin = json.dumps(self._derive(plugin, att, prev)).encode()
        t0 = time.perf_counter()
        p = subprocess.run(argv, input=stdin, env=env, capture_output=True, timeout=self.timeout_s)
        self.timings.append((ptype, command, time.perf_counter() - t0))
        out, err = p.stdout.decode(), p.stderr.decode()
        if p.returncode != 0:
            try:
                error = json.loads(out)
            except ValueError:
                error = {"code": -1, "msg": f"exit {p.returncode}, stdout is no error result", "details": out}
            raise CniPluginError(ptype, command, error, err)
        if command != "ADD":
            return None
        result: dict[str, Any] = json.loads(out)
        return result

    def add(self, att: Attachment) -> dict[str, Any]:
        prev: dict[str, Any] | None = None
        for plugin in self.conflist["plugins"]:
            prev = self._exec("ADD", plugin, att, prev)
        assert prev is not None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._cache(att).with_suffix(".tmp")
        tmp.write_text(json.dumps(prev))
        tmp.replace(self._cache(att))
        return prev

    def check(self, att: Attachment) -> None:
        if self.conflist.get("disableCheck"):
            return
        prev = self.cached_result(att)
        if prev is None:
            raise RuntimeError("CHECK for an attachment that was not added (a runtime must not do that)")
        for plugin in self.conflist["plugins"]:
            self._exec("CHECK", plugin, att, prev)

    def delete(self, att: Attachment) -> None:
        prev = self.cached_result(att)
        for plugin in reversed(self.conflist["plugins"]):
            self._exec("DEL", plugin, att, prev)
        self._cache(att).unlink(missing_ok=True)


# --- the lab's use of it -----------------------------------------------------------------------------


def primary_config(shape: str, pod_cidr: str, ipam_dir: str) -> tuple[str, dict[str, Any]]:
    """The node's own network configuration (before ztagent-cni is chained into it)."""
    ipam = {"type": "host-local", "ranges": [[{"subnet": pod_cidr}]], "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": ipam_dir}
    if shape == "ptp":
        return "10-ptp.conf", {"cniVersion": "1.0.0", "name": "ztlab-ptp", "type": "ptp", "ipMasq": False,
                               "ipam": ipam}
    if shape == "bridge":
        return "10-bridge.conflist", {"cniVersion": "1.0.0", "name": "ztlab-bridge", "plugins": [
            {"type": "bridge", "bridge": BRIDGE_NAME, "isGateway": True, "ipMasq": False, "ipam": ipam}]}
    raise ValueError(f"CNI shape {shape!r}: expected one of {', '.join(SHAPES)}")


def node_dir(lab_dir: str, node: str) -> Path:
    return Path(lab_dir) / "cni" / node


def socket_path(lab_dir: str, node: str) -> str:
    return str(node_dir(lab_dir, node) / "cni.sock")


def prepare_node(lab_dir: str, node: str, netns: str, shape: str, pod_cidr: str | None,
                 python: str = "/usr/bin/python3") -> dict[str, Any]:
    """Write the node's primary config and chain ztagent-cni into it with cni.install; returns the
    node's CNI record for the lab state."""
    from cni import install

    if not pod_cidr:
        raise ValueError(f"node {node}: --cni needs a podCIDR (host-local hands out pod IPs from it)")
    missing = [p for p in ("ptp", "bridge", "host-local") if not os.access(f"{REF_PLUGINS}/{p}", os.X_OK)]
    if missing:
        raise FileNotFoundError(f"CNI plugins {missing} not in {REF_PLUGINS}: apt-get install "
                                "containernetworking-plugins (scripts/setup.sh does)")
    d = node_dir(lab_dir, node)
    dirs = {k: d / k for k in ("bin", "net.d", "ipam", "cache")}
    for p in dirs.values():
        p.mkdir(parents=True, exist_ok=True)
    fname, conf = primary_config(shape, pod_cidr, str(dirs["ipam"]))
    (dirs["net.d"] / fname).write_text(json.dumps(conf, indent=2))
    sock = socket_path(lab_dir, node)
    install.install(dirs["bin"], dirs["net.d"], install.plugin_entry(sock, 20.0),
                    python if os.path.exists(python) else install.DEFAULT_PYTHON)
    return {"shape": shape, "dir": str(d), "socket": sock, "netns": netns}


def runtime_for(node_cni: dict[str, Any]) -> CniRuntime:
    d = Path(node_cni["dir"])
    return CniRuntime.from_conf_dir(d / "net.d", cni_path=[str(d / "bin"), REF_PLUGINS],
                                    cache_dir=d / "cache", node_netns=str(node_cni["netns"]))


def pod_attachment(namespace: str, name: str, netns: str, ips: tuple[str, ...],
                   container_id: str | None = None) -> Attachment:
    """The attachment kubelet + containerd would make for a pod sandbox (CNI_ARGS as kubelet sets
    them), asking host-local for the config's address."""
    cid = container_id or f"ztlab{secrets.token_hex(8)}"
    args: list[tuple[str, str]] = [
        ("IgnoreUnknown", "1"), ("K8S_POD_NAMESPACE", namespace), ("K8S_POD_NAME", name),
        ("K8S_POD_INFRA_CONTAINER_ID", cid), ("K8S_POD_UID", f"uid-{cid}"),
    ]
    if ips:
        args.append(("IP", ",".join(ips)))
    return Attachment(container_id=cid, netns=f"/run/netns/{netns}", args=tuple(args))


def host_ifname_of(result: dict[str, Any], bridge: str = BRIDGE_NAME) -> str:
    host = [i["name"] for i in result.get("interfaces", []) if not i.get("sandbox") and i["name"] != bridge]
    if len(host) != 1:
        raise ValueError(f"CNI result names {len(host)} host veths: {result.get('interfaces')}")
    return str(host[0])


def add_pod(state: Any, pod: Any) -> dict[str, Any]:
    """Create ``pod`` (a lab.topology.PodSpec) on its node through the node's CNI chain: a fresh
    network namespace, then ADD as a runtime. Recorded in the lab state before anything is made."""
    from lab.topology import _create_netns, pod_netns

    node_cni = state.nodes[pod.node].get("cni")
    if not node_cni:
        raise ValueError(f"node {pod.node} of lab {state.lab} has no CNI configuration (lab up --cni)")
    ns = pod_netns(state.lab, pod.namespace, pod.name)
    _create_netns(state, ns)
    att = pod_attachment(pod.namespace, pod.name, ns, pod.ips)
    state.pods[pod.ref] = {"netns": ns, "node": pod.node, "node_netns": node_cni["netns"],
                           "ips": list(pod.ips), "container_id": att.container_id, "cni": True}
    state.save()
    result = runtime_for(node_cni).add(att)
    state.pods[pod.ref]["host_ifname"] = host_ifname_of(result)
    state.save()
    return result


def delete_pod(state: Any, ref: str) -> None:
    """CNI DEL of a lab pod made by :func:`add_pod`, then its namespace goes."""
    from pyroute2 import netns as pyroute2_netns

    info = state.find_pod(ref)
    node_cni = state.nodes[info["node"]]["cni"]
    att = Attachment(container_id=info["container_id"], netns=f"/run/netns/{info['netns']}")
    runtime_for(node_cni).delete(att)
    if info["netns"] in pyroute2_netns.listnetns():
        pyroute2_netns.remove(info["netns"])
    key = next(k for k, v in state.pods.items() if v is info)
    del state.pods[key]
    state.save()
