"""The stand-in API server driven by the real clients: `kubectl` (Debian's package) and
lightkube (the agent's client library, chosen by bench/k8s_client_rss.py), plus raw HTTP where a
test pins a wire detail (event framing, Status bodies, continue tokens) that a client hides."""

from __future__ import annotations

import asyncio
import json
import pathlib
import shutil
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError as LightkubeApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ConfigMap, Pod, ServiceAccount

from tests.kubeapi import RunningApiServer, running

pytestmark = pytest.mark.timeout(120)

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl not installed (scripts/setup.sh installs it)"
)

AuthorizationPolicy = create_namespaced_resource(
    "security.istio.io", "v1", "AuthorizationPolicy", "authorizationpolicies"
)

POD_YAML = """\
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  nodeName: node-a
  containers:
  - name: web
    image: nginx:1.27
    ports: [{containerPort: 80}]
  - name: sidecar
    image: busybox:1.36
"""

# Istio YAML as users write it (security.istio.io/v1), applied verbatim.
ISTIO_YAML = """\
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
        ports: ["80"]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: shop
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: jwt
  namespace: shop
spec:
  selector:
    matchLabels: {app: web}
  jwtRules:
  - issuer: "https://issuer.example"
    jwksUri: "https://issuer.example/jwks.json"
"""


@pytest.fixture
async def api(tmp_path: pathlib.Path) -> AsyncIterator[RunningApiServer]:
    async with running(tmp_path, bookmark_interval=0.3) as a:
        ns = a.server.res("v1", "Namespace")
        a.server.create(ns, None, {"metadata": {"name": "shop"}})
        yield a


@pytest.fixture
async def kube(api: RunningApiServer) -> AsyncIterator[AsyncClient]:
    client = AsyncClient(config=KubeConfig.from_file(str(api.kubeconfig)))
    yield client
    await client.close()


async def kubectl(
    api: RunningApiServer, *args: str, stdin: str | None = None, check: bool = True
) -> tuple[int, str, str]:
    assert KUBECTL is not None
    proc = await asyncio.create_subprocess_exec(
        KUBECTL,
        "--kubeconfig",
        str(api.kubeconfig),
        "--cache-dir",
        str(api.kubeconfig.parent / "kcache"),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else None), 60)
    rc = proc.returncode
    assert rc is not None
    if check and rc != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({rc}): {err.decode()}")
    return rc, out.decode(), err.decode()


def _ssl(api: RunningApiServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(api.ca_file))


async def raw(
    api: RunningApiServer,
    method: str,
    path: str,
    body: Any = None,
    *,
    content_type: str = "application/json",
    token: str | None = None,
) -> tuple[int, Any, Any]:
    headers = {"Authorization": f"Bearer {token or api.token}", "Content-Type": content_type}
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, api.url + path, data=data, headers=headers, ssl=_ssl(api)) as r,
    ):
        return r.status, await r.json(content_type=None), r.headers


async def watch_lines(api: RunningApiServer, path: str, n: int, timeout: float = 10) -> list[dict[str, Any]]:
    """Reads n newline-delimited events of a raw watch stream (or up to its end)."""
    out: list[dict[str, Any]] = []
    async with (
        aiohttp.ClientSession() as s,
        s.get(api.url + path, headers={"Authorization": f"Bearer {api.token}"}, ssl=_ssl(api)) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/json"
        assert r.headers.get("Transfer-Encoding") == "chunked"

        async def read() -> None:
            async for line in r.content:
                if line.strip():
                    out.append(json.loads(line))
                    if len(out) >= n:
                        return

        await asyncio.wait_for(read(), timeout)
    return out


def _pod(name: str, ns: str = "shop", labels: dict[str, str] | None = None, node: str | None = None) -> Pod:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "busybox:1.36"}]}
    if node:
        spec["nodeName"] = node
    return Pod.from_dict({"metadata": {"name": name, "namespace": ns, "labels": labels or {}}, "spec": spec})


# --- kubectl -------------------------------------------------------------------------------------


