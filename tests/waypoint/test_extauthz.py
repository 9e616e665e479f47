"""The ext_authz client sends what Envoy's own ext_authz filter sends, and reads answers the same way.

One test authorizer (a real aiohttp server recording every check request) is called twice per
case: by a real Envoy 1.40 configured as Istio configures a CUSTOM ``envoyExtAuthzHttp`` provider
(HTTP connection manager -> ext_authz http_service -> router), and by
:class:`waypoint.extauthz.ExtAuthzHttpClient` with the same provider settings. The recorded
requests must be equal, and so must what reaches the backend (allow) or the client (deny/error).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web

from bench.envoy import _HCM_TYPE, ENVOY, _static_cluster, start_envoy
from waypoint.extauthz import (
    BodyTooLarge,
    ExtAuthzHttpClient,
    ExtAuthzHttpProvider,
    ProviderConfigError,
    build_check_request,
    interpret_response,
)

# Headers Envoy's router adds to the request it proxies to the backend (the waypoint's forwarding,
# not the ext_authz contract): ignored when comparing what reached the backend. The check requests
# are compared with nothing ignored.
ENVOY_ROUTER_HEADERS = frozenset({"x-envoy-expected-rq-timeout-ms", "x-forwarded-proto", "x-request-id"})

MESH_PROVIDER: dict[str, Any] = {
    "name": "ext",
    "envoyExtAuthzHttp": {
        "service": "authz.ns1.svc.cluster.local",
        "port": 9000,
        "timeout": "10s",
        "pathPrefix": "/check",
        "includeRequestHeadersInCheck": ["x-tenant", "x-b3-*", "*-trace", "cookie"],
        "includeAdditionalHeadersInCheck": {"x-auth-source": "waypoint", "x-tenant": "overridden"},
        "headersToUpstreamOnAllow": ["x-user", "x-role*"],
        "headersToDownstreamOnAllow": ["x-down"],
        "headersToDownstreamOnDeny": [],
    },
}


@dataclass
class Recorded:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Servers:
    authz_port: int
    backend_port: int
    checks: list[Recorded] = field(default_factory=list)
    upstream: list[Recorded] = field(default_factory=list)


async def _record(request: web.Request) -> Recorded:
    hs = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.raw_headers]
    return Recorded(request.method, request.raw_path, hs, await request.read())


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    s = Servers(0, 0)

    async def authz(request: web.Request) -> web.StreamResponse:
        rec = await _record(request)
        s.checks.append(rec)
        p = request.raw_path
        if "/deny" in p:
            hs = {"x-reason": "tenant", "www-authenticate": 'Bearer realm="x"', "content-type": "text/plain"}
            return web.Response(status=403, body=b"denied by policy engine", headers=hs)
        if "/unauth" in p:
            return web.Response(status=401, body=b"who are you", headers={"x-reason": "no-user"})
        if "/error" in p:
            return web.Response(status=503, body=b"overloaded")
        return web.Response(
            status=200,
            body=b"ignored",
            headers=[
                ("x-user", "alice"),
                ("x-role-admin", "true"),
                ("x-not-forwarded", "1"),
                ("x-down", "from-authz"),
                ("x-envoy-auth-headers-to-remove", "x-secret, x-other"),
            ],
        )

    async def backend(request: web.Request) -> web.StreamResponse:
        s.upstream.append(await _record(request))
        return web.Response(text="backend ok")

    runners = []
    ports = []
    for handler in (authz, backend):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    s.authz_port, s.backend_port = ports
    try:
        yield s
    finally:
        for r in runners:
            await r.cleanup()


def envoy_config(authz_port: int, backend_port: int, body: bool = False) -> dict[str, Any]:
    """What istiod generates for the MESH_PROVIDER above (pilot's extauthz builder, HTTP)."""
    ext_authz = {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            "status_on_error": {"code": 403},
            **(
                {"with_request_body": {"max_request_bytes": 8, "allow_partial_message": True}} if body else {}
            ),
            "allowed_headers": {
                "patterns": [
                    {"exact": "x-tenant", "ignore_case": True},
                    {"prefix": "x-b3-", "ignore_case": True},
                    {"suffix": "-trace", "ignore_case": True},
                    {"exact": "cookie", "ignore_case": True},
                ]
            },
            "http_service": {
                "server_uri": {
                    "uri": "http://authz.ns1.svc.cluster.local",
                    "cluster": "authz",
                    "timeout": "10s",
                },
                "path_prefix": "/check",
                "authorization_request": {
                    "headers_to_add": [
                        {"key": "x-auth-source", "value": "waypoint"},
                        {"key": "x-tenant", "value": "overridden"},
                    ]
                },
                "authorization_response": {
                    "allowed_upstream_headers": {
                        "patterns": [
                            {"exact": "x-user", "ignore_case": True},
                            {"prefix": "x-role", "ignore_case": True},
                        ]
                    },
                    "allowed_client_headers_on_success": {
                        "patterns": [{"exact": "x-down", "ignore_case": True}]
                    },
                },
            },
        },
    }
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _HCM_TYPE,
            "stat_prefix": "waypoint",
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}],
                    }
                ]
            },
            "http_filters": [
                ext_authz,
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                    },
                },
            ],
        },
    }
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "waypoint",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [{"filters": [hcm]}],
                }
            ],
            "clusters": [
                _static_cluster("authz", "127.0.0.1", authz_port),
                _static_cluster("backend", "127.0.0.1", backend_port),
            ],
        }
    }


