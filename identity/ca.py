"""The CA's signing logic: turn a workload's CSR into an X509-SVID (DESIGN §3).

Pure: the current time, the TTL and the serial-number randomness are parameters; the CA holds
no mutable state, so a refused CSR cannot change anything. Two ways to get a CA:

* :meth:`CertificateAuthority.create_root` — a self-signed ECDSA P-256 root that signs leaves
  directly (labs, tests, single-cluster meshes);
* :meth:`CertificateAuthority.load` — "plug-in CA": an operator's intermediate certificate and
  key plus the chain up to their root. The root key stays offline; leaves are issued with the
  intermediates attached so peers that only trust the root can build the path.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity.bundle import CERT_PARSE_ERRORS, TrustBundle
from identity.keys import generate_key
from identity.spiffe import SpiffeId, SpiffeIdError, TrustDomain

# Clock skew allowance: peers whose clocks lag ours must still accept a fresh certificate.
BACKDATE = dt.timedelta(minutes=2)
DEFAULT_WORKLOAD_TTL = dt.timedelta(hours=1)
DEFAULT_MAX_TTL = dt.timedelta(hours=24)
DEFAULT_ROOT_TTL = dt.timedelta(days=3650)
# A P-256 CSR with one SAN is ~500 bytes of PEM; anything near this is not a workload CSR.
MAX_CSR_BYTES = 16 * 1024
SERIAL_BYTES = 16  # 128 random bits (CA/B BR ask for >= 64; RFC 5280 allows up to 20 octets)

CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
Rng = Callable[[int], bytes]


class CaError(Exception):
    """The CA refuses a request or a configuration; ``rule`` names the rule at fault."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{rule}: {message}")
        self.rule = rule
        self.message = message


@dataclass(frozen=True)
class IssuedCertificate:
    spiffe_id: SpiffeId
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # leaf first, then the CA's intermediates; never the root

    @property
    def not_before(self) -> dt.datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)


