"""Workload keys and CSRs: ECDSA P-256 (DESIGN §3), one SPIFFE URI SAN per CSR."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from identity.spiffe import SpiffeId


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key (randomness from the OS CSPRNG via OpenSSL)."""
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: SpiffeId) -> bytes:
    """A PEM CSR carrying exactly one URI SAN, the SPIFFE ID, and an empty subject.

    The subject is empty because SPIFFE identity lives only in the URI SAN; the CA ignores any
    subject anyway and builds its own.
    """
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("workload keys must be ECDSA P-256")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (the agent keeps keys in memory or in 0600 files)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key_pem(data: bytes) -> ec.EllipticCurvePrivateKey:
    """Load a PEM private key, insisting on ECDSA P-256; ValueError names what is wrong."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a usable unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"private key is {type(key).__name__}, ECDSA P-256 required")
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"private key is on curve {key.curve.name}, ECDSA P-256 required")
    return key
