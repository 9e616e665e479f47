"""A fixed PKI for the certificate targets' seeds: root -> intermediate -> leaves, at a fixed time.

Keys are derived from constant scalars and every validity date is fixed, so corpus entries saved
by one run still chain to the bundle of the next (ECDSA signatures differ run to run; validity
does not). This is a seed generator, not a CA: it can build the broken shapes the CA never issues.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime(2026, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
TD = "cluster.local"
WORKLOAD_ID = f"spiffe://{TD}/ns/default/sa/sleep"


def fixed_key(n: int) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(0x5EED_0000 + n, ec.SECP256R1())


ROOT_KEY, INTER_KEY, LEAF_KEY, OTHER_KEY = (fixed_key(i) for i in range(4))


def key_usage(*, leaf: bool, **flags: bool) -> x509.KeyUsage:
    base = dict(
        digital_signature=leaf,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=not leaf,
        crl_sign=not leaf,
        encipher_only=False,
        decipher_only=False,
    )
    base.update(flags)
    return x509.KeyUsage(**base)


def build(
    *,
    subject_key: ec.EllipticCurvePrivateKey,
    signer: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    issuer: x509.Name,
    serial: int,
    ca: bool,
    uris: Sequence[str],
    ku: x509.KeyUsage | None = None,
    ku_critical: bool = True,
    eku: bool = True,
    days: int = 1,
) -> x509.Certificate:
    pub = subject_key.public_key()
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(pub)
        .serial_number(serial)
        .not_valid_before(NOW - dt.timedelta(days=days))
        .not_valid_after(NOW + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
        )
    )
    if uris:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=len(subject) == 0,
        )
    b = b.add_extension(ku or key_usage(leaf=not ca), critical=ku_critical)
    if eku and not ca:
        b = b.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    return b.sign(signer, hashes.SHA256())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


ROOT = build(
    subject_key=ROOT_KEY,
    signer=ROOT_KEY,
    subject=_name("fuzz root"),
    issuer=_name("fuzz root"),
    serial=1,
    ca=True,
    uris=[f"spiffe://{TD}"],
    days=3650,
)
INTER = build(
    subject_key=INTER_KEY,
    signer=ROOT_KEY,
    subject=_name("fuzz intermediate"),
    issuer=ROOT.subject,
    serial=2,
    ca=True,
    uris=[f"spiffe://{TD}"],
    days=365,
)


def leaf(*, via_intermediate: bool = True, serial: int = 10, **kw: object) -> x509.Certificate:
    signer, issuer = (INTER_KEY, INTER.subject) if via_intermediate else (ROOT_KEY, ROOT.subject)
    args: dict[str, object] = dict(
        subject_key=LEAF_KEY,
        signer=signer,
        subject=x509.Name([]),
        issuer=issuer,
        serial=serial,
        ca=False,
        uris=[WORKLOAD_ID],
    )
    args.update(kw)
    return build(**args)  # type: ignore[arg-type]


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
