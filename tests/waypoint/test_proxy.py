# ruff: noqa: E501
"""The waypoint end to end on loopback: real mTLS HBONE in and out, real clients (curl, nghttp,
grpcio), a real backend speaking HTTP/1.1, h2c and gRPC.

    curl/nghttp/grpc -> source "agent" (HboneClient.listener_protocol, as frontend/sleep)
      -> HBONE -> waypoint (HboneServer + WaypointProxy, in-process hand-off)
      -> HBONE as the waypoint -> destination "agent" (HboneServer, records the peer) -> backend
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jwt as pyjwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from identity.bundle import TrustBundleSet
from identity.ca import CertificateAuthority
from identity.spiffe import SpiffeId
from identity.svid import WorkloadCredential
from mesh.config import parse_config
from mesh.model import Waypoint
from mesh.store import WorkloadStore
from serving.accesslog import AccessLog
from tests.tunnel.conftest import NOW, issue
from tests.waypoint.backend import start_grpc, start_http
from tunnel.client import HboneClient, OutboundTarget
from tunnel.hbone import Authority
from tunnel.server import AuthzDecision, AuthzRequest, HboneServer
from waypoint.decide import WaypointPolicies
from waypoint.extauthz import ExtAuthzHttpClient, ExtAuthzHttpProvider
from waypoint.metrics import WaypointMetrics
from waypoint.proxy import WaypointProxy

VIP = "127.0.0.10"
SLEEP_IP, OTHER_IP, HTTPBIN_IP, WAYPOINT_IP = "127.0.0.2", "127.0.0.4", "127.0.0.3", "127.0.0.5"
WAYPOINT_ID = "spiffe://cluster.local/ns/backend/sa/waypoint"
SLEEP_ID = "spiffe://cluster.local/ns/frontend/sa/sleep"
DENY_BODY = "RBAC: access denied"
JWT_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)

CONFIG = """\
apiVersion: ztagent.io/v1alpha1
kind: MeshConfig
trustDomain: cluster.local
nodes: [{{name: node-a, address: 127.0.1.1}}, {{name: node-b, address: 127.0.1.2}}]
workloads:
  - {{name: sleep, namespace: frontend, serviceAccount: sleep, node: node-a, ips: [{sleep}], labels: {{app: sleep}}}}
  - {{name: other, namespace: frontend, serviceAccount: other, node: node-a, ips: [{other}]}}
  - {{name: httpbin, namespace: backend, serviceAccount: httpbin, node: node-b, ips: [{httpbin}],
     labels: {{app: httpbin}}}}
  - {{name: waypoint, namespace: backend, serviceAccount: waypoint, node: node-a, ips: [{wp}], enrolled: false}}
