from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from identity.bundle import BundleError, TrustBundle, TrustBundleSet
from identity.ca import BACKDATE, CaError, CertificateAuthority
from identity.keys import build_csr, generate_key, key_to_pem, load_key_pem
from identity.spiffe import SpiffeId, TrustDomain
from identity.svid import verify_svid
from tests.identity.certgen import NOW, TD, WORKLOAD_ID, ca_spec, key
from tests.identity.certgen import build as build_cert

SID = SpiffeId.parse(WORKLOAD_ID)
HOUR = dt.timedelta(hours=1)


def allow_all(_: SpiffeId) -> bool:
    return True


class CountingRng:
    """Deterministic bytes, and a count of how much randomness was drawn (observable state)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, n: int) -> bytes:
        self.calls += 1
        return bytes([0x80 + self.calls % 16] + [self.calls % 256] * (n - 1))


@pytest.fixture(scope="module")
def root_ca() -> CertificateAuthority:
    return CertificateAuthority.create_root(TD, NOW - dt.timedelta(days=1), key=key(20))


@pytest.fixture(scope="module")
def plugin_ca(root_ca: CertificateAuthority) -> CertificateAuthority:
    # Operator's chain: offline root -> intermediate (the CA we run holds only the latter's key).
    inter = root_ca.create_intermediate(NOW - dt.timedelta(days=1), dt.timedelta(days=90), key=key(21))
    return CertificateAuthority.load(inter.chain_pem(), inter.key_pem())


def csr_for(ident: str | SpiffeId = SID, k: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    sid = ident if isinstance(ident, SpiffeId) else SpiffeId.parse(ident)
    return build_csr(k or key(22), sid)


def raw_csr(
    names: list[x509.GeneralName] | None,
    signer: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names is not None:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=True)
    algo = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(signer, algo).public_bytes(serialization.Encoding.PEM)


# ---- issuance -------------------------------------------------------------------------------


def test_issued_leaf_has_the_svid_shape(root_ca: CertificateAuthority) -> None:
    rng = CountingRng()
    ca = CertificateAuthority(
        trust_domain=root_ca.trust_domain,
        key=key(20),
        certificate=root_ca.certificate,
        roots=root_ca.roots,
        rng=rng,
    )
    wl_key = key(22)
    issued = ca.sign_csr(csr_for(SID, wl_key), allowed=allow_all, ttl=HOUR, now=NOW)
    cert = issued.certificate
    assert issued.spiffe_id == SID
    assert issued.chain == (cert,)  # root-signed: nothing to attach
    assert cert.subject == x509.Name([])
    assert cert.issuer == root_ca.certificate.subject
    assert cert.not_valid_before_utc == NOW - BACKDATE == NOW - dt.timedelta(minutes=2)
    assert cert.not_valid_after_utc == NOW + HOUR == issued.not_after
    assert cert.serial_number == int.from_bytes(CountingRng()(16), "big")  # drawn from the injected rng
    assert cert.signature_hash_algorithm is not None and cert.signature_hash_algorithm.name == "sha256"
    assert cert.public_key().public_numbers() == wl_key.public_key().public_numbers()  # type: ignore[union-attr]
    ext = cert.extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [WORKLOAD_ID]
    assert len(list(san.value)) == 1
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    kuse = ext.get_extension_for_class(x509.KeyUsage)
    assert kuse.critical and kuse.value.digital_signature
    assert not (kuse.value.key_cert_sign or kuse.value.crl_sign or kuse.value.key_encipherment)
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(wl_key.public_key())
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = root_ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    assert verify_svid(issued.chain, TrustBundleSet.of(ca.bundle), NOW) == SID


def test_serials_are_random_and_distinct(root_ca: CertificateAuthority) -> None:
    serials = {
        root_ca.sign_csr(csr_for(), allowed=allow_all, now=NOW).certificate.serial_number for _ in range(20)
    }
    assert len(serials) == 20
    assert all(0 < s < 2**128 for s in serials)


def test_root_certificate_is_a_spiffe_signing_cert(root_ca: CertificateAuthority) -> None:
    root = root_ca.certificate
    assert root.issuer == root.subject
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    kuse = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert kuse.key_cert_sign and kuse.crl_sign and not kuse.digital_signature
    san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}"]
    pub = root.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    root.verify_directly_issued_by(root)


def test_plugin_ca_hands_out_the_intermediate(
    root_ca: CertificateAuthority, plugin_ca: CertificateAuthority
) -> None:
    issued = plugin_ca.sign_csr(csr_for(), allowed=allow_all, ttl=HOUR, now=NOW)
    assert len(issued.chain) == 2
    assert issued.chain[1] == plugin_ca.certificate != root_ca.certificate
    assert plugin_ca.roots == root_ca.roots  # the bundle published is the operator's root
    assert plugin_ca.bundle.to_pem() == root_ca.bundle.to_pem()
    bundles = TrustBundleSet.of(root_ca.bundle)
    assert verify_svid(issued.chain, bundles, NOW) == SID
    pem = issued.chain_pem
    assert pem.count(b"BEGIN CERTIFICATE") == 2 and pem.startswith(issued.cert_pem)


def test_two_level_plugin_chain(root_ca: CertificateAuthority) -> None:
    mid = root_ca.create_intermediate(NOW - HOUR, dt.timedelta(days=30), key=key(23))
    low = mid.create_intermediate(NOW - HOUR, dt.timedelta(days=10), key=key(24))
    # Chain file in scrambled order: load() orders it by signatures.
    scrambled = root_ca.certificate.public_bytes(serialization.Encoding.PEM) + low.chain_pem()
    loaded = CertificateAuthority.load(scrambled, low.key_pem())
    assert loaded.intermediates == (mid.certificate,)
    issued = loaded.sign_csr(csr_for(), allowed=allow_all, now=NOW)
    assert issued.chain == (issued.certificate, low.certificate, mid.certificate)
    assert verify_svid(issued.chain, TrustBundleSet.of(root_ca.bundle), NOW) == SID


def test_leaf_not_after_is_capped_by_the_ca(root_ca: CertificateAuthority) -> None:
    short = root_ca.create_intermediate(NOW - HOUR, dt.timedelta(hours=1, minutes=30), key=key(25))
    issued = short.sign_csr(csr_for(), allowed=allow_all, ttl=dt.timedelta(hours=4), now=NOW)
    assert issued.not_after == short.certificate.not_valid_after_utc == NOW + dt.timedelta(minutes=30)
    assert verify_svid(issued.chain, TrustBundleSet.of(root_ca.bundle), issued.not_after) == SID


def test_leaf_not_after_is_capped_by_an_operator_root_that_expires_first() -> None:
    root = build_cert(ca_spec("short root", not_after=NOW + dt.timedelta(minutes=40)), key(32))
    inter = build_cert(ca_spec("long intermediate"), key(33), key(32), root)
    ca = CertificateAuthority.load(_pem(inter, root), key_to_pem(key(33)))
    issued = ca.sign_csr(csr_for(), allowed=allow_all, ttl=HOUR, now=NOW)
    assert issued.not_after == NOW + dt.timedelta(minutes=40)


def test_requested_extensions_are_ignored(root_ca: CertificateAuthority) -> None:
    # A CSR asking to be a CA (or for extra key usages) still gets a plain workload leaf.
    req = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evil")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(WORKLOAD_ID)]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key(22), hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    cert = root_ca.sign_csr(req, allowed=allow_all, now=NOW).certificate
    assert cert.subject == x509.Name([])
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    kuse = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert kuse.digital_signature and not kuse.key_cert_sign and not kuse.crl_sign


@pytest.mark.parametrize("which", ["root", "plug-in intermediate"])
def test_issued_key_usage_is_always_critical(
    which: str, root_ca: CertificateAuthority, plugin_ca: CertificateAuthority
) -> None:
    # X509-SVID §4.3: keyUsage MUST be critical on every SVID, and verify_svid now refuses a leaf
    # without it (leaf-key-usage-not-critical). Whatever the CSR asks for (here a non-critical
    # keyUsage of its own), what the CA issues carries a critical one and passes our own validator.
    ca = root_ca if which == "root" else plugin_ca
    req = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(WORKLOAD_ID)]), critical=True
        )
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=False
        )
        .sign(key(22), hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    issued = ca.sign_csr(req, allowed=allow_all, now=NOW)
    for cert in (issued.certificate, ca.certificate):  # the leaf and the CA that signed it
        assert cert.extensions.get_extension_for_class(x509.KeyUsage).critical
    assert verify_svid(issued.chain, TrustBundleSet.of(ca.bundle), NOW) == SID


def test_openssl_accepts_our_chain(tmp_path: Path, plugin_ca: CertificateAuthority) -> None:
    # An independent implementation agrees the CA's output is a valid X.509 chain.
    issued = plugin_ca.sign_csr(csr_for(), allowed=allow_all, ttl=HOUR, now=NOW)
    (tmp_path / "root.pem").write_bytes(plugin_ca.bundle.to_pem())
    (tmp_path / "inter.pem").write_bytes(plugin_ca.certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.pem").write_bytes(issued.cert_pem)
    for purpose in ("sslclient", "sslserver"):
        out = subprocess.run(
            [
                "openssl",
                "verify",
                "-attime",
                str(int(NOW.timestamp())),
                "-purpose",
                purpose,
                "-CAfile",
                "root.pem",
                "-untrusted",
                "inter.pem",
                "leaf.pem",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 0, out.stderr + out.stdout
        assert out.stdout.strip() == "leaf.pem: OK"


# ---- refusals ---------------------------------------------------------------------------------

_rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_good = csr_for()
_der = x509.load_pem_x509_csr(_good).public_bytes(serialization.Encoding.DER)
_tampered = (
    b"-----BEGIN CERTIFICATE REQUEST-----\n"
    + base64.encodebytes(_der[:-1] + bytes([_der[-1] ^ 0x01]))
    + b"-----END CERTIFICATE REQUEST-----\n"
)
URI = x509.UniformResourceIdentifier

REFUSALS: list[tuple[str, str, Callable[[], bytes | str]]] = [
    ("garbage", "csr-malformed", lambda: b"hello, CA"),
    ("empty", "csr-malformed", lambda: b""),
    ("truncated PEM", "csr-malformed", lambda: _good[: len(_good) // 2]),
    ("PEM body corrupted", "csr-malformed", lambda: _good.replace(_good[60:70], b"!!!!!!!!!!")),
    (
        "certificate instead of CSR",
        "csr-malformed",
        lambda: build_cert(ca_spec("x"), key(26)).public_bytes(serialization.Encoding.PEM),
    ),
    ("non-ASCII text", "csr-malformed", lambda: "-----BEGIN CERTIFICATE REQUEST-----é"),
    ("oversized", "csr-too-large", lambda: _good + b"\n" * 20_000),
    ("bad signature", "csr-signature", lambda: _tampered),
    ("RSA key", "csr-key-type", lambda: raw_csr([URI(WORKLOAD_ID)], _rsa_key)),
    (
        "P-384 key",
        "csr-key-type",
        lambda: raw_csr([URI(WORKLOAD_ID)], ec.generate_private_key(ec.SECP384R1())),
    ),
    (
        "Ed25519 key",
        "csr-key-type",
        lambda: raw_csr([URI(WORKLOAD_ID)], ed25519.Ed25519PrivateKey.generate()),
    ),
    ("no SAN", "csr-no-san", lambda: raw_csr(None, key(22))),
    (
        "two URI SANs",
        "csr-san-count",
        lambda: raw_csr([URI(WORKLOAD_ID), URI(f"spiffe://{TD}/ns/a/sa/b")], key(22)),
    ),
    (
        "DNS SAN",
        "csr-non-uri-san",
        lambda: raw_csr([URI(WORKLOAD_ID), x509.DNSName("sleep.default")], key(22)),
    ),
    ("DNS SAN only", "csr-non-uri-san", lambda: raw_csr([x509.DNSName("sleep.default")], key(22))),
    (
        "IP SAN",
        "csr-non-uri-san",
        lambda: raw_csr(
            [URI(WORKLOAD_ID), x509.IPAddress(__import__("ipaddress").ip_address("10.0.0.1"))], key(22)
        ),
    ),
    ("email SAN", "csr-non-uri-san", lambda: raw_csr([URI(WORKLOAD_ID), x509.RFC822Name("a@b.c")], key(22))),
    (
        "non-SPIFFE URI",
        "csr-invalid-spiffe-id",
        lambda: raw_csr([URI("https://cluster.local/ns/a")], key(22)),
    ),
    (
        "uppercase trust domain",
        "csr-invalid-spiffe-id",
        lambda: raw_csr([URI("spiffe://Cluster.local/ns/a/sa/b")], key(22)),
    ),
    (
        "oversized ID",
        "csr-invalid-spiffe-id",
        lambda: raw_csr([URI(f"spiffe://{TD}/" + "a" * 2100)], key(22)),
    ),
    ("trust domain ID", "csr-invalid-spiffe-id", lambda: raw_csr([URI(f"spiffe://{TD}")], key(22))),
    (
        "wrong trust domain",
        "wrong-trust-domain",
        lambda: csr_for("spiffe://other.example/ns/default/sa/sleep"),
    ),
]


@pytest.mark.parametrize(("name", "rule", "make"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_csr_refusals(
    root_ca: CertificateAuthority, name: str, rule: str, make: Callable[[], bytes | str]
) -> None:
    rng = CountingRng()
    asked: list[SpiffeId] = []
    ca = CertificateAuthority(
        trust_domain=root_ca.trust_domain,
        key=key(20),
        certificate=root_ca.certificate,
        roots=root_ca.roots,
        rng=rng,
    )
    with pytest.raises(CaError) as info:
        ca.sign_csr(make(), allowed=lambda i: asked.append(i) or True, ttl=HOUR, now=NOW)
    assert info.value.rule == rule, info.value
    assert str(info.value).startswith(f"{rule}: ") and len(info.value.message) > 10
    # Refused before authorization and before any serial was drawn: nothing changed.
    assert asked == [] and rng.calls == 0
    # ...and the CA still works.
    assert ca.sign_csr(csr_for(), allowed=allow_all, now=NOW).spiffe_id == SID


def test_not_authorized_is_refused(root_ca: CertificateAuthority) -> None:
    asked: list[SpiffeId] = []

    def only_other(i: SpiffeId) -> bool:
        asked.append(i)
        return i == SpiffeId.parse("spiffe://cluster.local/ns/other/sa/x")

    with pytest.raises(CaError) as info:
        root_ca.sign_csr(csr_for(), allowed=only_other, now=NOW)
    assert info.value.rule == "not-authorized"
    assert WORKLOAD_ID in info.value.message
    assert asked == [SID]


@pytest.mark.parametrize(
    ("ttl", "now", "rule"),
    [
        (dt.timedelta(0), NOW, "ttl"),
        (-HOUR, NOW, "ttl"),
        (dt.timedelta(hours=25), NOW, "ttl"),
        (HOUR, NOW + dt.timedelta(days=3651), "ca-expired"),
        (HOUR, NOW - dt.timedelta(days=2), "ca-not-yet-valid"),
    ],
)
def test_ttl_and_ca_validity(
    root_ca: CertificateAuthority, ttl: dt.timedelta, now: dt.datetime, rule: str
) -> None:
    with pytest.raises(CaError) as info:
        root_ca.sign_csr(csr_for(), allowed=allow_all, ttl=ttl, now=now)
    assert info.value.rule == rule


# ---- loading an operator's CA -------------------------------------------------------------------


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def test_load_errors(root_ca: CertificateAuthority, plugin_ca: CertificateAuthority) -> None:
    inter_pem = _pem(plugin_ca.certificate)
    cases: list[tuple[bytes, bytes, dict[str, str], str]] = [
        (plugin_ca.chain_pem(), b"garbage", {}, "ca-key-pem"),
        (plugin_ca.chain_pem(), key_to_pem(key(27)), {}, "ca-key-mismatch"),
        (b"", plugin_ca.key_pem(), {}, "ca-chain-pem"),
        (plugin_ca.chain_pem()[:300], plugin_ca.key_pem(), {}, "ca-chain-pem"),
        (inter_pem, plugin_ca.key_pem(), {}, "ca-chain-incomplete"),  # root missing
        (plugin_ca.chain_pem(), plugin_ca.key_pem(), {"trust_domain": "other.example"}, "ca-trust-domain"),
    ]
    for chain_pem, key_pem, kw, rule in cases:
        with pytest.raises(CaError) as info:
            CertificateAuthority.load(chain_pem, key_pem, **kw)  # type: ignore[arg-type]
        assert info.value.rule == rule, (rule, info.value)


def test_load_refuses_a_non_ca_signing_cert() -> None:
    leafish = build_cert(ca_spec("not a ca", ca=False), key(28))
    with pytest.raises(CaError) as info:
        CertificateAuthority.load(_pem(leafish), key_to_pem(key(28)))
    assert info.value.rule == "ca-not-ca"


def test_load_needs_a_trust_domain_when_certs_name_none() -> None:
    root = build_cert(ca_spec("operator root", uris=()), key(29))
    with pytest.raises(CaError) as info:
        CertificateAuthority.load(_pem(root), key_to_pem(key(29)))
    assert info.value.rule == "ca-trust-domain"
    ca = CertificateAuthority.load(_pem(root), key_to_pem(key(29)), trust_domain="corp.example")
    assert ca.trust_domain == TrustDomain("corp.example")
    issued = ca.sign_csr(csr_for("spiffe://corp.example/ns/a/sa/b"), allowed=allow_all, now=NOW)
    assert verify_svid(issued.chain, TrustBundleSet.of(ca.bundle), NOW) == SpiffeId.parse(
        "spiffe://corp.example/ns/a/sa/b"
    )


def test_rsa_operator_ca_signs_with_sha256() -> None:
    root_key = _rsa_key
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(root_key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - HOUR)
        .not_valid_after(NOW + dt.timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    key_pem = root_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ca = CertificateAuthority.load(_pem(root), key_pem, trust_domain=TD)
    issued = ca.sign_csr(csr_for(), allowed=allow_all, now=NOW)
    assert verify_svid(issued.chain, TrustBundleSet.of(ca.bundle), NOW) == SID


def test_ca_round_trips_through_pem(plugin_ca: CertificateAuthority) -> None:
    again = CertificateAuthority.load(plugin_ca.chain_pem(), plugin_ca.key_pem())
    assert again.certificate == plugin_ca.certificate and again.roots == plugin_ca.roots
    assert again.trust_domain == plugin_ca.trust_domain


def test_create_root_refuses_other_key_types() -> None:
    with pytest.raises(CaError, match="ca-key-type"):
        CertificateAuthority.create_root(TD, NOW, key=ec.generate_private_key(ec.SECP384R1()))


# ---- keys and bundles -------------------------------------------------------------------------


def test_keys_are_p256_and_csr_carries_one_uri() -> None:
    k = generate_key()
    assert k.curve.name == "secp256r1"
    csr = x509.load_pem_x509_csr(build_csr(k, SID))
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(WORKLOAD_ID)]
    assert load_key_pem(key_to_pem(k)).private_numbers() == k.private_numbers()
    with pytest.raises(ValueError, match="P-256"):
        build_csr(ec.generate_private_key(ec.SECP384R1()), SID)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="RSAPrivateKey"):
        load_key_pem(
            _rsa_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


def test_bundle_pem_and_jwks(root_ca: CertificateAuthority, plugin_ca: CertificateAuthority) -> None:
    b = TrustBundle(TrustDomain(TD), root_ca.roots, sequence=7, refresh_hint_seconds=120)
    assert TrustBundle.from_pem(TD, b.to_pem()).roots == root_ca.roots
    doc = json.loads(json.dumps(b.to_jwks()))
    assert doc["spiffe_sequence"] == 7 and doc["spiffe_refresh_hint"] == 120
    (entry,) = doc["keys"]
    assert entry["use"] == "x509-svid" and entry["kty"] == "EC" and entry["crv"] == "P-256"
    assert "kid" not in entry
    assert base64.b64decode(entry["x5c"][0]) == root_ca.certificate.public_bytes(serialization.Encoding.DER)
    nums = root_ca.certificate.public_key().public_numbers()  # type: ignore[union-attr]
    assert base64.urlsafe_b64decode(entry["x"] + "==") == nums.x.to_bytes(32, "big")
    assert base64.urlsafe_b64decode(entry["y"] + "==") == nums.y.to_bytes(32, "big")
    back = TrustBundle.from_jwks(TD, {**doc, "keys": [*doc["keys"], {"use": "jwt-svid", "kty": "EC"}]})
    assert back.roots == root_ca.roots and back.sequence == 7


def test_bundle_set_picks_by_domain(root_ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create_root("other.example", NOW, key=key(30))
    s = TrustBundleSet.of(other.bundle, root_ca.bundle)
    assert s.domains == (TrustDomain(TD), TrustDomain("other.example"))
    assert s.for_domain(TrustDomain("other.example")) == other.bundle
    assert s.for_domain(TrustDomain("nope")) is None
    assert s.all_roots_pem() == root_ca.bundle.to_pem() + other.bundle.to_pem()
    with pytest.raises(BundleError, match="duplicate-trust-domain"):
        TrustBundleSet.of(root_ca.bundle, root_ca.bundle)
    assert s.with_bundle(root_ca.bundle).domains == s.domains


@pytest.mark.parametrize(
    ("pem", "rule"),
    [
        (b"", "pem"),
        (b"-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n", "pem"),
        (
            lambda: build_cert(ca_spec("leafy", ca=False), key(31)).public_bytes(serialization.Encoding.PEM),
            "root-not-ca",
        ),
    ],
)
def test_bundle_refusals(pem: bytes | Callable[[], bytes], rule: str) -> None:
    data = pem() if callable(pem) else pem
    with pytest.raises(BundleError) as info:
        TrustBundle.from_pem(TD, data)
    assert info.value.rule == rule


def _root_with_undecodable_san() -> bytes:
    # Found by fuzz/targets/svid.py: cryptography parses extensions lazily, so a root whose URI
    # SAN is not IA5 loads fine and raised a bare ValueError from the basicConstraints check.
    der = bytearray(build_cert(ca_spec("odd root"), key(32)).public_bytes(serialization.Encoding.DER))
    at = der.find(f"spiffe://{TD}".encode())
    der[at] = 0xFF  # same length, so the DER stays well formed; the IA5String does not
    cert = x509.load_der_x509_certificate(bytes(der))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_bundle_root_with_malformed_extensions_is_a_bundle_error() -> None:
    with pytest.raises(BundleError) as info:
        TrustBundle.from_pem(TD, _root_with_undecodable_san())
    assert info.value.rule == "malformed-certificate"


_seg = st.text(st.sampled_from("abcXYZ019._-"), min_size=1, max_size=40).filter(
    lambda s: s not in (".", "..")
)


@settings(max_examples=40, deadline=None)
@given(st.lists(_seg, min_size=1, max_size=30))
def test_any_valid_id_round_trips_through_issuance_and_verification(segments: list[str]) -> None:
    sid = SpiffeId(TrustDomain(TD), "".join("/" + s for s in segments))
    ca = CertificateAuthority.create_root(TD, NOW - HOUR, key=key(20))
    issued = ca.sign_csr(build_csr(key(22), sid), allowed=lambda i: i == sid, now=NOW)
    assert verify_svid(issued.chain, TrustBundleSet.of(ca.bundle), NOW) == sid


def _bump_version(der: bytes, tlv: bytes, to: int) -> bytes:
    out = bytearray(der)
    at = out.find(tlv)
    assert at > 0
    out[at + len(tlv) - 1] = to
    return bytes(out)


def _armor(der: bytes, label: str) -> bytes:
    body = base64.encodebytes(der)
    return f"-----BEGIN {label}-----\n".encode() + body + f"-----END {label}-----\n".encode()


def test_unknown_x509_and_csr_versions_are_typed_refusals(root_ca: CertificateAuthority) -> None:
    # Found by the fuzz targets: cryptography raises x509.InvalidVersion (not a ValueError) for a
    # certificate or CSR with an unknown version; it escaped the bundle loader, the plug-in CA
    # loader and sign_csr, where the CA server turned it into UNKNOWN with a traceback.
    root_der = root_ca.certificate.public_bytes(serialization.Encoding.DER)
    bad_root = _armor(_bump_version(root_der, bytes([0xA0, 0x03, 0x02, 0x01, 0x02]), 3), "CERTIFICATE")
    with pytest.raises(BundleError) as binfo:
        TrustBundle.from_pem(TD, bad_root)
    assert binfo.value.rule == "pem"
    with pytest.raises(CaError) as linfo:
        CertificateAuthority.load(bad_root, root_ca.key_pem())
    assert linfo.value.rule == "ca-chain-pem"
    csr_der = x509.load_pem_x509_csr(csr_for()).public_bytes(serialization.Encoding.DER)
    bad_csr = _armor(_bump_version(csr_der, bytes([0x02, 0x01, 0x00]), 5), "CERTIFICATE REQUEST")
    with pytest.raises(CaError) as cinfo:
        root_ca.sign_csr(bad_csr, allowed=allow_all, now=NOW)
    assert cinfo.value.rule == "csr-malformed"


def test_a_csr_with_two_san_extensions_is_malformed(root_ca: CertificateAuthority) -> None:
    # Same class as the svid fuzz finding: DuplicateExtension is not a ValueError, so it escaped
    # sign_csr and the CA server answered UNKNOWN. SAN + issuerAltName, then the OID patched.
    uri = x509.UniformResourceIdentifier(WORKLOAD_ID)
    der = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([uri]), critical=True)
        .add_extension(x509.IssuerAlternativeName([uri]), critical=False)
        .sign(key(22), hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    ian_oid = bytes([0x06, 0x03, 0x55, 0x1D, 0x12])
    dup = _armor(der.replace(ian_oid, ian_oid[:-1] + b"\x11"), "CERTIFICATE REQUEST")
    with pytest.raises(CaError) as info:
        root_ca.sign_csr(dup, allowed=allow_all, now=NOW)
    assert info.value.rule == "csr-malformed"


def test_a_csr_with_an_unknown_key_algorithm_is_a_key_type_refusal(root_ca: CertificateAuthority) -> None:
    # Found by fuzz/targets/ca_request.py: cryptography raises UnsupportedAlgorithm for a key
    # OID it does not know; it escaped sign_csr and the CA server answered UNKNOWN.
    der = x509.load_pem_x509_csr(csr_for()).public_bytes(serialization.Encoding.DER)
    ec_oid = bytes([0x06, 0x07, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01])  # id-ecPublicKey
    assert der.count(ec_oid) == 1
    odd = _armor(der.replace(ec_oid, ec_oid[:-2] + b"\x42\x01"), "CERTIFICATE REQUEST")  # ...10045.66.1
    with pytest.raises(CaError) as info:
        root_ca.sign_csr(odd, allowed=allow_all, now=NOW)
    assert info.value.rule == "csr-key-type"
