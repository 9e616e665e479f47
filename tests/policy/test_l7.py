"""L7 AuthorizationPolicy tables: every field, `when` keys, header joining, claims, decision order."""

from __future__ import annotations

from typing import Any

import pytest

from policy import parse_policies
from policy.authz import Verdict
from policy.l7 import (
    CODE_ALLOW_MATCHED,
    CODE_CUSTOM_CONFLICT,
    CODE_CUSTOM_DENIED,
    CODE_CUSTOM_PENDING,
    CODE_DENY_MATCHED,
    CODE_INVALID_POLICY,
    CODE_NO_ALLOW_MATCHED,
    CODE_NO_POLICY,
    DENY_BODY,
    CustomOutcome,
    HeaderMap,
    HttpRequest,
    L7PolicyIndex,
    RequestRejected,
    WaypointTarget,
    evaluate_l7,
)
from policy.model import AuthorizationPolicy
from policy.paths import PathRejected
from tests.policy.util import authz

SLEEP = "cluster.local/ns/ns1/sa/sleep"
CLAIMS = {
    "iss": "https://issuer.example",
    "sub": "alice",
    "aud": ["payments", "web"],
    "azp": "frontend",
    "scope": ["payments:charge", "read"],
    "groups": ["admins", "dev"],
    "org": {"team": {"name": "core"}, "tier": "gold", "n": 3},
    "email_verified": True,
}


def req(
    method: str = "GET",
    path: str = "/",
    host: str = "httpbin.ns2.svc.cluster.local:8000",
    headers: Any = (),
    principal: str | None = SLEEP,
    src: str | None = "10.244.1.2",
    dst: str | None = "10.244.2.5",
    port: int = 8000,
    remote: str | None = None,
    claims: dict[str, Any] | None = None,
    sni: str | None = None,
) -> HttpRequest:
    return HttpRequest.create(
        method=method,
        path=path,
        host=host,
        headers=headers,
        source_principal=principal,
        source_ip=src,
        destination_ip=dst,
        destination_port=port,
        remote_ip=remote,
        jwt_claims=claims,
        sni=sni,
    )


def pol(spec: str, action: str = "ALLOW", name: str = "p", ns: str = "ns2", **kw: Any) -> AuthorizationPolicy:
    ref = "{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}"
    body = f"targetRefs: [{ref}]\naction: {action}\n"
    if action == "CUSTOM" and "provider" not in spec:
        body += "provider: {name: ext}\n"
    ps = parse_policies([authz(ns, name, body + spec, **kw)])
    assert ps.ok, [str(e) for e in ps.errors]
    return ps.authorization[0]


def allows(spec: str, r: HttpRequest, action: str = "ALLOW") -> bool:
    """Does one policy of `action` with this spec match r (via the verdict it produces)?"""
    d = evaluate_l7(r, [pol(spec, action)])
    if action == "ALLOW":
        return d.allowed
    return not d.allowed


# --------------------------------------------------------------------------------------------
# to.operation


