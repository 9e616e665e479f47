"""identity/svid.py (and the bundle loader beside it): X509-SVID validation on mutated DER/PEM.

The first byte picks the shape, the rest is the input:

0. PEM text -> ``load_pem_chain`` -> ``verify_svid``;
1. a chain of DER certificates, each prefixed with a 2-byte length -> ``verify_svid``;
2. one DER leaf, presented with the real intermediate -> ``verify_svid`` and, when its key is
   the fixed leaf key, ``WorkloadCredential.from_chain``;
3. PEM text -> ``identity.bundle.load_pem_roots`` (a trust bundle).

Validation runs at a fixed ``now`` against a bundle of the fixed root. Refusals must be
``SvidError`` / ``BundleError`` with a documented rule; DER that cryptography cannot parse at
all is what a TLS stack would have refused earlier (``ValueError`` from cryptography, skipped).
An accepted chain must independently satisfy the leaf rules of X509-SVID §4-§5.
"""

from __future__ import annotations

import struct

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from fuzz.targets import _pki
from identity.bundle import BundleError, TrustBundle, TrustBundleSet, load_pem_roots
from identity.spiffe import SpiffeId, TrustDomain
from identity.svid import SvidError, WorkloadCredential, load_pem_chain, verify_svid

SVID_RULES = frozenset(
    {
        "pem",
        "malformed-certificate",
        "empty-chain",
        "chain-too-long",
        "leaf-no-uri-san",
        "leaf-multiple-uri-sans",
        "leaf-invalid-spiffe-id",
        "leaf-no-path",
        "leaf-is-ca",
        "leaf-no-key-usage",
        "leaf-key-usage-not-critical",
        "leaf-no-digital-signature",
        "leaf-key-cert-sign",
        "leaf-crl-sign",
        "leaf-eku",
        "signing-cert-not-ca",
        "signing-cert-key-usage",
        "signing-cert-spiffe-id",
        "untrusted-domain",
        "expired",
        "not-yet-valid",
        "foreign-signer",
        "path-validation",
        "key-mismatch",
        "id-mismatch",
    }
)
BUNDLE_RULES = frozenset(
    {"pem", "empty", "root-not-ca", "root-key-type", "too-many-roots", "trust-domain", "jwks"}
    | {"malformed-certificate"}
)

BUNDLES = TrustBundleSet.of(TrustBundle(TrustDomain(_pki.TD), (_pki.ROOT,)))
MAX_LEN = 8192


def _chain_blob(*certs: x509.Certificate) -> bytes:
    return b"".join(struct.pack(">H", len(d)) + d for d in (_pki.der(c) for c in certs))


_GOOD = _pki.leaf()


def _off_curve(cert: x509.Certificate) -> bytes:
    """``cert``'s DER with the leaf key's EC point moved off the curve (a regression seed)."""
    der = bytearray(_pki.der(cert))
    point = _pki.LEAF_KEY.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    at = der.find(point)
    der[at + len(point) - 1] ^= 1
    return bytes(der)


SEEDS: list[bytes] = [
    b"\x00" + _pki.pem(_GOOD) + _pki.pem(_pki.INTER),
    b"\x00" + _pki.pem(_pki.leaf(via_intermediate=False)),
    b"\x00" + _pki.pem(_GOOD) + b"-----BEGIN CERTIFICATE-----\nAAAA\n",
    b"\x01" + _chain_blob(_GOOD, _pki.INTER),
    b"\x01" + _chain_blob(_GOOD, _pki.INTER, _pki.ROOT),
    b"\x01" + _chain_blob(_pki.leaf(via_intermediate=False)),
    b"\x01" + _chain_blob(_pki.leaf(ku_critical=False), _pki.INTER),
    b"\x02" + _pki.der(_GOOD),
    b"\x02" + _off_curve(_GOOD),
    b"\x02" + _pki.der(_pki.leaf(ca=True)),
    b"\x02" + _pki.der(_pki.leaf(eku=False)),
    b"\x02" + _pki.der(_pki.leaf(uris=[_pki.WORKLOAD_ID, "spiffe://cluster.local/x"])),
    b"\x02" + _pki.der(_pki.leaf(uris=["spiffe://cluster.local"])),
    b"\x02" + _pki.der(_pki.leaf(uris=["spiffe://other.example/ns/a/sa/b"])),
    b"\x02" + _pki.der(_pki.leaf(ku=_pki.key_usage(leaf=True, key_cert_sign=True))),
    b"\x02" + _pki.der(_pki.leaf(ku_critical=False)),
    b"\x03" + _pki.pem(_pki.ROOT),
    b"\x03" + _pki.pem(_pki.ROOT) + _pki.pem(_pki.INTER),
    b"\x03" + _pki.pem(_GOOD),
]


