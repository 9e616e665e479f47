# ruff: noqa: E501
"""`ztagent policy check --waypoint ...`: one request decided by the waypoint's own code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from cli.main import main

ISS = "https://issuer.example"
NOW = 1_800_000_000

POLICIES = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: pay}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  jwtRules: [{issuer: "https://issuer.example", jwksUri: "https://issuer.example/jwks", audiences: [payments]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: charge, namespace: pay}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/checkout"], requestPrincipals: ["https://issuer.example/alice"]}}]
      to: [{operation: {methods: [POST], paths: [/v1/charge]}}]
      when: [{key: "request.auth.claims[scope]", values: ["payments:charge"]}]
"""


@pytest.fixture(scope="module")
def key() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def files(tmp_path: Path, key: Any) -> dict[str, str]:
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICIES)
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "k1"
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    claims = {"iss": ISS, "sub": "alice", "aud": "payments", "exp": NOW + 300, "iat": NOW - 10,
              "scope": "payments:read payments:charge"}  # fmt: skip
    good = pyjwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})
    head, _body, sig = good.split(".")
    tampered = ".".join([head, pyjwt.utils.base64url_encode(json.dumps({**claims, "sub": "mallory"}).encode()).decode(), sig])
    return {"policies": str(pol), "jwks": str(jwks), "good": good, "tampered": tampered}


def check(files: dict[str, str], *extra: str, jwt: str | None = "good", jwks: bool = True) -> list[str]:
    argv = ["policy", "check", "-f", files["policies"], "--waypoint", "pay/waypoint",
            "--source-principal", "cluster.local/ns/shop/sa/checkout", "--at", str(NOW), *extra]  # fmt: skip
    if jwt is not None:
        argv += ["--jwt", files[jwt]]
    if jwks:
        argv += ["--jwks", files["jwks"]]
    return argv


def test_allowed_charge(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(check(files, "--method", "POST", "--path", "/v1/charge")) == 0
    out = capsys.readouterr().out
    assert out.startswith("ALLOW pay/charge") and "request principal: https://issuer.example/alice" in out


@pytest.mark.parametrize(
    ("extra", "jwt", "jwks", "status"),
    [
        (("--method", "GET", "--path", "/v1/charge"), "good", True, 403),  # wrong method
        (("--method", "POST", "--path", "/v1/refund"), "good", True, 403),  # wrong path
        (("--method", "POST", "--path", "/v1/charge"), None, True, 403),  # no token: no principal
        (("--method", "POST", "--path", "/v1/charge"), "tampered", True, 401),  # bad signature
        (("--method", "POST", "--path", "/v1/charge"), "good", False, 401),  # JWKS never loaded: fail closed
        (("--method", "POST", "--path", "/v1/charge", "--at", str(NOW + 3600)), "good", True, 401),  # expired
    ],
)
def test_denied(files: dict[str, str], capsys: pytest.CaptureFixture[str], extra: tuple[str, ...],
                jwt: str | None, jwks: bool, status: int) -> None:  # fmt: skip
    assert main([*check(files, *extra, jwt=jwt, jwks=jwks), "-o", "json"]) == 1
    got = json.loads(capsys.readouterr().out)
    assert got["decision"] == "DENY" and got["status"] == status, got


def test_normalization_matches_what_is_forwarded(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*check(files, "--method", "POST", "--path", "/v1/x/../charge"), "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["normalizedPath"] == "/v1/charge"


@pytest.mark.parametrize("extra", [(), ("--path", "/x", "-H", "no-colon"), ("--path", "/x", "--waypoint", "bad")])
def test_bad_input_exits_2(files: dict[str, str], extra: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(check(files, *extra)) == 2
    assert "ztagent policy check:" in capsys.readouterr().err
