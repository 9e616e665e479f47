from __future__ import annotations

import base64
import dataclasses
import datetime as dt
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from identity.bundle import TrustBundle, TrustBundleSet
from identity.spiffe import SpiffeId
from identity.svid import SvidError, WorkloadCredential, leaf_spiffe_id, load_pem_chain, verify_svid
from tests.identity.certgen import (
    CA_KU,
    NOW,
    TD,
    WORKLOAD_ID,
    Pki,
    Spec,
    build,
    ca_spec,
    key,
    ku,
    make_pki,
)

PKI = make_pki(TD, key_base=0)
OTHER = make_pki("other.example", key_base=2)
IMPOSTOR = make_pki(TD, key_base=4)  # same trust domain name, different keys
LEAF_KEY = key(10)


def bundles(*pkis: Pki) -> TrustBundleSet:
    return TrustBundleSet.of(
        *(TrustBundle.from_pem(p.td, p.root.public_bytes(serialization.Encoding.PEM)) for p in pkis)
    )


def leaf(spec: Spec | None = None, pki: Pki = PKI, *, via_intermediate: bool = True) -> x509.Certificate:
    spec = spec or Spec()
    if via_intermediate:
        return build(spec, LEAF_KEY, pki.inter_key, pki.inter)
    return build(spec, LEAF_KEY, pki.root_key, pki.root)


# ---- valid chains -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "make_chain"),
    [
        ("root signs leaf directly", lambda: [leaf(via_intermediate=False)]),
        ("plug-in CA: root -> intermediate -> leaf", lambda: [leaf(), PKI.inter]),
        ("chain that also carries the root", lambda: [leaf(), PKI.inter, PKI.root]),
        (
            "leaf with a DNS SAN besides the URI (spec allows)",
            lambda: [leaf(Spec(dns=("a.example",))), PKI.inter],
        ),
        ("leaf without EKU (spec: SHOULD, not MUST)", lambda: [leaf(Spec(eku=None)), PKI.inter]),
        (
            "leaf with keyEncipherment+keyAgreement",
            lambda: [
                leaf(Spec(key_usage=ku(digital_signature=True, key_encipherment=True, key_agreement=True))),
                PKI.inter,
            ],
        ),
        (
            "leaf with a subject",
            lambda: [leaf(Spec(subject=x509.Name.from_rfc4514_string("CN=sleep"))), PKI.inter],
        ),
    ],
)
def test_valid_chains_verify(name: str, make_chain: Callable[[], list[x509.Certificate]]) -> None:
    assert verify_svid(make_chain(), bundles(PKI), NOW) == SpiffeId.parse(WORKLOAD_ID)


def test_each_trust_domain_verifies_against_its_own_bundle() -> None:
    both = bundles(PKI, OTHER)
    other_id = "spiffe://other.example/ns/x/sa/y"
    assert verify_svid([leaf(Spec(uris=(other_id,)), OTHER), OTHER.inter], both, NOW) == SpiffeId.parse(
        other_id
    )
    assert verify_svid([leaf(), PKI.inter], both, NOW) == SpiffeId.parse(WORKLOAD_ID)


# ---- leaf rules ---------------------------------------------------------------------------

LEAF_RULES = [
    ("leaf-no-uri-san", Spec(uris=())),
    ("leaf-no-uri-san", Spec(uris=(), dns=("sleep.default.svc",))),
    ("leaf-multiple-uri-sans", Spec(uris=(WORKLOAD_ID, f"spiffe://{TD}/ns/default/sa/other"))),
    ("leaf-invalid-spiffe-id", Spec(uris=("https://cluster.local/ns/default/sa/sleep",))),
    ("leaf-invalid-spiffe-id", Spec(uris=("spiffe://Cluster.local/ns/default/sa/sleep",))),
    ("leaf-invalid-spiffe-id", Spec(uris=("spiffe://cluster.local/ns/default/sa/sleep/",))),
    ("leaf-no-path", Spec(uris=(f"spiffe://{TD}",))),
    ("leaf-is-ca", Spec(ca=True)),
    ("leaf-is-ca", Spec(ca=True, key_usage=ku(digital_signature=True, key_cert_sign=True))),
    ("leaf-no-key-usage", Spec(key_usage=None)),
    ("leaf-key-usage-not-critical", Spec(key_usage_critical=False)),
    ("leaf-no-digital-signature", Spec(key_usage=ku(key_encipherment=True))),
    ("leaf-key-cert-sign", Spec(key_usage=ku(digital_signature=True, key_cert_sign=True))),
    ("leaf-crl-sign", Spec(key_usage=ku(digital_signature=True, crl_sign=True))),
    ("leaf-eku", Spec(eku=(ExtendedKeyUsageOID.SERVER_AUTH,))),
    ("leaf-eku", Spec(eku=(ExtendedKeyUsageOID.CLIENT_AUTH,))),
    ("leaf-eku", Spec(eku=(ExtendedKeyUsageOID.CODE_SIGNING,))),
]


