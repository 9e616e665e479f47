"""Build arbitrary (including deliberately broken) certificates for identity tests.

The CA under test only ever issues well-formed SVIDs, so to prove the validator rejects each
broken shape we need an independent builder with a knob per rule.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime(2026, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
TD = "cluster.local"
WORKLOAD_ID = f"spiffe://{TD}/ns/default/sa/sleep"

_KEY_CACHE: list[ec.EllipticCurvePrivateKey] = []


def key(i: int = 0) -> ec.EllipticCurvePrivateKey:
    """Deterministic-per-run pool of P-256 keys (generation is cheap, but reuse keeps tests clear)."""
    while len(_KEY_CACHE) <= i:
        _KEY_CACHE.append(ec.generate_private_key(ec.SECP256R1()))
    return _KEY_CACHE[i]


def ku(**flags: bool) -> x509.KeyUsage:
    base = dict(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    base.update(flags)
    return x509.KeyUsage(**base)


LEAF_KU = ku(digital_signature=True)
CA_KU = ku(key_cert_sign=True, crl_sign=True)
BOTH_EKU = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
_UNSET: Any = object()


@dataclass
class Spec:
    """One certificate's shape. Defaults describe a valid workload leaf."""

    subject: x509.Name = field(default_factory=lambda: x509.Name([]))
    uris: Sequence[str] = (WORKLOAD_ID,)
    dns: Sequence[str] = ()
    ca: bool | None = False  # None: omit basicConstraints
    path_length: int | None = None
    key_usage: x509.KeyUsage | None = LEAF_KU
    key_usage_critical: bool = True  # X509-SVID §4.3 says MUST; False builds the broken shape
    eku: Sequence[x509.ObjectIdentifier] | None = tuple(BOTH_EKU)
    not_before: dt.datetime = NOW - dt.timedelta(minutes=2)
    not_after: dt.datetime = NOW + dt.timedelta(hours=1)


def ca_spec(name: str, td: str = TD, **kw: Any) -> Spec:
    defaults: dict[str, Any] = dict(
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]),
        uris=(f"spiffe://{td}",),
        ca=True,
        key_usage=CA_KU,
        eku=None,
        not_before=NOW - dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=365),
    )
    defaults.update(kw)
    return Spec(**defaults)


def build(
    spec: Spec,
    subject_key: ec.EllipticCurvePrivateKey,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
    issuer: x509.Certificate | None = None,
) -> x509.Certificate:
    """Sign ``spec`` with ``issuer_key`` (self-signed when no issuer is given)."""
    signer = issuer_key if issuer_key is not None else subject_key
    issuer_name = issuer.subject if issuer is not None else spec.subject
    pub = subject_key.public_key()
    b = (
        x509.CertificateBuilder()
        .subject_name(spec.subject)
        .issuer_name(issuer_name)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(spec.not_before)
        .not_valid_after(spec.not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
        )
    )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in spec.uris]
    names += [x509.DNSName(d) for d in spec.dns]
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=len(spec.subject) == 0)
    if spec.ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=spec.ca, path_length=spec.path_length), critical=True)
    if spec.key_usage is not None:
        b = b.add_extension(spec.key_usage, critical=spec.key_usage_critical)
    if spec.eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(list(spec.eku)), critical=False)
    return b.sign(signer, hashes.SHA256())


@dataclass
class Pki:
    """root(td) -> intermediate -> leaf, plus a direct root -> leaf, for one trust domain."""

    td: str
    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    inter_key: ec.EllipticCurvePrivateKey
    inter: x509.Certificate


def make_pki(td: str = TD, key_base: int = 0) -> Pki:
    rk, ik = key(key_base), key(key_base + 1)
    root = build(ca_spec(f"{td} root", td), rk)
    inter = build(ca_spec(f"{td} intermediate", td), ik, rk, root)
    return Pki(td, rk, root, ik, inter)