@pytest.mark.parametrize(
    "spec,r,want",
    [
        # methods / notMethods
        ("rules: [{to: [{operation: {methods: [POST]}}]}]", req("POST"), True),
        ("rules: [{to: [{operation: {methods: [POST]}}]}]", req("GET"), False),
        ("rules: [{to: [{operation: {notMethods: [DELETE]}}]}]", req("GET"), True),
        ("rules: [{to: [{operation: {notMethods: [DELETE]}}]}]", req("DELETE"), False),
        ("rules: [{to: [{operation: {methods: ['P*']}}]}]", req("PUT"), True),
        # paths: exact, prefix, suffix, presence, templates, against the normalized path
        ("rules: [{to: [{operation: {paths: [/v1/charge]}}]}]", req(path="/v1/charge"), True),
        ("rules: [{to: [{operation: {paths: [/v1/charge]}}]}]", req(path="/v1/charge?x=1"), True),
        ("rules: [{to: [{operation: {paths: [/v1/charge]}}]}]", req(path="/v1/charge/"), False),
        ("rules: [{to: [{operation: {paths: [/v1/charge]}}]}]", req(path="/v1/x/../charge"), True),
        ("rules: [{to: [{operation: {paths: [/v1/charge]}}]}]", req(path="/v1//charge"), True),
        ("rules: [{to: [{operation: {paths: [/v1/charge]}}]}]", req(path="/v1/%63harge"), True),
        ("rules: [{to: [{operation: {paths: ['/v1/*']}}]}]", req(path="/v1/anything/else"), True),
        ("rules: [{to: [{operation: {paths: ['*.html']}}]}]", req(path="/a/b.html"), True),
        ("rules: [{to: [{operation: {paths: ['/u/{*}/info']}}]}]", req(path="/u/7/info"), True),
        ("rules: [{to: [{operation: {paths: ['/u/{*}/info']}}]}]", req(path="/u/7/8/info"), False),
        ("rules: [{to: [{operation: {paths: ['/u/{**}']}}]}]", req(path="/u/7/8/info"), True),
        ("rules: [{to: [{operation: {paths: ['/u/{**}']}}]}]", req(path="/v/7"), False),
        ("rules: [{to: [{operation: {notPaths: ['/admin*']}}]}]", req(path="/x/../admin/users"), False),
        ("rules: [{to: [{operation: {notPaths: ['/admin*']}}]}]", req(path="/public"), True),
        # hosts: case-insensitive, with and without port
        ("rules: [{to: [{operation: {hosts: [httpbin.ns2.svc.cluster.local]}}]}]", req(), True),
        (
            "rules: [{to: [{operation: {hosts: [HTTPBIN.ns2.svc.cluster.local]}}]}]",
            req(host="httpbin.NS2.svc.cluster.local"),
            True,
        ),
        ("rules: [{to: [{operation: {hosts: ['httpbin.ns2.svc.cluster.local:8000']}}]}]", req(), True),
        ("rules: [{to: [{operation: {hosts: ['httpbin.ns2.svc.cluster.local:9000']}}]}]", req(), False),
        ("rules: [{to: [{operation: {hosts: ['*.cluster.local']}}]}]", req(), True),
        ("rules: [{to: [{operation: {hosts: ['*.example.com']}}]}]", req(), False),
        ("rules: [{to: [{operation: {hosts: ['httpbin*']}}]}]", req(host="HttpBin:80"), True),
        ("rules: [{to: [{operation: {hosts: ['[::1]']}}]}]", req(host="[::1]:8000"), True),
        ("rules: [{to: [{operation: {notHosts: [evil.example]}}]}]", req(host="EVIL.example:443"), False),
        ("rules: [{to: [{operation: {notHosts: [evil.example]}}]}]", req(), True),
        # ports / notPorts (destination port)
        ("rules: [{to: [{operation: {ports: ['8000']}}]}]", req(port=8000), True),
        ("rules: [{to: [{operation: {ports: ['8000']}}]}]", req(port=9000), False),
        ("rules: [{to: [{operation: {notPorts: ['8000']}}]}]", req(port=8000), False),
        # fields AND, operations OR
        (
            "rules: [{to: [{operation: {methods: [POST], paths: [/v1/charge]}}]}]",
            req("POST", "/v1/charge"),
            True,
        ),
        (
            "rules: [{to: [{operation: {methods: [POST], paths: [/v1/charge]}}]}]",
            req("POST", "/v1/refund"),
            False,
        ),
        (
            "rules: [{to: [{operation: {methods: [POST]}}, {operation: {paths: [/x]}}]}]",
            req("GET", "/x"),
            True,
        ),
    ],
)
def test_operation(spec: str, r: HttpRequest, want: bool) -> None:
    assert allows(spec, r) is want
    # The same rule in a DENY policy denies exactly the same requests.
    assert allows(spec, r, "DENY") is want


# --------------------------------------------------------------------------------------------
# from.source


