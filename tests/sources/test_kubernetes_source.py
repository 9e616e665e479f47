"""KubernetesConfigSource against the stand-in API server (tests/kubeapi): real HTTPS, real
lightkube, real watch streams with bookmarks, drops and 410s, and real `kubectl apply`."""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import itertools
import pathlib
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from mesh.model import Kind, Snapshot, Upsert
from mesh.store import WorkloadStore
from sources.base import ChangeSet, ConfigSource, SourceEvent
from sources.kubernetes import KubernetesConfigSource
from tests.kubeapi import RunningApiServer, running

pytestmark = pytest.mark.timeout(90)

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed (scripts/setup.sh)")
TD = "cluster.local"


def res(api: RunningApiServer, kind: str) -> Any:
    table = {
        "Namespace": ("v1", "Namespace"),
        "Pod": ("v1", "Pod"),
        "ServiceAccount": ("v1", "ServiceAccount"),
        "Service": ("v1", "Service"),
        "EndpointSlice": ("discovery.k8s.io/v1", "EndpointSlice"),
        "Gateway": ("gateway.networking.k8s.io/v1", "Gateway"),
        "AuthorizationPolicy": ("security.istio.io/v1", "AuthorizationPolicy"),
    }
    return api.server.res(*table[kind])


def namespace(api: RunningApiServer, name: str, labels: dict[str, str] | None = None) -> None:
    api.server.create(res(api, "Namespace"), None, {"metadata": {"name": name, "labels": labels or {}}})


def service_account(api: RunningApiServer, ns: str, name: str) -> None:
    api.server.create(res(api, "ServiceAccount"), ns, {"metadata": {"name": name}})


def pod(
    api: RunningApiServer,
    ns: str,
    name: str,
    *,
    node: str,
    ip: str | None,
    host_ip: str,
    labels: dict[str, str] | None = None,
    sa: str = "default",
    host_network: bool = False,
    phase: str = "Running",
    ports: list[dict[str, Any]] | None = None,
) -> None:
    """Create a pod and report its status as the kubelet does (the lab plays the kubelet)."""
    spec: dict[str, Any] = {
        "nodeName": node,
        "serviceAccountName": sa,
        "containers": [{"name": "app", "image": "busybox:1.36", "ports": ports or []}],
    }
    if host_network:
        spec["hostNetwork"] = True
    api.server.create(res(api, "Pod"), ns, {"metadata": {"name": name, "labels": labels or {}}, "spec": spec})
    set_status(api, ns, name, phase=phase, ip=ip, host_ip=host_ip)


def set_status(
    api: RunningApiServer, ns: str, name: str, *, phase: str, ip: str | None, host_ip: str
) -> None:
    obj = copy.deepcopy(api.server._get(res(api, "Pod"), ns, name))
    status: dict[str, Any] = {"phase": phase, "hostIP": host_ip, "hostIPs": [{"ip": host_ip}]}
    if ip is not None:
        status.update(podIP=ip, podIPs=[{"ip": ip}])
    obj["status"] = status
    api.server.update(res(api, "Pod"), ns, name, obj, subresource="status")


def relabel(api: RunningApiServer, kind: str, ns: str | None, name: str, labels: dict[str, str]) -> None:
    obj = copy.deepcopy(api.server._get(res(api, kind), ns, name))
    obj["metadata"]["labels"] = labels
    api.server.update(res(api, kind), ns, name, obj)


def delete_pod(api: RunningApiServer, ns: str, name: str) -> None:
    api.server.delete(res(api, "Pod"), ns, name, {"gracePeriodSeconds": 0})


def base_cluster(api: RunningApiServer) -> None:
    """node-a and node-b, each with a host-network agent pod; shop (ambient) and plain."""
    namespace(api, "ztagent-system")
    service_account(api, "ztagent-system", "ztagent")
    for node, host in (("node-a", "192.168.50.1"), ("node-b", "192.168.50.2")):
        pod(api, "ztagent-system", f"ztagent-{node}", node=node, ip=host, host_ip=host, sa="ztagent",
            host_network=True)  # fmt: skip
    namespace(api, "shop", {"istio.io/dataplane-mode": "ambient"})
    namespace(api, "plain")
    service_account(api, "shop", "web")