@needs_kubectl
async def test_kubectl_discovery_and_version(api: RunningApiServer) -> None:
    _, out, _ = await kubectl(api, "version", "-o", "json")
    assert json.loads(out)["serverVersion"]["gitVersion"] == "v1.32.4"
    _, out, _ = await kubectl(api, "api-resources", "-o", "name")
    names = set(out.split())
    assert {
        "pods",
        "nodes",
        "services",
        "endpointslices.discovery.k8s.io",
        "tokenreviews.authentication.k8s.io",
        "authorizationpolicies.security.istio.io",
        "peerauthentications.security.istio.io",
        "requestauthentications.security.istio.io",
        "gateways.gateway.networking.k8s.io",
    } <= names
    _, out, _ = await kubectl(api, "get", "ns", "-o", "name")
    assert "namespace/default" in out.split() and "namespace/shop" in out.split()


@needs_kubectl
async def test_kubectl_apply_pod_then_reapply_is_a_strategic_patch(api: RunningApiServer) -> None:
    _, out, _ = await kubectl(api, "apply", "-f", "-", stdin=POD_YAML)
    assert "pod/web created" in out
    srv = api.server
    pod = srv.store.get(srv.res("v1", "Pod"), "shop/web")
    assert pod is not None
    assert pod["status"] == {"phase": "Pending", "qosClass": "BestEffort"}
    assert pod["spec"]["serviceAccountName"] == "default"  # defaulted, and the SA had to exist
    rv = pod["metadata"]["resourceVersion"]
    # Changing one container's image: kubectl sends a strategic merge patch keyed by container name.
    _, out, _ = await kubectl(api, "apply", "-f", "-", stdin=POD_YAML.replace("nginx:1.27", "nginx:1.28"))
    assert "pod/web configured" in out
    pod = srv.store.get(srv.res("v1", "Pod"), "shop/web")
    assert pod is not None
    assert [(c["name"], c["image"]) for c in pod["spec"]["containers"]] == [
        ("web", "nginx:1.28"),
        ("sidecar", "busybox:1.36"),
    ]
    assert int(pod["metadata"]["resourceVersion"]) > int(rv)
    assert any(m == "PATCH" and "/namespaces/shop/pods/web" in p for m, p in srv.requests)
    # A pod's spec is immutable apart from images & co: the server refuses, as a real one does.
    rc, _, err = await kubectl(
        api, "apply", "-f", "-", stdin=POD_YAML.replace("containerPort: 80", "containerPort: 81"), check=False
    )
    assert rc != 0 and "pod updates may not change fields" in err


@needs_kubectl
async def test_kubectl_apply_istio_yaml_verbatim(api: RunningApiServer) -> None:
    _, out, _ = await kubectl(api, "apply", "-f", "-", stdin=ISTIO_YAML)
    assert "authorizationpolicy.security.istio.io/allow-frontend created" in out
    assert "peerauthentication.security.istio.io/default created" in out
    assert "requestauthentication.security.istio.io/jwt created" in out
    _, out, _ = await kubectl(api, "get", "authorizationpolicy", "-n", "shop", "allow-frontend", "-o", "json")
    ap = json.loads(out)
    assert ap["spec"]["rules"][0]["from"][0]["source"]["principals"] == ["cluster.local/ns/shop/sa/frontend"]
    assert ap["metadata"]["generation"] == 1
    # Re-apply with a change: custom kinds get a JSON merge patch, and the generation moves.
    _, out, _ = await kubectl(
        api, "apply", "-f", "-", stdin=ISTIO_YAML.replace('ports: ["80"]', 'ports: ["8080"]')
    )
    assert "authorizationpolicy.security.istio.io/allow-frontend configured" in out
    _, out, _ = await kubectl(api, "get", "ap", "-n", "shop", "allow-frontend", "-o", "json")
    ap = json.loads(out)
    assert ap["spec"]["rules"][0]["to"][0]["operation"]["ports"] == ["8080"]
    assert ap["metadata"]["generation"] == 2
    # A typo is refused by strict field validation (kubectl's default) and changes nothing.
    rc, _, err = await kubectl(
        api, "apply", "-f", "-", stdin=ISTIO_YAML.replace("principals:", "principal:"), check=False
    )
    assert rc != 0 and 'unknown field "spec.rules[0].from[0].source.principal"' in err
    _, out, _ = await kubectl(api, "get", "ap", "-n", "shop", "allow-frontend", "-o", "json")
    assert json.loads(out)["metadata"]["generation"] == 2


