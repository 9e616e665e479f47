"""The node agent's side of `IstioCertificateService/CreateCertificate`.

The agent authenticates with its node credential (``ztagent ca bootstrap-node`` output: key.pem,
cert-chain.pem, root-cert.pem) over TLS, checks the CA server by its DNS name
(:data:`credentials.identities.CA_SERVER_NAME`) against the node credential's trust bundle, and
asks for a workload certificate the way ztunnel does: a fresh P-256 key per request, a CSR with
the workload's SPIFFE ID, the same ID in the ``ImpersonatedIdentity`` metadata.

Nothing from the answer is trusted until checked: the leaf must be for our key and our SPIFFE
ID and must verify, with the intermediates sent, against the trust bundle we already hold.

Node credentials (credentials.node): the bootstrap credential is read from ``--node-credentials``
and never written; renewals of the node identity (through the certificate manager) are kept in
memory and persisted beside it (``node-renewed.pem``). Every new connection presents the newest
credential valid at that instant, so once a renewed credential has expired during a CA outage
the next dial uses the bootstrap one and the node heals when the CA is back.

Every failure is a :class:`CaClientError` whose ``kind`` says what class of problem it is
(``unreachable``, ``unauthenticated``, ``denied``, ``rejected``, ``malformed-answer``,
``ca-error``), whose ``reason`` is the cause an operator acts on (credentials.causes: node
credential expired, CA unreachable, refused by the CA, ...) and whose message starts with that
cause and names the CA address and the identity.
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

import jwt
from cryptography import x509
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from credentials import causes
from credentials.files import (
    CredentialFileError,
    CredentialFiles,
    read_credentials,
    read_renewed,
    write_renewed,
)
from credentials.grpc_unary import CLOSED_BEFORE_HTTP2, GrpcError, Status, UnaryChannel
from credentials.identities import CA_SERVER_NAME, IMPERSONATED_IDENTITY, node_of
from credentials.node import (
    BOOTSTRAP,
    RENEWED,
    Choice,
    NoValidNodeCredential,
    describe_window,
    is_valid_at,
    newest,
    select_node_credential,
    validity_window,
)
from credentials.proto import ca_pb2
from identity.bundle import BundleError, TrustBundle, TrustBundleSet
from identity.ca import is_self_signed, signing_trust_domain
from identity.keys import build_csr, generate_key
from identity.spiffe import SpiffeId, TrustDomain
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
    def __init__(
        self, kind: str, message: str, identity: SpiffeId | None = None, *, reason: str = causes.OTHER
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.identity = identity
        self.reason = reason  # a credentials.causes reason (the metric label)


def _chain_checks(cred: WorkloadCredential, bundles: TrustBundleSet, now: dt.datetime) -> None:
    """The X509-SVID checks for a node credential, at an instant inside its validity window, so
    an expired one is still known to be ours (selection then decides by time alone)."""
    start, end = validity_window(cred)
    verify_svid(cred.chain, bundles, min(max(now, start), end))


@dataclass(frozen=True)
class NodeCredentials:
    """The node's credentials for talking to the CA: the bootstrap one and, once the node has
    renewed its identity, the renewed one (credentials.node says which is presented when)."""

    bootstrap: WorkloadCredential
    bundles: TrustBundleSet
    files: CredentialFiles  # the bootstrap credential's files (never rewritten by the agent)
    directory: Path | None = None  # where they were read from (renewals are persisted beside)
    renewed: WorkloadCredential | None = None

    @classmethod
    def from_files(cls, files: CredentialFiles, *, now: dt.datetime | None = None) -> NodeCredentials:
        try:
            cred = WorkloadCredential.from_pem(files.chain_pem, files.key_pem)
            bundle = TrustBundle.from_pem(cred.spiffe_id.trust_domain, files.roots_pem)
        except (SvidError, BundleError) as exc:
            raise CaClientError("bad-credentials", f"node credential unusable: {exc}") from None
        node = cls(cred, TrustBundleSet.of(bundle), files)
        if now is not None:
            node._check_usable(now)
        return node

    @classmethod
    def from_dir(
        cls, directory: str | os.PathLike[str], *, now: dt.datetime | None = None
    ) -> NodeCredentials:
        """The bootstrap credential of ``directory`` plus the renewed one persisted beside it
        (ignored, with a warning, if it is unreadable or not this node's). With ``now``, raise
        unless one of them is valid then (the message names both and why)."""
        try:
            files = read_credentials(directory)
        except CredentialFileError as exc:
            raise CaClientError("bad-credentials", str(exc)) from None
        node = dataclasses.replace(cls.from_files(files), directory=Path(directory))
        renewed = node._load_renewed(now or utc_now())
        if renewed is not None:
            node = dataclasses.replace(node, renewed=renewed)
        if now is not None:
            node._check_usable(now)
        return node

    def _load_renewed(self, now: dt.datetime) -> WorkloadCredential | None:
        assert self.directory is not None
        try:
            pems = read_renewed(self.directory)
            if pems is None:
                return None
            cred = WorkloadCredential.from_pem(pems[1], pems[0])
            if cred.spiffe_id != self.bootstrap.spiffe_id:
                raise SvidError("id-mismatch", f"it is for {cred.spiffe_id}, not {self.bootstrap.spiffe_id}")
            _chain_checks(cred, self.bundles, now)
        except (CredentialFileError, SvidError) as exc:
            log.warning(
                f"renewed node credential in {self.directory} ignored: {exc}",
                extra={"event": "node_credential_renewed_ignored", "identity": str(self.bootstrap.spiffe_id)},
            )
            return None
        return cred

    def _check_usable(self, now: dt.datetime) -> None:
        try:
            _chain_checks(self.bootstrap, self.bundles, now)
            self.select(now)
        except SvidError as exc:
            raise CaClientError(
                "bad-credentials", f"node credential {self.spiffe_id} is not valid: {exc}"
            ) from None
        except NoValidNodeCredential as exc:
            raise CaClientError(
                "bad-credentials", f"node credential {self.spiffe_id} is not valid: {exc}", reason=exc.reason
            ) from None

    def select(self, now: dt.datetime) -> Choice:
        """The credential to present at ``now``, or NoValidNodeCredential."""
        return select_node_credential(self.bootstrap, self.renewed, now)

    def with_credential(self, cred: WorkloadCredential) -> NodeCredentials:
        """The same node with a renewed certificate and key (the bootstrap one is kept)."""
        if cred.spiffe_id != self.spiffe_id:
            raise ValueError(f"{cred.spiffe_id} is not this node's identity {self.spiffe_id}")
        return dataclasses.replace(self, renewed=cred)

    @property
    def credential(self) -> WorkloadCredential:
        """The most recently issued node credential (valid or not; see :meth:`select`)."""
        return newest(self.bootstrap, self.renewed).credential

    @property
    def spiffe_id(self) -> SpiffeId:
        return self.bootstrap.spiffe_id

    @property
    def node_name(self) -> str:
        return node_of(self.spiffe_id, self.spiffe_id.trust_domain) or "<node>"


@dataclass(frozen=True)
class NodeCredentialStatus:
    """What the CA client presents and what it holds, at one instant (for status and tests)."""

    in_use: str | None  # BOOTSTRAP | RENEWED, or None when neither is valid
    bootstrap_not_after: dt.datetime
    renewed_not_after: dt.datetime | None
    problem: str  # "" when the newest credential is valid, else what is wrong and what to do
    reason: str  # a credentials.causes reason for ``problem``, "" when there is none


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


def _check_address(address: str) -> None:
    host, _, port = address.rpartition(":")
    numeric_port = port.isascii() and port.isdigit()
    tcp = bool(host) and numeric_port and "/" not in host and not address.startswith("unix:")
    if not (address.startswith("unix:/") or tcp):
        raise ValueError(f"CA address {address!r}: expected unix:/absolute/path or host:port")


def ca_client_context(node: NodeCredentials, credential: WorkloadCredential | None = None) -> ssl.SSLContext:
    """TLS 1.3 with a node credential (default: the newest), trusting the node's bundle for the
    CA's certificate, which must carry :data:`CA_SERVER_NAME` (checked as a DNS name, like any
    gRPC client)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=node.bundles.all_roots_pem().decode("ascii"))
    ctx.set_alpn_protocols([ALPN_H2])
    load_credential(ctx, credential if credential is not None else node.credential)
    return ctx