@pytest.mark.parametrize(
    ("rule", "spec"), LEAF_RULES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(LEAF_RULES)]
)
def test_leaf_rules(rule: str, spec: Spec) -> None:
    with pytest.raises(SvidError) as info:
        verify_svid([leaf(spec), PKI.inter], bundles(PKI), NOW)
    assert info.value.rule == rule


def test_leaf_without_basic_constraints_is_a_leaf() -> None:
    # RFC 5280: absent basicConstraints means cA=false, which is what the spec asks of a leaf.
    assert verify_svid([leaf(Spec(ca=None)), PKI.inter], bundles(PKI), NOW) == SpiffeId.parse(WORKLOAD_ID)


# ---- signing-certificate rules ------------------------------------------------------------


def _inter(**kw: object) -> x509.Certificate:
    # Same subject and key as PKI.inter, so leaf() (issued by PKI.inter) chains to it.
    return build(ca_spec(f"{TD} intermediate", **kw), PKI.inter_key, PKI.root_key, PKI.root)  # type: ignore[arg-type]


SIGNING_RULES = [
    ("signing-cert-not-ca", dict(ca=False)),
    ("signing-cert-not-ca", dict(ca=None)),
    ("signing-cert-key-usage", dict(key_usage=ku(digital_signature=True))),
    ("signing-cert-key-usage", dict(key_usage=None)),
    ("signing-cert-spiffe-id", dict(uris=(f"spiffe://{TD}/ns/ca",))),
    ("signing-cert-spiffe-id", dict(uris=("spiffe://BAD",))),
]


@pytest.mark.parametrize(
    ("rule", "kw"), SIGNING_RULES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(SIGNING_RULES)]
)
def test_signing_certificate_rules(rule: str, kw: dict[str, object]) -> None:
    with pytest.raises(SvidError) as info:
        verify_svid([leaf(), _inter(**kw)], bundles(PKI), NOW)
    assert info.value.rule == rule


def test_intermediate_without_spiffe_id_is_fine() -> None:
    # Signing certs SHOULD (not MUST) be SVIDs: operators' plug-in intermediates often are not.
    assert verify_svid([leaf(), _inter(uris=())], bundles(PKI), NOW) == SpiffeId.parse(WORKLOAD_ID)


def test_path_length_constraint_is_enforced_by_path_validation() -> None:
    inter0 = _inter(path_length=0)
    sub_key = key(11)
    sub = build(ca_spec("sub-intermediate"), sub_key, PKI.inter_key, inter0)
    lf = build(Spec(), LEAF_KEY, sub_key, sub)
    with pytest.raises(SvidError) as info:
        verify_svid([lf, sub, inter0], bundles(PKI), NOW)
    assert info.value.rule == "path-validation"


# ---- time ---------------------------------------------------------------------------------

HOUR = dt.timedelta(hours=1)
SECOND = dt.timedelta(seconds=1)


@pytest.mark.parametrize(
    ("at", "rule"),
    [
        (NOW + HOUR, None),  # NotAfter itself is still valid (RFC 5280: "through")
        (NOW + HOUR + SECOND, "expired"),
        (NOW + dt.timedelta(days=30), "expired"),
        (NOW - dt.timedelta(minutes=2), None),  # NotBefore itself
        (NOW - dt.timedelta(minutes=2) - SECOND, "not-yet-valid"),
        (NOW - dt.timedelta(days=1), "not-yet-valid"),
    ],
)
def test_leaf_validity_at_injected_time(at: dt.datetime, rule: str | None) -> None:
    chain = [leaf(), PKI.inter]
    if rule is None:
        assert verify_svid(chain, bundles(PKI), at) == SpiffeId.parse(WORKLOAD_ID)
    else:
        with pytest.raises(SvidError) as info:
            verify_svid(chain, bundles(PKI), at)
        assert info.value.rule == rule