@needs_kubectl
async def test_kubectl_label_patch_delete(api: RunningApiServer) -> None:
    await kubectl(api, "apply", "-f", "-", stdin=POD_YAML)
    await kubectl(api, "label", "-n", "shop", "pod", "web", "istio.io/dataplane-mode=ambient")
    _, out, _ = await kubectl(api, "get", "-n", "shop", "pod", "web", "-o", "jsonpath={.metadata.labels}")
    assert json.loads(out) == {"app": "web", "istio.io/dataplane-mode": "ambient"}
    await kubectl(api, "label", "-n", "shop", "pod", "web", "istio.io/dataplane-mode-")
    await kubectl(
        api,
        "patch",
        "-n",
        "shop",
        "pod",
        "web",
        "--type=json",
        "-p",
        '[{"op":"add","path":"/metadata/annotations","value":{"a":"b"}}]',
    )
    await kubectl(
        api,
        "patch",
        "-n",
        "shop",
        "pod",
        "web",
        "-p",
        '{"spec":{"containers":[{"name":"sidecar","image":"busybox:1.37"}]}}',
    )  # strategic (default)
    _, out, _ = await kubectl(api, "get", "-n", "shop", "pod", "web", "-o", "json")
    pod = json.loads(out)
    assert pod["metadata"]["labels"] == {"app": "web"}
    assert pod["metadata"]["annotations"]["a"] == "b"
    assert [c["image"] for c in pod["spec"]["containers"]] == ["nginx:1.27", "busybox:1.37"]
    # Status via the subresource only: a patch of the main resource leaves status alone.
    await kubectl(
        api, "patch", "-n", "shop", "pod", "web", "--type=merge", "-p", '{"status":{"phase":"Running"}}'
    )
    _, out, _ = await kubectl(api, "get", "-n", "shop", "pod", "web", "-o", "jsonpath={.status.phase}")
    assert out == "Pending"
    await kubectl(
        api,
        "patch",
        "-n",
        "shop",
        "pod",
        "web",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"phase":"Running","podIP":"10.1.0.5"}}',
    )
    _, out, _ = await kubectl(api, "get", "-n", "shop", "pod", "web", "-o", "jsonpath={.status.phase}")
    assert out == "Running"
    # A pod on a node is deleted gracefully: deletionTimestamp now, gone when the kubelet says so.
    await kubectl(api, "delete", "-n", "shop", "pod", "web", "--wait=false")
    _, out, _ = await kubectl(
        api, "get", "-n", "shop", "pod", "web", "-o", "jsonpath={.metadata.deletionTimestamp}"
    )
    assert out
    await kubectl(api, "delete", "-n", "shop", "pod", "web", "--grace-period=0", "--force")
    rc, _, err = await kubectl(api, "get", "-n", "shop", "pod", "web", check=False)
    assert rc != 0 and 'pods "web" not found' in err
    await kubectl(
        api,
        "create",
        "-f",
        "-",
        stdin="apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg, namespace: shop}\ndata: {k: v}\n",
    )
    _, out, _ = await kubectl(api, "delete", "-n", "shop", "configmap", "cfg")
    assert 'configmap "cfg" deleted' in out