@pytest.mark.parametrize(
    "spec,r,want",
    [
        ("rules: [{from: [{source: {principals: [cluster.local/ns/ns1/sa/sleep]}}]}]", req(), True),
        (
            "rules: [{from: [{source: {principals: [cluster.local/ns/ns1/sa/sleep]}}]}]",
            req(principal="spiffe://cluster.local/ns/ns1/sa/sleep"),
            True,
        ),
        (
            "rules: [{from: [{source: {principals: [cluster.local/ns/ns1/sa/sleep]}}]}]",
            req(principal=None),
            False,
        ),
        ("rules: [{from: [{source: {notPrincipals: ['*']}}]}]", req(principal=None), True),
        ("rules: [{from: [{source: {namespaces: [ns1]}}]}]", req(), True),
        ("rules: [{from: [{source: {notNamespaces: [ns1]}}]}]", req(), False),
        ("rules: [{from: [{source: {serviceAccounts: [ns1/sleep]}}]}]", req(), True),
        ("rules: [{from: [{source: {serviceAccounts: [sleep]}}]}]", req(), False),  # bare = policy ns (ns2)
        ("rules: [{from: [{source: {notServiceAccounts: [ns1/sleep]}}]}]", req(), False),
        ("rules: [{from: [{source: {ipBlocks: [10.244.1.0/24]}}]}]", req(), True),
        ("rules: [{from: [{source: {ipBlocks: [10.244.1.0/24]}}]}]", req(src="::ffff:10.244.1.9"), True),
        ("rules: [{from: [{source: {notIpBlocks: [10.244.1.0/24]}}]}]", req(), False),
        ("rules: [{from: [{source: {requestPrincipals: ['*']}}]}]", req(), False),
        ("rules: [{from: [{source: {requestPrincipals: ['*']}}]}]", req(claims=CLAIMS), True),
        (
            "rules: [{from: [{source: {requestPrincipals: [https://issuer.example/alice]}}]}]",
            req(claims=CLAIMS),
            True,
        ),
        (
            "rules: [{from: [{source: {requestPrincipals: [https://issuer.example/bob]}}]}]",
            req(claims=CLAIMS),
            False,
        ),
        (
            "rules: [{from: [{source: {requestPrincipals: ['https://issuer.example/*']}}]}]",
            req(claims=CLAIMS),
            True,
        ),
        ("rules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]", req(), True),
        ("rules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]", req(claims=CLAIMS), False),
        # remoteIpBlocks: the remote (original client) IP, defaulting to the source IP
        ("rules: [{from: [{source: {remoteIpBlocks: [10.244.1.2/32]}}]}]", req(), True),
        ("rules: [{from: [{source: {remoteIpBlocks: [192.0.2.0/24]}}]}]", req(remote="192.0.2.7"), True),
        ("rules: [{from: [{source: {remoteIpBlocks: [192.0.2.0/24]}}]}]", req(), False),
        ("rules: [{from: [{source: {notRemoteIpBlocks: [192.0.2.0/24]}}]}]", req(remote="192.0.2.7"), False),
        # A forged forwarded-for header is not the remote IP.
        (
            "rules: [{from: [{source: {remoteIpBlocks: [192.0.2.0/24]}}]}]",
            req(headers={"x-forwarded-for": "192.0.2.7"}),
            False,
        ),
        # sources OR, fields AND
        ("rules: [{from: [{source: {namespaces: [x]}}, {source: {namespaces: [ns1]}}]}]", req(), True),
        ("rules: [{from: [{source: {namespaces: [ns1], ipBlocks: [1.2.3.4]}}]}]", req(), False),
    ],
)
def test_source(spec: str, r: HttpRequest, want: bool) -> None:
    assert allows(spec, r) is want
    assert allows(spec, r, "DENY") is want


# --------------------------------------------------------------------------------------------
# when


def when(key: str, values: list[str] | None = None, not_values: list[str] | None = None) -> str:
    c: dict[str, Any] = {"key": key}
    if values is not None:
        c["values"] = values
    if not_values is not None:
        c["notValues"] = not_values
    import json

    return f"rules: [{{when: [{json.dumps(c)}]}}]"


HDRS = [("X-Tenant", "acme"), ("x-tenant", "beta"), ("Cookie", "a=1"), ("cookie", "b=2"), ("X-Empty", "")]


