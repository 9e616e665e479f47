"""X509-SVIDs: the credential a workload presents, and validation of a peer's SVID.

:func:`verify_svid` applies the X509-SVID spec (§3-§5) at an injected time:

1. leaf rules (§5.2, §4.1, §4.3, §4.4): exactly one URI SAN holding a valid SPIFFE ID with a
   non-root path; not a CA; keyUsage present, critical, with digitalSignature and without
   keyCertSign/cRLSign; if EKU is present it carries serverAuth and clientAuth;
2. signing-certificate rules (§3.2): every other certificate in the presented chain is a CA
   with keyCertSign, and its SPIFFE ID, if any, has no path;
3. the trust bundle is chosen by the *leaf's* trust domain, so a root of one domain never
   vouches for another domain's IDs;
4. validity of every presented certificate at ``now``;
5. RFC 5280 path validation to one of that bundle's roots at ``now``, done by
   ``cryptography.x509.verification`` (the pyca Rust verifier): it builds the path, checks
   signatures, validity, basic constraints, key usage, name constraints and path length. We
   run our own checks first only to name the precise SPIFFE rule that failed; the verifier is
   the authority on the chain.

Every failure raises :class:`SvidError` whose ``rule`` says which rule failed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from identity.bundle import CERT_PARSE_ERRORS, TrustBundleSet
from identity.spiffe import SpiffeId, SpiffeIdError

MAX_CHAIN_LENGTH = 8  # leaf + intermediates; deeper chains are not something a mesh issues
MAX_PEM_BYTES = 256 * 1024


class SvidError(Exception):
    """An SVID failed validation; ``rule`` names the rule (e.g. "leaf-is-ca", "expired")."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{rule}: {message}")
        self.rule = rule
        self.message = message


def _describe(cert: x509.Certificate) -> str:
    try:
        subject = cert.subject.rfc4514_string()
    except CERT_PARSE_ERRORS:  # names are decoded lazily; a bad one must not hide the real refusal
        subject = ""
    return f"certificate {subject!r}" if subject else f"certificate serial {cert.serial_number:x}"


def load_pem_chain(data: bytes) -> list[x509.Certificate]:
    """Parse concatenated PEM certificates; SvidError("pem") on anything unusable."""
    if not isinstance(data, bytes):
        raise SvidError("pem", f"expected PEM bytes, got {type(data).__name__}")
    if len(data) > MAX_PEM_BYTES:
        raise SvidError("pem", f"PEM input is {len(data)} bytes; at most {MAX_PEM_BYTES} accepted")
    begins = data.count(b"-----BEGIN CERTIFICATE-----")
    if begins == 0:
        raise SvidError("pem", "no '-----BEGIN CERTIFICATE-----' block found")
    if data.count(b"-----END CERTIFICATE-----") != begins:
        raise SvidError("pem", "a PEM certificate block is truncated (BEGIN without END)")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except CERT_PARSE_ERRORS as exc:
        raise SvidError("pem", f"cannot parse PEM certificate: {exc}") from None
    return certs


def _extensions(cert: x509.Certificate) -> x509.Extensions:
    try:
        return cert.extensions
    except CERT_PARSE_ERRORS as exc:  # duplicate or undecodable extensions
        raise SvidError(
            "malformed-certificate", f"{_describe(cert)} has malformed extensions: {exc}"
        ) from None