@needs_kubectl
async def test_kubectl_get_watch(api: RunningApiServer, kube: AsyncClient) -> None:
    await kube.create(_pod("first"))
    assert KUBECTL is not None
    proc = await asyncio.create_subprocess_exec(
        KUBECTL,
        "--kubeconfig",
        str(api.kubeconfig),
        "--cache-dir",
        str(api.kubeconfig.parent / "kcache"),
        "get",
        "pods",
        "-n",
        "shop",
        "-w",
        "--output-watch-events",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        header = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert header.split()[:2] == [b"EVENT", b"NAME"]  # the server's Table columns, after EVENT
        first = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert first.split()[:2] == [b"ADDED", b"first"]  # the initial list
        for _ in range(100):  # kubectl lists, then opens its watch from the list's resourceVersion
            if api.server.open_watches:
                break
            await asyncio.sleep(0.05)
        await kube.create(_pod("second"))
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert line.split()[:2] == [b"ADDED", b"second"]
        await kube.delete(Pod, "second", namespace="shop")
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert line.split()[:2] == [b"DELETED", b"second"]
    finally:
        proc.terminate()
        await proc.wait()


# --- lightkube (the agent's client library) -------------------------------------------------------


async def test_lightkube_list_then_watch_from_resource_version(
    api: RunningApiServer, kube: AsyncClient
) -> None:
    for i in range(5):
        await kube.create(_pod(f"p{i}", labels={"app": "a"}))
    listing = kube.list(Pod, namespace="shop", chunk_size=2)  # three pages: continue tokens
    names = [p.metadata.name async for p in listing]
    assert names == [f"p{i}" for i in range(5)]
    rv = listing.resourceVersion
    assert sum(1 for m, p in api.server.requests if "continue=" in p) == 2
    # Changes after the list, then a watch from the list's revision sees exactly those, in order.
    await kube.patch(Pod, "p1", {"metadata": {"labels": {"app": "b"}}}, namespace="shop")
    await kube.delete(Pod, "p2", namespace="shop")
    await kube.create(_pod("p5"))
    events = []
    async for typ, obj in kube.watch(Pod, namespace="shop", resource_version=rv):
        events.append((typ, obj.metadata.name))
        if len(events) == 3:
            break
    assert events == [("MODIFIED", "p1"), ("DELETED", "p2"), ("ADDED", "p5")]


async def test_lightkube_watch_bookmarks(api: RunningApiServer, kube: AsyncClient) -> None:
    await kube.create(_pod("a"))
    rv = (await kube.get(Pod, "a", namespace="shop")).metadata.resourceVersion
    await kube.create(ConfigMap(metadata=ObjectMeta(name="other", namespace="shop")))
    # lightkube's AsyncClient.watch() does not expose allowWatchBookmarks; its request builder
    # does (the agent's source will wrap exactly this).
    br = kube._client.prepare_request(
        "list",
        res=Pod,
        namespace="shop",
        watch=True,
        params={"resourceVersion": rv, "allowWatchBookmarks": "true"},
    )
    seen = []
    async for typ, obj in kube._client.watch(br):
        seen.append((typ, obj.metadata.resourceVersion))
        break
    typ, bookmark_rv = seen[0]
    assert typ == "BOOKMARK"
    # The bookmark carries the global revision, past the ConfigMap write the pod watch never saw.
    assert int(bookmark_rv) == api.server.store.rv > int(rv)


async def test_lightkube_watch_from_compacted_revision_gets_410(
    api: RunningApiServer, kube: AsyncClient
) -> None:
    await kube.create(_pod("a"))
    old = (await kube.get(Pod, "a", namespace="shop")).metadata.resourceVersion
    await kube.create(_pod("b"))
    api.server.compact()
    with pytest.raises(LightkubeApiError) as exc:
        async for _ in kube.watch(Pod, namespace="shop", resource_version=old):
            pass
    assert exc.value.status.code == 410
    assert exc.value.status.reason == "Expired"
    assert "too old resource version" in (exc.value.status.message or "")


async def test_lightkube_watch_expired_mid_stream(api: RunningApiServer, kube: AsyncClient) -> None:
    rv = (await kube.create(_pod("a"))).metadata.resourceVersion

    async def breaker() -> None:
        while not api.server.open_watches:
            await asyncio.sleep(0.02)
        await kube.create(_pod("b"))
        await asyncio.sleep(0.1)
        api.server.expire_watches()

    task = asyncio.create_task(breaker())
    got = []
    with pytest.raises(LightkubeApiError) as exc:
        async for typ, obj in kube.watch(Pod, namespace="shop", resource_version=rv):
            got.append((typ, obj.metadata.name))
    await task
    assert got == [("ADDED", "b")]
    assert exc.value.status.code == 410


async def test_lightkube_tokenreview_and_token_request(api: RunningApiServer, kube: AsyncClient) -> None:
    from lightkube.resources.authentication_v1 import TokenReview

    await kube.create(ServiceAccount(metadata=ObjectMeta(name="ztagent", namespace="shop")))
    api.server.create(api.server.res("v1", "Node"), None, {"metadata": {"name": "node-a"}})
    pod = _pod("agent-1", node="node-a")
    pod.spec.serviceAccountName = "ztagent"
    pod = await kube.create(pod)
    token = api.server.issue_token("shop", "ztagent", ["ztagent-ca"], pod="agent-1")
    review = await kube.create(TokenReview.from_dict({"spec": {"token": token, "audiences": ["ztagent-ca"]}}))
    st = review.status
    assert st.authenticated is True
    assert st.audiences == ["ztagent-ca"]
    assert st.user.username == "system:serviceaccount:shop:ztagent"
    assert "system:serviceaccounts:shop" in st.user.groups
    node_uid = api.server.store.get(api.server.res("v1", "Node"), "node-a")["metadata"]["uid"]  # type: ignore[index]
    assert st.user.extra["authentication.kubernetes.io/pod-name"] == ["agent-1"]
    assert st.user.extra["authentication.kubernetes.io/pod-uid"] == [pod.metadata.uid]
    assert st.user.extra["authentication.kubernetes.io/node-name"] == ["node-a"]
    assert st.user.extra["authentication.kubernetes.io/node-uid"] == [node_uid]
    # The wrong audience is refused, and a token outlives its pod only until the pod is gone.
    review = await kube.create(TokenReview.from_dict({"spec": {"token": token, "audiences": ["other"]}}))
    assert not review.status.authenticated and "audiences" in review.status.error
    await kube.delete(Pod, "agent-1", namespace="shop", grace_period=0)
    review = await kube.create(TokenReview.from_dict({"spec": {"token": token, "audiences": ["ztagent-ca"]}}))
    assert not review.status.authenticated
    assert review.status.error == "[invalid bearer token, service account token has been invalidated]"


async def test_lightkube_custom_kind_and_conflict(api: RunningApiServer, kube: AsyncClient) -> None:
    ap = AuthorizationPolicy.from_dict(
        {"metadata": {"name": "deny", "namespace": "shop"}, "spec": {"action": "DENY", "rules": [{}]}}
    )
    created = await kube.create(ap)
    created.spec["action"] = "ALLOW"
    updated = await kube.replace(created)
    assert updated.spec["action"] == "ALLOW"
    created.spec["action"] = "AUDIT"  # stale resourceVersion
    with pytest.raises(LightkubeApiError) as exc:
        await kube.replace(created)
    assert exc.value.status.code == 409 and exc.value.status.reason == "Conflict"


# --- wire details (raw HTTP) ------------------------------------------------------------------------


async def test_unauthenticated_is_401_status(api: RunningApiServer) -> None:
    code, body, _ = await raw(api, "GET", "/api/v1/pods", token="wrong")
    assert code == 401
    assert body == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Unauthorized",
        "reason": "Unauthorized",
        "code": 401,
    }