@pytest.mark.parametrize(
    "spec,r,want",
    [
        # headers: case-insensitive names, repeated values joined with "," as Envoy does
        (when("request.headers[x-tenant]", ["acme,beta"]), req(headers=HDRS), True),
        (when("request.headers[X-TENANT]", ["acme"]), req(headers=HDRS), False),
        (when("request.headers[x-tenant]", ["acme*"]), req(headers=HDRS), True),
        (when("request.headers[x-tenant]", ["*beta"]), req(headers=HDRS), True),
        (when("request.headers[cookie]", ["a=1; b=2"]), req(headers=HDRS), True),
        (when("request.headers[x-tenant]", ["*"]), req(headers=HDRS), True),
        (when("request.headers[x-empty]", ["*"]), req(headers=HDRS), True),  # present, even empty
        (when("request.headers[x-missing]", ["*"]), req(headers=HDRS), False),
        (when("request.headers[x-missing]", not_values=["anything"]), req(headers=HDRS), True),
        (when("request.headers[x-tenant]", not_values=["acme,beta"]), req(headers=HDRS), False),
        (when("request.headers[x-tenant]", ["acme,beta"], ["x"]), req(headers=HDRS), True),
        # pseudo-headers: Host is :authority in Envoy
        (when("request.headers[:authority]", ["httpbin.*"]), req(), True),
        (when("request.headers[host]", ["httpbin.*"]), req(), True),
        (when("request.headers[:method]", ["PUT"]), req("PUT"), True),
        (when("request.headers[:path]", ["/a/b?x=1"]), req(path="/a/./b?x=1"), True),
        # request.auth.*
        (when("request.auth.principal", ["https://issuer.example/alice"]), req(claims=CLAIMS), True),
        (when("request.auth.principal", ["*"]), req(), False),
        (when("request.auth.audiences", ["web"]), req(claims=CLAIMS), True),
        (when("request.auth.audiences", ["mobile"]), req(claims=CLAIMS), False),
        (when("request.auth.audiences", ["solo"]), req(claims={**CLAIMS, "aud": "solo"}), True),
        (when("request.auth.presenter", ["frontend"]), req(claims=CLAIMS), True),
        # claims: list, nested, non-string, absent
        (when("request.auth.claims[groups]", ["admins"]), req(claims=CLAIMS), True),
        (when("request.auth.claims[groups]", ["root"]), req(claims=CLAIMS), False),
        (when("request.auth.claims[scope]", ["payments:charge"]), req(claims=CLAIMS), True),
        (when("request.auth.claims[org][team][name]", ["core"]), req(claims=CLAIMS), True),
        (when("request.auth.claims[org][tier]", ["gold"]), req(claims=CLAIMS), True),
        (when("request.auth.claims[org][team]", ["core"]), req(claims=CLAIMS), False),  # an object
        (when("request.auth.claims[org][n]", ["3"]), req(claims=CLAIMS), False),  # a number
        (when("request.auth.claims[email_verified]", ["true"]), req(claims=CLAIMS), False),
        (when("request.auth.claims[nope]", ["x"]), req(claims=CLAIMS), False),
        (when("request.auth.claims[nope]", not_values=["x"]), req(claims=CLAIMS), True),
        (when("request.auth.claims[groups]", ["admins"]), req(), False),
        (when("request.auth.claims[groups]", not_values=["admins"]), req(claims=CLAIMS), False),
        # connection / source / destination
        (when("source.ip", ["10.244.1.0/24"]), req(), True),
        (when("remote.ip", ["192.0.2.1"]), req(remote="192.0.2.1"), True),
        (when("source.namespace", ["ns1"]), req(), True),
        (when("source.principal", ["*/sa/sleep"]), req(), True),
        (when("source.serviceAccount", ["ns1/sleep"]), req(), True),
        (when("destination.ip", ["10.244.2.5"]), req(), True),
        (when("destination.port", ["8000"]), req(), True),
        (when("destination.port", not_values=["8000"]), req(), False),
        (when("connection.sni", ["httpbin.example"]), req(sni="httpbin.example"), True),
        (when("connection.sni", ["httpbin.example"]), req(), False),
    ],
)
def test_when(spec: str, r: HttpRequest, want: bool) -> None:
    assert allows(spec, r) is want
    assert allows(spec, r, "DENY") is want


def test_space_delimited_scope_needs_the_jwt_module_to_split_it() -> None:
    # The evaluator matches list elements; a raw space-delimited string is one value.
    spec = when("request.auth.claims[scope]", ["payments:charge"])
    assert not allows(spec, req(claims={**CLAIMS, "scope": "read payments:charge"}))
    assert allows(spec, req(claims={**CLAIMS, "scope": ["read", "payments:charge"]}))


def test_header_map_joining() -> None:
    h = HeaderMap([("A", "1"), ("b", "2"), ("a", "3"), ("a", "")])
    assert h.get("a") == "1,3,"
    assert h.get("A") == "1,3,"
    assert h.values("a") == ("1", "3", "")
    assert h.get("c") is None
    assert "B" in h and "c" not in h
    assert len(h) == 4


