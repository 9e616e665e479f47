"""The node agent's side of `IstioCertificateService/CreateCertificate`.

The agent authenticates with its node credential (``ztagent ca bootstrap-node`` output: key.pem,
cert-chain.pem, root-cert.pem) over TLS, checks the CA server by its DNS name
(:data:`credentials.identities.CA_SERVER_NAME`) against the node credential's trust bundle, and
asks for a workload certificate the way ztunnel does: a fresh P-256 key per request, a CSR with
the workload's SPIFFE ID, the same ID in the ``ImpersonatedIdentity`` metadata.

Nothing from the answer is trusted until checked: the leaf must be for our key and our SPIFFE
ID and must verify, with the intermediates sent, against the trust bundle we already hold.

Every failure is a :class:`CaClientError` whose ``kind`` says what class of problem it is
(``unreachable``, ``unauthenticated``, ``denied``, ``rejected``, ``malformed-answer``,
``ca-error``) and whose message names the CA address and the identity.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from credentials.files import CredentialFileError, CredentialFiles, read_credentials, write_credentials
from credentials.grpc_unary import GrpcError, Status, UnaryChannel
from credentials.identities import CA_SERVER_NAME, IMPERSONATED_IDENTITY
from credentials.proto import ca_pb2
from identity.bundle import BundleError, TrustBundle, TrustBundleSet
from identity.ca import is_self_signed
from identity.keys import build_csr, generate_key
from identity.spiffe import SpiffeId
from identity.svid import SvidError, WorkloadCredential, load_pem_chain, verify_svid
from tunnel.tls import ALPN_H2, load_credential

log = logging.getLogger("ztagent.ca.client")

Clock = Callable[[], dt.datetime]
MAX_ANSWER_CERTS = 16
# In-flight calls on a channel replaced by a node-credential renewal get this long to finish.
CHANNEL_DRAIN_SECONDS = 10.0
# The method's path on the wire (istio/api security/v1alpha1/ca.proto: package istio.v1.auth).
CREATE_CERTIFICATE = "/istio.v1.auth.IstioCertificateService/CreateCertificate"


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CaClientError(Exception):
    def __init__(self, kind: str, message: str, identity: SpiffeId | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.identity = identity


@dataclass(frozen=True)
class NodeCredentials:
    """The node's own credential for talking to the CA, checked on load."""

    credential: WorkloadCredential
    bundles: TrustBundleSet
    files: CredentialFiles
    directory: Path | None = None  # where it was read from (renewals are written back there)

    @classmethod
    def from_files(cls, files: CredentialFiles, *, now: dt.datetime | None = None) -> NodeCredentials:
        try:
            cred = WorkloadCredential.from_pem(files.chain_pem, files.key_pem)
            bundle = TrustBundle.from_pem(cred.spiffe_id.trust_domain, files.roots_pem)
        except (SvidError, BundleError) as exc:
            raise CaClientError("bad-credentials", f"node credential unusable: {exc}") from None
        bundles = TrustBundleSet.of(bundle)
        if now is not None:
            try:
                verify_svid(cred.chain, bundles, now)
            except SvidError as exc:
                raise CaClientError(
                    "bad-credentials", f"node credential {cred.spiffe_id} is not valid: {exc}"
                ) from None
        return cls(cred, bundles, files)

    @classmethod
    def from_dir(
        cls, directory: str | os.PathLike[str], *, now: dt.datetime | None = None
    ) -> NodeCredentials:
        try:
            files = read_credentials(directory)
        except CredentialFileError as exc:
            raise CaClientError("bad-credentials", str(exc)) from None
        return dataclasses.replace(cls.from_files(files, now=now), directory=Path(directory))

    def with_credential(self, cred: WorkloadCredential) -> NodeCredentials:
        """The same node with a renewed certificate and key."""
        if cred.spiffe_id != self.spiffe_id:
            raise ValueError(f"{cred.spiffe_id} is not this node's identity {self.spiffe_id}")
        files = CredentialFiles(cred.key_pem(), cred.chain_pem(), self.files.roots_pem)
        return NodeCredentials(cred, self.bundles, files, self.directory)

    @property
    def spiffe_id(self) -> SpiffeId:
        return self.credential.spiffe_id