async def test_watch_too_old_is_an_error_event_in_a_200_stream(api: RunningApiServer) -> None:
    srv = api.server
    srv.create(srv.res("v1", "Pod"), "shop", _pod("a").to_dict())
    srv.compact()
    events = await watch_lines(api, "/api/v1/namespaces/shop/pods?watch=1&resourceVersion=2", 1)
    assert events == [
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"too old resource version: 2 ({srv.store.rv})",
                "reason": "Expired",
                "code": 410,
            },
        }
    ]


async def test_watch_without_resource_version_starts_with_synthetic_adds(api: RunningApiServer) -> None:
    srv = api.server
    srv.create(srv.res("v1", "Pod"), "shop", _pod("a").to_dict())
    srv.create(srv.res("v1", "Pod"), "shop", _pod("b").to_dict())
    events = await watch_lines(api, "/api/v1/namespaces/shop/pods?watch=1&timeoutSeconds=1", 5)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "a"), ("ADDED", "b")]
    assert events[0]["object"]["kind"] == "Pod" and events[0]["object"]["apiVersion"] == "v1"


async def test_send_initial_events_ends_with_annotated_bookmark(api: RunningApiServer) -> None:
    srv = api.server
    srv.create(srv.res("v1", "Pod"), "shop", _pod("a").to_dict())
    events = await watch_lines(
        api,
        "/api/v1/namespaces/shop/pods?watch=1&sendInitialEvents=true"
        "&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true",
        2,
    )
    assert events[0]["type"] == "ADDED"
    assert events[1]["type"] == "BOOKMARK"
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    code, body, _ = await raw(api, "GET", "/api/v1/pods?watch=1&sendInitialEvents=true")
    assert code == 422 and body["reason"] == "Invalid"