# --------------------------------------------------------------------------------------------
# Unsupported attributes and unknown values fail closed


@pytest.mark.parametrize(
    "key", ["experimental.envoy.filters.http.foo[bar]", "request.experimental.inline.headers[x]"]
)
def test_unsupported_when_fails_closed(key: str) -> None:
    spec = when(key, ["v"])
    r = req()
    d = evaluate_l7(r, [pol(spec)])
    assert not d.allowed and d.code == CODE_NO_ALLOW_MATCHED
    assert key in d.reason
    d = evaluate_l7(r, [pol(spec, "DENY")])
    assert not d.allowed and d.code == CODE_DENY_MATCHED
    assert "fail closed" in d.reason and key in d.reason
    # notValues too
    d = evaluate_l7(r, [pol(when(key, not_values=["v"]), "DENY")])
    assert not d.allowed


def test_unknown_ip_fails_closed() -> None:
    r = req(src=None)
    assert not allows("rules: [{from: [{source: {notIpBlocks: [1.2.3.4/32]}}]}]", r)
    assert allows("rules: [{from: [{source: {ipBlocks: [1.2.3.4/32]}}]}]", r, "DENY")
    d = evaluate_l7(r, [pol("rules: [{from: [{source: {notIpBlocks: [1.2.3.4/32]}}]}]", "DENY")])
    assert not d.allowed and "unknown IP" in d.reason


# --------------------------------------------------------------------------------------------
# Decision order


def test_order_and_status() -> None:
    r = req("POST", "/v1/charge", claims=CLAIMS)
    allow = pol("rules: [{to: [{operation: {methods: [POST]}}]}]", name="allow-post")
    deny = pol("rules: [{to: [{operation: {paths: [/v1/charge]}}]}]", "DENY", name="deny-charge")
    d = evaluate_l7(r, [])
    assert d.allowed and d.code == CODE_NO_POLICY and d.status == 200 and d.body == ""
    d = evaluate_l7(r, [allow])
    assert d.allowed and d.code == CODE_ALLOW_MATCHED and d.policies == ("ns2/allow-post",)
    d = evaluate_l7(r, [allow, deny])
    assert not d.allowed and d.code == CODE_DENY_MATCHED and d.status == 403 and d.body == DENY_BODY
    assert d.policies == ("ns2/deny-charge",)
    d = evaluate_l7(req("GET"), [allow])
    assert not d.allowed and d.code == CODE_NO_ALLOW_MATCHED and d.status == 403
    assert d.to_dict()["decision"] == "DENY"


def test_unset_rules_never_match_and_empty_rule_always_does() -> None:
    assert not evaluate_l7(req(), [pol("")]).allowed  # ALLOW without rules allows nothing
    assert evaluate_l7(req(), [pol("rules: [{}]")]).allowed
    assert not evaluate_l7(req(), [pol("rules: [{}]", "DENY")]).allowed


def test_audit_and_dry_run_never_change_the_verdict() -> None:
    r = req("DELETE", "/x")
    audit = pol("rules: [{}]", "AUDIT", name="audit")
    dry_deny = pol("rules: [{to: [{operation: {methods: [DELETE]}}]}]", "DENY", name="dry", dry_run="true")
    dry_allow = pol("rules: [{to: [{operation: {methods: [GET]}}]}]", name="dry-allow", dry_run="true")
    d = evaluate_l7(r, [audit, dry_deny, dry_allow])
    assert d.allowed and d.code == CODE_NO_POLICY  # dry-run ALLOW does not count as present
    assert d.audit == ("ns2/audit",)
    assert [m.policy for m in d.dry_run] == ["ns2/dry"]
    assert d.dry_run_verdict is Verdict.DENY


def test_poisoned_policies_fail_closed() -> None:
    bad = parse_policies(
        [
            authz(
                "ns2",
                "bad",
                "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n"
                "action: DENY\nrules: [{to: [{operation: {bogus: 1}}]}]",
            )
        ]
    ).authorization[0]
    assert bad.poisoned
    d = evaluate_l7(req(), [bad])
    assert not d.allowed and d.code == CODE_INVALID_POLICY


