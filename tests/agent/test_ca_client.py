"""The agent's CA client against a CA that answers badly.

Our own CA never sends a wrong certificate, so to prove the client checks answers this test runs
a misbehaving CA: a real gRPC server on a real unix socket with real mTLS (the same server
certificate and trust as `ztagent ca serve`), whose CreateCertificate answers are crafted per
case. Each must surface as CaClientError(kind="malformed-answer") naming what is wrong.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from caserver import store as ca_store
from credentials.client import CaClient, CaClientError, NodeCredentials
from credentials.proto import ca_pb2, ca_pb2_grpc
from identity.keys import generate_key
from identity.spiffe import SpiffeId
from tests.agent.test_ca_helpers import TD, CaEnv, make_env, now, short_tmpdir

SLEEP = SpiffeId.parse(f"spiffe://{TD}/ns/ns1/sa/sleep")
HTTPBIN = SpiffeId.parse(f"spiffe://{TD}/ns/ns2/sa/httpbin")


def pem(c: x509.Certificate) -> str:
    return c.public_bytes(serialization.Encoding.PEM).decode()


def leaf(
    st: ca_store.CaStore,
    pub: ec.EllipticCurvePublicKey,
    sid: SpiffeId,
    *,
    start: dt.datetime | None = None,
    ttl: dt.timedelta = dt.timedelta(hours=1),
) -> x509.Certificate:
    """A leaf signed with the CA's key: right issuer, caller-chosen key, ID and validity."""
    key = serialization.load_pem_private_key(st.ca.key_pem(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    t = start or now()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(st.ca.certificate.subject)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(t - dt.timedelta(minutes=2))
        .not_valid_after(t + ttl)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(sid))]), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


Answer = Callable[[ca_pb2.IstioCertificateRequest], list[str]]


class MisbehavingCa(ca_pb2_grpc.IstioCertificateServiceServicer):
    def __init__(self) -> None:
        self.answer: Answer = lambda req: []

    async def CreateCertificate(self, request: Any, context: Any) -> Any:  # the wire name
        return ca_pb2.IstioCertificateResponse(cert_chain=self.answer(request))


@pytest.fixture(scope="module")
def env() -> Iterator[CaEnv]:
    with short_tmpdir() as base:
        yield make_env(base)


@pytest.fixture
async def ca(env: CaEnv) -> AsyncIterator[tuple[MisbehavingCa, str]]:
    st = ca_store.load(env.ca_dir)
    key_pem, chain_pem, _ = ca_store.issue_server_certificate(st, now=now())
    servicer = MisbehavingCa()
    server = grpc.aio.server()
    ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    address = f"unix:{env.base}/bad.sock"
    creds = grpc.ssl_server_credentials(
        [(key_pem, chain_pem)], root_certificates=st.bundle.to_pem(), require_client_auth=True
    )
    assert server.add_secure_port(address, creds)
    await server.start()
    try:
        yield servicer, address
    finally:
        await server.stop(None)


def _csr_pub(req: ca_pb2.IstioCertificateRequest) -> ec.EllipticCurvePublicKey:
    pub = x509.load_pem_x509_csr(req.csr.encode()).public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    return pub


def cases(env: CaEnv) -> list[tuple[str, Answer, str]]:
    st = ca_store.load(env.ca_dir)
    root = pem(st.ca.roots[0])
    foreign = ca_store.init_self_signed(env.base / f"foreign-{now().timestamp()}", TD, now=now())
    return [
        ("empty", lambda r: [], "empty cert_chain"),
        ("not-pem", lambda r: ["hello"], "cert_chain[0] is not PEM certificates"),
        ("root-only", lambda r: [root], "the first certificate is not a leaf"),
        (
            "other-identity",
            lambda r: [pem(leaf(st, _csr_pub(r), HTTPBIN)), root],
            f"certificate is for {HTTPBIN}",
        ),
        (
            "other-key",
            lambda r: [pem(leaf(st, generate_key().public_key(), SLEEP)), root],
            "key-mismatch",
        ),
        (
            "foreign-ca",
            lambda r: [pem(leaf(foreign, _csr_pub(r), SLEEP)), pem(foreign.ca.roots[0])],
            "does not verify against our trust bundle",
        ),
        (
            "expired",
            lambda r: [pem(leaf(st, _csr_pub(r), SLEEP, start=now() - dt.timedelta(hours=3))), root],
            "expired",
        ),
    ]


async def test_malformed_answers_are_refused_with_the_reason(
    env: CaEnv, ca: tuple[MisbehavingCa, str]
) -> None:
    servicer, address = ca
    async with CaClient(address, NodeCredentials.from_dir(env.node_a)) as client:
        # Sanity: a correct answer from the same server is accepted (so refusals below are real).
        st = ca_store.load(env.ca_dir)
        servicer.answer = lambda r: [pem(leaf(st, _csr_pub(r), SLEEP)), pem(st.ca.roots[0])]
        assert (await client.create_certificate(SLEEP)).spiffe_id == SLEEP
        for name, answer, needle in cases(env):
            servicer.answer = answer
            with pytest.raises(CaClientError) as ei:
                await client.create_certificate(SLEEP)
            assert ei.value.kind == "malformed-answer", name
            assert needle in str(ei.value), (name, str(ei.value))
            assert str(SLEEP) in str(ei.value) and address in str(ei.value)


async def test_unreachable_ca_is_named(env: CaEnv) -> None:
    address = f"unix:{env.base}/nobody-listens.sock"
    async with CaClient(address, NodeCredentials.from_dir(env.node_a), timeout=5) as client:
        with pytest.raises(CaClientError) as ei:
            await client.create_certificate(SLEEP)
    assert ei.value.kind == "unreachable"
    assert address in str(ei.value) and str(SLEEP) in str(ei.value)


def test_bad_addresses_are_refused(env: CaEnv) -> None:
    node = NodeCredentials.from_dir(env.node_a)
    for bad in ["ca.sock", "unix:relative.sock", "http://ca:15012", "ca:", ":15012"]:
        with pytest.raises(ValueError, match="expected unix:/absolute/path or host:port"):
            CaClient(bad, node)