def leaf_spiffe_id(cert: x509.Certificate) -> SpiffeId:
    """Apply the X509-SVID leaf rules to ``cert`` and return its SPIFFE ID.

    This does not validate the chain; use it only on a certificate whose chain was already
    verified against the right trust domain's bundle.
    """
    exts = _extensions(cert)
    try:
        san = exts.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise SvidError("leaf-no-uri-san", "leaf has no subjectAltName, so no SPIFFE ID") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        raise SvidError("leaf-no-uri-san", "leaf has no URI SAN, so no SPIFFE ID")
    if len(uris) > 1:
        raise SvidError("leaf-multiple-uri-sans", f"leaf has {len(uris)} URI SANs; exactly one is allowed")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise SvidError(
            "leaf-invalid-spiffe-id", f"leaf URI SAN {uris[0]!r} is not a SPIFFE ID ({exc})"
        ) from None
    if spiffe_id.path == "":
        raise SvidError("leaf-no-path", f"leaf SPIFFE ID {spiffe_id} has no path (a trust domain ID)")
    try:
        bc = exts.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise SvidError("leaf-is-ca", "leaf has basicConstraints CA=true")
    except x509.ExtensionNotFound:
        pass  # absent basicConstraints means cA=false (RFC 5280 §4.2.1.9 DEFAULT FALSE)
    try:
        ku_ext = exts.get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound:
        raise SvidError(
            "leaf-no-key-usage", "leaf has no keyUsage extension (required on every SVID)"
        ) from None
    if not ku_ext.critical:
        # X509-SVID §4.3: "MUST be set on all SVIDs, and MUST be marked critical". A verifier
        # that does not know the extension must refuse the certificate, not ignore the limits.
        raise SvidError("leaf-key-usage-not-critical", "leaf keyUsage extension is not marked critical")
    ku = ku_ext.value
    if not ku.digital_signature:
        raise SvidError("leaf-no-digital-signature", "leaf keyUsage lacks digitalSignature")
    if ku.key_cert_sign:
        raise SvidError("leaf-key-cert-sign", "leaf keyUsage sets keyCertSign")
    if ku.crl_sign:
        raise SvidError("leaf-crl-sign", "leaf keyUsage sets cRLSign")
    try:
        eku = exts.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None:
        missing = [
            name
            for name, oid in (
                ("serverAuth", ExtendedKeyUsageOID.SERVER_AUTH),
                ("clientAuth", ExtendedKeyUsageOID.CLIENT_AUTH),
            )
            if oid not in eku
        ]
        if missing:
            raise SvidError("leaf-eku", f"leaf extendedKeyUsage lacks {' and '.join(missing)}")
    return spiffe_id


def _check_signing_cert(cert: x509.Certificate) -> None:
    exts = _extensions(cert)
    try:
        bc = exts.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise SvidError("signing-cert-not-ca", f"{_describe(cert)} in the chain is not a CA")
    try:
        ku = exts.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is None or not ku.key_cert_sign:
        raise SvidError("signing-cert-key-usage", f"{_describe(cert)} in the chain lacks keyCertSign")
    try:
        san = exts.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            try:
                sid = SpiffeId.parse(uri)
            except SpiffeIdError as exc:
                raise SvidError(
                    "signing-cert-spiffe-id", f"{_describe(cert)} has an invalid SPIFFE ID ({exc})"
                ) from None
            if sid.path:
                raise SvidError(
                    "signing-cert-spiffe-id", f"{_describe(cert)} has SPIFFE ID {sid} with a path"
                )


