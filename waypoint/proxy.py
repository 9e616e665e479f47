"""The waypoint's data path: one HBONE stream in, HTTP requests decided, HBONE out per endpoint.

::

    tunnel.server (mTLS, CONNECT to a service VIP:port or pod ip:port bound to this waypoint)
      -> WaypointProxy.admit (is the destination ours? who is the caller?) -> Accept(protocol=...)
      -> the stream is handed in-process to an asyncio.StreamReaderProtocol (tunnel.relay pipe)
      -> sniff: HTTP/2 preface -> http2.serve; an HTTP/1.x request line -> http1.serve; else L4
      -> per request: decide (JWT, L7 policy, ext_authz) -> 403 "RBAC: access denied" | forward
      -> forward: tunnel.client HBONE to the endpoint's node agent, as the waypoint's identity,
         CONNECT authority endpoint ip:targetPort; x-forwarded-client-cert says who called.

The destination agent sees the waypoint's SPIFFE ID as its peer, so its L4 policy can require
that traffic came through the waypoint (principal ``<td>/ns/<ns>/sa/<waypoint>``); the original
caller is in ``x-forwarded-client-cert`` (set here from the verified peer, any incoming value
removed) and in the ``baggage`` the source agent sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from identity.spiffe import SpiffeId
from identity.svid import WorkloadCredential
from mesh.model import HBONE_PORT, Service, ServicePort, Waypoint, Workload
from mesh.store import WorkloadStore
from policy.l7 import CustomOutcome, WaypointTarget
from serving.accesslog import AccessLog
from tunnel.client import HboneClient, OutboundTarget, TunnelError
from tunnel.hbone import Authority, Status
from tunnel.relay import TunnelStream
from tunnel.server import Accept, Refuse, StreamRequest
from waypoint.decide import Outcome, RequestFacts, WaypointPolicies, decide, tcp_connection
from waypoint.extauthz import BodyTooLarge, ExtAuthzHttpClient
from waypoint.metrics import RequestLabels, WaypointMetrics

log = logging.getLogger("ztagent.waypoint")

H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
READ_CHUNK: Final = 64 * 1024
SNIFF_TIMEOUT: Final = 10.0  # a client that says nothing is treated as non-HTTP after this
UPSTREAM_FAILED_BODY: Final = "upstream connect error or disconnect/reset before headers"  # Envoy's words
_METHOD_CHARS: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-_")


@dataclass
class StreamContext:
    """One HBONE stream at the waypoint: who called, what for (set once at admission)."""

    peer: SpiffeId
    source: Authority  # the caller's address (the believed forwarded-for, else the peer's)
    source_workload: Workload | None
    destination: Authority  # the CONNECT authority (a VIP:port or pod ip:port)
    service: Service | None
    service_port: ServicePort | None
    workload: Workload | None  # pod-addressed traffic: the pod
    target: WaypointTarget
    opened: float = field(default_factory=time.monotonic)

    @property
    def caller(self) -> str:
        return str(self.peer)


@dataclass
class Upstream:
    """One HBONE stream from the waypoint to an endpoint's node agent, as reader/writer."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    stream: TunnelStream
    workload: Workload
    address: Authority

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()


def stream_pair(
    stream: TunnelStream, extra: dict[str, Any] | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over a tunnel stream, through the in-process pipe (no socketpair)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_CHUNK * 4)
    proto = asyncio.StreamReaderProtocol(reader)
    transport = stream.attach_protocol(proto, extra)
    return reader, asyncio.StreamWriter(transport, proto, reader, loop)


