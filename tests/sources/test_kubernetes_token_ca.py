"""Token bootstrap against the stand-in API server: the CA in Kubernetes mode (its own pod watch,
TokenReview of the caller's projected token) and the agent's token-mode CA client, real TLS and
real gRPC both ways; and `ztagent ca serve` with the flags deploy/ca.yaml uses, as a process."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from caserver import store as ca_store
from caserver.server import CaServer
from caserver.tokenauth import KubernetesTokenReviewer, node_of_review
from credentials.client import CaClientError, TokenCaClient, TokenCredentials
from credentials.identities import CA_SERVER_NAME
from credentials.proto import ca_pb2, ca_pb2_grpc
from identity.keys import build_csr, generate_key
from identity.spiffe import SpiffeId
from mesh.errors import ConfigError
from sources.kubernetes import CA_RESOURCES, KubernetesConfigSource, client_factory
from tests.kubeapi import RunningApiServer, running, write_kubeconfig
from tests.kubeapi.auth import API_AUDIENCE
from tests.sources.test_kubernetes_source import TD, base_cluster, eventually, pod, service_account

pytestmark = pytest.mark.timeout(120)

WEB_A = SpiffeId.parse(f"spiffe://{TD}/ns/shop/sa/web")  # on node-a
DB_B = SpiffeId.parse(f"spiffe://{TD}/ns/shop/sa/db")  # on node-b
AUDIENCE = "ztagent-ca"


class Clock:
    """The API server's clock, to expire tokens without waiting."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Env:
    api: RunningApiServer
    clock: Clock
    ca_dir: pathlib.Path
    root: pathlib.Path
    tmp: pathlib.Path

    def token(self, pod_name: str | None, *, sa: str = "ztagent", ns: str = "ztagent-system",
              audiences: tuple[str, ...] = (AUDIENCE,), expiration: int = 3600) -> pathlib.Path:  # fmt: skip
        issue = self.api.server.issue_token
        tok = issue(ns, sa, list(audiences), pod=pod_name, expiration_seconds=expiration)
        path = self.tmp / f"token-{len(list(self.tmp.glob('token-*')))}"
        path.write_text(tok)
        return path


@pytest.fixture
async def env(tmp_path: pathlib.Path) -> AsyncIterator[Env]:
    clock = Clock()
    async with running(tmp_path / "kubeapi", bookmark_interval=0.5, clock=clock) as api:
        base_cluster(api)
        service_account(api, "shop", "db")
        pod(api, "shop", "web-a", node="node-a", ip="10.244.1.5", host_ip="192.168.50.1", sa="web")
        pod(api, "shop", "db-b", node="node-b", ip="10.244.2.5", host_ip="192.168.50.2", sa="db")
        ca_dir = tmp_path / "ca"
        st = ca_store.init_self_signed(ca_dir, TD, now=dt.datetime.now(dt.UTC))
        root = tmp_path / "root-cert.pem"
        root.write_bytes(st.bundle.to_pem())
        yield Env(api, clock, ca_dir, root, tmp_path)


@pytest.fixture
async def ca(env: Env) -> AsyncIterator[tuple[CaServer, str, KubernetesConfigSource]]:
    """The CA as deploy/ca.yaml runs it, in-process: its own Pods+Namespaces watch, TokenReview."""
    st = ca_store.load(env.ca_dir)
    source = KubernetesConfigSource(env.api.kubeconfig, trust_domain=TD, resources=CA_RESOURCES)
    snapshot = await source.initial()

    def pod_node(ns: str, name: str) -> str | None:
        return ((source.raw("pods", ns, name) or {}).get("spec") or {}).get("nodeName")

    factory = client_factory(env.api.kubeconfig)
    reviewer = KubernetesTokenReviewer(factory, audience=AUDIENCE, pod_node=pod_node)
    server = CaServer(st, snapshot, node_auth="token", token_reviewer=reviewer)
    address = await server.start("127.0.0.1:0")
    follow = asyncio.ensure_future(server.follow(source, snapshot))
    try:
        yield server, address, source
    finally:
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)
        await server.stop(0)
        await reviewer.close()
        await source.close()


def client(env: Env, address: str, token: pathlib.Path) -> TokenCaClient:
    return TokenCaClient(address, TokenCredentials.from_files(token, env.root))


