"""deploy/ is valid Kubernetes and says what issue 15 asks of it.

- offline: every document against Kubernetes' own OpenAPI schemas (kubernetes-validate, strict:
  an unknown field fails), the Gateway against the structural schema the stand-in serves;
- kubectl: `apply -k deploy/` and `apply -f deploy/samples/` with --dry-run=client and
  --dry-run=server against the stand-in API server (tests/kubeapi), whose strict field validation
  uses the same schemas;
- the properties the manifests exist for: least-privilege RBAC, an unprivileged agent with the
  capabilities capture needs, the downward-API node name, an audience-bound projected token, the
  probes, the rollout and drain settings, a leader-free 2-replica CA."""

from __future__ import annotations

import asyncio
import copy
import pathlib
import shutil
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.kubeapi import RunningApiServer, openapi, running

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = openapi.K8S_SCHEMA_VERSION.removeprefix("v")
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl not installed (scripts/setup.sh installs it)"
)


def manifest_files() -> list[pathlib.Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def documents() -> Iterator[tuple[pathlib.Path, dict[str, Any]]]:
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


def by_kind(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in deploy/, found {len(found)}"
    return found[0]


def validate_offline(doc: dict[str, Any]) -> None:
    """Raises on a document that a real API server (with Istio's/Gateway API's CRDs) rejects."""
    api_version, kind = doc["apiVersion"], doc["kind"]
    if (api_version, kind) == ("gateway.networking.k8s.io/v1", "Gateway"):
        schema = {
            "$defs": openapi.definitions(),
            "$ref": "#/$defs/" + openapi.kind_definition(api_version, kind),
        }
        jsonschema.Draft202012Validator(schema).validate(doc)
        unknown = openapi.unknown_fields(copy.deepcopy(doc), openapi.schema_for(api_version, kind))
        if unknown:
            raise ValueError(f"unknown fields: {unknown}")
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_every_base_file() -> None:
    k = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    base = sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(k["resources"]) == base


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_documents_validate_against_kubernetes_schemas(path: pathlib.Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs
    for doc in docs:
        validate_offline(doc)


def test_offline_validation_catches_a_typo() -> None:
    ds = copy.deepcopy(by_kind("DaemonSet", "ztagent"))
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_offline(ds)
    gw = copy.deepcopy(by_kind("Gateway", "waypoint"))
    gw["spec"]["gatewayClass"] = gw["spec"].pop("gatewayClassName")
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_offline(gw)


# --- kubectl against the stand-in API server ---------------------------------------------------


@pytest.fixture
async def api(tmp_path: pathlib.Path) -> AsyncIterator[RunningApiServer]:
    async with running(tmp_path) as a:
        yield a


async def kubectl(api: RunningApiServer, *args: str) -> tuple[int, str, str]:
    assert KUBECTL is not None
    cache = str(api.kubeconfig.parent / "kcache")
    proc = await asyncio.create_subprocess_exec(
        KUBECTL, "--kubeconfig", str(api.kubeconfig), "--cache-dir", cache, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@needs_kubectl
async def test_kubectl_client_dry_run(api: RunningApiServer) -> None:
    rc, out, err = await kubectl(api, "apply", "--dry-run=client", "-k", "deploy/")
    assert rc == 0, err
    assert "daemonset.apps/ztagent created (dry run)" in out
    assert "deployment.apps/ztagent-ca created (dry run)" in out
    rc, out, err = await kubectl(api, "apply", "--dry-run=client", "-f", "deploy/samples/")
    assert rc == 0, err
    assert "gateway.gateway.networking.k8s.io/waypoint created (dry run)" in out
    assert api.server.store.count(api.server.res("apps/v1", "DaemonSet")) == 0  # nothing was written


@needs_kubectl
async def test_kubectl_server_dry_run_with_strict_field_validation(
    api: RunningApiServer, tmp_path: pathlib.Path
) -> None:
    # The namespaces must exist for a server-side dry run of what goes in them, as on a real server.
    for ns in ("deploy/namespace.yaml",):
        rc, _, err = await kubectl(api, "apply", "-f", ns)
        assert rc == 0, err
    rc, out, err = await kubectl(api, "apply", "--dry-run=server", "-k", "deploy/")
    assert rc == 0, err
    assert "daemonset.apps/ztagent created (server dry run)" in out
    srv = api.server
    srv.create(srv.res("v1", "Namespace"), None, {"metadata": {"name": "demo"}})
    rc, out, err = await kubectl(api, "apply", "--dry-run=server", "-f", "deploy/samples/")
    assert rc == 0, err
    assert srv.store.count(srv.res("apps/v1", "Deployment")) == 0
    # The same server refuses a manifest with a typo.
    bad = copy.deepcopy(by_kind("DaemonSet", "ztagent"))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    rc, _, err = await kubectl(api, "apply", "--dry-run=server", "-f", str(path))
    assert rc != 0 and 'unknown field "spec.template.spec.containers[0].securityContxt"' in err


# --- what the manifests are for ------------------------------------------------------------------


def _rules(role: str) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = by_kind("ClusterRole", role)["rules"]
    return rules


def _grants(role: str) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in _rules(role) for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}  # fmt: skip


def test_rbac_is_least_privilege() -> None:
    read = ("get", "list", "watch")
    agent_reads = {
        ("", "pods"),
        ("", "services"),
        ("", "namespaces"),
        ("discovery.k8s.io", "endpointslices"),
        ("gateway.networking.k8s.io", "gateways"),
        ("security.istio.io", "authorizationpolicies"),
        ("security.istio.io", "peerauthentications"),
        ("security.istio.io", "requestauthentications"),
    }
    assert _grants("ztagent-agent") == {(g, r, v) for g, r in agent_reads for v in read}
    assert _grants("ztagent-ca") == {
        (g, r, v) for g, r in {("", "pods"), ("", "namespaces")} for v in read
    } | {("authentication.k8s.io", "tokenreviews", "create")}
    for role in ("ztagent-agent", "ztagent-ca", "ztagent-waypoint"):
        for g, r, v in _grants(role):
            assert "*" not in (g, r, v), f"{role} has a wildcard"
            assert r != "secrets", f"{role} may read secrets"
    binding = by_kind("ClusterRoleBinding", "ztagent-agent")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ztagent", "namespace": "ztagent-system"}
    ]
    assert by_kind("ClusterRoleBinding", "ztagent-ca")["roleRef"]["name"] == "ztagent-ca"


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _args(container: dict[str, Any]) -> dict[str, str]:
    out = {}
    for a in container["args"]:
        if a.startswith("--"):
            k, _, v = a.partition("=")
            out[k] = v
    return out


def test_agent_daemonset() -> None:
    ds = by_kind("DaemonSet", "ztagent")
    pod = ds["spec"]["template"]["spec"]
    c = _container(ds)
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["serviceAccountName"] == "ztagent"
    sc = c["securityContext"]
    assert sc.get("privileged") is not True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == {"BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"}
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    args = _args(c)
    assert c["args"][0] == "run"
    assert args["--config-source"] == "kubernetes" and args["--node"] == "$(NODE_NAME)"
    assert args["--ca-auth"] == "token"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    # The token file the agent reads is an audience-bound projected token.
    token_dir = mounts["ca-credentials"]["mountPath"]
    sources = volumes["ca-credentials"]["projected"]["sources"]
    token = next(s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s)
    assert args["--token-path"] == f"{token_dir}/{token['path']}"
    assert token["audience"] == "ztagent-ca" and token["expirationSeconds"] <= 3600
    assert args["--ca-root-cert"].startswith(token_dir + "/")
    assert volumes["bpffs"]["hostPath"]["path"] == "/sys/fs/bpf"
    assert mounts["modules"]["readOnly"] is True and mounts["kernel-src"]["readOnly"] is True
    assert volumes["modules"]["hostPath"]["path"] == "/lib/modules"
    assert volumes["kernel-src"]["hostPath"]["path"] == "/usr/src"
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert "livenessProbe" in c
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    ann = ds["spec"]["template"]["metadata"]["annotations"]
    metrics_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "metrics")
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == metrics_port
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    assert "preStop" in c["lifecycle"]
    drain = float(args["--drain-timeout"])
    assert pod["terminationGracePeriodSeconds"] > drain


def test_ca_deployment_and_service() -> None:
    dep = by_kind("Deployment", "ztagent-ca")
    assert dep["spec"]["replicas"] >= 2
    c = _container(dep)
    args = _args(c)
    assert c["args"][:2] == ["ca", "serve"]
    assert args["--config-source"] == "kubernetes"
    assert args["--listen"].endswith(":15012")
    assert args["--node-auth"] == "token" and args["--token-audience"] == "ztagent-ca"
    pod = dep["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert volumes["ca"]["secret"]["secretName"] == "ztagent-ca"
    assert volumes["ca"]["secret"]["defaultMode"] == 0o400  # the CA refuses a key readable by others
    assert mounts["ca"]["mountPath"] == args["--dir"] and mounts["ca"]["readOnly"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["readinessProbe"]["httpGet"]["port"] == 15021
    svc = by_kind("Service", "ztagent-ca")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert [p["port"] for p in svc["spec"]["ports"]] == [15012]
    # The agent dials exactly this Service.
    assert _args(_container(by_kind("DaemonSet", "ztagent")))["--ca"] == "ztagent-ca.ztagent-system.svc:15012"


def test_sample_waypoint_is_an_istio_waypoint_gateway() -> None:
    gw = by_kind("Gateway", "waypoint")
    assert gw["spec"]["gatewayClassName"] == "istio-waypoint"
    assert gw["spec"]["listeners"] == [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]
    dep = by_kind("Deployment", "waypoint")
    assert dep["metadata"]["namespace"] == gw["metadata"]["namespace"]
    assert _container(dep)["args"][0] == "waypoint"
    ns = by_kind("Namespace", gw["metadata"]["namespace"])
    assert ns["metadata"]["labels"]["istio.io/use-waypoint"] == gw["metadata"]["name"]


@needs_kubectl
async def test_rbac_grants_exactly_what_the_roles_need(api: RunningApiServer, tmp_path: pathlib.Path) -> None:
    """deploy/ applied for real; then the agent's and the CA's own tokens against the stand-in's
    RBAC authorizer: their reads and the CA's TokenReview pass, anything else is 403."""
    from lightkube import AsyncClient, KubeConfig
    from lightkube.core.exceptions import ApiError
    from lightkube.generic_resource import create_namespaced_resource
    from lightkube.resources.authentication_v1 import TokenReview
    from lightkube.resources.core_v1 import Namespace, Node, Pod, Secret, Service
    from lightkube.resources.discovery_v1 import EndpointSlice

    from tests.kubeapi import write_kubeconfig

    rc, _, err = await kubectl(api, "apply", "-f", "deploy/namespace.yaml")
    assert rc == 0, err
    rc, _, err = await kubectl(api, "apply", "-k", "deploy/")
    assert rc == 0, err
    srv = api.server
    pod = srv.res("v1", "Pod")
    for name, sa in (("agent-1", "ztagent"), ("ca-1", "ztagent-ca")):
        srv.create(
            pod,
            "ztagent-system",
            {
                "metadata": {"name": name},
                "spec": {
                    "serviceAccountName": sa,
                    "nodeName": "node-a",
                    "containers": [{"name": "c", "image": "x:1"}],
                },
            },
        )

    def client_for(sa: str, pod_name: str) -> AsyncClient:
        token = srv.issue_token(
            "ztagent-system", sa, ["https://kubernetes.default.svc.cluster.local"], pod=pod_name
        )
        kc = write_kubeconfig(tmp_path / f"{sa}.kubeconfig", api.url, api.ca_file, token)
        return AsyncClient(config=KubeConfig.from_file(str(kc)))

    policy_kinds = [create_namespaced_resource("security.istio.io", "v1", k, p) for k, p in (
        ("AuthorizationPolicy", "authorizationpolicies"), ("PeerAuthentication", "peerauthentications"),
        ("RequestAuthentication", "requestauthentications"))]  # fmt: skip
    gateway = create_namespaced_resource("gateway.networking.k8s.io", "v1", "Gateway", "gateways")

    async def forbidden(coro: Any) -> None:
        with pytest.raises(ApiError) as exc:
            await coro
        assert exc.value.status.code == 403, exc.value.status

    agent = client_for("ztagent", "agent-1")
    try:
        for kind in (Pod, Service, EndpointSlice, gateway, *policy_kinds):
            [x async for x in agent.list(kind, namespace="*")]
        [x async for x in agent.list(Namespace)]
        async for _ in agent.watch(Pod, namespace="*", server_timeout=1):
            break
        await forbidden(agent.get(Secret, "ztagent-ca", namespace="ztagent-system"))
        await forbidden(agent.get(Node, "node-a"))
        await forbidden(agent.delete(Pod, "ca-1", namespace="ztagent-system"))
        await forbidden(agent.create(TokenReview.from_dict({"spec": {"token": "x"}})))
    finally:
        await agent.close()
    ca = client_for("ztagent-ca", "ca-1")
    try:
        [x async for x in ca.list(Pod, namespace="*")]
        review = await ca.create(TokenReview.from_dict({"spec": {"token": "x", "audiences": ["ztagent-ca"]}}))
        assert review.status.authenticated is not True
        await forbidden(ca.get(Secret, "ztagent-ca", namespace="ztagent-system"))
        await forbidden(_first(ca.list(Service, namespace="*")))
    finally:
        await ca.close()


async def _first(it: Any) -> Any:
    async for x in it:
        return x
    return None
