"""The lab plays the kubelet: its nodes and pods registered in an API server as Node and Pod
objects with their status (addresses, IPs, phase), the way a kubelet reports them, so the CA and
the agents can run in Kubernetes mode (``--config-source kubernetes``) against that server.

What a real cluster would hold for a lab's MeshConfig (:func:`cluster_objects`, pure):
Namespaces and ServiceAccounts of its workloads; one Node per lab node (``spec.podCIDR``,
``status.addresses`` InternalIP); one Pod per workload, on its node, labelled as the workload is
and with ``istio.io/dataplane-mode`` ``ambient`` or ``none`` for its enrollment; one host-network
agent Pod per node (``ztagent-system/ztagent-<node>``, service account ``ztagent``: what the
DaemonSet runs, and what the agent's projected token is bound to); the Services; and the Istio
policies verbatim. :class:`LabKubelet` writes them (create, then ``/status`` as a kubelet does)
and removes the pods as a kubelet does at the end (deletion with grace 0).

Not wired into ``ztagent lab up --kubernetes`` yet: the runner (lab/runner.py, cli/commands/lab.py)
has to start the CA and the agents with the Kubernetes flags and give the node namespaces a route
to the API server.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Final

from lightkube import Client, KubeConfig
from lightkube.codecs import from_dict
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Node, Pod
from lightkube.types import PatchType

import sources.kubernetes  # noqa: F401  (registers the Istio and Gateway kinds with lightkube)
from mesh.model import Snapshot, thaw

AGENT_NAMESPACE: Final = "ztagent-system"
AGENT_SERVICE_ACCOUNT: Final = "ztagent"
DATAPLANE_MODE: Final = "istio.io/dataplane-mode"
IMAGE: Final = "ztagent.io/lab-pod:netns"  # a network namespace, not an image: nothing pulls it


def agent_pod_name(node: str) -> str:
    return f"ztagent-{node}"


def cluster_objects(cfg: Snapshot) -> list[dict[str, Any]]:
    """Every object, in creation order (namespaces and service accounts before pods)."""
    out: list[dict[str, Any]] = []
    namespaces = {AGENT_NAMESPACE, *(w.namespace for w in cfg.workloads)}
    namespaces |= {s.namespace for s in cfg.services} | {p.namespace for p in cfg.policies}
    out += [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}} for ns in sorted(namespaces)]
    accounts = {
        (AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT),
        *((w.namespace, w.service_account) for w in cfg.workloads),
    }
    for ns, sa in sorted(accounts):
        out.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}})
    for n in cfg.nodes:
        spec: dict[str, Any] = {}
        if n.pod_cidr is not None:
            spec = {"podCIDR": str(n.pod_cidr), "podCIDRs": [str(n.pod_cidr)]}
        meta = {"name": n.name, "labels": {"kubernetes.io/hostname": n.name}}
        out.append({"apiVersion": "v1", "kind": "Node", "metadata": meta, "spec": spec})
        out.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": agent_pod_name(n.name), "namespace": AGENT_NAMESPACE,
                         "labels": {"app.kubernetes.io/name": "ztagent"}},
            "spec": {"nodeName": n.name, "hostNetwork": True, "serviceAccountName": AGENT_SERVICE_ACCOUNT,
                     "containers": [{"name": "ztagent", "image": IMAGE}]},
        })  # fmt: skip
    for w in cfg.workloads:
        labels = {**dict(w.labels), DATAPLANE_MODE: "ambient" if w.enrolled else "none"}
        out.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": w.name, "namespace": w.namespace, "labels": labels},
            "spec": {"nodeName": w.node, "serviceAccountName": w.service_account,
                     "containers": [{"name": "app", "image": IMAGE}]},
        })  # fmt: skip
    for s in cfg.services:
        ports = [{"port": p.port, "targetPort": p.target_port, "protocol": p.protocol,
                  **({"name": p.name} if p.name else {})} for p in s.ports]  # fmt: skip
        spec = {"selector": dict(s.selector), "ports": ports}
        if s.vips:
            spec["clusterIP"] = str(s.vips[0])
            spec["clusterIPs"] = [str(v) for v in s.vips]
        out.append({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": s.name, "namespace": s.namespace}, "spec": spec})  # fmt: skip
    out += [thaw(p.raw) for p in cfg.policies]
    return out


def node_status(cfg: Snapshot, name: str) -> dict[str, Any]:
    """What a kubelet reports for its node."""
    node = cfg.node(name)
    if node is None:
        raise ValueError(f"node {name!r} is not in the lab")
    return {
        "addresses": [
            {"type": "InternalIP", "address": str(node.address)},
            {"type": "Hostname", "address": name},
        ],
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
    }


def pod_statuses(cfg: Snapshot) -> list[tuple[str, str, dict[str, Any]]]:
    """(namespace, name, status) for every pod: Running, its IPs, its node's address."""
    host = {n.name: str(n.address) for n in cfg.nodes}
    out = []
    for n in cfg.nodes:
        ip = host[n.name]
        out.append((AGENT_NAMESPACE, agent_pod_name(n.name), _running(ip, [ip])))
    for w in cfg.workloads:
        out.append((w.namespace, w.name, _running(host[w.node], [str(i) for i in w.ips])))
    return out


def _running(host_ip: str, ips: list[str]) -> dict[str, Any]:
    return {
        "phase": "Running",
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "podIP": ips[0],
        "podIPs": [{"ip": i} for i in ips],
        "conditions": [{"type": "Ready", "status": "True"}],
    }


class LabKubelet:
    """Writes a lab into an API server (sync lightkube: the lab runner is synchronous)."""

    def __init__(self, kubeconfig: str | os.PathLike[str]) -> None:
        self.client = Client(config=KubeConfig.from_file(os.fspath(kubeconfig)), field_manager="ztagent-lab")

    def register(self, cfg: Snapshot) -> None:
        """Create every object (an existing one is left as is), then report node and pod status."""
        for obj in cluster_objects(cfg):
            try:
                self.client.create(from_dict(obj))
            except ApiError as exc:
                if exc.status.code != 409:
                    raise
        for n in cfg.nodes:
            self.client.patch(Node.Status, n.name, {"status": node_status(cfg, n.name)},
                              patch_type=PatchType.MERGE)  # fmt: skip
        for ns, name, status in pod_statuses(cfg):
            self.client.patch(Pod.Status, name, {"status": status}, namespace=ns, patch_type=PatchType.MERGE)

    def unregister(self, cfg: Snapshot, pods: Iterable[tuple[str, str]] | None = None) -> None:
        """Delete the lab's pods as a kubelet does once they stopped (grace 0)."""
        refs = pods if pods is not None else [(ns, name) for ns, name, _ in pod_statuses(cfg)]
        for ns, name in refs:
            try:
                self.client.delete(Pod, name, namespace=ns, grace_period=0)
            except ApiError as exc:
                if exc.status.code != 404:
                    raise

    def close(self) -> None:
        self.client.close()