def _hash_for(key: CaKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _serial(rng: Rng) -> int:
    raw = rng(SERIAL_BYTES)
    if len(raw) != SERIAL_BYTES:
        raise ValueError(f"rng returned {len(raw)} bytes, wanted {SERIAL_BYTES}")
    # Positive and non-zero as RFC 5280 §4.1.2.2 requires.
    return int.from_bytes(raw, "big") or 1


def _pub_der(key: x509.Certificate | CaKey) -> bytes:
    pub = key.public_key()
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _aki_for(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]


def is_self_signed(cert: x509.Certificate) -> bool:
    """True for a root: issuer equals subject and the certificate verifies under its own key."""
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def signing_trust_domain(cert: x509.Certificate) -> TrustDomain | None:
    """The trust domain named by a signing certificate's SPIFFE URI SAN, if it has one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            return SpiffeId.parse(uri).trust_domain
        except SpiffeIdError:
            continue
    return None


def _check_signing_cert(cert: x509.Certificate, what: str) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CaError("ca-not-ca", f"{what} has no basicConstraints extension") from None
    if not bc.ca:
        raise CaError("ca-not-ca", f"{what} is not a CA certificate (basicConstraints CA=false)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise CaError("ca-key-usage", f"{what} has no keyUsage extension") from None
    if not ku.key_cert_sign:
        raise CaError("ca-key-usage", f"{what} keyUsage lacks keyCertSign")


class CertificateAuthority:
    """Signs workload CSRs. Immutable after construction."""

    def __init__(
        self,
        *,
        trust_domain: TrustDomain,
        key: CaKey,
        certificate: x509.Certificate,
        intermediates: Sequence[x509.Certificate] = (),
        roots: Sequence[x509.Certificate],
        max_ttl: dt.timedelta = DEFAULT_MAX_TTL,
        rng: Rng = os.urandom,
    ) -> None:
        if _pub_der(key) != _pub_der(certificate):
            raise CaError("ca-key-mismatch", "the CA private key does not match the signing certificate")
        _check_signing_cert(certificate, "signing certificate")
        if not roots:
            raise CaError("ca-no-root", "no root certificate given")
        self.trust_domain = trust_domain
        self._key = key
        self.certificate = certificate
        self.intermediates = tuple(intermediates)
        self.roots = tuple(roots)
        self.max_ttl = max_ttl
        self._rng = rng
        # Handed out after each leaf: the signing cert unless it is itself the root.
        issuing = () if certificate in self.roots else (certificate, *self.intermediates)
        self.issuer_chain: tuple[x509.Certificate, ...] = issuing
        # A leaf must not outlive any certificate on its path, or peers reject it mid-life.
        # Roots count too: an operator's root may expire before the intermediate it signed.
        path = [certificate, *self.intermediates, *self.roots]
        self.not_before = max(c.not_valid_before_utc for c in path)
        self.not_after = min(c.not_valid_after_utc for c in path)

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def create_root(
        cls,
        trust_domain: TrustDomain | str,
        now: dt.datetime,
        key: ec.EllipticCurvePrivateKey | None = None,
        ttl: dt.timedelta = DEFAULT_ROOT_TTL,
        *,
        rng: Rng = os.urandom,
        max_ttl: dt.timedelta = DEFAULT_MAX_TTL,
    ) -> CertificateAuthority:
        """A self-signed ECDSA P-256 root for ``trust_domain``, valid from ``now`` for ``ttl``."""
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain(trust_domain)
        _check_now(now)
        key = key if key is not None else generate_key()
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise CaError("ca-key-type", "root keys created here are ECDSA P-256")
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, td.name),
                x509.NameAttribute(NameOID.COMMON_NAME, "ztagent root CA"),
            ]
        )
        cert = _build_ca_cert(
            subject=name,
            issuer=name,
            subject_key=key,
            signing_key=key,
            issuer_cert=None,
            td=td,
            now=now,
            ttl=ttl,
            rng=rng,
        )
        return cls(trust_domain=td, key=key, certificate=cert, roots=(cert,), max_ttl=max_ttl, rng=rng)

    def create_intermediate(
        self,
        now: dt.datetime,
        ttl: dt.timedelta,
        key: ec.EllipticCurvePrivateKey | None = None,
        *,
        common_name: str = "ztagent intermediate CA",
    ) -> CertificateAuthority:
        """A CA one level below this one (what an operator's offline root would sign)."""
        _check_now(now)
        key = key if key is not None else generate_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.trust_domain.name),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        cert = _build_ca_cert(
            subject=name,
            issuer=self.certificate.subject,
            subject_key=key,
            signing_key=self._key,
            issuer_cert=self.certificate,
            td=self.trust_domain,
            now=now,
            ttl=ttl,
            rng=self._rng,
        )
        return CertificateAuthority(
            trust_domain=self.trust_domain,
            key=key,
            certificate=cert,
            intermediates=self.issuer_chain,
            roots=self.roots,
            max_ttl=self.max_ttl,
            rng=self._rng,
        )

    @classmethod
    def load(
        cls,
        chain_pem: bytes,
        key_pem: bytes,
        *,
        trust_domain: TrustDomain | str | None = None,
        rng: Rng = os.urandom,
        max_ttl: dt.timedelta = DEFAULT_MAX_TTL,
    ) -> CertificateAuthority:
        """Load a CA from its certificate chain and key (plug-in CA).

        ``chain_pem`` holds the signing certificate (matching ``key_pem``), any intermediates,
        and the self-signed root, in any order. Every link's signature is checked. The trust
        domain comes from the CA certificates' SPIFFE URI SAN or from ``trust_domain``; if both
        are present they must agree.
        """
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise CaError("ca-key-pem", f"cannot read the CA private key: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise CaError("ca-key-type", f"CA key is {type(key).__name__}; ECDSA or RSA required")
        if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 2048:
            raise CaError("ca-key-type", f"RSA CA key is {key.key_size} bits; at least 2048 required")
        if b"-----BEGIN CERTIFICATE-----" not in chain_pem:
            raise CaError("ca-chain-pem", "no PEM certificate in the CA chain")
        try:
            certs = x509.load_pem_x509_certificates(chain_pem)
        except CERT_PARSE_ERRORS as exc:
            raise CaError("ca-chain-pem", f"cannot read the CA chain: {exc}") from None
        key_der = _pub_der(key)
        signing = [c for c in certs if _pub_der(c) == key_der]
        if not signing:
            raise CaError("ca-key-mismatch", "no certificate in the CA chain matches the CA private key")
        cert = signing[0]
        # Walk up issuer links to a self-signed root, verifying each signature.
        path = [cert]
        while not is_self_signed(path[-1]):
            child = path[-1]
            parents = [c for c in certs if c.subject == child.issuer and c not in path]
            parent = None
            for p in parents:
                try:
                    child.verify_directly_issued_by(p)
                except (ValueError, TypeError, InvalidSignature):
                    continue
                parent = p
                break
            if parent is None:
                raise CaError(
                    "ca-chain-incomplete",
                    f"no certificate in the CA chain signed {child.subject.rfc4514_string()!r}; "
                    "the chain must reach a self-signed root",
                )
            _check_signing_cert(parent, f"CA chain certificate {parent.subject.rfc4514_string()!r}")
            path.append(parent)
        root = path[-1]
        named = signing_trust_domain(cert) or signing_trust_domain(root)
        given = None
        if trust_domain is not None:
            given = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain(trust_domain)
        if named is not None and given is not None and named != given:
            raise CaError(
                "ca-trust-domain", f"CA certificate names trust domain {named}, but {given} was given"
            )
        td = given or named
        if td is None:
            raise CaError("ca-trust-domain", "CA certificates carry no SPIFFE ID; give the trust domain")
        return cls(
            trust_domain=td,
            key=key,
            certificate=cert,
            intermediates=tuple(path[1:-1]),
            roots=(root,),
            max_ttl=max_ttl,
            rng=rng,
        )

    # -- publication ------------------------------------------------------------------------

    @property
    def bundle(self) -> TrustBundle:
        return TrustBundle(self.trust_domain, self.roots)

    def chain_pem(self) -> bytes:
        """Signing certificate, intermediates and root: the file :meth:`load` reads back."""
        certs = [self.certificate, *self.intermediates, *[r for r in self.roots if r != self.certificate]]
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

    def key_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    # -- issuance ---------------------------------------------------------------------------

    def sign_csr(
        self,
        csr_pem: bytes | str,
        *,
        allowed: Callable[[SpiffeId], bool],
        ttl: dt.timedelta = DEFAULT_WORKLOAD_TTL,
        now: dt.datetime,
    ) -> IssuedCertificate:
        """Issue an X509-SVID for the CSR's SPIFFE ID, or raise :class:`CaError`.

        ``allowed`` is the caller's authorization (e.g. "this workload runs on the requesting
        node"); it is asked only once the CSR is known to be well-formed.
        """
        _check_now(now)
        csr = _parse_csr(csr_pem)
        spiffe_id = self._check_csr_identity(csr)
        if not allowed(spiffe_id):
            raise CaError("not-authorized", f"the requester is not entitled to {spiffe_id}")
        if ttl <= dt.timedelta(0):
            raise CaError("ttl", f"TTL must be positive, got {ttl}")
        if ttl > self.max_ttl:
            raise CaError("ttl", f"TTL {ttl} exceeds this CA's maximum {self.max_ttl}")
        if now < self.not_before:
            raise CaError(
                "ca-not-yet-valid", f"the CA certificate is valid only from {self.not_before.isoformat()}"
            )
        if now >= self.not_after:
            raise CaError("ca-expired", f"the CA certificate expired at {self.not_after.isoformat()}")
        return self._issue(csr, spiffe_id, ttl=ttl, now=now)

    def _check_csr_identity(self, csr: x509.CertificateSigningRequest) -> SpiffeId:
        try:
            pub = csr.public_key()
        except UnsupportedAlgorithm as exc:  # an algorithm OID cryptography does not know (fuzz)
            raise CaError(
                "csr-key-type", f"CSR key is of an unknown type ({exc}); workload keys must be ECDSA P-256"
            ) from None
        except ValueError as exc:  # e.g. an EC point that is not on its curve
            raise CaError("csr-malformed", f"the CSR's public key cannot be read: {exc}") from None
        if isinstance(pub, rsa.RSAPublicKey):
            raise CaError("csr-key-type", f"CSR key is RSA-{pub.key_size}; workload keys must be ECDSA P-256")
        if isinstance(pub, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            raise CaError(
                "csr-key-type", f"CSR key is {type(pub).__name__[:-9]}; workload keys must be ECDSA P-256"
            )
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise CaError(
                "csr-key-type", f"CSR key is {type(pub).__name__}; workload keys must be ECDSA P-256"
            )
        if not isinstance(pub.curve, ec.SECP256R1):
            raise CaError(
                "csr-key-type", f"CSR key is ECDSA on {pub.curve.name}; workload keys must be ECDSA P-256"
            )
        if not csr.is_signature_valid:
            raise CaError("csr-signature", "the CSR's self-signature does not verify")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise CaError(
                "csr-no-san", "the CSR has no subjectAltName; exactly one SPIFFE URI SAN is required"
            ) from None
        except CERT_PARSE_ERRORS as exc:  # duplicate or unparseable extensions
            raise CaError("csr-malformed", f"CSR extensions cannot be parsed: {exc}") from None
        others = [n for n in san if not isinstance(n, x509.UniformResourceIdentifier)]
        if others:
            kinds = ", ".join(sorted({_gn_kind(n) for n in others}))
            raise CaError(
                "csr-non-uri-san", f"the CSR carries {kinds} SAN(s); only one SPIFFE URI SAN is allowed"
            )
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1:
            raise CaError("csr-san-count", f"the CSR carries {len(uris)} URI SANs; exactly one is required")
        try:
            spiffe_id = SpiffeId.parse(uris[0])
        except SpiffeIdError as exc:
            raise CaError(
                "csr-invalid-spiffe-id", f"the CSR's URI SAN is not a valid SPIFFE ID ({exc})"
            ) from None
        if spiffe_id.path == "":
            raise CaError(
                "csr-invalid-spiffe-id", f"{spiffe_id} is a trust domain ID; a workload ID needs a path"
            )
        if spiffe_id.trust_domain != self.trust_domain:
            raise CaError(
                "wrong-trust-domain", f"{spiffe_id} is not in this CA's trust domain {self.trust_domain}"
            )
        return spiffe_id

    def _issue(
        self, csr: x509.CertificateSigningRequest, spiffe_id: SpiffeId, *, ttl: dt.timedelta, now: dt.datetime
    ) -> IssuedCertificate:
        not_after = min(now + ttl, self.not_after)
        pub = csr.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)  # checked in _check_csr_identity
        builder = (
            x509.CertificateBuilder()
            # Empty subject: identity is the URI SAN only, so the SAN is critical (RFC 5280 §4.2.1.6).
            .subject_name(x509.Name([]))
            .issuer_name(self.certificate.subject)
            .public_key(pub)
            .serial_number(_serial(self._rng))
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .add_extension(_aki_for(self.certificate), critical=False)
        )
        cert = builder.sign(self._key, _hash_for(self._key))
        return IssuedCertificate(spiffe_id=spiffe_id, certificate=cert, chain=(cert, *self.issuer_chain))


def _gn_kind(name: x509.GeneralName) -> str:
    return {
        x509.DNSName: "DNS",
        x509.IPAddress: "IP",
        x509.RFC822Name: "email",
        x509.DirectoryName: "directory-name",
        x509.RegisteredID: "registered-ID",
        x509.OtherName: "other-name",
    }.get(type(name), type(name).__name__)


def _parse_csr(csr_pem: bytes | str) -> x509.CertificateSigningRequest:
    if isinstance(csr_pem, str):
        try:
            csr_pem = csr_pem.encode("ascii")
        except UnicodeEncodeError:
            raise CaError("csr-malformed", "the CSR PEM contains non-ASCII characters") from None
    if not isinstance(csr_pem, bytes):
        raise CaError("csr-malformed", f"the CSR must be PEM bytes, got {type(csr_pem).__name__}")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CaError("csr-too-large", f"the CSR is {len(csr_pem)} bytes; at most {MAX_CSR_BYTES} accepted")
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in csr_pem:
        raise CaError("csr-malformed", "no '-----BEGIN CERTIFICATE REQUEST-----' PEM block found")
    if b"-----END CERTIFICATE REQUEST-----" not in csr_pem:
        raise CaError("csr-malformed", "the CSR PEM block is truncated (no END line)")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        csr.extensions  # noqa: B018 - force parsing now so malformed extensions fail here
    except CERT_PARSE_ERRORS as exc:  # e.g. a CSR "version 5", or two SAN extensions (fuzz)
        raise CaError("csr-malformed", f"the CSR cannot be parsed: {exc}") from None
    return csr


def _check_now(now: dt.datetime) -> None:
    if now.tzinfo is None:
        raise ValueError("`now` must be timezone-aware (UTC)")


def _build_ca_cert(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    subject_key: ec.EllipticCurvePrivateKey,
    signing_key: CaKey,
    issuer_cert: x509.Certificate | None,
    td: TrustDomain,
    now: dt.datetime,
    ttl: dt.timedelta,
    rng: Rng,
) -> x509.Certificate:
    pub = subject_key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(pub)
    aki = (
        _aki_for(issuer_cert)
        if issuer_cert is not None
        else x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(pub)
        .serial_number(_serial(rng))
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # A signing certificate SHOULD be an SVID whose ID has no path (X509-SVID §3.2).
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(td.id))]), critical=False
        )
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
    )
    return builder.sign(signing_key, _hash_for(signing_key))