class _NodeCredentialCollector(Collector):
    """Scrape-time gauges of the node credentials (computed from the client's clock)."""

    def __init__(self, client: CaClient) -> None:
        self._client = client

    def collect(self) -> Any:
        node = self._client.node
        now = self._client._clock()
        expiry = GaugeMetricFamily(
            "ztagent_node_credential_expiry_timestamp_seconds",
            "NotAfter of the node's credentials for the CA (bootstrap: never rewritten; renewed)",
            labels=["credential"],
        )
        valid = GaugeMetricFamily(
            "ztagent_node_credential_valid",
            "1 if the node credential is valid now, else 0 (expired or not yet valid)",
            labels=["credential"],
        )
        in_use = GaugeMetricFamily(
            "ztagent_node_credential_in_use",
            "1 for the node credential the CA client presents on new connections",
            labels=["credential"],
        )
        try:
            chosen: str | None = node.select(now).which
        except NoValidNodeCredential:
            chosen = None
        for which, cred in ((BOOTSTRAP, node.bootstrap), (RENEWED, node.renewed)):
            if cred is None:
                continue
            expiry.add_metric([which], validity_window(cred)[1].timestamp())
            valid.add_metric([which], 1.0 if is_valid_at(cred, now) else 0.0)
            in_use.add_metric([which], 1.0 if chosen == which else 0.0)
        return [expiry, valid, in_use]


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
        self.node = node
        self._init_channel_state(address, timeout, clock, impersonate, server_name, in_use=None)

    def _init_channel_state(
        self, address: str, timeout: float, clock: Clock, impersonate: bool, server_name: str, *,
        in_use: str | None,
    ) -> None:  # fmt: skip
        """What every CA client holds, whatever it authenticates with."""
        _check_address(address)
        self.address = address
        self.timeout = timeout
        self._clock = clock
        self._impersonate = impersonate
        self._server_name = server_name
        self._channel: UnaryChannel | None = None
        self._channel_cred: WorkloadCredential | None = None  # what the channel's TLS presents
        self._in_use: str | None = in_use  # which credential was last chosen (for transition logs)
        self._draining: dict[asyncio.Task[None], UnaryChannel] = {}

    def bundles(self) -> TrustBundleSet:
        return self.node.bundles

    @property
    def node_identity(self) -> SpiffeId | None:
        """The node's own identity, renewed beside the workloads' (None in token mode)."""
        return self.node.spiffe_id

    def _call_metadata(self) -> list[tuple[str, str]]:
        """Request metadata of a CreateCertificate call (none: the TLS client certificate is
        the node's credential)."""
        return []

    def _choose(self) -> tuple[WorkloadCredential, NoValidNodeCredential | None]:
        """The credential for the next connection, and why it will fail if none is valid.

        With none valid we still present the newest: the CA has the last word (its clock may
        lag ours), and the failure is then reported as the expired credential it is."""
        now = self._clock()
        try:
            choice = self.node.select(now)
        except NoValidNodeCredential as exc:
            if self._in_use is not None:
                log.error(
                    f"no valid node credential: {exc}",
                    extra={"event": "node_credential_expired", "identity": str(self.node.spiffe_id)},
                )
            self._in_use = None
            return self.node.credential, exc
        if choice.which != self._in_use:
            renewed = self.node.renewed
            if choice.which == BOOTSTRAP and renewed is not None and not is_valid_at(renewed, now):
                log.warning(
                    "renewed node credential not usable "
                    f"({describe_window(RENEWED, renewed, now)}); "
                    "authenticating to the CA with the bootstrap credential "
                    f"(valid until {validity_window(choice.credential)[1].isoformat()})",
                    extra={"event": "node_credential_fallback", "identity": str(self.node.spiffe_id)},
                )
            elif self._in_use is not None or choice.which == RENEWED:
                log.info(
                    f"authenticating to the CA with the {choice.which} node credential "
                    f"(valid until {validity_window(choice.credential)[1].isoformat()})",
                    extra={"event": "node_credential_in_use", "identity": str(self.node.spiffe_id)},
                )
            self._in_use = choice.which
        return choice.credential, None

    def _get_channel(self) -> tuple[UnaryChannel, NoValidNodeCredential | None]:
        cred, problem = self._choose()
        if self._channel is not None and self._channel_cred is not cred:
            self._retire_channel()  # the credential to present changed: new handshakes use it
        if self._channel is None:
            ctx = ca_client_context(self.node, cred)
            self._channel = UnaryChannel(self.address, ctx, self._server_name)
            self._channel_cred = cred
        return self._channel, problem

    def _retire_channel(self) -> None:
        """Let the current channel's calls finish in the background; the next call dials anew."""
        old, self._channel = self._channel, None
        if old is not None:
            task = asyncio.get_running_loop().create_task(old.close(grace=CHANNEL_DRAIN_SECONDS))
            self._draining[task] = old
            task.add_done_callback(lambda t: self._draining.pop(t, None))

    def node_credential_status(self) -> NodeCredentialStatus:
        """Which node credential is presented now, and what is wrong with them, if anything."""
        node, now = self.node, self._clock()
        renewed_end = validity_window(node.renewed)[1] if node.renewed is not None else None
        bootstrap_end = validity_window(node.bootstrap)[1]
        try:
            choice = node.select(now)
        except NoValidNodeCredential as exc:
            problem = f"{causes.describe(exc.reason)}: {exc}"
            return NodeCredentialStatus(None, bootstrap_end, renewed_end, problem, exc.reason)
        problem = reason = ""
        if choice.which == BOOTSTRAP and node.renewed is not None and not is_valid_at(node.renewed, now):
            # Working, but on the fallback: the renewals failed for longer than the workload TTL.
            assert renewed_end is not None
            expired = now > renewed_end
            reason = causes.NODE_CREDENTIAL_EXPIRED if expired else causes.NODE_CREDENTIAL_NOT_YET_VALID
            state = describe_window(RENEWED, node.renewed, now).removeprefix("renewed credential ")
            problem = (
                f"{causes.describe(reason)}: renewable node credential {node.spiffe_id} {state}; "
                "authenticating to the CA with the bootstrap credential, valid until "
                f"{bootstrap_end.isoformat()}"
            )
        return NodeCredentialStatus(choice.which, bootstrap_end, renewed_end, problem, reason)

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Export ztagent_node_credential_{expiry_timestamp_seconds,valid,in_use}{credential}."""
        registry.register(_NodeCredentialCollector(self))

    def set_node_credential(self, cred: WorkloadCredential, *, persist: bool = True) -> None:
        """Use a renewed node credential from the next connection on.

        The node identity is renewed like any other (the CA lets a node renew its own), so the
        composition root subscribes :meth:`on_rotate` to the certificate manager and manages
        the node identity beside the workloads. The current channel drains in the background;
        new calls handshake with the new certificate. With ``persist`` the renewal is written
        beside the bootstrap credential (``node-renewed.pem``, one atomic rename; the bootstrap
        files are never touched), so a restarted agent starts with it while it is valid and
        falls back to the bootstrap credential once it is not.
        """
        self.node = self.node.with_credential(cred)
        if persist and self.node.directory is not None:
            try:
                write_renewed(self.node.directory, cred.key_pem(), cred.chain_pem())
            except CredentialFileError as exc:
                log.error(
                    f"renewed node credential not saved: {exc}",
                    extra={"event": "node_credential_save_failed", "identity": str(cred.spiffe_id)},
                )
        self._retire_channel()
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
        metadata = self._call_metadata()
        channel, problem = self._get_channel()
        try:
            raw = await channel.call(
                CREATE_CERTIFICATE, request.SerializeToString(), timeout=self.timeout, metadata=metadata
            )
        except GrpcError as exc:
            kind = _kind_for(exc.code)
            if kind == "unreachable":
                # Drop the channel: the next attempt dials afresh (the certificate manager owns
                # the retry schedule).
                await self._drop_channel()
            raise self._error(exc, kind, spiffe_id, problem) from None
        try:
            answer = ca_pb2.IstioCertificateResponse.FromString(raw)
        except DecodeError as exc:
            raise CaClientError(
                "malformed-answer",
                f"bad answer from the CA at {self.address} for {spiffe_id}: undecodable answer: {exc}",
                spiffe_id,
                reason=causes.BAD_ANSWER,
            ) from None
        return self._check_answer(answer, key, spiffe_id)

    def _error(
        self, exc: GrpcError, kind: str, spiffe_id: SpiffeId, problem: NoValidNodeCredential | None
    ) -> CaClientError:
        """Name the real cause: our own expired credential first (the CA refuses it whatever
        else happens, and only an operator can fix it), then what the transport saw."""
        what = f"{exc.code.name}: {exc.details}"
        if problem is not None:
            msg = (
                f"{causes.describe(problem.reason)}: cannot get {spiffe_id} from the CA at "
                f"{self.address}: {problem} ({what})"
            )
            return CaClientError(kind, msg, spiffe_id, reason=problem.reason)
        if kind != "unreachable":
            msg = (
                f"{causes.describe(causes.CA_REFUSED)}: the CA at {self.address} refused {spiffe_id}: {what}"
            )
            return CaClientError(kind, msg, spiffe_id, reason=causes.CA_REFUSED)
        if exc.transport == CLOSED_BEFORE_HTTP2:
            # By our clock the credential we presented is valid, so the CA refused it for another
            # reason: another CA's credential, a revoked root, or the CA's clock is off.
            cred = self._channel_cred or self.node.credential
            msg = (
                f"{causes.describe(causes.CA_REFUSED)}: the CA at {self.address} refused the TLS handshake "
                f"of node credential {self.node.spiffe_id} (serial {cred.leaf.serial_number:x}, valid until "
                f"{validity_window(cred)[1].isoformat()}) while fetching {spiffe_id}: {what}; does the CA "
                "trust the CA that issued it, and do the clocks agree?"
            )
            return CaClientError(kind, msg, spiffe_id, reason=causes.CA_REFUSED)
        msg = (
            f"{causes.describe(causes.CA_UNREACHABLE)}: no answer from the CA at {self.address} for "
            f"{spiffe_id}: {what}"
        )
        return CaClientError(kind, msg, spiffe_id, reason=causes.CA_UNREACHABLE)

    def _check_answer(self, answer: Any, key: Any, spiffe_id: SpiffeId) -> WorkloadCredential:
        def bad(why: str) -> CaClientError:
            return CaClientError(
                "malformed-answer",
                f"bad answer from the CA at {self.address} for {spiffe_id}: {why}",
                spiffe_id,
                reason=causes.BAD_ANSWER,
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
            verify_svid(cred.chain, self.bundles(), self._clock())
        except SvidError as exc:
            raise bad(f"issued certificate does not verify against our trust bundle: {exc}") from None
        return cred


# -- token mode (Kubernetes): no node credential, a projected service-account token ----------

TOKEN = "token"  # NodeCredentialStatus.in_use in token mode
BEARER = "Bearer "  # istio-agent's form: metadata ``authorization: Bearer <token>``


@dataclass(frozen=True)
class TokenCredentials:
    """How a node proves itself in Kubernetes: its pod's projected, audience-bound
    service-account token (re-read on every call: the kubelet rewrites it at 80 % of its life)
    and the trust bundle that verifies the CA's serving certificate (``--ca-root-cert``)."""

    token_path: Path
    bundles: TrustBundleSet
    trust_domain: TrustDomain

    @classmethod
    def from_files(
        cls,
        token_path: str | os.PathLike[str],
        root_cert: str | os.PathLike[str],
        *,
        trust_domain: str | None = None,
    ) -> TokenCredentials:
        """The trust domain comes from the root's SPIFFE URI SAN (``ztagent ca init`` writes
        one), else ``trust_domain``; the token must be readable now."""
        try:
            pem = Path(root_cert).read_bytes()
            roots = load_pem_chain(pem)
        except (OSError, SvidError) as exc:
            raise CaClientError("bad-credentials", f"--ca-root-cert {root_cert}: {exc}") from None
        td = signing_trust_domain(roots[0]) or (TrustDomain(trust_domain) if trust_domain else None)
        if td is None:
            raise CaClientError(
                "bad-credentials",
                f"--ca-root-cert {root_cert}: the root names no SPIFFE trust domain (URI SAN); "
                "give the trust domain explicitly",
            )
        try:
            bundle = TrustBundle.from_pem(td, pem)
        except BundleError as exc:
            raise CaClientError("bad-credentials", f"--ca-root-cert {root_cert}: {exc}") from None
        creds = cls(Path(token_path), TrustBundleSet.of(bundle), td)
        creds.read_token()
        return creds

    def read_token(self) -> str:
        try:
            token = self.token_path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CaClientError(
                "bad-credentials", f"service-account token {self.token_path} unreadable: {exc}"
            ) from None
        if not token or any(c.isspace() for c in token):
            raise CaClientError(
                "bad-credentials", f"service-account token {self.token_path} is empty or not one token"
            )
        return token

    def expiry(self) -> dt.datetime | None:
        """The token's ``exp`` as it claims it (unverified: the CA's TokenReview decides; this
        is for status and metrics only), None when unreadable."""
        try:
            claims = jwt.decode(self.read_token(), options={"verify_signature": False})
            return dt.datetime.fromtimestamp(int(claims["exp"]), dt.UTC)
        except (CaClientError, jwt.PyJWTError, KeyError, TypeError, ValueError):
            return None


