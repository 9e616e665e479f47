"""The CA's state directory and credential files.

Layout of a CA directory (Istio's plug-in CA file names, so an operator's ``cacerts`` material
is familiar):

=================  ==========================================================================
``ca-cert.pem``    the signing certificate: the self-signed root, or the operator's intermediate
``ca-key.pem``     its private key, mode 0600 (loading refuses a key readable by others)
``cert-chain.pem`` signing certificate, intermediates and root (what the CA loads back)
``root-cert.pem``  the trust anchor(s): the published trust bundle
``ca.json``        trust domain and kind (``self-signed`` or ``plug-in``)
=================  ==========================================================================

With a plug-in CA the root's *key* never comes here: only the operator's intermediate key does.

Credential directories (what ``ca issue`` and ``ca bootstrap-node`` write and the agent reads):
``key.pem`` (0600), ``cert-chain.pem`` (leaf then intermediates, never the root) and
``root-cert.pem`` (the trust bundle).

Every write goes to a temporary file in the same directory and is renamed into place, so a
crash leaves the old file or the new one, never half of one; a refused request writes nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from credentials.files import (
    CHAIN_FILE,
    KEY_FILE,
    ROOTS_FILE,
    CredentialFileError,
    CredentialFiles,
    check_key_mode,
    read_credentials,
    read_file,
    write_all,
    write_credentials,
)
from credentials.identities import CA_SERVER_NAME, ca_server_identity
from identity.bundle import TrustBundle
from identity.ca import BACKDATE, DEFAULT_MAX_TTL, CaError, CertificateAuthority
from identity.keys import generate_key, key_to_pem
from identity.spiffe import SpiffeIdError, TrustDomain

CA_CERT: Final = "ca-cert.pem"
CA_KEY: Final = "ca-key.pem"
CA_CHAIN: Final = "cert-chain.pem"
ROOT_CERT: Final = "root-cert.pem"
CA_META: Final = "ca.json"


KIND_SELF_SIGNED: Final = "self-signed"
KIND_PLUGIN: Final = "plug-in"

SERVER_CERT_TTL: Final = dt.timedelta(hours=24)

# A CA directory's errors are the credential files' errors: one class, so `ca` commands catch one.
CaStoreError = CredentialFileError


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CaStore:
    """A loaded CA directory."""

    directory: Path
    ca: CertificateAuthority
    kind: str

    @property
    def trust_domain(self) -> TrustDomain:
        return self.ca.trust_domain

    @property
    def bundle(self) -> TrustBundle:
        return self.ca.bundle


def _existing_ca(directory: Path) -> list[str]:
    return [n for n in (CA_KEY, CA_CERT, CA_CHAIN, ROOT_CERT, CA_META) if (directory / n).exists()]


def _refuse_overwrite(directory: Path, force: bool) -> None:
    present = _existing_ca(directory)
    if present and not force:
        raise CaStoreError(
            f"a CA already exists in {directory} ({', '.join(present)}); "
            "refusing to overwrite it (pass --force to replace it: every issued certificate "
            "then stops verifying)"
        )


def _save(directory: Path, ca: CertificateAuthority, kind: str, now: dt.datetime) -> CaStore:
    meta = {
        "trustDomain": ca.trust_domain.name,
        "kind": kind,
        "createdAt": now.astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
    }
    write_all(
        directory,
        {
            CA_KEY: (ca.key_pem(), 0o600),
            CA_CERT: (_pem(ca.certificate), 0o644),
            CA_CHAIN: (ca.chain_pem(), 0o644),
            ROOT_CERT: (ca.bundle.to_pem(), 0o644),
            CA_META: ((json.dumps(meta, indent=2, sort_keys=True) + "\n").encode(), 0o644),
        },
    )
    return CaStore(directory, ca, kind)


def init_self_signed(
    directory: str | os.PathLike[str],
    trust_domain: str | TrustDomain,
    *,
    now: dt.datetime,
    force: bool = False,
) -> CaStore:
    """Create a self-signed ECDSA P-256 root CA in ``directory``."""
    d = Path(directory)
    _refuse_overwrite(d, force)
    try:
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain(trust_domain)
    except SpiffeIdError as exc:
        raise CaStoreError(f"--trust-domain {trust_domain!r}: {exc}") from None
    ca = CertificateAuthority.create_root(td, now)
    return _save(d, ca, KIND_SELF_SIGNED, now)


def init_plugin(
    directory: str | os.PathLike[str],
    *,
    chain_pem: bytes,
    key_pem: bytes,
    root_pem: bytes | None = None,
    trust_domain: str | None = None,
    now: dt.datetime,
    force: bool = False,
) -> CaStore:
    """Install an operator's intermediate CA (plug-in CA); the root's key stays with the operator.

    ``chain_pem`` holds the intermediate (matching ``key_pem``) and any further intermediates;
    the root is either at its end or given separately as ``root_pem``.
    """
    d = Path(directory)
    _refuse_overwrite(d, force)
    full = chain_pem if root_pem is None else chain_pem.rstrip(b"\n") + b"\n" + root_pem
    try:
        ca = CertificateAuthority.load(full, key_pem, trust_domain=trust_domain)
    except (CaError, SpiffeIdError) as exc:
        raise CaStoreError(f"plug-in CA refused: {exc}") from None
    if ca.certificate in ca.roots:
        raise CaStoreError(
            "plug-in CA refused: the key given is the root's own key; a plug-in CA installs an "
            "intermediate so the root key can stay offline (use `ca init --trust-domain` for a "
            "self-signed root)"
        )
    if now >= ca.not_after:
        raise CaStoreError(f"plug-in CA refused: its chain expired at {ca.not_after.isoformat()}")
    return _save(d, ca, KIND_PLUGIN, now)


def load(directory: str | os.PathLike[str], *, max_ttl: dt.timedelta = DEFAULT_MAX_TTL) -> CaStore:
    d = Path(directory)
    if not (d / CA_META).exists():
        raise CaStoreError(f"{d} is not a CA directory (no {CA_META}); create one with `ztagent ca init`")
    try:
        meta = json.loads(read_file(d / CA_META, "CA metadata"))
        td = meta["trustDomain"]
        kind = meta["kind"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CaStoreError(f"{d / CA_META} is malformed: {exc}") from None
    key_path = d / CA_KEY
    key_pem = read_file(key_path, "CA key")
    check_key_mode(key_path)
    chain_pem = read_file(d / CA_CHAIN, "CA chain")
    try:
        ca = CertificateAuthority.load(chain_pem, key_pem, trust_domain=td, max_ttl=max_ttl)
    except (CaError, SpiffeIdError) as exc:
        raise CaStoreError(f"CA in {d} cannot be loaded: {exc}") from None
    return CaStore(d, ca, kind)


# --------------------------------------------------------------------------------------------
# The CA server's own TLS certificate


def issue_server_certificate(
    store: CaStore, *, now: dt.datetime, ttl: dt.timedelta = SERVER_CERT_TTL
) -> tuple[bytes, bytes, dt.datetime]:
    """A serving certificate for the CA's gRPC endpoint: (key PEM, chain PEM, not_after).

    Not an X509-SVID: gRPC clients verify servers by DNS name, so it carries the DNS SAN
    :data:`CA_SERVER_NAME` beside the CA's SPIFFE ID, which identity's workload signing rightly
    refuses. It is signed directly with the CA key, only ever held in memory, and only good for
    serverAuth, so it can't be used as a client or workload credential.
    """
    ca = store.ca
    ca_key = serialization.load_pem_private_key(ca.key_pem(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaStoreError(f"CA key is {type(ca_key).__name__}; ECDSA or RSA required")
    key = generate_key()
    not_after = min(now + ttl, ca.not_after)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(CA_SERVER_NAME),
                    x509.UniformResourceIdentifier(str(ca_server_identity(ca.trust_domain))),
                ]
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.certificate.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    cert = builder.sign(ca_key, hashes.SHA256())
    chain = b"".join(_pem(c) for c in (cert, *ca.issuer_chain))
    return key_to_pem(key), chain, not_after


# Credential directories are written by the `ca issue` / `ca bootstrap-node` commands through
# this module too; they live in credentials.files because the node agent reads them.
__all__ = [
    "CHAIN_FILE",
    "KEY_FILE",
    "ROOTS_FILE",
    "CaStore",
    "CaStoreError",
    "CredentialFiles",
    "init_plugin",
    "init_self_signed",
    "issue_server_certificate",
    "load",
    "read_credentials",
    "write_credentials",
]