def _kind_for(code: Status) -> str:
    return {
        Status.UNAVAILABLE: "unreachable",
        Status.DEADLINE_EXCEEDED: "unreachable",
        Status.UNAUTHENTICATED: "unauthenticated",
        Status.PERMISSION_DENIED: "denied",
        Status.INVALID_ARGUMENT: "rejected",
        Status.RESOURCE_EXHAUSTED: "rejected",
        Status.FAILED_PRECONDITION: "rejected",
    }.get(code, "ca-error")


def ca_client_context(node: NodeCredentials) -> ssl.SSLContext:
    """TLS 1.3 with the node's credential, trusting the node's bundle for the CA's certificate,
    which must carry :data:`CA_SERVER_NAME` (checked as a DNS name, like any gRPC client)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=node.bundles.all_roots_pem().decode("ascii"))
    ctx.set_alpn_protocols([ALPN_H2])
    load_credential(ctx, node.credential)
    return ctx


class CaClient:
    """An async client for one CA address (``unix:/path`` or ``host:port``)."""

    def __init__(
        self,
        address: str,
        node: NodeCredentials,
        *,
        timeout: float = 10.0,
        clock: Clock = utc_now,
        impersonate: bool = True,
        server_name: str = CA_SERVER_NAME,
    ) -> None:
        host, _, port = address.rpartition(":")
        tcp = bool(host) and port.isdigit() and "/" not in host and not address.startswith("unix:")
        if not (address.startswith("unix:/") or tcp):
            raise ValueError(f"CA address {address!r}: expected unix:/absolute/path or host:port")
        self.address = address
        self.node = node
        self.timeout = timeout
        self._clock = clock
        self._impersonate = impersonate
        self._server_name = server_name
        self._channel: UnaryChannel | None = None
        self._draining: dict[asyncio.Task[None], UnaryChannel] = {}

    def bundles(self) -> TrustBundleSet:
        return self.node.bundles

    def _get_channel(self) -> UnaryChannel:
        if self._channel is None:
            self._channel = UnaryChannel(self.address, ca_client_context(self.node), self._server_name)
        return self._channel

    def set_node_credential(self, cred: WorkloadCredential, *, persist: bool = True) -> None:
        """Use a renewed node credential from the next connection on.

        The node identity is renewed like any other (the CA lets a node renew its own), so the
        composition root subscribes :meth:`on_rotate` to the certificate manager and manages
        the node identity beside the workloads. The current channel drains in the background;
        new calls handshake with the new certificate. With ``persist`` the renewal is written
        back to the credential directory so a restarted agent does not hold an expired one.
        """
        self.node = self.node.with_credential(cred)
        if persist and self.node.directory is not None:
            try:
                write_credentials(self.node.directory, self.node.files)
            except CredentialFileError as exc:
                log.error(
                    f"renewed node credential not saved: {exc}",
                    extra={"event": "node_credential_save_failed", "identity": str(cred.spiffe_id)},
                )
        old, self._channel = self._channel, None
        if old is not None:
            task = asyncio.get_running_loop().create_task(old.close(grace=CHANNEL_DRAIN_SECONDS))
            self._draining[task] = old
            task.add_done_callback(lambda t: self._draining.pop(t, None))
        log.info(
            f"node credential renewed, valid until {cred.not_after.isoformat()}",
            extra={"event": "node_credential_renewed", "identity": str(cred.spiffe_id)},
        )

    def on_rotate(self, spiffe_id: SpiffeId, cred: WorkloadCredential | None) -> None:
        """A CertificateManager subscriber: picks up renewals of this node's own identity."""
        if cred is not None and spiffe_id == self.node.spiffe_id:
            self.set_node_credential(cred)

    async def close(self) -> None:
        ch, self._channel = self._channel, None
        if ch is not None:
            await ch.close(cancel_dial=True)
        # Channels still draining after a renewal: close them now (cancels their calls).
        for task, old in list(self._draining.items()):
            task.cancel()
            await old.close(cancel_dial=True)
        self._draining.clear()

    async def _drop_channel(self) -> None:
        """Forget the channel after an unreachable CA, so the next call dials afresh. Calls
        sharing its connection or its dial fail as unreachable; nothing is cancelled."""
        ch, self._channel = self._channel, None
        if ch is not None:
            await ch.close()

    async def __aenter__(self) -> CaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def fetch(self, spiffe_id: SpiffeId, ttl: dt.timedelta | None = None) -> WorkloadCredential:
        """Obtain a fresh credential for ``spiffe_id`` (what the certificate manager calls)."""
        return await self.create_certificate(spiffe_id, ttl)

    async def create_certificate(
        self, spiffe_id: SpiffeId, ttl: dt.timedelta | None = None
    ) -> WorkloadCredential:
        key = generate_key()
        request = ca_pb2.IstioCertificateRequest(
            csr=build_csr(key, spiffe_id).decode("ascii"),
            validity_duration=int(ttl.total_seconds()) if ttl is not None else 0,
        )
        if self._impersonate:
            value = struct_pb2.Value(string_value=str(spiffe_id))
            request.metadata.CopyFrom(struct_pb2.Struct(fields={IMPERSONATED_IDENTITY: value}))
        try:
            raw = await self._get_channel().call(
                CREATE_CERTIFICATE, request.SerializeToString(), timeout=self.timeout
            )
        except GrpcError as exc:
            kind = _kind_for(exc.code)
            details = exc.details
            if kind == "unreachable":
                # Drop the channel: the next attempt dials afresh (the certificate manager owns
                # the retry schedule).
                await self._drop_channel()
                hint = (
                    "is the CA running there, and does it accept this node's credential "
                    f"({self.node.spiffe_id})? TLS handshake failures also show up this way"
                )
                msg = f"CA at {self.address} unreachable for {spiffe_id}: {exc.code.name}: {details} ({hint})"
            else:
                msg = f"CA at {self.address} refused {spiffe_id}: {exc.code.name}: {details}"
            raise CaClientError(kind, msg, spiffe_id) from None
        try:
            answer = ca_pb2.IstioCertificateResponse.FromString(raw)
        except DecodeError as exc:
            raise CaClientError(
                "malformed-answer",
                f"CA at {self.address} answered badly for {spiffe_id}: undecodable answer: {exc}",
                spiffe_id,
            ) from None
        return self._check_answer(answer, key, spiffe_id)

    def _check_answer(self, answer: Any, key: Any, spiffe_id: SpiffeId) -> WorkloadCredential:
        def bad(why: str) -> CaClientError:
            return CaClientError(
                "malformed-answer", f"CA at {self.address} answered badly for {spiffe_id}: {why}", spiffe_id
            )

        entries = list(answer.cert_chain)
        if not entries:
            raise bad("empty cert_chain")
        certs: list[x509.Certificate] = []
        for i, entry in enumerate(entries):
            try:
                certs.extend(load_pem_chain(entry.encode("ascii")))
            except (SvidError, UnicodeEncodeError) as exc:
                raise bad(f"cert_chain[{i}] is not PEM certificates: {exc}") from None
            if len(certs) > MAX_ANSWER_CERTS:
                raise bad(f"more than {MAX_ANSWER_CERTS} certificates")
        # istiod's shape: leaf, intermediates, then the root(s); drop the self-signed tail.
        chain = [c for c in certs if not is_self_signed(c)]
        if not chain or chain[0] is not certs[0]:
            raise bad("the first certificate is not a leaf")
        try:
            cred = WorkloadCredential.from_chain(key, chain)
        except SvidError as exc:
            raise bad(f"{exc}") from None
        if cred.spiffe_id != spiffe_id:
            raise bad(f"certificate is for {cred.spiffe_id}")
        try:
            verify_svid(cred.chain, self.node.bundles, self._clock())
        except SvidError as exc:
            raise bad(f"issued certificate does not verify against our trust bundle: {exc}") from None
        return cred