def _check_validity(cert: x509.Certificate, now: dt.datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise SvidError(
            "not-yet-valid",
            f"{what} is not valid before {cert.not_valid_before_utc.isoformat()} (now {now.isoformat()})",
        )
    if now > cert.not_valid_after_utc:
        raise SvidError(
            "expired", f"{what} expired at {cert.not_valid_after_utc.isoformat()} (now {now.isoformat()})"
        )


def _issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def verify_svid(chain: Sequence[x509.Certificate], bundles: TrustBundleSet, now: dt.datetime) -> SpiffeId:
    """Validate a presented chain (leaf first, then intermediates) and return the peer's ID."""
    if now.tzinfo is None:
        raise ValueError("`now` must be timezone-aware (UTC)")
    if not chain:
        raise SvidError("empty-chain", "no certificate presented")
    if len(chain) > MAX_CHAIN_LENGTH:
        raise SvidError("chain-too-long", f"{len(chain)} certificates presented; at most {MAX_CHAIN_LENGTH}")
    leaf, intermediates = chain[0], list(chain[1:])
    spiffe_id = leaf_spiffe_id(leaf)
    for cert in intermediates:
        _check_signing_cert(cert)
    bundle = bundles.for_domain(spiffe_id.trust_domain)
    if bundle is None:
        raise SvidError(
            "untrusted-domain", f"no trust bundle for trust domain {spiffe_id.trust_domain} of {spiffe_id}"
        )
    _check_validity(leaf, now, "leaf")
    for cert in intermediates:
        _check_validity(cert, now, _describe(cert))

    verifier = PolicyBuilder().store(Store(list(bundle.roots))).time(now).build_client_verifier()
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        raise _diagnose(chain, bundle.roots, now, spiffe_id, exc) from None
    return spiffe_id


def _diagnose(
    chain: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: dt.datetime,
    spiffe_id: SpiffeId,
    exc: VerificationError,
) -> SvidError:
    """Name the rule behind a path-validation failure (the verifier's own text is kept)."""
    # Which presented certificates are linked by signatures to a bundle root? (Fixpoint over
    # at most MAX_CHAIN_LENGTH certificates.)
    linked: list[x509.Certificate] = list(roots)
    changed = True
    while changed:
        changed = False
        for cert in chain:
            if cert not in linked and any(_issued_by(cert, t) for t in linked):
                linked.append(cert)
                changed = True
    if chain[0] not in linked:
        return SvidError(
            "foreign-signer",
            f"the leaf is not signed by a root of the {spiffe_id.trust_domain} bundle, directly or through "
            f"the presented intermediates ({exc})",
        )
    anchored = [r for r in roots if any(c is not r and _issued_by(c, r) for c in linked)]
    for root in anchored:
        if now > root.not_valid_after_utc:
            return SvidError(
                "expired", f"root {_describe(root)} expired at {root.not_valid_after_utc.isoformat()}"
            )
        if now < root.not_valid_before_utc:
            return SvidError(
                "not-yet-valid",
                f"root {_describe(root)} is not valid before {root.not_valid_before_utc.isoformat()}",
            )
    return SvidError(
        "path-validation", f"chain does not validate to the {spiffe_id.trust_domain} bundle: {exc}"
    )


@dataclass(frozen=True)
class WorkloadCredential:
    """What the TLS layer presents: a key, and its X509-SVID chain (leaf, intermediates)."""

    spiffe_id: SpiffeId
    private_key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        if not self.chain:
            raise SvidError("empty-chain", "a credential needs at least its leaf certificate")
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        try:
            leaf_key = self.chain[0].public_key().public_bytes(der, pub)
        except (ValueError, UnsupportedAlgorithm) as exc:  # e.g. an EC point not on its curve (fuzz)
            raise SvidError(
                "malformed-certificate", f"the leaf's public key cannot be read: {exc}"
            ) from None
        if self.private_key.public_key().public_bytes(der, pub) != leaf_key:
            raise SvidError("key-mismatch", "the private key does not match the leaf certificate")
        leaf_id = leaf_spiffe_id(self.chain[0])
        if leaf_id != self.spiffe_id:
            raise SvidError("id-mismatch", f"leaf certificate is for {leaf_id}, not {self.spiffe_id}")

    @classmethod
    def from_chain(
        cls, private_key: ec.EllipticCurvePrivateKey, chain: Sequence[x509.Certificate]
    ) -> WorkloadCredential:
        if not chain:
            raise SvidError("empty-chain", "a credential needs at least its leaf certificate")
        return cls(leaf_spiffe_id(chain[0]), private_key, tuple(chain))

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes) -> WorkloadCredential:
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise SvidError("key-pem", f"cannot read the private key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SvidError("key-type", f"workload key is {type(key).__name__}; ECDSA required")
        return cls.from_chain(key, load_pem_chain(chain_pem))

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_before(self) -> dt.datetime:
        return self.chain[0].not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.chain[0].not_valid_after_utc

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