REQUEST_HEADERS = [
    ("Authorization", "Bearer abc.def.ghi"),
    ("X-Tenant", "acme"),
    ("X-Tenant", "beta"),
    ("X-B3-Flags", "1"),
    ("X-B3-Flags", "0"),
    ("X-B3-TraceId", "80f198ee56343ba8"),
    ("x-span-trace", "t1"),
    ("Cookie", "a=1"),
    ("X-Secret", "s3cr3t"),
    ("X-Other", "o"),
    ("X-Unlisted", "never sent"),
    ("User-Agent", "test-client/1"),
    ("Accept", "*/*"),
]


def _strip(hs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted((k, v) for k, v in hs if k not in ENVOY_ROUTER_HEADERS)


pytestmark_envoy = pytest.mark.skipif(
    not ENVOY.exists(), reason="Envoy binary not installed at .venv/bin/envoy"
)


@pytest.mark.envoy
@pytestmark_envoy
@pytest.mark.timeout(120)
@pytest.mark.parametrize("with_body", [False, True], ids=["headers-only", "with-body"])
async def test_same_as_envoy(servers: Servers, with_body: bool) -> None:
    cfg = envoy_config(servers.authz_port, servers.backend_port, with_body)
    envoy = await asyncio.to_thread(start_envoy, cfg)
    mesh = MESH_PROVIDER
    if with_body:
        opts = {"maxRequestBytes": 8, "allowPartialMessage": True}
        mesh = {**mesh, "envoyExtAuthzHttp": {**mesh["envoyExtAuthzHttp"], "includeRequestBodyInCheck": opts}}
    provider = ExtAuthzHttpProvider.from_mesh_config(mesh)
    client = ExtAuthzHttpClient(provider, address=("127.0.0.1", servers.authz_port))
    authority = "httpbin.ns2.svc.cluster.local:8000"
    try:
        async with aiohttp.ClientSession(
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent")
        ) as http:
            for method, path, body in (
                ("GET", "/api/items?q=1&x=%2F", b""),
                ("POST", "/api/charge", b'{"amount": 5}'),
                ("PATCH", "/api/small", b"abc"),
                ("DELETE", "/deny/this", b""),
                ("GET", "/unauth", b""),
                ("PUT", "/error/x", b""),
            ):
                servers.checks.clear()
                servers.upstream.clear()
                url = yarl.URL(f"http://127.0.0.1:{envoy.listener_port}{path}", encoded=True)
                # aiohttp labels a bytes body itself; name the type so both paths carry the same.
                ctype = [("Content-Type", "application/json")] if body else []
                hdrs = [("Host", authority), *REQUEST_HEADERS, *ctype]
                async with http.request(method, url, headers=hdrs, data=body or None) as resp:
                    envoy_status, envoy_body = resp.status, await resp.read()
                    envoy_resp_headers = [(k.decode().lower(), v.decode()) for k, v in resp.raw_headers]
                assert len(servers.checks) == 1, (path, envoy_status, envoy_body)
                envoy_check = servers.checks.pop()
                envoy_upstream = servers.upstream.pop() if servers.upstream else None

                sent_headers = [*REQUEST_HEADERS, *ctype]
                if body:
                    sent_headers.append(("Content-Length", str(len(body))))
                result = await client.check(method, path, authority, sent_headers, body)
                assert len(servers.checks) == 1
                ours = servers.checks.pop()

                # 1. The check request: same method, path, body and headers.
                assert ours.method == envoy_check.method == method
                assert ours.path == envoy_check.path == "/check" + path
                assert ours.body == envoy_check.body == (body[:8] if with_body else b"")
                assert sorted(ours.headers) == sorted(envoy_check.headers), path

                # 2. The verdict and what it does to the request and the response.
                if envoy_upstream is not None:
                    assert result.allowed and result.status == 200 and envoy_status == 200
                    applied = _apply_upstream(hdrs, body, result.upstream_set, result.upstream_remove)
                    assert _strip(applied) == _strip(
                        [(k, v) for k, v in envoy_upstream.headers if k not in ("content-length",)]
                        + ([("content-length", str(len(body)))] if body else [])
                    ), path
                    down = dict(result.downstream_headers)
                    assert down == {"x-down": "from-authz"}
                    assert dict(envoy_resp_headers)["x-down"] == "from-authz"
                else:
                    assert not result.allowed
                    assert result.status == envoy_status, (path, result, envoy_body)
                    assert result.body == envoy_body, path
                    # Framing and Envoy's own stamps (its router's service time) are not the
                    # authorizer's headers; content-type is checked with the body below.
                    ignore = {
                        "date",
                        "server",
                        "content-length",
                        "connection",
                        "x-envoy-upstream-service-time",
                    }
                    env_h = sorted((k, v) for k, v in envoy_resp_headers if k not in ignore)
                    our_h = sorted((k, v) for k, v in result.downstream_headers if k not in ignore)
                    assert our_h == env_h, path
    finally:
        await client.close()
        await asyncio.to_thread(envoy.stop)


def _apply_upstream(
    headers: list[tuple[str, str]], body: bytes, set_: tuple[tuple[str, str], ...], remove: tuple[str, ...]
) -> list[tuple[str, str]]:
    names = {k for k, _ in set_} | set(remove)
    out = [(k.lower(), v) for k, v in headers if k.lower() not in names]
    out.extend(set_)
    out = [("host" if k == "host" else k, v) for k, v in out]
    if body:
        out.append(("content-length", str(len(body))))
    return out


# --------------------------------------------------------------------------------------------
# Without Envoy: failure handling and config errors


async def test_unreachable_and_slow_authorizers_fail_closed(servers: Servers) -> None:
    base = dict(MESH_PROVIDER["envoyExtAuthzHttp"])
    p = ExtAuthzHttpProvider.from_mesh_config({"name": "ext", "envoyExtAuthzHttp": base})
    # Nothing listens on the backend port's neighbour... use a closed port we know: bind and close.
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    c = ExtAuthzHttpClient(p, address=("127.0.0.1", dead))
    r = await c.check("GET", "/x", "h", [])
    assert not r.allowed and r.status == 403 and r.error and c.errors == 1
    await c.close()
    fo = ExtAuthzHttpProvider.from_mesh_config(
        {"name": "ext", "envoyExtAuthzHttp": {**base, "failOpen": True, "statusOnError": "503"}}
    )
    c = ExtAuthzHttpClient(fo, address=("127.0.0.1", dead))
    r = await c.check("GET", "/x", "h", [])
    assert r.allowed and r.error
    await c.close()

    # A slow authorizer: the timeout bounds the wait and denies.
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)
        writer.close()

    srv = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    slow = ExtAuthzHttpProvider.from_mesh_config(
        {"name": "ext", "envoyExtAuthzHttp": {**base, "timeout": "200ms", "statusOnError": "503"}}
    )
    c = ExtAuthzHttpClient(slow, address=("127.0.0.1", port))
    t0 = asyncio.get_running_loop().time()
    r = await c.check("GET", "/x", "h", [])
    assert not r.allowed and r.status == 503 and "0.2s" in (r.error or "")
    assert asyncio.get_running_loop().time() - t0 < 2
    await c.close()
    srv.close()


