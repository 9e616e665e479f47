# ruff: noqa: E501
"""The waypoint's L7 hop against Envoy configured as the same hop (RBAC + jwt_authn), same run.

    .venv/bin/python -m bench.waypoint_bench [--runs 3] [--seconds 5] [--conns 1,16]

Four paths to one nginx (1 KB answers) on loopback, measured in alternation with wrk (keep-alive,
every request carrying the same valid JWT), all entering through ztagent's HBONE client
(``HboneClient.listener_protocol``, as frontend/sleep):

* **hbone**: HBONE -> ztagent's HBONE server (the destination agent's role) -> nginx. Baseline.
* **waypoint**: HBONE -> ``WaypointProxy`` (RequestAuthentication + ALLOW on path and request
  principal) -> HBONE as the waypoint -> ztagent's HBONE server -> nginx.
* **envoy-hbone**: HBONE -> Envoy terminating CONNECT -> nginx. Envoy's baseline.
* **envoy-l7**: HBONE -> Envoy terminating CONNECT -> (loopback TCP, in place of Istio's internal
  listener) -> Envoy HCM with jwt_authn + RBAC (the same rule) + router -> nginx.

Added latency = p50(path) - p50(its baseline), for ztagent and for Envoy. The waypoint runs in
its own process (uvloop), the source and destination HBONE ends in another, Envoy with one
worker: one L7 proxy process each. Only same-run ratios are claims (this VM is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bench.envoy import _HCM_TYPE, _listener, _static_cluster, hbone_server_config, start_envoy
from bench.suite import _free_port, nginx_1kb, parse_wrk
from credentials.files import CredentialFiles, read_credentials, write_credentials
from identity.bundle import TrustBundle, TrustBundleSet
from identity.ca import CertificateAuthority
from identity.keys import build_csr, generate_key, key_to_pem, load_key_pem
from identity.spiffe import SpiffeId
from identity.svid import WorkloadCredential, load_pem_chain

TD = "cluster.local"
ISS = "https://issuer.example"
SRC_IP, DEST_IP, WP_IP, VIP = "127.0.0.2", "127.0.0.3", "127.0.0.5", "127.0.0.10"


def _issue(ca: CertificateAuthority, ns: str, sa: str, out: str) -> None:
    import datetime as dt

    key = generate_key()
    sid = SpiffeId.for_workload(ca.trust_domain, ns, sa)
    now = dt.datetime.now(dt.UTC)
    issued = ca.sign_csr(build_csr(key, sid), allowed=lambda _i: True, ttl=dt.timedelta(hours=2), now=now)
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in issued.chain)
    write_credentials(out, CredentialFiles(key_to_pem(key), chain, ca.bundle.to_pem()))


def _load(directory: str) -> tuple[WorkloadCredential, TrustBundleSet]:
    f = read_credentials(directory)
    cred = WorkloadCredential.from_chain(load_key_pem(f.key_pem), load_pem_chain(f.chain_pem))
    return cred, TrustBundleSet.of(TrustBundle.from_pem(TD, f.roots_pem))


def mesh_config(nginx_port: int, jwks: str) -> str:
    return f"""\
apiVersion: ztagent.io/v1alpha1
kind: MeshConfig
trustDomain: cluster.local
nodes: [{{name: n1, address: 127.0.1.1}}]
workloads:
  - {{name: sleep, namespace: frontend, serviceAccount: sleep, node: n1, ips: [{SRC_IP}]}}
  - {{name: nginx, namespace: backend, serviceAccount: nginx, node: n1, ips: [{DEST_IP}], labels: {{app: nginx}}}}
services:
  - {{name: nginx, namespace: backend, vips: [{VIP}], ports: [{{port: 80, targetPort: {nginx_port}}}],
     selector: {{app: nginx}}, labels: {{istio.io/use-waypoint: waypoint}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: backend}}
spec: {{gatewayClassName: istio-waypoint, addresses: [{{value: {WP_IP}}}]}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: backend}}
spec:
  targetRefs: [{{kind: Service, group: "", name: nginx}}]
  jwtRules: [{{issuer: "{ISS}", jwks: '{jwks}'}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-alice, namespace: backend}}
spec:
  targetRefs: [{{kind: Service, group: "", name: nginx}}]
  rules: [{{from: [{{source: {{requestPrincipals: ["{ISS}/alice"]}}}}], to: [{{operation: {{paths: ["/"]}}}}]}}]
