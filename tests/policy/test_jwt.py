"""RequestAuthentication / JWT: locations, outputs, Istio's status codes and the attack cases.

Keys are generated here with `cryptography`; tokens are signed with PyJWT or, for the attacks
PyJWT refuses to produce (alg none, HMAC with a public key), built byte by byte.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from policy.jwt import (
    MAX_TOKEN_BYTES,
    MSG_ALG,
    MSG_AUDIENCE,
    MSG_BAD_FORMAT,
    MSG_EXPIRED,
    MSG_KID,
    MSG_NOT_YET_VALID,
    MSG_TOO_BIG,
    MSG_UNKNOWN_ISSUER,
    MSG_VERIFY,
    JwksError,
    JwksStore,
    JwtAuthenticator,
    JwtRuleSpec,
    parse_jwks,
    parse_request_authentication,
)
from policy.l7 import HttpRequest, evaluate_l7
from policy.model import JwtHeader, JwtRule
from tests.policy.test_l7 import pol

NOW = 1_800_000_000.0
ISS = "https://issuer.example"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk_of(pub: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    if isinstance(pub, rsa.RSAPublicKey):
        d = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(pub))
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        d = json.loads(pyjwt.algorithms.ECAlgorithm.to_jwk(pub))
    else:
        d = json.loads(pyjwt.algorithms.OKPAlgorithm.to_jwk(pub))
    d["kid"] = kid
    if alg:
        d["alg"] = alg
    return d


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "ed": ed25519.Ed25519PrivateKey.generate(),
        "p521": ec.generate_private_key(ec.SECP521R1()),
    }


@pytest.fixture(scope="module")
def jwks(keys: dict[str, Any]) -> str:
    return json.dumps(
        {
            "keys": [
                jwk_of(keys["rsa"].public_key(), "rsa1"),
                jwk_of(keys["ec"].public_key(), "ec1"),
                jwk_of(keys["ed"].public_key(), "ed1"),
            ]
        }
    )


def claims(**kw: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"iss": ISS, "sub": "alice", "aud": "payments", "exp": NOW + 300, "iat": NOW - 10}
    c.update(kw)
    return {k: v for k, v in c.items() if v is not None}


def sign(key: Any, payload: dict[str, Any], alg: str = "RS256", kid: str | None = "rsa1", **hdr: Any) -> str:
    headers = dict(hdr)
    if kid is not None:
        headers["kid"] = kid
    return pyjwt.encode(payload, key, algorithm=alg, headers=headers)


def rule(jwks: str | None = None, **kw: Any) -> JwtRuleSpec:
    kw.setdefault("issuer", ISS)
    return JwtRuleSpec(JwtRule(jwks=jwks, **kw))


def auth(
    a: JwtAuthenticator,
    token: str | None,
    *,
    headers: list[tuple[str, str]] | None = None,
    query: str | None = None,
):  # type: ignore[no-untyped-def]
    hs = list(headers or [])
    if token is not None:
        hs.append(("Authorization", f"Bearer {token}"))
    return a.authenticate(hs, query, NOW)


@pytest.fixture
def a(jwks: str) -> JwtAuthenticator:
    return JwtAuthenticator([rule(jwks, audiences=("payments",))], now=NOW)


# --------------------------------------------------------------------------------------------
# Good paths


@pytest.mark.parametrize(
    "kind,alg,kid",
    [
        ("rsa", "RS256", "rsa1"),
        ("rsa", "PS384", "rsa1"),
        ("rsa", "RS512", None),
        ("ec", "ES256", "ec1"),
        ("ed", "EdDSA", "ed1"),
    ],
)
def test_valid_tokens(
    a: JwtAuthenticator, keys: dict[str, Any], kind: str, alg: str, kid: str | None
) -> None:
    r = auth(a, sign(keys[kind], claims(), alg, kid))
    assert r.status == 200 and r.ok, r.reason
    assert r.principal == f"{ISS}/alice"
    assert r.claims is not None and r.claims["sub"] == "alice"
    assert r.remove_headers == ("authorization",)  # not forwarded by default


def test_missing_token_passes_without_principal(a: JwtAuthenticator) -> None:
    r = auth(a, None)
    assert r.ok and r.principal is None and r.claims is None


def test_clock_skew_is_60s(a: JwtAuthenticator, keys: dict[str, Any]) -> None:
    k = keys["rsa"]
    assert auth(a, sign(k, claims(exp=NOW - 59))).ok
    assert auth(a, sign(k, claims(nbf=NOW + 59))).ok
    assert auth(a, sign(k, claims(iat=NOW + 59))).ok
    assert auth(a, sign(k, claims(exp=None))).ok  # exp is not required (Istio/Envoy default)


# --------------------------------------------------------------------------------------------
# Attacks: each must be refused with the right status


def _attacks(keys: dict[str, Any], jwks: str) -> list[tuple[str, str, int, str]]:
    rsa_key = keys["rsa"]
    good = sign(rsa_key, claims())
    h, p, s = good.split(".")
    pub_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # alg none, with and without a signature part
    none_hdr = b64(json.dumps({"alg": "none", "kid": "rsa1"}).encode())
    body = b64(json.dumps(claims()).encode())
    # RSA/HMAC confusion: HS256 keyed with the RSA public key (PEM and the JWKS JSON)
    hs_hdr = b64(json.dumps({"alg": "HS256", "kid": "rsa1", "typ": "JWT"}).encode())
    conf_pem = f"{hs_hdr}.{body}." + b64(
        hmac.new(pub_pem, f"{hs_hdr}.{body}".encode(), hashlib.sha256).digest()
    )
    jwk_bytes = json.dumps(json.loads(jwks)["keys"][0]).encode()
    conf_jwk = f"{hs_hdr}.{body}." + b64(
        hmac.new(jwk_bytes, f"{hs_hdr}.{body}".encode(), hashlib.sha256).digest()
    )
    # a tampered payload keeping the original signature
    evil = b64(json.dumps(claims(sub="admin")).encode())
    # an attacker key embedded in the header (jwk) with the real kid
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    embedded = sign(attacker, claims(), jwk=jwk_of(attacker.public_key(), "rsa1"))
    return [
        ("alg none", f"{none_hdr}.{body}.", 401, MSG_ALG),
        ("alg none + sig", f"{none_hdr}.{body}.{s}", 401, MSG_ALG),
        ("alg None case", f"{b64(json.dumps({'alg': 'None'}).encode())}.{body}.", 401, MSG_ALG),
        ("HS256 with RSA PEM", conf_pem, 401, MSG_ALG),
        ("HS256 with JWK", conf_jwk, 401, MSG_ALG),
        ("ES256 header on RSA kid", sign(keys["ec"], claims(), "ES256", "rsa1"), 401, MSG_KID),
        ("expired", sign(rsa_key, claims(exp=NOW - 61)), 401, MSG_EXPIRED),
        ("not yet valid", sign(rsa_key, claims(nbf=NOW + 61)), 401, MSG_NOT_YET_VALID),
        ("issued in the future", sign(rsa_key, claims(iat=NOW + 3600)), 401, MSG_NOT_YET_VALID),
        ("exp not a number", sign(rsa_key, claims(exp="tomorrow")), 401, "Jwt exp claim is not a number"),
        ("wrong issuer", sign(rsa_key, claims(iss="https://evil.example")), 401, MSG_UNKNOWN_ISSUER),
        ("wrong audience", sign(rsa_key, claims(aud="other")), 403, MSG_AUDIENCE),
        ("no audience", sign(rsa_key, claims(aud=None)), 403, MSG_AUDIENCE),
        ("unknown kid", sign(rsa_key, claims(), kid="nope"), 401, MSG_KID),
        ("other key, same kid", sign(keys["rsa2"], claims()), 401, MSG_VERIFY),
        ("tampered payload", f"{h}.{evil}.{s}", 401, MSG_VERIFY),
        ("tampered signature", f"{h}.{p}.{s[:-4]}AAAA", 401, MSG_VERIFY),
        ("embedded jwk header", embedded, 401, MSG_VERIFY),
        ("crit header", sign(rsa_key, claims(), crit=["exp"], exp=1), 401, MSG_VERIFY),
        ("two parts", f"{h}.{p}", 401, MSG_BAD_FORMAT),
        ("JWE shape", f"{h}.{p}.{s}.x.y", 401, MSG_BAD_FORMAT),
        ("not base64", f"{h}.{p}!.{s}", 401, MSG_BAD_FORMAT),
        ("payload not JSON", f"{h}.{b64(b'nope')}.{s}", 401, MSG_BAD_FORMAT),
        ("oversized", sign(rsa_key, claims(pad="x" * MAX_TOKEN_BYTES)), 401, MSG_TOO_BIG),
    ]


def test_attack_cases(a: JwtAuthenticator, keys: dict[str, Any], jwks: str) -> None:
    for name, token, status, words in _attacks(keys, jwks):
        r = auth(a, token)
        assert r.status == status, (name, r.reason)
        assert r.reason == words, (name, r.reason)
        assert r.principal is None and r.claims is None, name
        if status == 401:
            assert r.www_authenticate is not None


def test_algorithm_pinned_by_the_jwk(keys: dict[str, Any]) -> None:
    k = keys["rsa"]
    doc = json.dumps({"keys": [jwk_of(k.public_key(), "rsa1", alg="RS256")]})
    a = JwtAuthenticator([rule(doc)], now=NOW)
    assert auth(a, sign(k, claims(), "RS256")).ok
    r = auth(a, sign(k, claims(), "PS256"))  # same key, other algorithm: refused
    assert r.status == 401 and "kid or alg" in r.reason


def test_jwks_key_filtering(keys: dict[str, Any]) -> None:
    ks = parse_jwks(
        {
            "keys": [
                {"kty": "oct", "k": b64(b"secret"), "kid": "h"},
                jwk_of(keys["p521"].public_key(), "p521"),
                {**jwk_of(keys["ec"].public_key(), "enc"), "use": "enc"},
                {**jwk_of(keys["rsa"].public_key(), "bad"), "alg": "HS256"},
                jwk_of(keys["rsa"].public_key(), "rsa1"),
            ]
        },
        NOW,
    )
    assert [k.kid for k in ks.keys] == ["rsa1"]
    assert len(ks.dropped) == 4 and any("HMAC" in d for d in ks.dropped)
    with pytest.raises(JwksError):
        parse_jwks({"keys": [{"kty": "oct", "k": b64(b"secret")}]}, NOW)
    for bad in ("not json", "[]", '{"keys": "x"}', '{"keys": []}'):
        with pytest.raises(JwksError):
            parse_jwks(bad, NOW)


# --------------------------------------------------------------------------------------------
# JWKS rotation and fail-closed loading


def test_jwks_rotation_keeps_last_good_and_first_failure_fails_closed(keys: dict[str, Any]) -> None:
    uri = "https://issuer.example/jwks"
    store = JwksStore(uri)
    a = JwtAuthenticator([rule(None, jwks_uri=uri)], {uri: store}, now=NOW)
    assert a.remote_sources() == [(uri, None)]
    t1 = sign(keys["rsa"], claims(), kid="rsa1")
    t2 = sign(keys["rsa2"], claims(), kid="rsa2")
    # Before the first successful fetch every token is refused; no token still passes.
    store.failed("connection refused", NOW)
    r = auth(a, t1)
    assert r.status == 401 and "fetch" in r.reason
    assert auth(a, None).ok
    assert store.state()["ready"] is False and store.state()["lastError"] == "connection refused"
    # First good set.
    store.update(json.dumps({"keys": [jwk_of(keys["rsa"].public_key(), "rsa1")]}), NOW)
    assert auth(a, t1).ok
    assert auth(a, t2).status == 401
    # Rotation: the issuer publishes both keys, then drops the old one.
    old = store.current
    store.update(
        {"keys": [jwk_of(keys["rsa"].public_key(), "rsa1"), jwk_of(keys["rsa2"].public_key(), "rsa2")]},
        NOW + 1,
    )
    assert store.current is not old
    assert auth(a, t1).ok and auth(a, t2).ok
    store.update({"keys": [jwk_of(keys["rsa2"].public_key(), "rsa2")]}, NOW + 2)
    assert auth(a, t1).status == 401 and auth(a, t2).ok
    # A bad document is refused and the last good set keeps serving.
    good = store.current
    with pytest.raises(JwksError):
        store.update("{garbage", NOW + 3)
    assert store.current is good and auth(a, t2).ok
    st = store.state()
    assert st["ready"] and st["keys"] == 1 and st["failures"] == 2 and st["updates"] == 3
    assert st["lastError"] and "JSON" in st["lastError"]


def test_bad_inline_jwks_refuses_every_token(keys: dict[str, Any]) -> None:
    a = JwtAuthenticator([rule("{not json")], now=NOW)
    assert auth(a, sign(keys["rsa"], claims())).status == 401
    assert auth(a, None).ok


# --------------------------------------------------------------------------------------------
# Locations, outputs, multiple tokens and rules


def test_locations(jwks: str, keys: dict[str, Any]) -> None:
    t = sign(keys["rsa"], claims())
    custom = JwtAuthenticator(
        [
            rule(
                jwks,
                from_headers=(JwtHeader("x-jwt", "Token "),),
                from_params=("tok",),
                from_cookies=("session",),
            )
        ],
        now=NOW,
    )
    assert custom.authenticate([("X-JWT", f"Token {t}")], None, NOW).principal == f"{ISS}/alice"
    assert custom.authenticate([], f"a=1&tok={t}", NOW).principal == f"{ISS}/alice"
    assert custom.authenticate([("cookie", f"a=b; session={t}")], None, NOW).principal == f"{ISS}/alice"
    # A custom location replaces the default ones: Authorization is not read.
    assert custom.authenticate([("authorization", f"Bearer {t}")], None, NOW).principal is None
    default = JwtAuthenticator([rule(jwks)], now=NOW)
    assert default.authenticate([("authorization", f"bearer {t}")], None, NOW).principal == f"{ISS}/alice"
    r = default.authenticate([], f"access_token={t}&x=1", NOW)
    assert r.principal == f"{ISS}/alice" and r.remove_params == ("access_token",)
    # Wrong prefix: not a token for this rule.
    assert default.authenticate([("authorization", f"Basic {t}")], None, NOW).principal is None


def test_outputs_and_forged_headers(jwks: str, keys: dict[str, Any]) -> None:
    a = JwtAuthenticator(
        [
            rule(
                jwks,
                output_payload_to_header="x-jwt-payload",
                output_claim_to_headers=(
                    ("x-sub", "sub"),
                    ("x-groups", "groups"),
                    ("x-admin", "admin"),
                    ("x-n", "org.n"),
                ),
                forward_original_token=True,
            )
        ],
        now=NOW,
    )
    c = claims(groups=["a"], admin=False, org={"n": 3})
    r = auth(a, sign(keys["rsa"], c), headers=[("x-jwt-payload", "forged"), ("x-sub", "root")])
    assert r.ok
    assert "authorization" not in r.remove_headers  # forwardOriginalToken
    assert set(r.remove_headers) >= {"x-jwt-payload", "x-sub", "x-groups", "x-admin", "x-n"}
    added = dict(r.add_headers)
    payload = json.loads(
        base64.urlsafe_b64decode(added["x-jwt-payload"] + "=" * (-len(added["x-jwt-payload"]) % 4))
    )
    assert payload == c and "=" not in added["x-jwt-payload"]
    assert added["x-sub"] == "alice" and added["x-admin"] == "false" and added["x-n"] == "3"
    assert "x-groups" not in added  # arrays are not copied (Istio: string, boolean, integer only)
    # No token: forged output headers are still removed, nothing added.
    r = auth(a, None, headers=[("x-sub", "root")])
    assert r.ok and "x-sub" in r.remove_headers and r.add_headers == ()


def test_multiple_tokens_and_rules(jwks: str, keys: dict[str, Any]) -> None:
    other = "https://other.example"
    doc2 = json.dumps({"keys": [jwk_of(keys["rsa2"].public_key(), "k2")]})
    a = JwtAuthenticator(
        [rule(jwks), rule(doc2, issuer=other, from_headers=(JwtHeader("x-other"),))],
        now=NOW,
    )
    t1 = sign(keys["rsa"], claims())
    t2 = sign(keys["rsa2"], claims(iss=other, sub="bob"), kid="k2")
    # Issuer picks the rule; a token in a location its issuer's rule does not read is unknown.
    assert a.authenticate([("x-other", t2)], None, NOW).principal == f"{other}/bob"
    assert a.authenticate([("authorization", f"Bearer {t2}")], None, NOW).status == 401
    # Two valid tokens: principal from the first rule's location.
    r = a.authenticate([("x-other", t2), ("authorization", f"Bearer {t1}")], None, NOW)
    assert r.ok and r.principal == f"{ISS}/alice"
    # One valid, one bad: refused.
    bad = sign(keys["rsa"], claims(exp=NOW - 3600))
    r = a.authenticate([("x-other", t2), ("authorization", f"Bearer {bad}")], None, NOW)
    assert r.status == 401


def test_issuerless_rule_accepts_any_issuer(jwks: str, keys: dict[str, Any]) -> None:
    a = JwtAuthenticator([JwtRuleSpec(JwtRule(issuer="", jwks=jwks))], now=NOW)
    r = auth(a, sign(keys["rsa"], claims(iss="https://anyone.example")))
    assert r.ok and r.principal == "https://anyone.example/alice"


def test_space_delimited_claims_and_l7(jwks: str, keys: dict[str, Any]) -> None:
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "ra", "namespace": "ns2"},
        "spec": {
            "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
            "jwtRules": [{"issuer": ISS, "jwks": jwks, "spaceDelimitedClaims": ["roles"]}],
        },
    }
    ra, specs = parse_request_authentication(doc)
    assert not ra.poisoned, ra.errors
    assert specs[0].space_delimited_claims == ("scope", "permission", "roles")
    a = JwtAuthenticator(specs, now=NOW)
    r = auth(a, sign(keys["rsa"], claims(scope="read payments:charge", roles="a b", other="x y")))
    assert r.ok and r.claims is not None
    assert r.claims["scope"] == ["read", "payments:charge"]
    assert r.claims["roles"] == ["a", "b"] and r.claims["other"] == "x y"
    # The verified claims drive L7 policy.
    policy = pol(
        "rules: [{from: [{source: {requestPrincipals: ['https://issuer.example/*']}}], "
        "when: [{key: 'request.auth.claims[scope]', values: ['payments:charge']}]}]"
    )
    req = HttpRequest.create(
        method="POST",
        path="/v1/charge",
        host="h",
        source_principal=None,
        source_ip="10.0.0.1",
        destination_port=80,
        jwt_claims=r.claims,
    )
    assert evaluate_l7(req, [policy]).allowed
    anon = HttpRequest.create(
        method="POST",
        path="/v1/charge",
        host="h",
        source_principal=None,
        source_ip="10.0.0.1",
        destination_port=80,
    )
    assert not evaluate_l7(anon, [policy]).allowed


def test_bad_space_delimited_field_poisons() -> None:
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "ra", "namespace": "ns2"},
        "spec": {"jwtRules": [{"issuer": ISS, "spaceDelimitedClaims": "scope"}]},
    }
    ra, _ = parse_request_authentication(doc)
    assert ra.poisoned and any("spaceDelimitedClaims" in e.path for e in ra.errors)


def test_poisoned_request_authentication_refuses_tokens(jwks: str, keys: dict[str, Any]) -> None:
    good, gspecs = parse_request_authentication(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "RequestAuthentication",
            "metadata": {"name": "good", "namespace": "ns2"},
            "spec": {"jwtRules": [{"issuer": ISS, "jwks": jwks}]},
        }
    )
    bad, bspecs = parse_request_authentication(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "RequestAuthentication",
            "metadata": {"name": "bad", "namespace": "ns2"},
            "spec": {"jwtRules": [{"issuer": ISS, "jwksUri": "ftp://x"}]},
        }
    )
    assert bad.poisoned and not good.poisoned
    t = sign(keys["rsa"], claims())
    ok = JwtAuthenticator.for_policies([(good, gspecs)], now=NOW)
    assert auth(ok, t).principal == f"{ISS}/alice"
    a = JwtAuthenticator.for_policies([(good, gspecs), (bad, bspecs)], now=NOW)
    r = auth(a, t)
    assert r.status == 401 and "ns2/bad is invalid" in r.reason
    assert auth(a, None).ok


def test_verified_token_cache_never_outlives_expiry_or_rotation(keys: dict[str, Any]) -> None:
    uri = "https://issuer.example/jwks"
    store = JwksStore(uri)
    store.update({"keys": [jwk_of(keys["rsa"].public_key(), "rsa1")]}, NOW)
    a = JwtAuthenticator([rule(None, jwks_uri=uri)], {uri: store}, now=NOW, cache_size=2)
    t = sign(keys["rsa"], claims(exp=NOW + 100))
    assert a.authenticate([("authorization", f"Bearer {t}")], None, NOW).ok
    assert t in a._cache
    assert a.authenticate([("authorization", f"Bearer {t}")], None, NOW + 50).ok  # from the cache
    # Expiry is checked on every hit.
    assert a.authenticate([("authorization", f"Bearer {t}")], None, NOW + 161).reason == MSG_EXPIRED
    # A rotation that drops the key invalidates the cached verification.
    store.update({"keys": [jwk_of(keys["rsa2"].public_key(), "rsa2")]}, NOW + 1)
    r = a.authenticate([("authorization", f"Bearer {t}")], None, NOW)
    assert r.status == 401 and r.reason == MSG_KID and t not in a._cache
    # Bounded: the oldest entry goes.
    store.update({"keys": [jwk_of(keys["rsa"].public_key(), "rsa1")]}, NOW + 2)
    toks = [sign(keys["rsa"], claims(sub=f"u{i}")) for i in range(3)]
    for tk in toks:
        assert a.authenticate([("authorization", f"Bearer {tk}")], None, NOW).ok
    assert list(a._cache) == toks[1:]
    # A tampered copy of a cached token is a different key: verified (and refused) afresh.
    h, _p, s_ = toks[2].split(".")
    evil = b64(json.dumps(claims(sub="admin")).encode())
    assert a.authenticate([("authorization", f"Bearer {h}.{evil}.{s_}")], None, NOW).reason == MSG_VERIFY