def _parse_der_chain(blob: bytes) -> list[x509.Certificate] | None:
    certs: list[x509.Certificate] = []
    pos = 0
    while pos + 2 <= len(blob) and len(certs) < 10:
        (n,) = struct.unpack_from(">H", blob, pos)
        pos += 2
        try:
            certs.append(x509.load_der_x509_certificate(blob[pos : pos + n]))
        except (ValueError, x509.InvalidVersion):  # cryptography's own refusals (no cert at all)
            return None
        pos += n
    return certs


def _check_accepted(chain: list[x509.Certificate], sid: SpiffeId) -> None:
    leaf = chain[0]
    exts = leaf.extensions
    uris = exts.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    if uris != [str(sid)] or not sid.path or str(sid.trust_domain) != _pki.TD:
        raise AssertionError(f"accepted {sid} from a leaf with URI SANs {uris}")
    ku = exts.get_extension_for_class(x509.KeyUsage)
    if not ku.critical or not ku.value.digital_signature or ku.value.key_cert_sign or ku.value.crl_sign:
        raise AssertionError(f"accepted a leaf with keyUsage {ku}")
    try:
        bc = exts.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is not None and bc.ca:
        raise AssertionError("accepted a CA certificate as a leaf")
    try:
        eku = exts.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and not {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku):
        raise AssertionError(f"accepted a leaf with EKU {eku}")
    if not leaf.not_valid_before_utc <= _pki.NOW <= leaf.not_valid_after_utc:
        raise AssertionError("accepted a leaf outside its validity")


def _verify(chain: list[x509.Certificate]) -> SpiffeId | None:
    try:
        sid = verify_svid(chain, BUNDLES, _pki.NOW)
    except SvidError as exc:
        if exc.rule not in SVID_RULES:
            raise AssertionError(f"undocumented SvidError rule {exc.rule!r}: {exc}") from exc
        return None
    _check_accepted(chain, sid)
    return sid


def fuzz_one(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 4, data[1:]
    if mode == 0:
        try:
            chain = load_pem_chain(body)
        except SvidError as exc:
            if exc.rule != "pem":
                raise AssertionError(f"load_pem_chain refused with rule {exc.rule!r}") from exc
            return
        _verify(chain)
    elif mode == 1:
        parsed = _parse_der_chain(body)
        if parsed is not None:
            _verify(parsed)
    elif mode == 2:
        try:
            cert = x509.load_der_x509_certificate(body)
        except (ValueError, x509.InvalidVersion):
            return
        sid = _verify([cert, _pki.INTER])
        # The credential constructor (what the agent builds from the CA's answer) on the same
        # leaf and the fixed leaf key: every refusal an SvidError, and a verified leaf usable.
        try:
            cred = WorkloadCredential.from_chain(_pki.LEAF_KEY, [cert, _pki.INTER])
        except SvidError as exc:
            if exc.rule not in SVID_RULES:
                raise AssertionError(f"undocumented SvidError rule {exc.rule!r}: {exc}") from exc
            if sid is not None and exc.rule != "key-mismatch":
                raise AssertionError(f"verified as {sid}, but no credential: {exc}") from exc
        else:
            if sid is not None and cred.spiffe_id != sid:
                raise AssertionError(f"credential {cred.spiffe_id} for a leaf verified as {sid}")
    else:
        try:
            roots = load_pem_roots(body)
        except BundleError as exc:
            if exc.rule not in BUNDLE_RULES:
                raise AssertionError(f"undocumented BundleError rule {exc.rule!r}: {exc}") from exc
            return
        for r in roots:
            bc = r.extensions.get_extension_for_class(x509.BasicConstraints).value
            if not bc.ca:
                raise AssertionError("a non-CA certificate was accepted as a root")
