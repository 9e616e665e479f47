"""`ztagent ca serve`: Istio's certificate service over mTLS, authorized by node placement.

Wire API: ``istio.v1.auth.IstioCertificateService/CreateCertificate`` (see proto/ca.proto for
the istio/api version followed), so ztunnel or an istio-agent configured with this CA's address
and root can use it, and our agent could use istiod.

Per request, in order (each failure is one gRPC status with a message naming what is wrong):

1. Transport: TLS 1.3 with a client certificate that chains to this CA's roots (gRPC checks the
   chain during the handshake; a client without one never gets a connection). Then the caller's
   certificate is checked again as an X509-SVID and must carry a node identity
   (credentials.identities) -> else ``UNAUTHENTICATED``.
2. Request shape: the body must decode as an ``IstioCertificateRequest`` (else
   ``INVALID_ARGUMENT`` and a one-line warning, not grpcio's ``UNKNOWN`` and traceback);
   ``validity_duration`` in [0, max TTL] (0 = default TTL); ``metadata``'s
   ``ImpersonatedIdentity`` (what ztunnel sends) must, if present, be a SPIFFE ID equal to the
   CSR's; the CSR must be PEM P-256 with exactly one SPIFFE URI SAN (identity.ca) ->
   ``INVALID_ARGUMENT``.
3. Authorization (caserver.authz): the identity must run on the calling node according to the
   current mesh config -> else ``PERMISSION_DENIED``.

Differences from istiod, on purpose: istiod answers a refused impersonation with an opaque
``UNAUTHENTICATED``; we answer ``PERMISSION_DENIED`` naming node and identity because the caller
is an authenticated node agent and the operator needs to know which placement is missing.

The answer has istiod's shape: ``cert_chain`` = leaf, intermediates, root(s), one PEM
certificate per entry each ending in a newline; ``root_cert`` carries the roots as well.

The CA holds no mutable issuance state (serials are random), so a refused request changes
nothing. The config file is re-read when it changes; a bad version is logged and the last good
one keeps serving.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Protocol

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter, Gauge

from caserver.authz import Decision, Placement, authorize
from caserver.store import SERVER_CERT_TTL, CaStore, issue_server_certificate
from caserver.tokenauth import TokenCaller, bearer_token
from credentials.identities import IMPERSONATED_IDENTITY, NODE_NAMESPACE, NODE_SERVICE_ACCOUNT, node_of
from credentials.proto import ca_pb2, ca_pb2_grpc
from identity.bundle import TrustBundleSet
from identity.ca import DEFAULT_WORKLOAD_TTL, CaError
from identity.spiffe import SpiffeId, SpiffeIdError
from identity.svid import SvidError, verify_svid
from mesh.config import ConfigError, MeshConfig
from mesh.diff import apply_changes
from mesh.model import Snapshot
from sources.base import ConfigRefused as SourceRefused
from sources.base import ConfigSource
from sources.file import FileConfigSource

log = logging.getLogger("ztagent.ca.server")

# A CSR is ~0.5 KiB; anything this big is not a certificate request. gRPC refuses it before
# any parsing (RESOURCE_EXHAUSTED).
MAX_REQUEST_BYTES = 64 * 1024

Clock = Callable[[], dt.datetime]
# Verified node certificates remembered (one or two per node: current and renewed).
AUTHN_CACHE_SIZE = 4096
SERVICE = "istio.v1.auth.IstioCertificateService"


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ConfigMismatch(Exception):
    pass


class TokenReviewer(Protocol):
    """Who a token belongs to (caserver.tokenauth.KubernetesTokenReviewer: a TokenReview)."""

    async def review(self, token: str) -> TokenCaller: ...


class CaServer(ca_pb2_grpc.IstioCertificateServiceServicer):
    """The certificate service. ``placement`` may be swapped at any time (config reload)."""

    def __init__(
        self,
        store: CaStore,
        config: MeshConfig,
        *,
        default_ttl: dt.timedelta = DEFAULT_WORKLOAD_TTL,
        clock: Clock = utc_now,
        registry: CollectorRegistry | None = None,
        server_cert_ttl: dt.timedelta = SERVER_CERT_TTL,
        node_auth: str = "certificate",
        token_reviewer: TokenReviewer | None = None,
    ) -> None:
        if node_auth not in ("certificate", "token"):
            raise ValueError(f"node_auth {node_auth!r}: expected certificate or token")
        if node_auth == "token" and token_reviewer is None:
            raise ValueError("node_auth token needs a token reviewer (TokenReview)")
        self.node_auth = node_auth
        self._reviewer = token_reviewer
        self.store = store
        self.server_cert_ttl = server_cert_ttl
        self._clock = clock
        self.default_ttl = default_ttl
        if default_ttl > store.ca.max_ttl:
            raise ValueError(f"default TTL {default_ttl} exceeds the maximum TTL {store.ca.max_ttl}")
        self.placement = self._placement_for(config)
        self._bundles = TrustBundleSet.of(store.bundle)
        # Client certificate PEM -> (caller ID, NotBefore, NotAfter) of a verified caller.
        self._authn_cache: dict[bytes, tuple[SpiffeId, dt.datetime, dt.datetime]] = {}
        self._server: grpc.aio.Server | None = None
        self._source: FileConfigSource | None = None  # set by watch_config
        self._server_cert: tuple[bytes, bytes, dt.datetime, dt.datetime] | None = None
        self._socket_path: Path | None = None
        self.requests = Counter(
            "ztagent_ca_requests",
            "CreateCertificate requests by outcome (gRPC status code name)",
            ["code"],
            registry=registry,
        )
        # The operator's "when must I rotate the root" alert (cf. istiod's root cert expiry gauge).
        self.root_expiry = Gauge(
            "ztagent_ca_root_cert_expiry_timestamp_seconds",
            "NotAfter of the earliest-expiring root in the published bundle (Unix seconds)",
            registry=registry,
        )
        self.root_expiry.set(min(r.not_valid_after_utc for r in store.ca.roots).timestamp())

    # -- configuration ------------------------------------------------------------------------

    def _placement_for(self, config: MeshConfig) -> Placement:
        if config.trust_domain != self.store.trust_domain:
            raise ConfigMismatch(
                f"config {config.source} is for trust domain {config.trust_domain}, but this CA signs "
                f"for {self.store.trust_domain}"
            )
        return Placement.from_config(config)

    def update_config(self, config: MeshConfig) -> None:
        """Switch to a new config; raises ConfigMismatch (and keeps the old one) if unusable."""
        self.placement = self._placement_for(config)

    async def watch_config(self, source: FileConfigSource) -> None:
        """Follow ``source`` (polling); denials also re-read it at once (:meth:`_reload_now`)."""
        self._source = source

        def on_update(cfg: MeshConfig) -> None:
            self._apply_config(cfg)

        await source.run(on_update, self._config_refused)

    def _apply_config(self, cfg: MeshConfig, *, quiet: bool = False) -> bool:
        try:
            self.update_config(cfg)
        except ConfigMismatch as exc:
            log.error(
                f"config refused, keeping the last good one: {exc}",
                extra={"event": "ca_config_refused", "file": cfg.source},
            )
            return False
        if quiet:  # a watch: the source logs each change set itself
            return True
        log.info(
            f"config reloaded ({cfg.source}, sha256 {cfg.digest[:12]})",
            extra={"event": "ca_config_reloaded", "file": cfg.source, "digest": cfg.digest},
        )
        return True

    async def follow(self, source: ConfigSource, initial: Snapshot) -> None:
        """Follow a change-set source (the Kubernetes watch) from ``initial`` until cancelled:
        each ChangeSet gives a new placement; a refused or unusable one keeps the last good."""
        current = initial
        async for ev in source.changes():
            if isinstance(ev, SourceRefused):
                self._config_refused(ev.error)
                continue
            try:
                nxt = apply_changes(current, ev.changes, source=ev.source, digest=ev.digest)
            except (TypeError, ValueError) as exc:
                log.error(f"change set refused, keeping the last good placement: {exc}")
                continue
            if self._apply_config(nxt, quiet=True):
                current = nxt

    def _config_refused(self, exc: ConfigError) -> None:
        log.error(f"config refused, keeping the last good one: {exc}", extra={"event": "ca_config_refused"})

    def _reload_now(self) -> bool:
        """Poll the watched config file once, now; True if a new placement was applied.

        The CA and the agents follow the same file, each on its own poll: an agent that sees a new
        workload first asks for its certificate before our next poll. Re-reading the file before
        denying turns that race into one stat (plus a read when it changed) instead of a refusal
        and a backoff at the agent."""
        if self._source is None:
            return False
        result = self._source.poll_once()
        if isinstance(result, ConfigError):
            self._config_refused(result)
            return False
        return result is not None and self._apply_config(result)

    # -- TLS ----------------------------------------------------------------------------------

    def _certificate_configuration(self, initial: bool = False) -> Any:
        """Called by gRPC on every handshake: rotate the serving certificate at half-life.

        Uses the real clock even when signing uses an injected one: peers' TLS stacks check
        this certificate against real time.
        """
        now = utc_now()
        cur = self._server_cert
        if not initial and cur is not None and now < cur[3]:
            return None  # unchanged
        key_pem, chain_pem, not_after = issue_server_certificate(
            self.store, now=now, ttl=self.server_cert_ttl
        )
        renew_at = now + (not_after - now) / 2
        self._server_cert = (key_pem, chain_pem, not_after, renew_at)
        return grpc.ssl_server_certificate_configuration(
            [(key_pem, chain_pem)], root_certificates=self.store.bundle.to_pem()
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        initial = self._certificate_configuration(initial=True)
        # Token mode: no client certificate (the token in the call's metadata is the node's
        # credential); the TLS 1.3 check below still applies.
        return grpc.dynamic_ssl_server_credentials(
            initial,
            self._certificate_configuration,
            require_client_authentication=self.node_auth == "certificate",
        )

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, listen: str) -> str:
        """Listen on ``unix:/path`` or ``host:port`` (port 0 picks one); returns the address."""
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                ("grpc.so_reuseport", 0),
            ]
        )
        # Not the generated add_..._to_server: its request deserializer runs inside grpcio, which
        # answers an undecodable body with UNKNOWN and logs a traceback at error level. Taking the
        # raw bytes and decoding them ourselves makes that an INVALID_ARGUMENT like any bad request.
        handlers = {
            "CreateCertificate": grpc.unary_unary_rpc_method_handler(
                self._create_certificate_wire,
                request_deserializer=None,  # the raw message bytes
                response_serializer=ca_pb2.IstioCertificateResponse.SerializeToString,
            )
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        if listen.startswith("unix:"):
            path = Path(listen[len("unix:") :])
            if not path.is_absolute():
                raise ValueError(f"--listen {listen!r}: the unix socket path must be absolute")
            if path.exists() or path.is_symlink():
                if not stat.S_ISSOCK(path.lstat().st_mode):
                    raise ValueError(f"--listen {listen!r}: {path} exists and is not a socket")
                path.unlink()  # a stale socket from a previous run
            self._socket_path = path
            target = f"unix:{path}"
        else:
            host, sep, port = listen.rpartition(":")
            if not sep or not host or not (port.isascii() and port.isdigit()):
                raise ValueError(f"--listen {listen!r}: expected unix:/path or host:port")
            target = listen
        bound = server.add_secure_port(target, self.server_credentials())
        if not bound:
            raise OSError(f"cannot listen on {listen}")
        await server.start()
        self._server = server
        if self._socket_path is not None:
            os.chmod(self._socket_path, 0o660)
            return f"unix:{self._socket_path}"
        return f"{host}:{bound}"

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._socket_path.unlink()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # -- the RPC ------------------------------------------------------------------------------

    async def _fail(
        self, context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, msg: str
    ) -> NoReturn:
        self.requests.labels(code.name).inc()
        await context.abort(code, msg)  # raises: ends the RPC with this status
        raise AssertionError("context.abort returned")

    async def _authenticate(
        self, context: grpc.aio.ServicerContext[Any, Any], now: dt.datetime
    ) -> tuple[str | None, str]:
        """(node, "") for an authenticated node, or (None, reason)."""
        ac = context.auth_context()
        version = (ac.get("ssl_tls_version") or [b""])[0].decode("ascii", "replace")
        if version != "TLSv1.3":
            return None, f"TLS 1.3 is required, this connection uses {version or 'no TLS'}"
        if self.node_auth == "token":
            assert self._reviewer is not None
            token, why = bearer_token(context.invocation_metadata() or ())
            if token is None:
                return None, why
            reviewed = await self._reviewer.review(token)
            return reviewed.node, reviewed.reason
        certs = ac.get("x509_pem_cert") or []
        if not certs:
            return None, "no client certificate: present a node credential (ztagent ca bootstrap-node)"
        cached = self._authn_cache.get(certs[0])
        if cached is not None and cached[1] <= now <= cached[2]:
            # Same certificate as an earlier call (a node reuses its connection): the full
            # X509-SVID check already passed; only its validity window can have changed.
            caller = cached[0]
        else:
            try:
                leaf = x509.load_pem_x509_certificate(certs[0])
                caller = verify_svid([leaf, *self.store.ca.issuer_chain], self._bundles, now)
            except (ValueError, SvidError) as exc:
                return None, f"client certificate rejected: {exc}"
            if len(self._authn_cache) >= AUTHN_CACHE_SIZE:
                self._authn_cache.clear()  # crude but bounded; refilling costs one verify per node
            self._authn_cache[certs[0]] = (caller, leaf.not_valid_before_utc, leaf.not_valid_after_utc)
        node = node_of(caller, self.store.trust_domain)
        if node is None:
            td = self.store.trust_domain
            return None, (
                f"caller {caller} is not a node identity "
                f"(spiffe://{td}/ns/{NODE_NAMESPACE}/sa/{NODE_SERVICE_ACCOUNT}/node/<node>)"
            )
        return node, ""

    async def _create_certificate_wire(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ca_pb2.IstioCertificateResponse:
        try:
            request = ca_pb2.IstioCertificateRequest.FromString(raw)
        except DecodeError as exc:
            # Who sent it decides the answer: a stranger learns nothing beyond UNAUTHENTICATED.
            node, why = await self._authenticate(context, self._clock())
            if node is None:
                log.warning(
                    f"CSR refused, caller not authenticated: {why}",
                    extra={"event": "ca_unauthenticated", "peer": context.peer()},
                )
                await self._fail(context, grpc.StatusCode.UNAUTHENTICATED, why)
            log.warning(
                f"undecodable CreateCertificate request ({len(raw)} bytes) from node {node!r}: {exc}",
                extra={"event": "ca_bad_request", "node": node, "rule": "undecodable"},
            )
            await self._fail(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a protobuf IstioCertificateRequest: {exc}",
            )
        return await self.CreateCertificate(request, context)

    async def CreateCertificate(  # the gRPC method name is the wire name
        self,
        request: ca_pb2.IstioCertificateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ca_pb2.IstioCertificateResponse:
        now = self._clock()
        node, why = await self._authenticate(context, now)
        if node is None:
            log.warning(
                f"CSR refused, caller not authenticated: {why}",
                extra={"event": "ca_unauthenticated", "peer": context.peer()},
            )
            await self._fail(context, grpc.StatusCode.UNAUTHENTICATED, why)

        # Request shape before any signing work.
        if request.validity_duration < 0:
            await self._fail(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"validity_duration {request.validity_duration} is negative",
            )
        ttl = self.default_ttl
        # Compared as seconds first: an int64 near its maximum overflows timedelta (fuzz finding).
        if request.validity_duration > self.store.ca.max_ttl.total_seconds():
            ttl = self.store.ca.max_ttl + dt.timedelta(seconds=1)
        elif request.validity_duration:
            ttl = dt.timedelta(seconds=request.validity_duration)
        if ttl > self.store.ca.max_ttl:
            await self._fail(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"validity_duration {request.validity_duration}s exceeds this CA's maximum "
                f"{int(self.store.ca.max_ttl.total_seconds())}s",
            )
        impersonated: SpiffeId | None = None
        if request.HasField("metadata") and IMPERSONATED_IDENTITY in request.metadata.fields:
            value = request.metadata.fields[IMPERSONATED_IDENTITY]
            if value.WhichOneof("kind") != "string_value":
                await self._fail(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"metadata {IMPERSONATED_IDENTITY} must be a string",
                )
            try:
                impersonated = SpiffeId.parse(value.string_value)
            except SpiffeIdError as exc:
                await self._fail(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"metadata {IMPERSONATED_IDENTITY} is not a SPIFFE ID: {exc}",
                )

        placement = self.placement  # one snapshot for the whole decision
        decisions: list[tuple[SpiffeId, Decision]] = []

        def allowed(sid: SpiffeId) -> bool:
            if impersonated is not None and sid != impersonated:
                decisions.append((sid, Decision(False, "mismatch")))
                return False
            d = authorize(placement, node, sid)
            decisions.append((sid, d))
            return d.allowed

        try:
            try:
                issued = self.store.ca.sign_csr(request.csr, allowed=allowed, ttl=ttl, now=now)
            except CaError:
                # Not placed here by the config we hold: the file may already say otherwise.
                denied = bool(decisions) and decisions[0][1].reason != "mismatch"
                if not (denied and not decisions[0][1].allowed and self._reload_now()):
                    raise
                placement = self.placement  # `allowed` reads this binding
                decisions.clear()
                issued = self.store.ca.sign_csr(request.csr, allowed=allowed, ttl=ttl, now=now)
        except CaError as exc:
            if decisions and not decisions[0][1].allowed:
                sid, d = decisions[0]
                if d.reason == "mismatch":
                    msg = f"the CSR is for {sid} but metadata {IMPERSONATED_IDENTITY} names {impersonated}"
                    await self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, msg)
                msg = f"node {node!r} may not obtain a certificate for {sid}: {d.reason}"
                log.warning(
                    f"CSR denied: {msg}",
                    extra={
                        "event": "ca_denied",
                        "node": node,
                        "identity": str(sid),
                        "config": placement.digest,
                    },
                )
                await self._fail(context, grpc.StatusCode.PERMISSION_DENIED, msg)
            code = (
                grpc.StatusCode.FAILED_PRECONDITION
                if exc.rule in ("ca-expired", "ca-not-yet-valid")
                else grpc.StatusCode.INVALID_ARGUMENT
            )
            log.warning(
                f"CSR refused from node {node!r}: {exc}",
                extra={"event": "ca_bad_request", "node": node, "rule": exc.rule},
            )
            await self._fail(context, code, f"CSR refused ({exc.rule}): {exc.message}")

        roots = [r.public_bytes(serialization.Encoding.PEM).decode("ascii") for r in self.store.ca.roots]
        chain = [c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in issued.chain]
        log.info(
            f"certificate issued for {issued.spiffe_id} to node {node!r}",
            extra={
                "event": "ca_issued",
                "node": node,
                "identity": str(issued.spiffe_id),
                "serial": format(issued.certificate.serial_number, "x"),
                "not_after": issued.not_after.isoformat(),
            },
        )
        self.requests.labels(grpc.StatusCode.OK.name).inc()
        return ca_pb2.IstioCertificateResponse(
            cert_chain=chain + roots, root_cert=ca_pb2.Roots(ca_cert=roots)
        )
