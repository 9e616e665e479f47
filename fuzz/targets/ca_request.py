"""The CA's request handling: ``IstioCertificateRequest`` bytes -> ``CaServer.CreateCertificate``.

The handler is called directly (read-only: ``caserver/server.py`` is not changed for this), for an
authenticated node ``node-a`` whose node certificate this CA issued, with a servicer context that
gives the handler what gRPC would (TLS 1.3, the node's PEM certificate, the peer) and raises on
``abort`` as gRPC's does. A real gRPC server costs milliseconds per call; this is the same code
path after the transport, at fuzzing speed. The first byte picks the shape:

0. the rest is the serialized request (``DecodeError`` = gRPC's deserializer refusing it);
1. the rest is a CSR in DER: armoured into PEM and sent with a valid request around it;
2. the rest is the ``csr`` string itself (PEM text, mutated).

Every outcome must be a response or one of the statuses the module documents for a bad request
(INVALID_ARGUMENT, PERMISSION_DENIED, FAILED_PRECONDITION); anything else reaching gRPC is an
UNKNOWN with a traceback. An issued certificate must be a valid SVID for an identity placed on
node-a, for at most the CA's maximum TTL.
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import struct
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry

from caserver.server import CaServer
from caserver.store import KIND_SELF_SIGNED, CaStore
from credentials.identities import IMPERSONATED_IDENTITY, node_identity
from credentials.proto import ca_pb2
from fuzz.targets import _pki
from identity.bundle import TrustBundleSet
from identity.ca import CertificateAuthority
from identity.keys import build_csr
from identity.spiffe import SpiffeId, TrustDomain
from identity.svid import verify_svid
from mesh.config import parse_config

MAX_LEN = 4096
NOW = _pki.NOW
TD = TrustDomain(_pki.TD)
ALLOWED_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
}

_serials = itertools.count(1000)


def _rng(n: int) -> bytes:
    return next(_serials).to_bytes(n, "big")


CA = CertificateAuthority.create_root(TD, NOW - dt.timedelta(days=1), key=_pki.fixed_key(10), rng=_rng)
CONFIG = parse_config(
    """apiVersion: ztagent.io/v1alpha1
kind: MeshConfig
trustDomain: cluster.local
nodes:
- {name: node-a, address: 10.250.0.1}
- {name: node-b, address: 10.250.0.2}
workloads:
- {name: sleep, namespace: default, serviceAccount: sleep, node: node-a, ips: [10.244.1.2]}
- {name: httpbin, namespace: backend, serviceAccount: httpbin, node: node-b, ips: [10.244.2.2]}
""",
    file="fuzz-ca.yaml",
)
SERVER = CaServer(
    CaStore(Path("/nonexistent-fuzz-ca"), CA, KIND_SELF_SIGNED),  # never read: the CA is in memory
    CONFIG,
    clock=lambda: NOW,
    registry=CollectorRegistry(),
)
NODE_ID = node_identity(TD, "node-a")
_NODE_KEY = _pki.fixed_key(11)
NODE_CERT_PEM = CA.sign_csr(build_csr(_NODE_KEY, NODE_ID), allowed=lambda _s: True, now=NOW).cert_pem
PLACED = {SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep"), NODE_ID}


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class Context:
    """What the handler reads of ``grpc.aio.ServicerContext`` for an authenticated node."""

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"ssl_tls_version": [b"TLSv1.3"], "x509_pem_cert": [NODE_CERT_PEM]}

    def peer(self) -> str:
        return "ipv4:10.250.0.1:40000"

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Aborted(code, details)


def _request(csr: str, *, ttl: int = 0, impersonate: str | None = None) -> ca_pb2.IstioCertificateRequest:
    req = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=ttl)
    if impersonate is not None:
        md = struct_pb2.Struct()
        md.fields[IMPERSONATED_IDENTITY].string_value = impersonate
        req.metadata.CopyFrom(md)
    return req


def _armor(der: bytes) -> str:
    body = base64.encodebytes(der).decode("ascii")
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


_SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
_GOOD_CSR = build_csr(_pki.LEAF_KEY, SpiffeId.parse(_SLEEP)).decode("ascii")
_CSR_DER = x509.load_pem_x509_csr(_GOOD_CSR.encode()).public_bytes(serialization.Encoding.DER)
SEEDS: list[bytes] = [
    b"\x00" + _request(_GOOD_CSR).SerializeToString(),
    b"\x00" + _request(_GOOD_CSR, ttl=3600, impersonate=_SLEEP).SerializeToString(),
    b"\x00" + _request(_GOOD_CSR, ttl=-1).SerializeToString(),
    b"\x00" + _request(_GOOD_CSR, ttl=10**12).SerializeToString(),
    b"\x00" + _request(_GOOD_CSR, ttl=2**63 - 1).SerializeToString(),  # regression: overflowed timedelta
    b"\x00"
    + _request(_GOOD_CSR, impersonate="spiffe://cluster.local/ns/backend/sa/httpbin").SerializeToString(),
    b"\x00"
    + _request(
        build_csr(_pki.LEAF_KEY, SpiffeId.parse("spiffe://cluster.local/ns/backend/sa/httpbin")).decode()
    ).SerializeToString(),
    b"\x00" + _request(build_csr(_NODE_KEY, NODE_ID).decode()).SerializeToString(),
    b"\x00" + _request(_GOOD_CSR, impersonate="not an id").SerializeToString(),
    b"\x01" + _CSR_DER,
    b"\x02" + _GOOD_CSR.encode(),
]


def _call(req: ca_pb2.IstioCertificateRequest) -> ca_pb2.IstioCertificateResponse | None:
    coro = SERVER.CreateCertificate(req, Context())  # type: ignore[arg-type,unused-ignore]  # grpc stubs may be absent
    try:
        coro.send(None)  # the handler awaits nothing but abort: it runs to the end here
    except StopIteration as done:
        resp: ca_pb2.IstioCertificateResponse = done.value
        return resp
    except Aborted as exc:
        if exc.code not in ALLOWED_CODES:
            raise AssertionError(f"status {exc.code.name} for a bad request: {exc}") from exc
        return None
    finally:
        coro.close()
    raise AssertionError("CreateCertificate suspended on something other than abort")


def _check_issued(req: ca_pb2.IstioCertificateRequest, resp: ca_pb2.IstioCertificateResponse) -> None:
    pems: list[Any] = list(resp.cert_chain)
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in pems]
    roots = {r.public_bytes(serialization.Encoding.PEM).decode() for r in CA.roots}
    leaf_chain = [c for c, p in zip(chain, pems, strict=True) if p not in roots]
    sid = verify_svid(leaf_chain, TrustBundleSet.of(CA.bundle), NOW)
    if sid not in PLACED:
        raise AssertionError(f"node-a was issued {sid}, which is not placed on it")
    life = leaf_chain[0].not_valid_after_utc - NOW
    if life > CA.max_ttl:
        raise AssertionError(f"issued for {life}, over the maximum {CA.max_ttl}")


def fuzz_one(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 3, data[1:]
    if mode == 0:
        try:
            req = ca_pb2.IstioCertificateRequest.FromString(body)
        except DecodeError:
            return  # gRPC's deserializer refuses it before the handler
    elif mode == 1:
        ttl = struct.unpack(">i", body[:4])[0] if len(body) >= 4 else 0
        req = _request(_armor(body[4:]), ttl=ttl)
    else:
        req = _request(body.decode("latin-1"))
    resp = _call(req)
    if resp is not None:
        _check_issued(req, resp)
