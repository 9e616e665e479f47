"""Trust bundles: the CA certificates that vouch for one trust domain (SPIFFE Trust Domain and
Bundle spec; X509-SVID spec §6 for the JWKS form).

A bundle is per trust domain because validation must pick roots by the leaf's trust domain:
a root trusted for ``a.example`` must not vouch for IDs in ``b.example``.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from identity.spiffe import SpiffeIdError, TrustDomain

# A bundle with more roots than this is almost certainly a mistake (or an attack on parse time).
MAX_ROOTS = 64
# What cryptography raises for a certificate or CSR it cannot read (at load or, lazily, when the
# extensions or names are first touched). Only ValueError is documented as such; InvalidVersion,
# DuplicateExtension and UnsupportedGeneralNameType are plain Exceptions, and catching ValueError
# alone let them escape untyped (found by fuzz/targets/svid.py).
CERT_PARSE_ERRORS: Final = (
    ValueError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)


class BundleError(ValueError):
    """A trust bundle cannot be used; ``rule`` names why."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{rule}: {message}")
        self.rule = rule
        self.message = message


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_bytes(n: int, size: int | None = None) -> bytes:
    length = size if size is not None else max(1, (n.bit_length() + 7) // 8)
    return n.to_bytes(length, "big")


def _jwk_for(cert: x509.Certificate) -> dict[str, Any]:
    """One JWK entry for an X509-SVID CA certificate (X509-SVID §6.1: use, x5c, no kid)."""
    pub = cert.public_key()
    jwk: dict[str, Any]
    if isinstance(pub, ec.EllipticCurvePublicKey):
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(pub.curve.name)
        if crv is None:
            raise BundleError("root-key-type", f"curve {pub.curve.name} has no JWK name")
        size = (pub.curve.key_size + 7) // 8
        nums = pub.public_numbers()
        jwk = {
            "kty": "EC",
            "crv": crv,
            "x": _b64url(_int_bytes(nums.x, size)),
            "y": _b64url(_int_bytes(nums.y, size)),
        }
    elif isinstance(pub, rsa.RSAPublicKey):
        rnums = pub.public_numbers()
        jwk = {"kty": "RSA", "n": _b64url(_int_bytes(rnums.n)), "e": _b64url(_int_bytes(rnums.e))}
    else:
        raise BundleError("root-key-type", f"{type(pub).__name__} roots cannot be published as JWK")
    jwk["use"] = "x509-svid"
    jwk["x5c"] = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")]
    return jwk


def _name(cert: x509.Certificate) -> str:
    try:
        return repr(cert.subject.rfc4514_string())
    except CERT_PARSE_ERRORS:  # an undecodable subject still gets a name in the message
        return f"serial {cert.serial_number:x}"


def _check_root(cert: x509.Certificate) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise BundleError(
            "root-not-ca", f"bundle certificate {_name(cert)} has no basicConstraints"
        ) from None
    except CERT_PARSE_ERRORS as exc:  # duplicate or undecodable extensions (parsed lazily)
        raise BundleError(
            "malformed-certificate", f"bundle certificate {_name(cert)} has malformed extensions: {exc}"
        ) from None
    if not bc.ca:
        raise BundleError("root-not-ca", f"bundle certificate {_name(cert)} is not a CA")


def load_pem_roots(pem: bytes) -> tuple[x509.Certificate, ...]:
    """Parse PEM CA certificates for a bundle; BundleError if unusable or not CAs."""
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise BundleError("pem", "no PEM certificate found")
    if pem.count(b"-----BEGIN CERTIFICATE-----") != pem.count(b"-----END CERTIFICATE-----"):
        raise BundleError("pem", "a PEM certificate block is truncated (BEGIN without END)")
    try:
        certs = tuple(x509.load_pem_x509_certificates(pem))
    except CERT_PARSE_ERRORS as exc:
        raise BundleError("pem", f"bad PEM certificate data: {exc}") from None
    if len(certs) > MAX_ROOTS:
        raise BundleError("too-many-roots", f"{len(certs)} certificates, at most {MAX_ROOTS}")
    for cert in certs:
        _check_root(cert)
    return certs


@dataclass(frozen=True)
class TrustBundle:
    """The X.509 roots of one trust domain, plus the SPIFFE bundle metadata we publish."""

    trust_domain: TrustDomain
    roots: tuple[x509.Certificate, ...]
    sequence: int = 0
    refresh_hint_seconds: int = 300

    def __post_init__(self) -> None:
        if not self.roots:
            raise BundleError("empty", f"bundle for {self.trust_domain} has no certificates")
        if len(self.roots) > MAX_ROOTS:
            raise BundleError("too-many-roots", f"bundle has {len(self.roots)} roots, at most {MAX_ROOTS}")
        for cert in self.roots:
            _check_root(cert)

    @classmethod
    def from_pem(cls, trust_domain: TrustDomain | str, pem: bytes) -> TrustBundle:
        return cls(_td(trust_domain), load_pem_roots(pem))

    def to_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.roots)

    def to_jwks(self) -> dict[str, Any]:
        """The SPIFFE bundle (a JWK Set) for this trust domain's X509-SVID authorities."""
        return {
            "keys": [_jwk_for(c) for c in self.roots],
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": self.refresh_hint_seconds,
        }

    @classmethod
    def from_jwks(cls, trust_domain: TrustDomain | str, doc: Mapping[str, Any]) -> TrustBundle:
        """Read a SPIFFE bundle: entries with ``use: x509-svid`` and a non-empty ``x5c`` (first
        value only, X509-SVID §6.2); other entries are ignored."""
        td = _td(trust_domain)
        keys = doc.get("keys")
        if not isinstance(keys, list):
            raise BundleError("jwks", "SPIFFE bundle has no 'keys' list")
        roots: list[x509.Certificate] = []
        for i, entry in enumerate(keys):
            if not isinstance(entry, Mapping) or entry.get("use") != "x509-svid":
                continue
            x5c = entry.get("x5c")
            if not isinstance(x5c, list) or not x5c:
                continue
            try:
                roots.append(x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True)))
            except (*CERT_PARSE_ERRORS, TypeError) as exc:
                raise BundleError("jwks", f"keys[{i}].x5c[0] is not a DER certificate: {exc}") from None
        seq = doc.get("spiffe_sequence", 0)
        hint = doc.get("spiffe_refresh_hint", 300)
        if not isinstance(seq, int) or not isinstance(hint, int):
            raise BundleError("jwks", "spiffe_sequence and spiffe_refresh_hint must be integers")
        return cls(td, tuple(roots), sequence=seq, refresh_hint_seconds=hint)


