"""TLS contexts for HBONE: TLS 1.3 only, ALPN h2, mutual SVID authentication (DESIGN.md §3, §4).

What this matches on the wire (ztunnel): TLS 1.3 with AES-256-GCM / AES-128-GCM, ALPN ``h2``,
the client sends no SNI and never resumes sessions, both sides present X509-SVIDs.

Verification happens in two steps. OpenSSL checks the peer chain against the roots of every
trusted trust domain (``CERT_REQUIRED``) so a peer that cannot chain to any of them fails the
handshake itself. Then :func:`verify_peer` runs ``identity.verify_svid`` on the verified chain:
that picks the bundle by the *leaf's* trust domain (a leaf of domain A signed by domain B's root
passes OpenSSL but not this), applies the X509-SVID rules and yields the peer's SPIFFE ID.

Python 3.11's ``ssl`` reads certificates and keys only from paths; the credential goes through
an anonymous memfd so private keys never touch a disk.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import os
import ssl
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from identity.bundle import TrustBundleSet
from identity.spiffe import SpiffeId
from identity.svid import SvidError, WorkloadCredential, verify_svid

ALPN_H2 = "h2"
# ztunnel's suites (rustls with AES-GCM only); OpenSSL's default would add ChaCha20-Poly1305.
TLS13_CIPHERSUITES = "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"
_ALLOWED_SUITE_NAMES = frozenset(TLS13_CIPHERSUITES.split(":"))


class TlsSetupError(RuntimeError):
    """A context could not be built as required (fail loud rather than run with weaker TLS)."""


class PeerVerificationError(Exception):
    """The peer finished the handshake but is not acceptable. ``rule`` names the check."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


class IdentityMismatchError(PeerVerificationError):
    """The server's SPIFFE ID is valid but not one expected for the destination."""

    def __init__(self, got: SpiffeId, expected: Collection[SpiffeId], where: str) -> None:
        want = ", ".join(sorted(str(e) for e in expected)) or "(none)"
        super().__init__(
            "server-identity-mismatch",
            f"HBONE server at {where} presented {got}, but the destination expects one of: {want}; "
            "refusing to send traffic (wrong node, stale workload data, or an impostor)",
        )
        self.got = got
        self.expected = tuple(expected)


# --- OpenSSL TLS 1.3 ciphersuites --------------------------------------------------------------
# Python 3.11 has no API for SSL_CTX_set_ciphersuites (set_ciphers only covers TLS <= 1.2). The
# SSL_CTX* is the first field after PyObject_HEAD in CPython's PySSLContext; we find it, prove it
# is the right pointer by reading back the verify mode and options Python set, then call libssl.
_libssl: Any = None


def _libssl_handle() -> Any:
    global _libssl
    if _libssl is None:
        import _ssl  # the extension module links the libssl its contexts live in

        lib = ctypes.CDLL(_ssl.__file__)
        lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
        lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        _libssl = lib
    return _libssl


def restrict_tls13_ciphersuites(ctx: ssl.SSLContext, suites: str = TLS13_CIPHERSUITES) -> None:
    lib = _libssl_handle()
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        raise TlsSetupError("cannot locate the OpenSSL context to restrict TLS 1.3 ciphersuites")
    # ssl.CERT_REQUIRED == SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT (3) in OpenSSL terms.
    if lib.SSL_CTX_get_verify_mode(ptr) != 3 or lib.SSL_CTX_get_options(ptr) != int(ctx.options):
        raise TlsSetupError("OpenSSL context layout not recognised; refusing to guess the ciphersuites")
    if lib.SSL_CTX_set_ciphersuites(ptr, suites.encode("ascii")) != 1:
        raise TlsSetupError(f"OpenSSL rejected TLS 1.3 ciphersuites {suites!r}")
    tls13 = {c["name"] for c in ctx.get_ciphers() if c.get("protocol") == "TLSv1.3"}
    if not tls13 or not tls13 <= _ALLOWED_SUITE_NAMES:
        raise TlsSetupError(f"TLS 1.3 ciphersuites are {sorted(tls13)}, expected only {suites}")


# --- contexts ----------------------------------------------------------------------------------
def load_credential(ctx: ssl.SSLContext, credential: WorkloadCredential) -> None:
    """Load a certificate chain and key into ``ctx`` from an anonymous memfd (never a disk file)."""
    fd = os.memfd_create("ztagent-svid", os.MFD_CLOEXEC)
    try:
        data = memoryview(credential.chain_pem() + credential.key_pem())
        while data:
            data = data[os.write(fd, data) :]
        # OpenSSL re-opens the path, so each read starts at offset 0 of the memfd.
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _base_context(protocol: int, credential: WorkloadCredential, bundles: TrustBundleSet) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SPIFFE authorizes on the URI SAN, never a DNS name
    ctx.verify_mode = ssl.CERT_REQUIRED
    roots = bundles.all_roots_pem()
    if not roots.strip():
        raise TlsSetupError("no trust bundle roots: cannot authenticate any HBONE peer")
    ctx.load_verify_locations(cadata=roots.decode("ascii"))
    ctx.set_alpn_protocols([ALPN_H2])
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
    load_credential(ctx, credential)
    restrict_tls13_ciphersuites(ctx)
    return ctx