class _TokenCollector(Collector):
    def __init__(self, client: TokenCaClient) -> None:
        self._client = client

    def collect(self) -> Any:
        expiry = GaugeMetricFamily(
            "ztagent_node_credential_expiry_timestamp_seconds",
            "NotAfter of the node's credentials for the CA (token: the service-account token's exp)",
            labels=["credential"],
        )
        valid = GaugeMetricFamily(
            "ztagent_node_credential_valid",
            "1 if the node credential is valid now, else 0 (expired or not yet valid)",
            labels=["credential"],
        )
        exp = self._client.token.expiry()
        if exp is not None:
            expiry.add_metric([TOKEN], exp.timestamp())
        valid.add_metric([TOKEN], 1.0 if exp is not None and exp > self._client._clock() else 0.0)
        return [expiry, valid]


class TokenCaClient(CaClient):
    """The CA client in Kubernetes mode: TLS verifying the CA by ``--ca-root-cert``, no client
    certificate, and the projected token in the ``authorization`` metadata of every call, as
    istio-agent sends it (``Bearer <token>``). There is no node identity to renew."""

    def __init__(
        self,
        address: str,
        token: TokenCredentials,
        *,
        timeout: float = 10.0,
        clock: Clock = utc_now,
        impersonate: bool = True,
        server_name: str = CA_SERVER_NAME,
    ) -> None:
        self.token = token
        self._init_channel_state(address, timeout, clock, impersonate, server_name, in_use=TOKEN)

    def bundles(self) -> TrustBundleSet:
        return self.token.bundles

    @property
    def node_identity(self) -> SpiffeId | None:
        return None

    def _call_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", BEARER + self.token.read_token())]

    def _get_channel(self) -> tuple[UnaryChannel, NoValidNodeCredential | None]:
        if self._channel is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.load_verify_locations(cadata=self.token.bundles.all_roots_pem().decode("ascii"))
            ctx.set_alpn_protocols([ALPN_H2])
            self._channel = UnaryChannel(self.address, ctx, self._server_name)
        return self._channel, None

    def node_credential_status(self) -> NodeCredentialStatus:
        exp = self.token.expiry()
        end = exp or dt.datetime.max.replace(tzinfo=dt.UTC)
        if exp is None:
            problem = (
                f"{causes.describe(causes.OTHER)}: service-account token {self.token.token_path} unreadable"
            )
            return NodeCredentialStatus(None, end, None, problem, causes.OTHER)
        if exp <= self._clock():
            reason = causes.NODE_CREDENTIAL_EXPIRED
            problem = (
                f"{causes.describe(reason)}: service-account token {self.token.token_path} expired at "
                f"{exp.isoformat()} (the kubelet rotates it: is the projected volume mounted?)"
            )
            return NodeCredentialStatus(None, end, None, problem, reason)
        return NodeCredentialStatus(TOKEN, end, None, "", "")

    def register_metrics(self, registry: CollectorRegistry) -> None:
        registry.register(_TokenCollector(self))

    def set_node_credential(self, cred: WorkloadCredential, *, persist: bool = True) -> None:
        raise ValueError("a token-authenticated CA client has no node credential to renew")

    def on_rotate(self, spiffe_id: SpiffeId, cred: WorkloadCredential | None) -> None:
        return None

    def _error(
        self, exc: GrpcError, kind: str, spiffe_id: SpiffeId, problem: NoValidNodeCredential | None
    ) -> CaClientError:
        what = f"{exc.code.name}: {exc.details}"
        if kind == "unreachable" and exc.transport != CLOSED_BEFORE_HTTP2:
            msg = (
                f"{causes.describe(causes.CA_UNREACHABLE)}: no answer from the CA at {self.address} "
                f"for {spiffe_id}: {what}"
            )
            return CaClientError(kind, msg, spiffe_id, reason=causes.CA_UNREACHABLE)
        msg = (
            f"{causes.describe(causes.CA_REFUSED)}: the CA at {self.address} refused {spiffe_id} "
            f"(service-account token {self.token.token_path}): {what}"
        )
        return CaClientError(kind, msg, spiffe_id, reason=causes.CA_REFUSED)