def test_custom_flow() -> None:
    r = req("POST", "/v1/charge")
    custom = pol("rules: [{to: [{operation: {paths: ['/v1/*']}}]}]", "CUSTOM", name="ext")
    allow = pol("rules: [{to: [{operation: {methods: [GET]}}]}]", name="get-only")
    d = evaluate_l7(r, [custom])
    assert not d.allowed and d.code == CODE_CUSTOM_PENDING and d.pending_custom == "ext"
    d = evaluate_l7(r, [custom], CustomOutcome("ext", allowed=False, reason="403 from authorizer"))
    assert not d.allowed and d.code == CODE_CUSTOM_DENIED and "403 from authorizer" in d.reason
    d = evaluate_l7(r, [custom], CustomOutcome("ext", allowed=True))
    assert d.allowed and d.code == CODE_NO_POLICY
    # CUSTOM allowed, then the ALLOW policies still decide.
    d = evaluate_l7(r, [custom, allow], CustomOutcome("ext", allowed=True))
    assert not d.allowed and d.code == CODE_NO_ALLOW_MATCHED
    # An outcome from another provider does not count.
    d = evaluate_l7(r, [custom], CustomOutcome("other", allowed=True))
    assert d.code == CODE_CUSTOM_PENDING
    # Not matching: no ext_authz call at all.
    d = evaluate_l7(req("GET", "/public"), [custom])
    assert d.allowed and d.pending_custom is None


def test_poisoned_custom_denies_without_asking() -> None:
    bad = parse_policies(
        [
            authz(
                "ns2",
                "badext",
                "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n"
                "action: CUSTOM\nprovider: {name: ext}\nrules: [{from: [{source: {principals: [x]}}]}]",
            )
        ]
    ).authorization[0]
    assert bad.poisoned  # principals are not supported with CUSTOM
    d = evaluate_l7(req(), [bad], CustomOutcome("ext", allowed=True))
    assert not d.allowed and d.code == CODE_INVALID_POLICY and d.pending_custom is None


def test_two_custom_providers_are_refused() -> None:
    a = pol("provider: {name: a}\nrules: [{}]", "CUSTOM", name="a")
    b = pol("provider: {name: b}\nrules: [{}]", "CUSTOM", name="b")
    d = evaluate_l7(req(), [a, b], CustomOutcome("a", True))
    assert not d.allowed and d.code == CODE_CUSTOM_CONFLICT


# --------------------------------------------------------------------------------------------
# Request validation and target selection


def test_bad_requests_are_400() -> None:
    assert req("M-SEARCH").method == "M-SEARCH"
    for m in ("get", "Get", "", "GE T", "G\u00c9T"):
        with pytest.raises(RequestRejected):
            req(m)
    with pytest.raises(RequestRejected):
        req("get")
    with pytest.raises(RequestRejected):
        req(headers=[("bad name", "x")])
    with pytest.raises(PathRejected):
        req(path="/admin%00")


def test_waypoint_selection() -> None:
    ps = parse_policies(
        [
            authz(
                "ns2",
                "gw",
                "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n"
                "action: DENY\nrules: [{to: [{operation: {paths: [/gw]}}]}]",
            ),
            authz(
                "ns2",
                "svc",
                "targetRefs: [{kind: Service, group: '', name: httpbin}]\n"
                "action: DENY\nrules: [{to: [{operation: {paths: [/svc]}}]}]",
            ),
            authz(
                "istio-system",
                "mesh",
                "targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, "
                "name: istio-waypoint}]\naction: DENY\nrules: [{to: [{operation: {paths: [/mesh]}}]}]",
            ),
            authz("ns2", "l4", "action: DENY\nrules: [{to: [{operation: {paths: [/l4]}}]}]"),
            authz(
                "ns3",
                "other",
                "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n"
                "action: DENY\nrules: [{}]",
            ),
        ]
    )
    assert ps.ok, [str(e) for e in ps.errors]
    idx = L7PolicyIndex(ps)
    t = WaypointTarget("ns2", "waypoint", "ns2", "httpbin")
    assert [p.key for p in idx.select(t)] == ["istio-system/mesh", "ns2/gw", "ns2/svc"]
    t2 = WaypointTarget("ns2", "waypoint", "ns2", "other-svc")
    assert [p.key for p in idx.select(t2)] == ["istio-system/mesh", "ns2/gw"]
    for path, ok in (("/gw", False), ("/svc", False), ("/mesh", False), ("/l4", True), ("/x", True)):
        assert idx.evaluate(req(path=path), t).allowed is ok, path
    assert idx.evaluate(req(path="/svc"), t2).allowed