async def test_label_selector_watch_sees_objects_leave_and_enter(api: RunningApiServer) -> None:
    srv = api.server
    pod_res = srv.res("v1", "Pod")
    srv.create(pod_res, "shop", _pod("a", labels={"istio.io/dataplane-mode": "ambient"}).to_dict())
    rv = str(srv.store.rv)

    async def relabel() -> None:
        while not srv.open_watches:
            await asyncio.sleep(0.02)
        srv.patch(
            pod_res,
            "shop",
            "a",
            "application/merge-patch+json",
            b'{"metadata":{"labels":{"istio.io/dataplane-mode":"none"}}}',
        )
        srv.patch(
            pod_res,
            "shop",
            "a",
            "application/merge-patch+json",
            b'{"metadata":{"labels":{"istio.io/dataplane-mode":"ambient"}}}',
        )

    task = asyncio.create_task(relabel())
    events = await watch_lines(
        api, f"/api/v1/pods?watch=1&labelSelector=istio.io%2Fdataplane-mode%3Dambient&resourceVersion={rv}", 2
    )
    await task
    assert [e["type"] for e in events] == ["DELETED", "ADDED"]
    # Leaving the selection is DELETED with the last state that matched, at the new revision.
    assert events[0]["object"]["metadata"]["labels"] == {"istio.io/dataplane-mode": "ambient"}
    assert int(events[0]["object"]["metadata"]["resourceVersion"]) == int(rv) + 1


async def test_dropped_watch_connection_is_cut_mid_stream(api: RunningApiServer) -> None:
    srv = api.server

    async def drop() -> None:
        while not srv.open_watches:
            await asyncio.sleep(0.02)
        srv.create(srv.res("v1", "Pod"), "shop", _pod("a").to_dict())
        await asyncio.sleep(0.1)
        assert srv.drop_watches() == 1

    task = asyncio.create_task(drop())
    with pytest.raises(aiohttp.ClientPayloadError):
        await watch_lines(api, f"/api/v1/pods?watch=1&resourceVersion={srv.store.rv}", 5)
    await task


async def test_list_continue_token_expires_with_410_and_an_inconsistent_token(api: RunningApiServer) -> None:
    srv = api.server
    for i in range(3):
        srv.create(srv.res("v1", "ConfigMap"), "shop", {"metadata": {"name": f"c{i}"}})
    code, page, _ = await raw(api, "GET", "/api/v1/namespaces/shop/configmaps?limit=1")
    assert code == 200 and [i["metadata"]["name"] for i in page["items"]] == ["c0"]
    assert page["metadata"]["remainingItemCount"] == 2
    assert "kind" not in page["items"][0]  # built-in list items carry no TypeMeta
    token = page["metadata"]["continue"]
    # The next page is consistent with the first: a write in between does not show up.
    srv.create(srv.res("v1", "ConfigMap"), "shop", {"metadata": {"name": "c0a"}})
    code, page2, _ = await raw(api, "GET", f"/api/v1/namespaces/shop/configmaps?limit=1&continue={token}")
    assert [i["metadata"]["name"] for i in page2["items"]] == ["c1"]
    srv.compact()
    code, body, _ = await raw(api, "GET", f"/api/v1/namespaces/shop/configmaps?limit=1&continue={token}")
    assert code == 410 and body["reason"] == "Expired" and body["code"] == 410
    assert body["metadata"]["continue"]
    code, body, _ = await raw(
        api, "GET", f"/api/v1/namespaces/shop/configmaps?limit=1&continue={token}&resourceVersion=5"
    )
    assert code == 400