"""


def envoy_l7_config(*, nginx: int, l7_port: int, jwks: str, cred: WorkloadCredential,
                    bundles: TrustBundleSet) -> dict[str, Any]:  # fmt: skip
    """HBONE terminator -> loopback -> HCM (jwt_authn + RBAC + router) -> nginx: the same rule."""
    cfg = hbone_server_config(backend=("127.0.0.1", l7_port), cred=cred, bundles=bundles)
    jwt_filter = {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"p": {"issuer": ISS, "local_jwks": {"inline_string": jwks}, "payload_in_metadata": "p"}},
            "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
                {"provider_name": "p"}, {"allow_missing": {}}]}}}],
        },
    }  # fmt: skip
    rbac = {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "ALLOW", "policies": {"allow-alice": {
                "permissions": [{"url_path": {"path": {"exact": "/"}}}],
                "principals": [{"and_ids": {"ids": [
                    {"metadata": {"filter": "envoy.filters.http.jwt_authn", "path": [{"key": "p"}, {"key": "iss"}],
                                  "value": {"string_match": {"exact": ISS}}}},
                    {"metadata": {"filter": "envoy.filters.http.jwt_authn", "path": [{"key": "p"}, {"key": "sub"}],
                                  "value": {"string_match": {"exact": "alice"}}}},
                ]}}],
            }}},
        },
    }  # fmt: skip
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _HCM_TYPE,
            "stat_prefix": "l7",
            "codec_type": "AUTO",
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "route": {"cluster": "nginx"}}]}]},
            "http_filters": [jwt_filter, rbac, {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        },
    }  # fmt: skip
    l7 = _listener("l7", [hcm])
    l7["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": l7_port}}
    cfg["static_resources"]["listeners"].append(l7)
    cfg["static_resources"]["clusters"].append(_static_cluster("nginx", DEST_IP, nginx))
    return cfg


# --- the ztagent processes ---------------------------------------------------------------------
def _ends_main(creds: str, nginx: int, targets: dict[str, tuple[str, int]], q: Any) -> None:
    """Source listeners (one per path) and the destination HBONE server, in one process."""
    import uvloop

    from tunnel.client import HboneClient, OutboundTarget
    from tunnel.hbone import Authority
    from tunnel.server import AuthzDecision, AuthzRequest, HboneServer

    async def main() -> None:
        src, bundles = _load(os.path.join(creds, "sleep"))
        dest_cred, _ = _load(os.path.join(creds, "nginx"))

        async def allow(_r: AuthzRequest) -> AuthzDecision:
            return AuthzDecision(True)

        dest = HboneServer(credentials=lambda _ip: dest_cred, bundles=lambda: bundles, authorize=allow)
        dport = (await dest.start(DEST_IP, 0)).port
        client = HboneClient(bundles=lambda: bundles)
        loop = asyncio.get_running_loop()
        ports = {"dest_hbone": dport}
        for name, (ip, port) in {**targets, "hbone": (DEST_IP, dport)}.items():
            expect = "backend/waypoint" if name == "waypoint" else "backend/nginx"
            ns, sa = expect.split("/")
            authority = Authority.of(VIP, 80) if name == "waypoint" else Authority.of(DEST_IP, nginx)
            target = OutboundTarget(source=src, destination=authority, agent_address=Authority.of(ip, port),
                                    expected_identities=(SpiffeId.for_workload(TD, ns, sa),))  # fmt: skip

            def resolve(_local: Authority, _peer: Authority, t: OutboundTarget = target) -> OutboundTarget:
                return t

            srv = await loop.create_server(client.listener_protocol(resolve), "127.0.0.1", 0, backlog=4096)
            ports[name] = srv.sockets[0].getsockname()[1]
        q.put(ports)
        await asyncio.sleep(3600)

    uvloop.run(main())


def _waypoint_main(creds: str, config: str, dest_port: int, q: Any) -> None:
    import uvloop

    from mesh.config import parse_config
    from mesh.store import WorkloadStore
    from serving.accesslog import AccessLog
    from tunnel.client import HboneClient
    from tunnel.server import HboneServer
    from waypoint.decide import WaypointPolicies
    from waypoint.metrics import WaypointMetrics
    from waypoint.proxy import WaypointProxy

    async def main() -> None:
        cred, bundles = _load(os.path.join(creds, "waypoint"))
        snap = parse_config(config)
        wp = snap.waypoints[0]
        store = WorkloadStore(snap, "n1")
        pol = WaypointPolicies.from_snapshot(snap, wp, now=time.time())
        proxy = WaypointProxy(waypoint=wp, store=lambda: store, policies=lambda: pol, credential=lambda: cred,
                              client=HboneClient(bundles=lambda: bundles), metrics=WaypointMetrics(),
                              access_log=AccessLog(os.devnull), upstream_hbone_port=dest_port)  # fmt: skip
        server = HboneServer(credentials=lambda _ip: cred, bundles=lambda: bundles, admit=proxy.admit)
        q.put((await server.start(WP_IP, 0)).port)
        await asyncio.sleep(3600)

    uvloop.run(main())


def _wrk(port: int, conns: int, seconds: float, token: str) -> Any:
    argv = ["wrk", f"-t{min(conns, 2)}", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency",
            "--timeout", "5s", "-H", f"authorization: Bearer {token}", f"http://127.0.0.1:{port}/"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed: {out.stderr[-300:]}")
    res = parse_wrk(out.stdout)
    if "Non-2xx" in out.stdout:
        probe = subprocess.run(
            ["curl", "-s", "-i", "-H", f"authorization: Bearer {token}", f"http://127.0.0.1:{port}/"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        raise RuntimeError(f"non-2xx answers on port {port}: {probe.stdout[:400]}")
    return res


@contextmanager
def _process(target: Any, *args: Any) -> Iterator[Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q), daemon=True)
    p.start()
    try:
        yield q.get(timeout=60)
    finally:
        p.terminate()
        p.join(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--conns", default="1,16")
    args = ap.parse_args(argv)
    import datetime as dt

    ca = CertificateAuthority.create_root(TD, dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "k1"
    jwks = json.dumps({"keys": [jwk]})
    token = pyjwt.encode({"iss": ISS, "sub": "alice", "exp": int(time.time()) + 7200}, key, algorithm="RS256",
                         headers={"kid": "k1"})  # fmt: skip
    results: dict[tuple[str, int], list[Any]] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="ztagent-wpbench-") as creds:
        for ns, sa in (("frontend", "sleep"), ("backend", "nginx"), ("backend", "waypoint")):
            _issue(ca, ns, sa, os.path.join(creds, sa))
        nginx = stack.enter_context(nginx_1kb(DEST_IP))
        config = mesh_config(nginx, jwks)
        nginx_cred, bundles = _load(os.path.join(creds, "nginx"))
        envoy_plain = start_envoy(
            hbone_server_config(backend=(DEST_IP, nginx), cred=nginx_cred, bundles=bundles)
        )
        stack.callback(envoy_plain.stop)
        envoy_l7 = start_envoy(envoy_l7_config(nginx=nginx, l7_port=_free_port("127.0.0.1"), jwks=jwks,
                                               cred=nginx_cred, bundles=bundles))  # fmt: skip
        stack.callback(envoy_l7.stop)
        # The waypoint needs the destination HBONE server's port: the ends with the destination
        # first, then the waypoint, then the waypoint path's source listener.
        ends0 = stack.enter_context(_process(_ends_main, creds, nginx, {
            "envoy-hbone": ("127.0.0.1", envoy_plain.listener_port),
            "envoy-l7": ("127.0.0.1", envoy_l7.listener_ports["hbone_in"])}))  # fmt: skip
        wp_port = stack.enter_context(_process(_waypoint_main, creds, config, ends0["dest_hbone"]))
        ends = stack.enter_context(_process(_ends_main, creds, nginx, {"waypoint": (WP_IP, wp_port)}))
        paths = {"hbone": ends0["hbone"], "waypoint": ends["waypoint"], "envoy-hbone": ends0["envoy-hbone"],
                 "envoy-l7": ends0["envoy-l7"]}  # fmt: skip
        for name, port in paths.items():  # warm up, and fail loudly if a path does not answer 200
            try:
                _wrk(port, 1, 1, token)
            except RuntimeError as exc:
                raise RuntimeError(f"path {name}: {exc}") from None
        for name in ("waypoint", "envoy-l7"):  # the rule is enforced on both: no token, no entry
            got = subprocess.run(
                ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{paths[name]}/"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if got.stdout != "403":
                raise RuntimeError(f"path {name} answered {got.stdout} without a token (expected 403)")
        for _run in range(args.runs):
            for conns in (int(c) for c in args.conns.split(",")):
                for name, port in paths.items():
                    results.setdefault((name, conns), []).append(_wrk(port, conns, args.seconds, token))
    print(f"waypoint bench: median of {args.runs} alternating runs, {args.seconds:g}s each, loopback, 1 KB")
    print(f"{'path':<12} {'conns':>5} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    med: dict[tuple[str, int], tuple[float, float, float]] = {}
    for (name, conns), rs in results.items():
        m = (statistics.median(r.rps for r in rs), statistics.median(r.p50_ms for r in rs),
             statistics.median(r.p99_ms for r in rs))  # fmt: skip
        med[(name, conns)] = m
        print(f"{name:<12} {conns:>5} {m[0]:>10.0f} {m[1]:>8.3f} {m[2]:>8.3f}")
    for conns in (int(c) for c in args.conns.split(",")):
        zt_add = med[("waypoint", conns)][1] - med[("hbone", conns)][1]
        env_add = med[("envoy-l7", conns)][1] - med[("envoy-hbone", conns)][1]
        rps = med[("waypoint", conns)][0] / med[("envoy-l7", conns)][0]
        print(
            f"{conns} conns: req/s waypoint/Envoy-L7 {rps:.2f}x; added p50 ztagent {zt_add * 1000:.0f} us, "
            f"Envoy {env_add * 1000:.0f} us ({zt_add / env_add if env_add > 0 else float('nan'):.2f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