def test_body_and_pure_reading() -> None:
    p = ExtAuthzHttpProvider.from_mesh_config(
        {
            "name": "b",
            "envoyExtAuthzHttp": {
                "service": "a",
                "port": 1,
                "includeRequestBodyInCheck": {"maxRequestBytes": 4},
                "headersToDownstreamOnDeny": ["x-why"],
            },
        }
    )
    with pytest.raises(BodyTooLarge):
        build_check_request(p, "POST", "/", "h", [], b"12345")
    cr = build_check_request(p, "POST", "/", "h", [("content-length", "3")], b"123")
    assert cr.body == b"123" and ("content-length", "3") in cr.headers
    partial = ExtAuthzHttpProvider.from_mesh_config(
        {
            "name": "b",
            "envoyExtAuthzHttp": {
                "service": "a",
                "port": 1,
                "includeRequestBodyInCheck": {"maxRequestBytes": 4, "allowPartialMessage": True},
            },
        }
    )
    assert build_check_request(partial, "POST", "/", "h", [], b"123456").body == b"1234"
    # A listed deny header set keeps Envoy's always-forwarded ones too.
    r = interpret_response(p, 401, [("X-Why", "a"), ("WWW-Authenticate", "Bearer"), ("x-no", "1")], b"no")
    assert (r.allowed, r.status, r.body) == (False, 401, b"no")
    assert dict(r.downstream_headers) == {"x-why": "a", "www-authenticate": "Bearer"}
    assert interpret_response(p, 502, [], b"").status == 403  # 5xx: error -> statusOnError
    assert interpret_response(p, 204, [], b"").allowed is False  # only 200 allows, as in Envoy
    o = interpret_response(p, 200, [], b"").outcome("b")
    assert (o.provider, o.allowed) == ("b", True)


@pytest.mark.parametrize(
    "spec,field",
    [
        ({"port": 1}, "service"),
        ({"service": "a"}, "port"),
        ({"service": "a", "port": 70000}, "port"),
        ({"service": "a", "port": 1, "timeout": "soon"}, "timeout"),
        ({"service": "a", "port": 1, "pathPrefix": "check"}, "pathPrefix"),
        ({"service": "a", "port": 1, "statusOnError": "abc"}, "statusOnError"),
        ({"service": "a", "port": 1, "includeRequestHeadersInCheck": "x"}, "includeRequestHeadersInCheck"),
        ({"service": "a", "port": 1, "bogus": 1}, "bogus"),
        ({"service": "a", "port": 1, "includeRequestBodyInCheck": {}}, "maxRequestBytes"),
    ],
)
def test_provider_errors_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ProviderConfigError) as ei:
        ExtAuthzHttpProvider.from_mesh_config({"name": "x", "envoyExtAuthzHttp": spec})
    assert field in ei.value.path