async def test_selectors_and_their_errors(api: RunningApiServer) -> None:
    srv = api.server
    srv.create(srv.res("v1", "Pod"), "shop", _pod("on-a", node="node-a").to_dict())
    srv.create(srv.res("v1", "Pod"), "shop", _pod("on-b", node="node-b", labels={"x": "1"}).to_dict())
    code, body, _ = await raw(api, "GET", "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a")
    assert [i["metadata"]["name"] for i in body["items"]] == ["on-a"]
    code, body, _ = await raw(api, "GET", "/api/v1/pods?labelSelector=x%20in%20(1,2),!y")
    assert [i["metadata"]["name"] for i in body["items"]] == ["on-b"]
    code, body, _ = await raw(
        api, "GET", "/api/v1/pods?fieldSelector=metadata.name!%3Don-a,metadata.namespace%3Dshop"
    )
    assert [i["metadata"]["name"] for i in body["items"]] == ["on-b"]
    code, body, _ = await raw(api, "GET", "/api/v1/pods?fieldSelector=spec.foo%3Dx")
    assert code == 400 and body["message"] == "field label not supported: spec.foo"
    code, body, _ = await raw(api, "GET", "/api/v1/pods?labelSelector=a%20in%20b")
    assert code == 400 and body["reason"] == "BadRequest"


async def test_status_subresource_and_put_conflict(api: RunningApiServer) -> None:
    srv = api.server
    srv.create(srv.res("v1", "Pod"), "shop", _pod("a").to_dict())
    code, pod, _ = await raw(api, "GET", "/api/v1/namespaces/shop/pods/a")
    stale = json.loads(json.dumps(pod))
    pod["status"]["phase"] = "Running"
    pod["metadata"]["labels"] = {"changed": "yes"}
    code, after, _ = await raw(api, "PUT", "/api/v1/namespaces/shop/pods/a/status", pod)
    assert code == 200 and after["status"]["phase"] == "Running"
    assert after["metadata"].get("labels") == {}  # a status write changes status only
    code, body, _ = await raw(api, "PUT", "/api/v1/namespaces/shop/pods/a", stale)
    assert code == 409 and body["reason"] == "Conflict"
    assert body["details"] == {"name": "a", "kind": "pods"}


async def test_patch_types_offered_per_kind(api: RunningApiServer) -> None:
    srv = api.server
    srv.create(
        srv.res("security.istio.io/v1", "PeerAuthentication"),
        "shop",
        {"metadata": {"name": "p"}, "spec": {"mtls": {"mode": "STRICT"}}},
    )
    path = "/apis/security.istio.io/v1/namespaces/shop/peerauthentications/p"
    code, body, _ = await raw(
        api, "PATCH", path, {"spec": {}}, content_type="application/strategic-merge-patch+json"
    )
    assert code == 415 and body["reason"] == "UnsupportedMediaType"
    code, body, _ = await raw(api, "PATCH", path, b"spec: {}", content_type="application/apply-patch+yaml")
    assert code == 415
    code, body, _ = await raw(
        api,
        "PATCH",
        path,
        [{"op": "replace", "path": "/spec/mtls/mode", "value": "PERMISSIVE"}],
        content_type="application/json-patch+json",
    )
    assert code == 200 and body["spec"]["mtls"]["mode"] == "PERMISSIVE"