class WaypointProxy:
    """Admission and per-request work of one waypoint. ``store()`` and ``policies()`` are read
    on every stream so a config reload applies to the next one."""

    def __init__(
        self,
        *,
        waypoint: Waypoint,
        store: Callable[[], WorkloadStore],
        policies: Callable[[], WaypointPolicies],
        credential: Callable[[], WorkloadCredential],
        client: HboneClient,
        metrics: WaypointMetrics,
        access_log: AccessLog,
        ext_authz: Mapping[str, ExtAuthzHttpClient] | None = None,
        clock: Callable[[], float] = time.time,
        upstream_hbone_port: int = HBONE_PORT,
    ) -> None:
        self.waypoint = waypoint
        self.upstream_hbone_port = upstream_hbone_port  # where endpoints' node agents take HBONE
        self.store = store
        self.policies = policies
        self.credential = credential
        self.client = client
        self.metrics = metrics
        self.access_log = access_log
        self.ext_authz = dict(ext_authz or {})
        self.clock = clock
        self._tasks: set[asyncio.Task[None]] = set()

    # -- admission (one call per CONNECT stream) ------------------------------------------------
    def _is_ours(self, wp: object) -> bool:
        return isinstance(wp, Waypoint) and wp.key == self.waypoint.key

    def context_for(self, req: StreamRequest) -> StreamContext | Refuse:
        store = self.store()
        dst = req.destination
        peer = req.connection.peer_identity
        svc = store.service_at(dst.ip, dst.port)
        service = sport = workload = None
        if svc is not None:
            service, sport = svc
            if not self._is_ours(store.waypoint_for(None, service)):
                return Refuse(
                    Status.BAD_REQUEST,
                    "not-local",
                    f"{dst}: service {service.key} is not bound to waypoint {self.waypoint.key}",
                )
        else:
            workload = store.by_ip(dst.ip)
            if workload is None or not self._is_ours(store.waypoint_for(workload, None)):
                return Refuse(
                    Status.BAD_REQUEST,
                    "not-local",
                    f"{dst}: not a service or workload bound to waypoint {self.waypoint.key}",
                )
        # The forwarded-for claim is believed only for a workload with the peer's own identity
        # (the node agent's rule), else the peer's address stands in.
        source, source_w = req.connection.peer, None
        if req.forwarded is not None:
            w = store.by_ip(req.forwarded.ip)
            if w is not None and w.spiffe_id == peer:
                source, source_w = req.forwarded, w
        if source_w is None:
            w = store.by_ip(source.ip)
            source_w = w if w is not None and w.spiffe_id == peer else None
        target = self.policies().target(
            service.namespace if service else None, service.name if service else None
        )
        return StreamContext(peer, source, source_w, dst, service, sport, workload, target)

    async def admit(self, req: StreamRequest) -> Accept | Refuse:
        ctx = self.context_for(req)
        if isinstance(ctx, Refuse):
            self.metrics.refused.labels(ctx.kind).inc()
            log.warning(
                ctx.reason,
                extra={"event": "waypoint_refused", "source_principal": str(req.connection.peer_identity)},
            )
            return ctx
        return Accept(protocol=lambda: self._protocol(ctx))

    def _protocol(self, ctx: StreamContext) -> asyncio.Protocol:
        reader = asyncio.StreamReader(limit=READ_CHUNK * 4)

        def connected(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            task = asyncio.get_running_loop().create_task(self._serve(ctx, r, w))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return asyncio.StreamReaderProtocol(reader, connected)

    # -- one downstream connection -----------------------------------------------------------------
    async def _serve(
        self, ctx: StreamContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        from waypoint import http1, http2  # the protocol modules import this one

        try:
            first = await self._sniff(reader)
            if first.startswith(H2_PREFACE):
                await http2.serve(self, ctx, reader, writer, first)
            elif _looks_like_http1(first):
                await http1.serve(self, ctx, reader, writer, first)
            else:
                await self._l4(ctx, reader, writer, first)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.debug(f"{ctx.caller} -> {ctx.destination}: connection ended: {exc!r}")
        except Exception:
            log.exception(f"{ctx.caller} -> {ctx.destination}: waypoint connection failed")
        finally:
            if not writer.is_closing():
                writer.close()

    async def _sniff(self, reader: asyncio.StreamReader) -> bytes:
        data = b""
        try:
            async with asyncio.timeout(SNIFF_TIMEOUT):
                while len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):
                    chunk = await reader.read(READ_CHUNK)
                    if not chunk:
                        break
                    data += chunk
                while (
                    data
                    and not H2_PREFACE.startswith(data[: len(H2_PREFACE)])
                    and b"\n" not in data
                    and len(data) < 8192
                    and _http1_prefix(data)
                ):
                    chunk = await reader.read(READ_CHUNK)
                    if not chunk:
                        break
                    data += chunk
        except TimeoutError:
            pass
        return data

    async def _l4(
        self, ctx: StreamContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes
    ) -> None:
        """Non-HTTP traffic: the policies bound to the target, read as L4 policies (Istio's
        waypoint applies its RBAC network filter to TCP), then a plain relay to an endpoint."""
        ns = ctx.service.namespace if ctx.service else (ctx.workload.namespace if ctx.workload else "")
        conn = tcp_connection(ctx.peer.principal, ctx.source.ip, ns, ctx.destination.port, ctx.destination.ip)
        d = self.policies().decide_tcp(ctx.target, conn)
        self.access_log.write(
            "waypoint_tcp",
            source_principal=str(ctx.peer),
            source_ip=str(ctx.source.ip),
            destination=str(ctx.destination),
            decision=d.verdict.value,
            policy=",".join(d.policies) or None,
            reason=d.reason,
            code=d.code,
        )
        if not d.allowed:
            self.metrics.refused.labels("tcp-denied").inc()
            return
        up = await self.open_upstream(ctx)
        if up is None:
            return
        up.writer.write(first)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while chunk := await r.read(READ_CHUNK):
                w.write(chunk)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()

        try:
            await asyncio.gather(pump(reader, up.writer), pump(up.reader, writer))
        finally:
            up.close()

    # -- decisions --------------------------------------------------------------------------------
    async def decide(self, ctx: StreamContext, facts: RequestFacts, body: bytes | None = None) -> Outcome:
        policies = self.policies()
        now = self.clock()
        out = decide(policies, ctx.target, facts, now)
        if out.pending_custom is not None:
            client = self.ext_authz.get(out.pending_custom)
            if client is None:
                custom = CustomOutcome(
                    out.pending_custom,
                    False,
                    f"no ext_authz provider {out.pending_custom!r} is configured (fail closed)",
                )
            else:
                try:
                    res = await client.check(facts.method, facts.target, facts.authority, facts.headers, body)
                except BodyTooLarge as exc:
                    return Outcome(413, "Payload Too Large", str(exc), "ext-authz-body-too-large")
                custom = res.outcome(out.pending_custom)
                if not res.allowed:
                    d = decide(policies, ctx.target, facts, now, custom)
                    body_text = res.body.decode("utf-8", "replace") if res.body else d.body
                    return Outcome(
                        res.status,
                        body_text,
                        d.reason,
                        d.code,
                        d.policies,
                        d.decision,
                        d.auth,
                        d.request,
                        response_headers=res.downstream_headers,
                    )
            out = decide(policies, ctx.target, facts, now, custom)
            if out.allowed and client is not None:
                # Envoy's ext_authz on allow: set headersToUpstreamOnAllow, drop
                # x-envoy-auth-headers-to-remove (interpret_response collected both).
                drop = {n.lower() for n, _ in res.upstream_set} | set(res.upstream_remove)
                hdrs = tuple((n, v) for n, v in out.upstream_headers if n not in drop) + res.upstream_set
                out = dataclasses.replace(out, upstream_headers=hdrs)
        return out

    # -- upstream -----------------------------------------------------------------------------------
    def pick(self, ctx: StreamContext) -> tuple[Workload, Authority] | None:
        store = self.store()
        if ctx.service is not None and ctx.service_port is not None:
            ep = store.pick_endpoint(ctx.service, ctx.service_port)
            if ep is None:
                return None
            return ep.workload, Authority.of(str(ep.ip), ep.port)
        if ctx.workload is not None:
            return ctx.workload, ctx.destination
        return None

    async def open_upstream(self, ctx: StreamContext) -> Upstream | None:
        """HBONE to a chosen endpoint's node agent, as the waypoint (None: logged, counted)."""
        chosen = self.pick(ctx)
        if chosen is None:
            self.metrics.refused.labels("no-endpoint").inc()
            log.warning(
                f"{ctx.caller} -> {ctx.destination}: no endpoint", extra={"event": "waypoint_no_endpoint"}
            )
            return None
        w, addr = chosen
        if not w.enrolled:
            # An endpoint outside the mesh cannot verify who we are: refuse rather than go plaintext.
            self.metrics.refused.labels("endpoint-not-enrolled").inc()
            log.warning(
                f"{ctx.caller} -> {w.key}: endpoint is not enrolled in the mesh; refused",
                extra={"event": "waypoint_endpoint_unenrolled"},
            )
            return None
        target = OutboundTarget(
            source=self.credential(),
            destination=addr,
            agent_address=Authority.of(str(addr.ip), self.upstream_hbone_port),
            expected_identities=(w.spiffe_id,),
            baggage=_baggage(self.waypoint),
        )
        try:
            stream = await self.client.establish(target, lambda: None)
        except TunnelError as exc:
            self.metrics.refused.labels(exc.kind).inc()
            log.warning(
                f"{ctx.caller} -> {w.key} ({addr}) via waypoint {self.waypoint.key}: {exc}",
                extra={"event": "waypoint_upstream_failed", "kind": exc.kind},
            )
            if ctx.service is not None and exc.kind in ("connect-refused", "connect-timeout"):
                self.store().mark_unhealthy(str(addr.ip), addr.port)
            return None
        r, wr = stream_pair(stream, {"peername": (str(addr.ip), addr.port)})
        return Upstream(r, wr, stream, w, addr)

    # -- accounting --------------------------------------------------------------------------------
    def finished(
        self,
        ctx: StreamContext,
        *,
        protocol: str,
        method: str,
        path: str,
        authority: str,
        outcome: Outcome | None,
        status: int,
        started: float,
        request_bytes: int,
        response_bytes: int,
        upstream: Workload | None,
        grpc_status: str | None = None,
    ) -> None:
        """Count and log one finished request (Istio's four HTTP series, one access-log line)."""
        ms = (time.monotonic() - started) * 1000.0
        labels = RequestLabels.of(
            self.waypoint,
            ctx.peer,
            ctx.source_workload,
            ctx.service,
            upstream or ctx.workload,
            status,
            protocol,
            grpc_status,
        )
        self.metrics.observe(labels, ms, request_bytes, response_bytes)
        decision = "ALLOW" if outcome is not None and outcome.allowed else "DENY"
        self.access_log.write(
            "waypoint_request",
            protocol=protocol,
            method=method,
            path=path,
            authority=authority,
            status=status,
            grpc_status=grpc_status,
            source_principal=str(ctx.peer),
            source_workload=ctx.source_workload.key if ctx.source_workload else None,
            source_ip=str(ctx.source.ip),
            request_principal=outcome.request_principal if outcome else None,
            destination=str(ctx.destination),
            destination_service=ctx.service.hostname if ctx.service else None,
            upstream=upstream.key if upstream else None,
            decision=decision,
            policy=",".join(outcome.policies) if outcome and outcome.policies else None,
            reason=outcome.reason if outcome else None,
            code=outcome.code if outcome else None,
            duration_ms=round(ms, 3),
            request_bytes=request_bytes,
            response_bytes=response_bytes,
        )

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for c in self.ext_authz.values():
            await c.close()


def _http1_prefix(data: bytes) -> bool:
    """Could ``data`` be the start of an HTTP/1.x request line (``TOKEN SP``...)?"""
    head = data.split(b" ", 1)[0]
    return bool(head) and len(head) <= 20 and all(c in _METHOD_CHARS for c in head)


def _looks_like_http1(data: bytes) -> bool:
    line = data.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
    parts = line.split(b" ")
    return len(parts) == 3 and _http1_prefix(data) and parts[2].startswith(b"HTTP/1.")


def _baggage(wp: Waypoint) -> str:
    return f"k8s.namespace.name={wp.namespace},k8s.deployment.name={wp.name},service.name={wp.name}"


__all__ = ["H2_PREFACE", "StreamContext", "Upstream", "WaypointProxy", "stream_pair"]