async def test_node_a_token_gets_node_a_identities_and_is_refused_node_b(
    env: Env, ca: tuple[CaServer, str, KubernetesConfigSource]
) -> None:
    _, address, _ = ca
    async with client(env, address, env.token("ztagent-node-a")) as c:
        cred = await c.create_certificate(WEB_A)
        assert cred.spiffe_id == WEB_A
        with pytest.raises(CaClientError) as info:
            await c.create_certificate(DB_B)
    err = info.value
    assert err.kind == "denied"
    assert "node 'node-a' may not obtain a certificate for spiffe://cluster.local/ns/shop/sa/db" in str(err)
    assert "it runs on node-b" in str(err)
    # node-b's agent gets it.
    async with client(env, address, env.token("ztagent-node-b")) as c:
        assert (await c.create_certificate(DB_B)).spiffe_id == DB_B


async def test_ca_follows_its_pod_watch(env: Env, ca: tuple[CaServer, str, KubernetesConfigSource]) -> None:
    server, address, _ = ca
    new = SpiffeId.parse(f"spiffe://{TD}/ns/shop/sa/late")
    service_account(env.api, "shop", "late")
    async with client(env, address, env.token("ztagent-node-a")) as c:
        with pytest.raises(CaClientError):
            await c.create_certificate(new)
        pod(env.api, "shop", "late-a", node="node-a", ip="10.244.1.9", host_ip="192.168.50.1", sa="late")
        await eventually(lambda: new in server.placement.identities_by_node.get("node-a", ()), what="placed")
        assert (await c.create_certificate(new)).spiffe_id == new


@pytest.mark.parametrize(
    "case",
    ["expired", "unknown", "wrong-audience", "not-the-agent", "not-pod-bound", "pod-gone", "no-token"],
)
async def test_bad_tokens_are_refused_with_the_reason(
    env: Env, ca: tuple[CaServer, str, KubernetesConfigSource], case: str
) -> None:
    _, address, _ = ca
    expect = {
        "expired": "service account token has expired",
        "unknown": "invalid bearer token",
        "wrong-audience": "is invalid for the target audiences",
        "not-the-agent": "is not a node agent's service account",
        "not-pod-bound": "not bound to a pod",
        "pod-gone": "has been invalidated",
        "no-token": "service-account token",
    }[case]
    if case == "expired":
        path = env.token("ztagent-node-a", expiration=600)
        env.clock.offset = 700
    elif case == "unknown":
        path = env.tmp / "token-unknown"
        path.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl")
    elif case == "wrong-audience":
        path = env.token("ztagent-node-a", audiences=("https://kubernetes.default.svc.cluster.local",))
    elif case == "not-the-agent":
        path = env.token("web-a", sa="web", ns="shop")  # any pod can ask for audience ztagent-ca
    elif case == "not-pod-bound":
        path = env.token(None)
    elif case == "pod-gone":
        path = env.token("ztagent-node-a")
        env.api.server.delete(env.api.server.res("v1", "Pod"), "ztagent-system", "ztagent-node-a",
                              {"gracePeriodSeconds": 0})  # fmt: skip
    else:
        path = env.token("ztagent-node-a")
    c = client(env, address, path)
    if case == "no-token":
        path.write_text("")
    try:
        with pytest.raises(CaClientError) as info:
            await c.create_certificate(WEB_A)
    finally:
        await c.close()
    assert expect in str(info.value), str(info.value)
    if case != "no-token":
        assert info.value.kind == "unauthenticated"


