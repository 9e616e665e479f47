"""The one kube-controller-manager loop the mesh depends on: the EndpointSlice controller. A real
cluster always runs it, so a client (the agent, the lab playing the kubelet) never writes
EndpointSlices for Services with a selector; here it keeps them as that controller does:
one slice per Service (label kubernetes.io/service-name, managed-by endpointslice-controller),
an endpoint per pod that matches the selector and has an IP, with ready/serving/terminating
conditions, nodeName and targetRef, and the Service's ports resolved against the pods' container
ports. Simplifications: one IPv4 slice per Service (the real one splits at 100 endpoints), named
target ports resolved per pod only when all pods agree."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from .resources import BY_PATH
from .store import Event, object_key

if TYPE_CHECKING:
    from .server import KubeApiServer

MANAGED_BY = "endpointslice-controller.k8s.io"

_SVC = BY_PATH[("", "v1", "services")]
_POD = BY_PATH[("", "v1", "pods")]
_SLICE = BY_PATH[("discovery.k8s.io", "v1", "endpointslices")]


def _ready(pod: dict[str, Any]) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


def _target_port(port: dict[str, Any], pods: list[dict[str, Any]]) -> int | None:
    target = port.get("targetPort", port.get("port"))
    if isinstance(target, int):
        return target
    found = set()
    for pod in pods:
        for c in pod["spec"].get("containers", []):
            for p in c.get("ports", []):
                if p.get("name") == target and p.get("protocol", "TCP") == port.get("protocol", "TCP"):
                    found.add(p["containerPort"])
    return found.pop() if len(found) == 1 else None


class EndpointSliceController:
    def __init__(self, server: KubeApiServer) -> None:
        self.server = server
        self._dirty: set[tuple[str, str]] = set()
        self._scheduled = False

    def on_event(self, ev: Event) -> None:
        if ev.resource is _SVC:
            self._mark(ev.obj["metadata"]["namespace"], ev.obj["metadata"]["name"])
        elif ev.resource is _POD:
            ns = ev.obj["metadata"]["namespace"]
            for svc in self.server.store.scan(_SVC, self.server.store.rv, prefix=ns + "/"):
                self._mark(ns, svc["metadata"]["name"])
        elif ev.resource is _SLICE and ev.type == "DELETED":
            svc_name = (ev.obj["metadata"].get("labels") or {}).get("kubernetes.io/service-name")
            if svc_name:
                self._mark(ev.obj["metadata"]["namespace"], svc_name)

    def _mark(self, ns: str, name: str) -> None:
        self._dirty.add((ns, name))
        if not self._scheduled:
            self._scheduled = True
            import asyncio

            try:
                asyncio.get_running_loop().call_soon(self.sync)
            except RuntimeError:  # no loop yet (the server's own start-up objects): sync now
                self.sync()

    def sync(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, set()
        for ns, name in sorted(dirty):
            self._reconcile(ns, name)

    def _slices(self, ns: str, name: str) -> list[dict[str, Any]]:
        return [
            s
            for s in self.server.store.scan(_SLICE, self.server.store.rv, prefix=ns + "/")
            if (s["metadata"].get("labels") or {}).get("kubernetes.io/service-name") == name
            and (s["metadata"].get("labels") or {}).get("endpointslice.kubernetes.io/managed-by")
            == MANAGED_BY
        ]

    def _reconcile(self, ns: str, name: str) -> None:
        store = self.server.store
        svc = store.get(_SVC, object_key(ns, name))
        existing = self._slices(ns, name)
        selector = (svc or {}).get("spec", {}).get("selector")
        if svc is None or not selector or svc["metadata"].get("deletionTimestamp"):
            for s in existing:
                store.delete(_SLICE, object_key(ns, s["metadata"]["name"]))
            return
        pods = [
            p
            for p in store.scan(_POD, store.rv, prefix=ns + "/")
            if all((p["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
            and (p.get("status") or {}).get("podIP")
            and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
        ]
        endpoints = []
        for p in pods:
            terminating = bool(p["metadata"].get("deletionTimestamp"))
            ready = _ready(p)
            ep: dict[str, Any] = {
                "addresses": [p["status"]["podIP"]],
                "conditions": {
                    "ready": ready and not terminating,
                    "serving": ready,
                    "terminating": terminating,
                },
                "targetRef": {
                    "kind": "Pod",
                    "namespace": ns,
                    "name": p["metadata"]["name"],
                    "uid": p["metadata"]["uid"],
                },
            }
            if p["spec"].get("nodeName"):
                ep["nodeName"] = p["spec"]["nodeName"]
            endpoints.append(ep)
        ports = []
        for sp in svc["spec"].get("ports", []):
            port: dict[str, Any] = {"name": sp.get("name", ""), "protocol": sp.get("protocol", "TCP")}
            target = _target_port(sp, pods)
            if target is not None:
                port["port"] = target
            if sp.get("appProtocol"):
                port["appProtocol"] = sp["appProtocol"]
            ports.append(port)
        body: dict[str, Any] = {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "labels": {"kubernetes.io/service-name": name,
                           "endpointslice.kubernetes.io/managed-by": MANAGED_BY},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name,
                                     "uid": svc["metadata"]["uid"], "controller": True,
                                     "blockOwnerDeletion": True}],
            },
            "addressType": "IPv4", "endpoints": endpoints, "ports": ports,
        }  # fmt: skip
        if not existing:
            body["metadata"]["generateName"] = f"{name}-"
            self.server.create(_SLICE, ns, body)
            return
        first, extra = existing[0], existing[1:]
        for s in extra:
            store.delete(_SLICE, object_key(ns, s["metadata"]["name"]))
        new = copy.deepcopy(first)
        new["metadata"]["labels"] = {**(first["metadata"].get("labels") or {}), **body["metadata"]["labels"]}
        new["metadata"]["ownerReferences"] = body["metadata"]["ownerReferences"]
        new["endpoints"], new["ports"] = endpoints, ports
        if new != first:
            self.server.update(_SLICE, ns, first["metadata"]["name"], new)