def test_expired_intermediate() -> None:
    inter = _inter(not_after=NOW - SECOND)
    with pytest.raises(SvidError) as info:
        verify_svid([leaf(), inter], bundles(PKI), NOW)
    assert info.value.rule == "expired"
    assert f"{TD} intermediate" in info.value.message


def test_expired_root() -> None:
    rk = key(0)
    old_root = build(ca_spec(f"{TD} root", not_after=NOW - SECOND), rk)
    pki = dataclasses.replace(PKI, root=old_root)
    inter = build(ca_spec(f"{TD} intermediate"), PKI.inter_key, rk, old_root)
    with pytest.raises(SvidError) as info:
        verify_svid([leaf(pki=pki), inter], bundles(pki), NOW)
    assert info.value.rule == "expired"
    assert "root" in info.value.message


# ---- trust ------------------------------------------------------------------------------


def test_untrusted_trust_domain() -> None:
    other_id = "spiffe://other.example/ns/x/sa/y"
    with pytest.raises(SvidError) as info:
        verify_svid([leaf(Spec(uris=(other_id,)), OTHER), OTHER.inter], bundles(PKI), NOW)
    assert info.value.rule == "untrusted-domain"


def test_root_of_one_domain_does_not_vouch_for_another() -> None:
    # The leaf claims other.example but is signed by cluster.local's CA: both bundles are
    # trusted, yet the bundle chosen is other.example's, whose root did not sign it.
    forged = leaf(Spec(uris=("spiffe://other.example/ns/x/sa/y",)), PKI)
    with pytest.raises(SvidError) as info:
        verify_svid([forged, PKI.inter], bundles(PKI, OTHER), NOW)
    assert info.value.rule == "foreign-signer"


@pytest.mark.parametrize(
    "make_chain",
    [
        lambda: [leaf(pki=IMPOSTOR), IMPOSTOR.inter],  # same names, different keys
        lambda: [leaf(pki=IMPOSTOR, via_intermediate=False)],
        lambda: [leaf(pki=IMPOSTOR), IMPOSTOR.inter, IMPOSTOR.root],  # brings its own root
        lambda: [leaf(pki=IMPOSTOR), PKI.inter],  # real intermediate attached, wrong signer
        lambda: [leaf()],  # intermediate withheld: nothing links the leaf to the root
    ],
    ids=[
        "impostor-ca",
        "impostor-root-direct",
        "impostor-with-root",
        "mismatched-intermediate",
        "missing-intermediate",
    ],
)
def test_foreign_signer(make_chain: Callable[[], list[x509.Certificate]]) -> None:
    with pytest.raises(SvidError) as info:
        verify_svid(make_chain(), bundles(PKI), NOW)
    assert info.value.rule == "foreign-signer"


def test_empty_and_overlong_chains() -> None:
    with pytest.raises(SvidError, match="empty-chain"):
        verify_svid([], bundles(PKI), NOW)
    with pytest.raises(SvidError, match="chain-too-long"):
        verify_svid([leaf()] + [PKI.inter] * 8, bundles(PKI), NOW)


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        verify_svid([leaf(), PKI.inter], bundles(PKI), NOW.replace(tzinfo=None))


# ---- PEM loading and credentials ------------------------------------------------------------


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        _pem(PKI.root)[:200],  # truncated
        _pem(PKI.root) + _pem(PKI.inter)[:-40],  # second block truncated
    ],
    ids=["empty", "garbage", "bad-der", "truncated", "second-truncated"],
)
def test_load_pem_chain_rejects_bad_pem(data: bytes) -> None:
    with pytest.raises(SvidError) as info:
        load_pem_chain(data)
    assert info.value.rule == "pem"


def test_load_pem_chain_keeps_order() -> None:
    lf = leaf()
    assert load_pem_chain(_pem(lf, PKI.inter)) == [lf, PKI.inter]