async def test_fault_hooks_delay_and_fail_next(api: RunningApiServer) -> None:
    api.server.faults.fail_next.append((429, "TooManyRequests"))
    code, _, headers = await raw(api, "GET", "/api/v1/pods")
    assert code == 429 and headers["Retry-After"] == "1"
    api.server.faults.delay = 0.3
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    code, _, _ = await raw(api, "GET", "/api/v1/pods")
    assert code == 200 and loop.time() - t0 >= 0.3


def test_subprocess_server_with_control_endpoint(tmp_path: pathlib.Path) -> None:
    from tests.kubeapi import ApiServerProcess

    with ApiServerProcess(tmp_path) as proc:
        assert proc.kubeconfig.exists()
        assert proc.control("drop_watches") == 0
        token = proc.control(
            "issue_token", namespace="default", serviceAccount="default", audiences=["ztagent-ca"]
        )
        assert token.count(".") == 2  # a JWT
        if KUBECTL:
            import subprocess

            out = subprocess.run(
                [
                    KUBECTL,
                    "--kubeconfig",
                    str(proc.kubeconfig),
                    "--cache-dir",
                    str(tmp_path / "kcache"),
                    "get",
                    "sa",
                    "-n",
                    "default",
                    "-o",
                    "name",
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
            assert out.split() == ["serviceaccount/default"]


async def test_endpointslice_controller_follows_services_and_pods(
    api: RunningApiServer, kube: AsyncClient
) -> None:
    from lightkube.resources.core_v1 import Service
    from lightkube.resources.discovery_v1 import EndpointSlice

    srv = api.server
    pod_res = srv.res("v1", "Pod")
    for name, node in (("web-1", "node-a"), ("web-2", "node-b")):
        pod = _pod(name, labels={"app": "web"}, node=node).to_dict()
        pod["spec"]["containers"][0]["ports"] = [{"name": "http", "containerPort": 8080}]
        srv.create(pod_res, "shop", pod)
    await kube.create(
        Service.from_dict(
            {
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {
                    "selector": {"app": "web"},
                    "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
                },
            }
        )
    )
    # The kubelet's part: IPs and readiness through the status subresource.
    for i, name in enumerate(("web-1", "web-2")):
        status = {
            "status": {
                "phase": "Running",
                "podIP": f"10.1.0.{i + 1}",
                "podIPs": [{"ip": f"10.1.0.{i + 1}"}],
                "conditions": [{"type": "Ready", "status": "True" if i == 0 else "False"}],
            }
        }
        srv.patch(
            pod_res,
            "shop",
            name,
            "application/merge-patch+json",
            json.dumps(status).encode(),
            subresource="status",
        )
    await asyncio.sleep(0.05)  # the controller runs on the next loop iteration, as a separate process would
    slices = [
        s
        async for s in kube.list(
            EndpointSlice, namespace="shop", labels={"kubernetes.io/service-name": "web"}
        )
    ]
    assert len(slices) == 1
    es = slices[0]
    assert es.addressType == "IPv4"
    assert es.metadata.labels["endpointslice.kubernetes.io/managed-by"] == "endpointslice-controller.k8s.io"
    assert [(p.name, p.port, p.protocol) for p in es.ports] == [("http", 8080, "TCP")]
    eps = {e.targetRef.name: e for e in es.endpoints}
    assert eps["web-1"].addresses == ["10.1.0.1"] and eps["web-1"].conditions.ready is True
    assert eps["web-2"].conditions.ready is False and eps["web-2"].nodeName == "node-b"
    # Relabelled out of the selector: gone from the slice.
    srv.patch(
        pod_res, "shop", "web-2", "application/merge-patch+json", b'{"metadata":{"labels":{"app":"x"}}}'
    )
    await asyncio.sleep(0.05)
    es = await kube.get(EndpointSlice, es.metadata.name, namespace="shop")
    assert [e.targetRef.name for e in es.endpoints] == ["web-1"]
    await kube.delete(Service, "web", namespace="shop")
    await asyncio.sleep(0.05)
    assert [s async for s in kube.list(EndpointSlice, namespace="shop")] == []