def build_server_context(credential: WorkloadCredential, bundles: TrustBundleSet) -> ssl.SSLContext:
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, credential, bundles)
    ctx.num_tickets = 0  # no resumption: every connection authenticates with its current SVID
    return ctx


def build_client_context(credential: WorkloadCredential, bundles: TrustBundleSet) -> ssl.SSLContext:
    return _base_context(ssl.PROTOCOL_TLS_CLIENT, credential, bundles)


def same_credential(a: WorkloadCredential, b: WorkloadCredential) -> bool:
    """Same SVID (callers may hand us equal copies; a rotation always brings a new leaf)."""
    return a is b or (a.spiffe_id == b.spiffe_id and a.chain == b.chain)


def same_bundles(a: TrustBundleSet, b: TrustBundleSet) -> bool:
    return a is b or a.all_roots_pem() == b.all_roots_pem()


@dataclass
class _Entry:
    credential: WorkloadCredential
    bundles: TrustBundleSet
    context: ssl.SSLContext


class ContextCache:
    """One server and one client context per local identity, rebuilt when the credential object
    or the trust bundle set changes (rotation takes effect on the next handshake, no restart)."""

    def __init__(self) -> None:
        self._server: dict[SpiffeId, _Entry] = {}
        self._client: dict[SpiffeId, _Entry] = {}
        self.builds = 0

    def _get(
        self,
        table: dict[SpiffeId, _Entry],
        credential: WorkloadCredential,
        bundles: TrustBundleSet,
        build: Callable[[WorkloadCredential, TrustBundleSet], ssl.SSLContext],
    ) -> ssl.SSLContext:
        entry = table.get(credential.spiffe_id)
        if (
            entry is not None
            and same_credential(entry.credential, credential)
            and same_bundles(entry.bundles, bundles)
        ):
            return entry.context
        ctx = build(credential, bundles)
        self.builds += 1
        table[credential.spiffe_id] = _Entry(credential, bundles, ctx)
        return ctx

    def server_context(self, credential: WorkloadCredential, bundles: TrustBundleSet) -> ssl.SSLContext:
        return self._get(self._server, credential, bundles, build_server_context)

    def client_context(self, credential: WorkloadCredential, bundles: TrustBundleSet) -> ssl.SSLContext:
        return self._get(self._client, credential, bundles, build_client_context)

    def forget(self, spiffe_id: SpiffeId) -> None:
        self._server.pop(spiffe_id, None)
        self._client.pop(spiffe_id, None)


# --- after the handshake -----------------------------------------------------------------------
def check_alpn(ssl_object: Any) -> None:
    proto = ssl_object.selected_alpn_protocol()
    if proto != ALPN_H2:
        raise PeerVerificationError(
            "alpn", f"peer negotiated ALPN {proto!r}, HBONE requires 'h2' (is this an HBONE peer?)"
        )


def peer_chain(ssl_object: Any) -> list[x509.Certificate]:
    """The peer's chain as OpenSSL verified it (leaf first); the bare leaf if unavailable."""
    inner = getattr(ssl_object, "_sslobj", ssl_object)
    getter = getattr(inner, "get_verified_chain", None)
    if getter is not None:
        try:
            certs = getter()
        except (ssl.SSLError, ValueError):
            certs = None
        if certs:
            import _ssl  # Certificate.public_bytes takes the private encoding constants

            return [x509.load_der_x509_certificate(c.public_bytes(_ssl.ENCODING_DER)) for c in certs]
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerVerificationError("no-peer-certificate", "peer presented no certificate")
    return [x509.load_der_x509_certificate(der)]


def verify_peer(ssl_object: Any, bundles: TrustBundleSet, now: dt.datetime) -> SpiffeId:
    """Check ALPN and the peer's X509-SVID; return the verified peer SPIFFE ID."""
    check_alpn(ssl_object)
    try:
        chain = peer_chain(ssl_object)
    except PeerVerificationError:
        raise
    except Exception as exc:
        raise PeerVerificationError("peer-chain", f"cannot read the peer certificate chain: {exc!r}") from exc
    roots = {r for b in bundles for r in b.roots}
    # verify_svid wants leaf + intermediates; the verified chain ends with the trust anchor.
    trimmed = [c for i, c in enumerate(chain) if i == 0 or c not in roots]
    try:
        return verify_svid(trimmed, bundles, now)
    except SvidError as exc:
        raise PeerVerificationError(f"svid-{exc.rule}", f"peer X509-SVID rejected: {exc}") from exc
    except Exception as exc:  # fail closed on anything unexpected in the certificate
        raise PeerVerificationError(
            "svid-invalid", f"peer certificate could not be verified: {exc!r}"
        ) from exc


def check_expected_identity(peer: SpiffeId, expected: Collection[SpiffeId], where: str) -> None:
    if peer not in expected:
        raise IdentityMismatchError(peer, expected, where)
