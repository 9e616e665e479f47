"""JWKS over real HTTPS (aiohttp both ends, a real certificate): refresh, last good kept, and a
first-load failure failing closed (every token for that rule refused)."""

from __future__ import annotations

import datetime as dt
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from policy.jwt import JwksStore, JwtAuthenticator, JwtRuleSpec
from policy.model import JwtRule
from waypoint.jwks import JwksFetcher

ISS = "https://issuer.example"


def _tls(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_pem, key_pem = tmp / "c.pem", tmp / "k.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))  # fmt: skip
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_pem, key_pem)
    client = ssl.create_default_context(cafile=str(cert_pem))
    return server, client


class Issuer:
    def __init__(self) -> None:
        self.doc: str | None = None  # None: answer 503
        self.hits = 0
        self.port = 0


@pytest.fixture
async def issuer(tmp_path: Path) -> AsyncIterator[tuple[Issuer, ssl.SSLContext]]:
    srv_ctx, cli_ctx = _tls(tmp_path)
    iss = Issuer()

    async def jwks(_r: web.Request) -> web.Response:
        iss.hits += 1
        if iss.doc is None:
            return web.Response(status=503)
        return web.Response(text=iss.doc, content_type="application/json")

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=srv_ctx)
    await site.start()
    iss.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield iss, cli_ctx
    await runner.cleanup()


def _jwks(key: Any, kid: str) -> str:
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = kid
    return json.dumps({"keys": [jwk]})


async def test_fetch_refresh_last_good_and_fail_closed(issuer: tuple[Issuer, ssl.SSLContext]) -> None:
    iss, ctx = issuer
    uri = f"https://localhost:{iss.port}/jwks"
    k1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    k2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC).timestamp()
    claims = {"iss": ISS, "sub": "alice", "exp": now + 300}
    t1 = pyjwt.encode(claims, k1, algorithm="RS256", headers={"kid": "k1"})
    t2 = pyjwt.encode(claims, k2, algorithm="RS256", headers={"kid": "k2"})
    store = JwksStore(uri)
    auth = JwtAuthenticator([JwtRuleSpec(JwtRule(issuer=ISS, jwks_uri=uri), policy="ns/ra")], {uri: store})
    fetcher = JwksFetcher(lambda: [(uri, store)], refresh=0.0, ssl_context=ctx)

    def status(tok: str) -> int:
        return auth.authenticate([("authorization", f"Bearer {tok}")], None, now).status

    await fetcher.refresh_now()  # the issuer is down: no key set yet, tokens refused (fail closed)
    assert store.current is None and status(t1) == 401
    iss.doc = _jwks(k1, "k1")
    await fetcher.refresh_now()
    assert status(t1) == 200 and status(t2) == 401
    iss.doc = "not json"  # a bad document keeps the last good set
    await fetcher.refresh_now()
    assert status(t1) == 200 and store.last_error
    iss.doc = None  # so does a failed fetch
    await fetcher.refresh_now()
    assert status(t1) == 200
    iss.doc = _jwks(k2, "k2")  # rotation
    fetcher._next.clear()
    await fetcher.refresh_now()
    assert status(t2) == 200 and status(t1) == 401
    assert iss.hits == 5


async def test_untrusted_https_certificate_is_a_failed_fetch(issuer: tuple[Issuer, ssl.SSLContext]) -> None:
    iss, _ctx = issuer
    iss.doc = "{}"
    uri = f"https://localhost:{iss.port}/jwks"
    store = JwksStore(uri)
    await JwksFetcher(lambda: [(uri, store)], refresh=0.0).refresh_now()  # system roots only
    assert store.current is None and "fetch failed" in (store.last_error or "")