services:
  - name: httpbin
    namespace: backend
    vips: [{vip}]
    ports: [{{port: 8000, targetPort: {http_port}, name: http}}, {{port: 9000, targetPort: {grpc_port}, name: grpc}}]
    selector: {{app: httpbin}}
    labels: {{istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: backend}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
  addresses: [{{type: IPAddress, value: {wp}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: httpbin-l7, namespace: backend}}
spec:
  targetRefs: [{{kind: Service, group: "", name: httpbin}}]
  action: ALLOW
  rules:
    - from: [{{source: {{principals: ["cluster.local/ns/frontend/sa/sleep"]}}}}]
      to: [{{operation: {{methods: [GET, POST], paths: ["/get", "/anything/*", "/test.Echo/Say"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: httpbin-ext, namespace: backend}}
spec:
  targetRefs: [{{kind: Service, group: "", name: httpbin}}]
  action: CUSTOM
  provider: {{name: ext}}
  rules: [{{to: [{{operation: {{paths: ["/anything/custom*"]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: backend}}
spec:
  targetRefs: [{{kind: Service, group: "", name: httpbin}}]
  jwtRules: [{{issuer: "https://issuer.example", jwks: '{jwks}', outputClaimToHeaders: [{{header: x-sub, claim: sub}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: httpbin-jwt, namespace: backend}}
spec:
  targetRefs: [{{kind: Service, group: "", name: httpbin}}]
  action: ALLOW
  rules: [{{from: [{{source: {{requestPrincipals: ["https://issuer.example/alice"]}}}}], to: [{{operation: {{paths: ["/jwt/*"]}}}}]}}]
"""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Mesh:
    http_port: int  # the source listener for VIP:8000 as sleep
    grpc_port: int  # the source listener for VIP:9000 as sleep
    other_port: int  # VIP:8000 as frontend/other
    peers: list[str] = field(default_factory=list)  # who the destination agent saw
    log: list[dict[str, Any]] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # paths the ext_authz authorizer was asked about
    metrics: WaypointMetrics = field(default_factory=WaypointMetrics)


class _ListLog(AccessLog):
    def __init__(self, out: list[dict[str, Any]]) -> None:
        super().__init__(stream=open("/dev/null", "w"))  # noqa: SIM115 (closed with the log)
        self.out = out

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        rec = super().write(event, **fields)
        self.out.append(rec)
        return rec


@pytest.fixture
async def mesh(ca: CertificateAuthority) -> AsyncIterator[Mesh]:
    http_port, grpc_port = _free_port(HTTPBIN_IP), _free_port(HTTPBIN_IP)
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(JWT_KEY.public_key()))
    jwk["kid"] = "k1"
    text = CONFIG.format(sleep=SLEEP_IP, other=OTHER_IP, httpbin=HTTPBIN_IP, wp=WAYPOINT_IP, vip=VIP,
                         http_port=http_port, grpc_port=grpc_port, jwks=json.dumps({"keys": [jwk]}))
    snap = parse_config(text, file="test.yaml")
    wp = next(w for w in snap.waypoints if w.key == "backend/waypoint")
    assert isinstance(wp, Waypoint) and str(wp.spiffe_id) == WAYPOINT_ID
    store = WorkloadStore(snap, "node-a")
    policies = WaypointPolicies.from_snapshot(snap, wp, now=NOW.timestamp())
    trust = TrustBundleSet.of(ca.bundle)

    def bundles() -> TrustBundleSet:
        return trust

    sleep, other = issue(ca, "frontend", "sleep"), issue(ca, "frontend", "other")
    wp_cred, httpbin = issue(ca, "backend", "waypoint"), issue(ca, "backend", "httpbin")

    backend = await start_http(HTTPBIN_IP, http_port)
    checks: list[str] = []

    async def authz(request: web.Request) -> web.Response:
        checks.append(request.raw_path)
        if request.headers.get("x-allow") == "yes":
            return web.Response(status=200, headers={"x-user": "checked"})
        return web.Response(status=403, text="denied by ext")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", authz)
    authz_runner = web.AppRunner(app)
    await authz_runner.setup()
    authz_site = web.TCPSite(authz_runner, "127.0.0.1", 0)
    await authz_site.start()
    authz_port = authz_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    provider = ExtAuthzHttpProvider.from_mesh_config(
        {"name": "ext", "envoyExtAuthzHttp": {"service": "authz.backend.svc.cluster.local", "port": 9000,
                                              "includeRequestHeadersInCheck": ["x-allow"],
                                              "headersToUpstreamOnAllow": ["x-user"]}}
    )
    grpc_server = start_grpc(HTTPBIN_IP, grpc_port)
    out = Mesh(0, 0, 0)

    async def authorize(req: AuthzRequest) -> AuthzDecision:
        out.peers.append(str(req.peer_identity))
        return AuthzDecision(True)

    dest = HboneServer(credentials=lambda _ip: httpbin, bundles=bundles, authorize=authorize)
    dest_port = (await dest.start(HTTPBIN_IP, 0)).port
    wp_client = HboneClient(bundles=bundles)
    proxy = WaypointProxy(waypoint=wp, store=lambda: store, policies=lambda: policies,
                          credential=lambda: wp_cred, client=wp_client, metrics=out.metrics,
                          access_log=_ListLog(out.log), upstream_hbone_port=dest_port,
                          ext_authz={"ext": ExtAuthzHttpClient(provider, address=("127.0.0.1", authz_port))})
    out.checks = checks
    wps = HboneServer(credentials=lambda _ip: wp_cred, bundles=bundles, admit=proxy.admit)
    wp_port = (await wps.start(WAYPOINT_IP, 0)).port
    src = HboneClient(bundles=bundles)
    loop = asyncio.get_running_loop()
    servers = []

    async def listener(cred: WorkloadCredential, ip: str, vport: int) -> int:
        def resolve(_local: Authority, peer: Authority) -> OutboundTarget:
            return OutboundTarget(source=cred, destination=Authority.of(VIP, vport),
                                  agent_address=Authority.of(WAYPOINT_IP, wp_port),
                                  expected_identities=(SpiffeId.parse(WAYPOINT_ID),),
                                  source_address=Authority.of(ip, peer.port))
        srv = await loop.create_server(src.listener_protocol(resolve), "127.0.0.1", 0)
        servers.append(srv)
        return int(srv.sockets[0].getsockname()[1])

    out.http_port = await listener(sleep, SLEEP_IP, 8000)
    out.grpc_port = await listener(sleep, SLEEP_IP, 9000)
    out.other_port = await listener(other, OTHER_IP, 8000)
    try:
        yield out
    finally:
        for s in servers:
            s.close()
        await src.close()
        await wps.drain(1)
        await proxy.close()
        await wp_client.close()
        await dest.drain(1)
        backend.close()
        await authz_runner.cleanup()
        grpc_server.stop(0)


async def _run(*argv: str) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), 30)
    return p.returncode or 0, out.decode(), err.decode()


async def _curl(port: int, path: str, *extra: str) -> tuple[int, str]:
    rc, out, err = await _run("curl", "-s", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}",
                              *extra, f"http://127.0.0.1:{port}{path}")
    assert rc == 0, err
    body, _, code = out.rpartition("\n")
    return int(code), body


async def test_http1_allowed_denied_and_forged_identity(mesh: Mesh) -> None:
    code, body = await _curl(mesh.http_port, "/get", "-H", "x-forwarded-client-cert: By=x;URI=spiffe://evil/ns/a/sa/b")
    assert code == 200, body
    seen = json.loads(body)
    xfcc = [v for n, v in seen["headers"] if n.lower() == "x-forwarded-client-cert"]
    assert xfcc == [f"By={WAYPOINT_ID};URI={SLEEP_ID}"]  # the forged value was replaced, not appended
    assert mesh.peers[-1] == WAYPOINT_ID  # the destination agent sees the waypoint as its peer

    code, body = await _curl(mesh.http_port, "/admin")
    assert (code, body) == (403, DENY_BODY)
    code, body = await _curl(mesh.http_port, "/anything/../admin")  # normalized before matching
    assert (code, body) == (403, DENY_BODY)
    code, body = await _curl(mesh.http_port, "/anything/x", "-X", "POST", "--data-binary", "x" * 100000)
    assert code == 200 and json.loads(body)["body_bytes"] == 100000
    # Another caller claiming to be sleep in a header is still itself.
    code, body = await _curl(mesh.other_port, "/get", "-H", f"x-forwarded-client-cert: By={WAYPOINT_ID};URI={SLEEP_ID}")
    assert (code, body) == (403, DENY_BODY)
    denied = [r for r in mesh.log if r["decision"] == "DENY"]
    assert denied and denied[-1]["source_principal"].endswith("/sa/other") and denied[-1]["status"] == 403
    assert "backend/httpbin-l7" in denied[-1]["policy"].split(",")
    fam = {m.name: m for m in mesh.metrics.registry.collect()}
    samples = [s for s in fam["istio_requests"].samples if s.name == "istio_requests_total"]
    assert {s.labels["response_code"] for s in samples} == {"200", "403"}
    assert all(s.labels["reporter"] == "waypoint" for s in samples)


async def test_keepalive_requests_share_one_upstream(mesh: Mesh) -> None:
    rc, out, err = await _run("curl", "-s", "--max-time", "10", f"http://127.0.0.1:{mesh.http_port}/get",
                              "-o", "/dev/null", f"http://127.0.0.1:{mesh.http_port}/get", "-o", "/dev/null",
                              "-w", "%{http_code}\n")
    assert rc == 0, err
    assert out.split() == ["200", "200"]


@pytest.mark.skipif(shutil.which("nghttp") is None, reason="nghttp (nghttp2-client) not installed")
async def test_http2_allowed_and_denied_with_nghttp(mesh: Mesh) -> None:
    rc, out, err = await _run("nghttp", "-v", f"http://127.0.0.1:{mesh.http_port}/get")
    assert rc == 0, err + out + str(mesh.log)
    assert ":status: 200" in out and '"method": "GET"' in out
    rc, out, err = await _run("nghttp", "-v", f"http://127.0.0.1:{mesh.http_port}/admin")
    assert ":status: 403" in out and DENY_BODY in out
    # Two streams on one connection, one allowed and one denied.
    rc, out, err = await _run("nghttp", "-v", f"http://127.0.0.1:{mesh.http_port}/get",
                              f"http://127.0.0.1:{mesh.http_port}/nope")
    assert out.count(":status: 200") == 1 and out.count(":status: 403") == 1


async def test_grpc_allowed_and_denied(mesh: Mesh) -> None:
    import grpc

    def calls(*methods: str) -> list[tuple[Any, Any, Any]]:
        # One channel: the allowed and the denied call share one HTTP/2 connection through the
        # waypoint (a denied stream must not disturb the connection).
        out = []
        with grpc.insecure_channel(f"127.0.0.1:{mesh.grpc_port}") as ch:
            for method in methods:
                fn = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
                try:
                    resp, c = fn.with_call(b"world", timeout=10)
                    out.append((grpc.StatusCode.OK, resp, dict(c.trailing_metadata() or ())))
                except grpc.RpcError as e:
                    out.append((e.code(), None, e.details()))
        return out

    (code, resp, trailers), (denied, _r, details), (again, resp2, _t) = await asyncio.to_thread(
        calls, "/test.Echo/Say", "/test.Echo/Other", "/test.Echo/Say"
    )
    assert code == grpc.StatusCode.OK and resp == b"hello world"
    assert trailers["seen-xfcc"] == f"By={WAYPOINT_ID};URI={SLEEP_ID}"
    assert denied == grpc.StatusCode.PERMISSION_DENIED, details
    assert again == grpc.StatusCode.OK and resp2 == b"hello world"
    assert [r["status"] for r in mesh.log[-3:]] == [200, 403, 200]


async def test_custom_policy_asks_the_ext_authz_provider(mesh: Mesh) -> None:
    code, body = await _curl(mesh.http_port, "/anything/custom1", "-H", "x-allow: yes")
    assert code == 200, body
    assert [v for n, v in json.loads(body)["headers"] if n.lower() == "x-user"] == ["checked"]
    code, body = await _curl(mesh.http_port, "/anything/custom2")
    assert (code, body) == (403, "denied by ext")
    assert mesh.checks == ["/anything/custom1", "/anything/custom2"]
    code, _body = await _curl(mesh.http_port, "/anything/other")  # CUSTOM does not match: not asked
    assert code == 200 and len(mesh.checks) == 2


async def test_request_authentication_through_the_waypoint(mesh: Mesh) -> None:
    now = int(time.time())
    good = pyjwt.encode({"iss": "https://issuer.example", "sub": "alice", "exp": now + 300}, JWT_KEY,
                        algorithm="RS256", headers={"kid": "k1"})
    code, body = await _curl(mesh.http_port, "/jwt/x", "-H", f"authorization: Bearer {good}",
                             "-H", "x-sub: forged")
    assert code == 200, body
    hdrs = {n.lower(): v for n, v in json.loads(body)["headers"]}
    assert "authorization" not in hdrs  # forwardOriginalToken is false: the token stays here
    assert hdrs["x-sub"] == "alice"  # outputClaimToHeaders, the forged value removed first
    assert (await _curl(mesh.http_port, "/jwt/x"))[0] == 403  # no token: no request principal
    assert (await _curl(mesh.http_port, "/jwt/x", "-H", f"authorization: Bearer {good[:-4]}AAAA"))[0] == 401
    assert mesh.log[-3]["request_principal"] == "https://issuer.example/alice"


async def test_non_http_traffic_gets_the_l4_reading_of_the_bound_policies(mesh: Mesh) -> None:
    # Every policy bound to httpbin has HTTP fields (ALLOW rules that match nothing at L4) or is
    # CUSTOM (fail closed at L4): raw TCP from sleep is refused at the waypoint.
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.http_port)
    writer.write(b"\x16\x03\x01 not http\r\n\r\n")
    await writer.drain()
    got = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert got == b""
    tcp = [r for r in mesh.log if r["event"] == "waypoint_tcp"]
    assert tcp and tcp[-1]["decision"] == "DENY" and tcp[-1]["source_principal"] == SLEEP_ID, tcp[-1]["reason"]