async def test_istio_create_certificate_with_a_grpcio_client(
    env: Env, ca: tuple[CaServer, str, KubernetesConfigSource]
) -> None:
    """What istio-agent/ztunnel send: grpcio over TLS, `authorization: Bearer <token>`."""
    _, address, _ = ca
    token = env.token("ztagent-node-a").read_text()
    channel = grpc.aio.secure_channel(
        address,
        grpc.ssl_channel_credentials(env.root.read_bytes()),
        options=[("grpc.ssl_target_name_override", CA_SERVER_NAME)],
    )
    try:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
        csr = build_csr(generate_key(), WEB_A).decode()
        resp = await stub.CreateCertificate(
            ca_pb2.IstioCertificateRequest(csr=csr),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
        assert len(resp.cert_chain) >= 2 and resp.root_cert.ca_cert
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateCertificate(ca_pb2.IstioCertificateRequest(csr=csr), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in (info.value.details() or "")
    finally:
        await channel.close()


def test_review_decision_is_pure() -> None:
    ok = {
        "authenticated": True,
        "audiences": [AUDIENCE],
        "user": {"username": "system:serviceaccount:ztagent-system:ztagent",
                 "extra": {"authentication.kubernetes.io/pod-name": ["ztagent-x"]}},
    }  # fmt: skip
    kw = {"audience": AUDIENCE, "agent_service_accounts": ["ztagent-system/ztagent"]}
    # No node-name extra (older API servers): the bound pod's spec.nodeName from the CA's watch.
    pods = {("ztagent-system", "ztagent-x"): "node-z"}
    caller = node_of_review(ok, pod_node=lambda ns, n: pods.get((ns, n)), **kw)  # type: ignore[arg-type]
    assert caller.node == "node-z"
    unknown = node_of_review(ok, pod_node=lambda ns, n: None, **kw)  # type: ignore[arg-type]
    assert unknown.node is None and "not scheduled on a node" in unknown.reason
    wrong = node_of_review({**ok, "audiences": ["x"]}, pod_node=lambda ns, n: None, **kw)  # type: ignore[arg-type]
    assert wrong.node is None and "audience" in wrong.reason


async def test_ca_serve_process_in_kubernetes_mode(env: Env) -> None:
    """`ztagent ca serve` with deploy/ca.yaml's flags (+ --kubeconfig), as a real process."""
    log = (env.tmp / "ca.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "ca", "serve", "--dir", str(env.ca_dir),
        "--config-source", "kubernetes", "--kubeconfig", str(env.api.kubeconfig),
        "--listen", "127.0.0.1:0", "--node-auth", "token", "--token-audience", AUDIENCE,
        "--metrics", "127.0.0.1:0", "--readiness", "127.0.0.1:0", "-o", "json",
        stdout=asyncio.subprocess.PIPE, stderr=log,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line, (env.tmp / "ca.log").read_text()
        info = json.loads(line)
        assert info["node_auth"] == "token"
        ready = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://{info['readiness']}/healthz/ready", timeout=5).status
        )
        assert ready == 200
        async with client(env, info["address"], env.token("ztagent-node-a")) as c:
            assert (await c.create_certificate(WEB_A)).spiffe_id == WEB_A
            with pytest.raises(CaClientError, match="it runs on node-b"):
                await c.create_certificate(DB_B)
        metrics = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://{info['metrics']}/metrics", timeout=5).read().decode()
        )
        assert 'ztagent_ca_requests_total{code="OK"} 1.0' in metrics
        assert 'ztagent_ca_requests_total{code="PERMISSION_DENIED"} 1.0' in metrics
    finally:
        proc.terminate()
        await proc.wait()
        log.close()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (scripts/setup.sh)")
async def test_deploy_rbac_is_enough_for_the_agent_and_the_ca(env: Env) -> None:
    """deploy/rbac.yaml applied with kubectl; the source and the TokenReview run with the
    agent's and the CA's own service-account tokens: every grant they need, and no more."""
    root = pathlib.Path(__file__).resolve().parents[2] / "deploy"
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    for f in ("namespace.yaml", "rbac.yaml"):
        r = await asyncio.to_thread(
            subprocess.run,
            [kubectl, "--kubeconfig", str(env.api.kubeconfig), "apply", "-f", str(root / f)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0 or "AlreadyExists" in r.stderr, r.stderr

    def kubeconfig_for(sa: str) -> pathlib.Path:
        tok = env.api.server.issue_token("ztagent-system", sa, [API_AUDIENCE])
        return write_kubeconfig(env.tmp / f"kubeconfig-{sa}", env.api.url, env.api.ca_file, tok)

    agent_src = KubernetesConfigSource(kubeconfig_for("ztagent"), trust_domain=TD)
    ca_src = KubernetesConfigSource(kubeconfig_for("ztagent-ca"), trust_domain=TD, resources=CA_RESOURCES)
    too_much = KubernetesConfigSource(kubeconfig_for("ztagent-ca"), trust_domain=TD)  # services: 403
    reviewer = KubernetesTokenReviewer(client_factory(kubeconfig_for("ztagent-ca")), audience=AUDIENCE)
    try:
        snap = await agent_src.initial()
        assert {w.key for w in snap.workloads} == {"shop/web-a", "shop/db-b"}
        assert {w.key for w in (await ca_src.initial()).workloads} == {"shop/web-a", "shop/db-b"}
        with pytest.raises(ConfigError, match="403"):
            await too_much.initial()
        caller = await reviewer.review(env.token("ztagent-node-a").read_text())
        assert caller.node == "node-a", caller.reason
    finally:
        for s in (agent_src, ca_src, too_much):
            await s.close()
        await reviewer.close()