def source_for(api: RunningApiServer, **kw: Any) -> KubernetesConfigSource:
    return KubernetesConfigSource(api.kubeconfig, trust_domain=TD, backoff=(0.05, 0.2), **kw)


async def eventually(pred: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.02)


class Follower:
    """What a role does with a source: a store fed by changes(), every event recorded."""

    def __init__(self, source: ConfigSource, snapshot: Snapshot, node: str = "node-a") -> None:
        self.source = source
        self.store = WorkloadStore(snapshot, node)
        self.events: list[SourceEvent] = []
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        async for ev in self.source.changes():
            self.events.append(ev)
            if isinstance(ev, ChangeSet):
                self.store.apply(ev.changes, source=ev.source, digest=ev.digest)

    def upserts(self, kind: Kind, key: str) -> list[Any]:
        return [
            c.obj
            for ev in self.events
            if isinstance(ev, ChangeSet)
            for c in ev.changes
            if isinstance(c, Upsert) and c.kind is kind and c.key == key
        ]

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        if self.task.done() and not self.task.cancelled() and self.task.exception():
            raise self.task.exception()  # type: ignore[misc]


@pytest.fixture
async def api(tmp_path: pathlib.Path) -> AsyncIterator[RunningApiServer]:
    async with running(tmp_path, bookmark_interval=0.3) as a:
        base_cluster(a)
        yield a


def same_mesh(a: Snapshot, b: Snapshot) -> bool:
    oa, ob = a.objects(), b.objects()
    return all(oa[k] == ob[k] for k in oa)


async def fresh(api: RunningApiServer) -> Snapshot:
    src = source_for(api)
    try:
        return await src.initial()
    finally:
        await src.close()


async def test_initial_snapshot(api: RunningApiServer) -> None:
    pod(api, "shop", "web-1", node="node-a", ip="10.244.1.5", host_ip="192.168.50.1", sa="web",
        labels={"app": "web"}, ports=[{"name": "http", "containerPort": 8080}])  # fmt: skip
    pod(api, "plain", "db", node="node-b", ip="10.244.2.7", host_ip="192.168.50.2", labels={"app": "db"})
    pod(api, "shop", "opted-out", node="node-b", ip="10.244.2.8", host_ip="192.168.50.2",
        labels={"istio.io/dataplane-mode": "none"})  # fmt: skip
    pod(api, "plain", "pending", node="node-b", ip=None, host_ip="192.168.50.2", phase="Pending")
    pod(api, "plain", "done", node="node-b", ip="10.244.2.9", host_ip="192.168.50.2", phase="Succeeded")
    api.server.create(res(api, "Service"), "shop", {
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    })  # fmt: skip
    src = source_for(api)
    try:
        snap = await src.initial()
    finally:
        await src.close()
    nodes = {n.name: n for n in snap.nodes}
    assert (
        nodes["node-a"].address == ipaddress.ip_address("192.168.50.1") and nodes["node-a"].pod_cidr is None
    )
    assert set(nodes) == {"node-a", "node-b"}
    ws = {w.key: w for w in snap.workloads}
    # host-network agents, a Pending pod without IP and a finished pod are not workloads
    assert set(ws) == {"shop/web-1", "plain/db", "shop/opted-out"}
    web = ws["shop/web-1"]
    assert (
        web.enrolled
        and web.node == "node-a"
        and str(web.spiffe_id) == "spiffe://cluster.local/ns/shop/sa/web"
    )
    assert web.ips == (ipaddress.ip_address("10.244.1.5"),) and dict(web.labels) == {"app": "web"}
    assert not ws["plain/db"].enrolled and not ws["shop/opted-out"].enrolled
    (svc,) = [s for s in snap.services if s.key == "shop/web"]
    assert svc.vips and svc.ports[0].port == 80 and svc.ports[0].target_port == 8080  # named port resolved
    assert snap.source == "k8s:Kubernetes" and snap.digest
    WorkloadStore(snap, "node-a")  # a store accepts it