def _td(trust_domain: TrustDomain | str) -> TrustDomain:
    if isinstance(trust_domain, TrustDomain):
        return trust_domain
    try:
        return TrustDomain(trust_domain)
    except SpiffeIdError as exc:
        raise BundleError("trust-domain", str(exc)) from None


@dataclass(frozen=True)
class TrustBundleSet:
    """Bundles for the trust domains we accept peers from, at most one per domain."""

    bundles: Mapping[TrustDomain, TrustBundle] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for td, b in self.bundles.items():
            if b.trust_domain != td:
                raise BundleError("trust-domain", f"bundle for {b.trust_domain} filed under {td}")
        # Freeze a private copy so later mutation of the caller's dict cannot change trust.
        object.__setattr__(self, "bundles", dict(self.bundles))

    @classmethod
    def of(cls, *bundles: TrustBundle) -> TrustBundleSet:
        by_td: dict[TrustDomain, TrustBundle] = {}
        for b in bundles:
            if b.trust_domain in by_td:
                raise BundleError("duplicate-trust-domain", f"two bundles for {b.trust_domain}")
            by_td[b.trust_domain] = b
        return cls(by_td)

    def with_bundle(self, bundle: TrustBundle) -> TrustBundleSet:
        """A new set with ``bundle`` added or replacing the one for its trust domain."""
        return TrustBundleSet({**self.bundles, bundle.trust_domain: bundle})

    def for_domain(self, trust_domain: TrustDomain) -> TrustBundle | None:
        return self.bundles.get(trust_domain)

    @property
    def domains(self) -> tuple[TrustDomain, ...]:
        return tuple(sorted(self.bundles))

    def all_roots_pem(self) -> bytes:
        """Every root of every domain, in domain order (what a TLS context loads as CAs)."""
        return b"".join(self.bundles[td].to_pem() for td in self.domains)

    def __iter__(self) -> Iterator[TrustBundle]:
        return (self.bundles[td] for td in self.domains)

    def __len__(self) -> int:
        return len(self.bundles)


def bundle_set(bundles: Iterable[TrustBundle]) -> TrustBundleSet:
    return TrustBundleSet.of(*bundles)