def test_workload_credential_checks_key_and_id() -> None:
    lf = leaf()
    cred = WorkloadCredential.from_chain(LEAF_KEY, [lf, PKI.inter])
    assert cred.spiffe_id == SpiffeId.parse(WORKLOAD_ID)
    assert cred.not_after == lf.not_valid_after_utc and cred.not_before == lf.not_valid_before_utc
    again = WorkloadCredential.from_pem(cred.chain_pem(), cred.key_pem())
    assert again.chain == cred.chain and again.spiffe_id == cred.spiffe_id
    with pytest.raises(SvidError, match="key-mismatch"):
        WorkloadCredential.from_chain(key(12), [lf, PKI.inter])
    with pytest.raises(SvidError, match="id-mismatch"):
        WorkloadCredential(SpiffeId.parse("spiffe://cluster.local/ns/x/sa/y"), LEAF_KEY, (lf,))
    with pytest.raises(SvidError, match="key-pem"):
        WorkloadCredential.from_pem(cred.chain_pem(), b"not a key")


def test_leaf_spiffe_id_alone_applies_leaf_rules() -> None:
    assert leaf_spiffe_id(leaf()) == SpiffeId.parse(WORKLOAD_ID)
    with pytest.raises(SvidError, match="leaf-is-ca"):
        leaf_spiffe_id(build(Spec(ca=True, key_usage=CA_KU), LEAF_KEY))


def test_credential_with_an_unreadable_leaf_key_is_an_svid_error() -> None:
    # Found by fuzz/targets/svid.py: a leaf whose EC point is not on the curve made
    # WorkloadCredential raise cryptography's bare ValueError instead of an SvidError.
    good = leaf()
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    point = LEAF_KEY.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    at = der.find(point)
    assert at > 0
    der[at + len(point) - 1] ^= 1  # last byte of Y: no longer a point on P-256
    broken = x509.load_der_x509_certificate(bytes(der))
    with pytest.raises(SvidError) as info:
        WorkloadCredential.from_chain(LEAF_KEY, [broken, PKI.inter])
    assert info.value.rule == "malformed-certificate"


def test_a_certificate_with_an_unknown_x509_version_is_a_pem_error() -> None:
    # Found by fuzz/targets/svid.py: cryptography raises x509.InvalidVersion, which is not a
    # ValueError, so it escaped load_pem_chain untyped.
    der = bytearray(leaf().public_bytes(serialization.Encoding.DER))
    at = der.find(bytes([0xA0, 0x03, 0x02, 0x01, 0x02]))  # [0] EXPLICIT INTEGER 2 (= v3)
    der[at + 4] = 3  # "v4": no such version
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bytes(der)) + b"-----END CERTIFICATE-----\n"
    with pytest.raises(SvidError) as info:
        load_pem_chain(pem)
    assert info.value.rule == "pem"


def test_an_intermediate_with_an_undecodable_subject_is_an_svid_error() -> None:
    # Found by fuzz/targets/svid.py: naming the certificate in a message decoded its subject,
    # and cryptography's ValueError escaped verify_svid instead of the chain's real refusal.
    der = bytearray(PKI.inter.public_bytes(serialization.Encoding.DER))
    at = der.find(f"{TD} intermediate".encode())
    der[at] = 0xFF  # not UTF-8 any more; same length, so the DER stays well formed
    bad_inter = x509.load_der_x509_certificate(bytes(der))
    with pytest.raises(SvidError) as info:
        verify_svid([leaf(), bad_inter], bundles(PKI), NOW)
    assert info.value.rule in ("foreign-signer", "path-validation")


def test_a_leaf_with_two_san_extensions_is_malformed() -> None:
    # Found by fuzz/targets/svid.py: cryptography's DuplicateExtension is not a ValueError and
    # escaped verify_svid. Built as SAN + issuerAltName (same value, so same length), then the
    # second extension's OID is turned into the SAN's (2.5.29.18 -> 2.5.29.17).
    uri = x509.UniformResourceIdentifier(WORKLOAD_ID)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(PKI.inter.subject)
        .public_key(LEAF_KEY.public_key())
        .serial_number(7)
        .not_valid_before(NOW - dt.timedelta(minutes=2))
        .not_valid_after(NOW + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([uri]), critical=True)
        .add_extension(x509.IssuerAlternativeName([uri]), critical=False)
        .add_extension(ku(digital_signature=True), critical=True)
        .sign(PKI.inter_key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    ian_oid = bytes([0x06, 0x03, 0x55, 0x1D, 0x12])
    assert der.count(ian_oid) == 1
    dup = x509.load_der_x509_certificate(der.replace(ian_oid, ian_oid[:-1] + b"\x11"))
    with pytest.raises(SvidError) as info:
        verify_svid([dup, PKI.inter], bundles(PKI), NOW)
    assert info.value.rule == "malformed-certificate"