async def test_pod_lifecycle_and_namespace_enrollment(api: RunningApiServer) -> None:
    src = source_for(api)
    f = Follower(src, await src.initial())
    try:
        pod(api, "shop", "web-1", node="node-a", ip="10.244.1.5", host_ip="192.168.50.1", sa="web",
            labels={"app": "web"})  # fmt: skip
        await eventually(lambda: f.store.by_name("shop", "web-1") is not None, what="pod created")
        w = f.store.by_name("shop", "web-1")
        assert w is not None and w.enrolled and [x.key for x in f.store.local_enrolled] == ["shop/web-1"]

        relabel(api, "Pod", "shop", "web-1", {"app": "web", "istio.io/dataplane-mode": "none"})
        await eventually(lambda: not f.store.local_enrolled, what="pod relabelled out of the mesh")
        w = f.store.by_name("shop", "web-1")
        assert w is not None and not w.enrolled and w.labels.get("istio.io/dataplane-mode") == "none"
        relabel(api, "Pod", "shop", "web-1", {"app": "web"})
        await eventually(lambda: bool(f.store.local_enrolled), what="pod back in the mesh")

        # Namespace enrollment toggled: every pod of it follows.
        relabel(api, "Namespace", None, "shop", {})
        await eventually(lambda: not f.store.local_enrolled, what="namespace un-enrolled")
        relabel(api, "Namespace", None, "shop", {"istio.io/dataplane-mode": "ambient"})
        await eventually(lambda: bool(f.store.local_enrolled), what="namespace enrolled")

        delete_pod(api, "shop", "web-1")
        await eventually(lambda: f.store.by_name("shop", "web-1") is None, what="pod deleted")
        assert same_mesh(f.store.snapshot, await fresh(api))
    finally:
        await f.stop()
        await src.close()


async def test_service_and_endpointslice(api: RunningApiServer) -> None:
    src = source_for(api)
    f = Follower(src, await src.initial())
    try:
        api.server.create(res(api, "Service"), "shop", {
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "http"}, {"name": "m", "port": 9090}]},
        })  # fmt: skip
        # No pod yet: the named port cannot be resolved, the numbered one is served; reported.
        await eventually(lambda: f.store.service("shop", "web") is not None, what="service")
        svc = f.store.service("shop", "web")
        assert svc is not None and [p.port for p in svc.ports] == [9090]
        assert "named port 'http'" in src.skipped["services/shop/web"]
        pod(api, "shop", "web-1", node="node-a", ip="10.244.1.5", host_ip="192.168.50.1", sa="web",
            labels={"app": "web"}, ports=[{"name": "http", "containerPort": 8080}])  # fmt: skip

        def resolved() -> bool:
            s = f.store.service("shop", "web")
            return s is not None and s.port(80) is not None

        await eventually(resolved, what="named target port resolved")
        svc = f.store.service("shop", "web")
        assert svc is not None
        p80 = svc.port(80)
        assert p80 is not None and p80.target_port == 8080
        assert [w.key for w in f.store.endpoints(svc)] == ["shop/web-1"]
        assert "services/shop/web" not in src.skipped
        api.server.delete(res(api, "Service"), "shop", "web", {})
        await eventually(lambda: f.store.service("shop", "web") is None, what="service deleted")
        assert same_mesh(f.store.snapshot, await fresh(api))
    finally:
        await f.stop()
        await src.close()


ISTIO_POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-frontend
  namespace: shop
spec:
  selector:
    matchLabels:
      app: web
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/frontend"]
    to:
    - operation:
        ports: ["8080"]
"""

BROKEN_POLICY = ISTIO_POLICY.replace('ports: ["8080"]', 'ports: ["not-a-port"]')


def kubectl(api: RunningApiServer, *args: str, stdin: str | None = None) -> str:
    assert KUBECTL is not None
    r = subprocess.run([KUBECTL, "--kubeconfig", str(api.kubeconfig), *args], input=stdin, text=True,
                       capture_output=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


@needs_kubectl
async def test_istio_policy_with_kubectl_apply(api: RunningApiServer, tmp_path: pathlib.Path) -> None:
    src = source_for(api)
    f = Follower(src, await src.initial())
    try:
        path = tmp_path / "policy.yaml"
        path.write_text(ISTIO_POLICY)
        await asyncio.to_thread(kubectl, api, "apply", "-f", str(path))
        key = "AuthorizationPolicy/shop/allow-frontend"
        await eventually(lambda: key in {p.key for p in f.store.snapshot.policies}, what="policy applied")
        (doc,) = [p for p in f.store.snapshot.policies if p.key == key]
        assert doc.raw["spec"]["action"] == "ALLOW" and doc.api_version == "security.istio.io/v1"
        assert "resourceVersion" not in doc.raw["metadata"]
        assert not f.store.stale_policies
        # A bad new version: the store keeps the last good one in force and says why.
        path.write_text(BROKEN_POLICY)
        await asyncio.to_thread(kubectl, api, "apply", "--validate=false", "-f", str(path))
        await eventually(lambda: key in f.store.stale_policies, what="bad policy kept at last good")
        assert "not-a-port" in str(f.store.stale_policies[key])
        path.write_text(ISTIO_POLICY)
        await asyncio.to_thread(kubectl, api, "apply", "-f", str(path))
        await eventually(lambda: not f.store.stale_policies, what="policy good again")
        await asyncio.to_thread(kubectl, api, "delete", "-f", str(path))
        await eventually(lambda: not f.store.snapshot.policies, what="policy deleted")
    finally:
        await f.stop()
        await src.close()


async def _churn(api: RunningApiServer, f: Follower, names: list[str], fault: Callable[[], object]) -> None:
    for i, name in enumerate(names):
        pod(api, "shop", name, node="node-a", ip=f"10.244.1.{10 + i}", host_ip="192.168.50.1", sa="web",
            labels={"app": "churn"})  # fmt: skip
        if i % 2 == 0:
            fault()
        await asyncio.sleep(0.05)
    await eventually(lambda: all(f.store.by_name("shop", n) is not None for n in names), what="all pods")


async def test_watch_dropped_mid_stream_loses_and_doubles_nothing(api: RunningApiServer) -> None:
    src = source_for(api)
    f = Follower(src, await src.initial())
    try:
        await eventually(lambda: api.server.open_watches >= 8, what="watches open")
        names = [f"churn-{i}" for i in range(6)]
        await _churn(api, f, names, api.server.drop_watches)
        delete_pod(api, "shop", names[0])
        api.server.drop_watches()
        await eventually(lambda: f.store.by_name("shop", names[0]) is None, what="delete after a drop")
        assert src.watch_restarts_total >= 3
        for n in names:  # exactly one Upsert per pod: the status write that made it a workload
            assert len(f.upserts(Kind.WORKLOAD, f"shop/{n}")) == 1, n
        assert same_mesh(f.store.snapshot, await fresh(api))
    finally:
        await f.stop()
        await src.close()


async def test_forced_410_relists_and_loses_and_doubles_nothing(api: RunningApiServer) -> None:
    src = source_for(api)
    f = Follower(src, await src.initial())
    try:
        await eventually(lambda: api.server.open_watches >= 8, what="watches open")
        names = [f"gone-{i}" for i in range(6)]

        def expire() -> None:
            api.server.compact()  # the resourceVersion the watch resumes from is now too old
            api.server.expire_watches()

        await _churn(api, f, names, expire)
        relabel(api, "Namespace", None, "shop", {})
        delete_pod(api, "shop", names[1])
        expire()
        await eventually(lambda: f.store.by_name("shop", names[1]) is None, what="delete across a 410")
        await eventually(lambda: not f.store.local_enrolled, what="namespace change across a 410")
        assert src.relists_total >= 1
        for n in names:
            ups = f.upserts(Kind.WORKLOAD, f"shop/{n}")
            # created enrolled, then un-enrolled by the namespace: never the same version twice
            assert all(a != b for a, b in itertools.pairwise(ups)), n
            assert len(ups) <= 2, (n, ups)
        assert same_mesh(f.store.snapshot, await fresh(api))
    finally:
        await f.stop()
        await src.close()


async def test_bookmarks_advance_the_resource_version(api: RunningApiServer) -> None:
    src = source_for(api, resources=("pods", "namespaces"))
    f = Follower(src, await src.initial())
    try:
        before = int(src.resource_versions["pods"])
        # Writes that the pod watch does not carry (a Service): only a bookmark moves its RV.
        api.server.create(
            res(api, "Service"), "plain", {"metadata": {"name": "x"}, "spec": {"ports": [{"port": 1}]}}
        )
        now = api.server.store.rv
        assert now > before
        await eventually(lambda: int(src.resource_versions["pods"]) >= now, what="bookmark")
        assert not [ev for ev in f.events if isinstance(ev, ChangeSet)]
    finally:
        await f.stop()
        await src.close()


async def test_unmappable_object_is_reported_once_and_skipped(api: RunningApiServer) -> None:
    src = source_for(api)
    f = Follower(src, await src.initial())
    try:
        api.server.create(res(api, "Gateway"), "shop", {
            "metadata": {"name": "waypoint", "labels": {"istio.io/waypoint-for": "everything"}},
            "spec": {"gatewayClassName": "istio-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
        })  # fmt: skip
        await eventually(lambda: "gateways/shop/waypoint" in src.skipped, what="gateway reported")
        assert "istio.io/waypoint-for" in src.skipped["gateways/shop/waypoint"]
        assert src.unmappable_total == 1
        relabel(api, "Gateway", "shop", "waypoint", {"istio.io/waypoint-for": "service"})
        # Still no address (no status, no Service): a different reason, reported once more.
        await eventually(
            lambda: "no address" in src.skipped.get("gateways/shop/waypoint", ""), what="re-report"
        )
        wp_svc = {"metadata": {"name": "waypoint"}, "spec": {"ports": [{"name": "mesh", "port": 15008}]}}
        api.server.create(res(api, "Service"), "shop", wp_svc)
        await eventually(lambda: f.store.waypoint("shop", "waypoint") is not None, what="waypoint mapped")
        wp = f.store.waypoint("shop", "waypoint")
        svc = f.store.service("shop", "waypoint")
        assert wp is not None and svc is not None and wp.addresses == svc.vips
        assert str(wp.spiffe_id) == "spiffe://cluster.local/ns/shop/sa/waypoint"
        assert "gateways/shop/waypoint" not in src.skipped and src.unmappable_total == 2
    finally:
        await f.stop()
        await src.close()


async def test_named_target_port_from_an_endpointslice(api: RunningApiServer) -> None:
    """No pod to resolve it: the slice's port of that name is the target (what kube-proxy uses)."""
    src = source_for(api)
    f = Follower(src, await src.initial())
    try:
        api.server.create(res(api, "Service"), "shop", {
            "metadata": {"name": "api"},
            "spec": {"selector": {"app": "api"},
                     "ports": [{"name": "grpc", "port": 50051, "targetPort": "grpc"}]},
        })  # fmt: skip
        await eventually(lambda: "services/shop/api" in src.skipped, what="unresolved port reported")
        api.server.create(res(api, "EndpointSlice"), "shop", {
            "metadata": {"name": "api-external", "labels": {
                "kubernetes.io/service-name": "api", "endpointslice.kubernetes.io/managed-by": "tests"}},
            "addressType": "IPv4",
            "ports": [{"name": "grpc", "port": 9999, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.244.9.9"]}],
        })  # fmt: skip

        def target() -> int | None:
            s = f.store.service("shop", "api")
            p = s.port(50051) if s is not None else None
            return p.target_port if p is not None else None

        await eventually(lambda: target() == 9999, what="port from the slice")
        assert "services/shop/api" not in src.skipped
        api.server.delete(res(api, "EndpointSlice"), "shop", "api-external", {})
        await eventually(lambda: target() is None, what="port left out again")
        assert same_mesh(f.store.snapshot, await fresh(api))
    finally:
        await f.stop()
        await src.close()
