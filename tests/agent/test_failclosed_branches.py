"""Every fail-closed branch of admission and of the proxies, at unit level.

The proxies see only :class:`agent.context.ProxyContext`, so each branch runs here against a
fake context over a real :class:`mesh.store.WorkloadStore` (built from a real config) and a
real connection tracker, metrics and access log: what is asserted is the reset, the counter
and the access-log line the production code writes. The supervisor's reload steps are tested
the same way with a failing certificate manager and a failing capture.
"""
# ruff: noqa: E501

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import socket
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

from agent.admission import (
    Admitted,
    Rejected,
    RejectKind,
    admit_hbone,
    admit_plaintext,
    plan_outbound,
    recheck,
)
from agent.capture import NullCapture
from agent.metrics import AgentMetrics
from agent.outbound import handle_outbound
from agent.records import Path
from agent.supervisor import AgentOptions, NodeAgent, build_store
from agent.tracking import ConnectionTracker
from credentials.manager import NoCredentialError
from identity.spiffe import SpiffeId
from mesh.config import IPAddress, parse_config, parse_ip
from mesh.store import WorkloadStore
from serving.accesslog import AccessLog
from tunnel.client import OutboundTarget, TunnelError

CFG = textwrap.dedent(
    """\
    apiVersion: ztagent.io/v1alpha1
    kind: MeshConfig
    trustDomain: cluster.local
    nodes:
      - {name: node-a, address: 10.250.0.1, podCIDR: 10.244.1.0/24}
      - {name: node-b, address: 10.250.0.2, podCIDR: 10.244.2.0/24}
    workloads:
      - {name: sleep, namespace: ns1, serviceAccount: sleep, node: node-a, ips: [10.244.1.2], labels: {app: sleep}}
      - {name: local-web, namespace: ns1, serviceAccount: web, node: node-a, ips: [10.244.1.5], labels: {app: local-web}}
      - {name: legacy, namespace: ns1, node: node-a, ips: [10.244.1.3], labels: {app: legacy}, enrolled: false}
      - {name: web-1, namespace: ns2, serviceAccount: web, node: node-b, ips: [10.244.2.2], labels: {app: web}}
      - {name: web-2, namespace: ns2, serviceAccount: web, node: node-b, ips: [10.244.2.3], labels: {app: web}}
      - {name: strict-db, namespace: ns1, serviceAccount: db, node: node-a, ips: [10.244.1.7], labels: {app: db}}
    services:
      - {name: web, namespace: ns2, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080}], selector: {app: web}}
      - {name: empty, namespace: ns2, vips: [10.96.0.11], ports: [{port: 80}], selector: {app: none}}
    ---
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: db-strict, namespace: ns1}
    spec: {selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}}
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-sleep-to-web, namespace: ns1}
    spec:
      selector: {matchLabels: {app: local-web}}
      action: DENY
      rules: [{from: [{source: {principals: [cluster.local/ns/ns1/sa/sleep]}}]}]
    """
)

SLEEP = SpiffeId.parse("spiffe://cluster.local/ns/ns1/sa/sleep")
WEB = SpiffeId.parse("spiffe://cluster.local/ns/ns2/sa/web")


def store_for(node: str = "node-a", text: str = CFG) -> WorkloadStore:
    return build_store(parse_config(text), node)


class FakeDownstream:
    """The held app connection: records whether the proxy reset it or handed it over."""

    def __init__(self, peer: tuple[str, int], local: tuple[str, int] = ("10.96.0.10", 80)) -> None:
        self.peer = peer
        self.local = local
        self.reset_called = False
        self.handed_over: Any = None

    @property
    def peer_ip(self) -> IPAddress | None:
        return parse_ip(self.peer[0])

    def reset(self) -> None:
        self.reset_called = True

    def hand_over(self, protocol: Any) -> None:
        self.handed_over = protocol


class FakeContext:
    """ProxyContext over a real store, tracker, metrics and access log; fakes only the network."""

    def __init__(self, store: WorkloadStore, *, node: str = "node-a") -> None:
        self._store = store
        self.node_name = node
        self.hbone_port = 15008
        self.metrics = AgentMetrics()
        self.log = io.StringIO()
        self.connections = ConnectionTracker(self.metrics, AccessLog(stream=self.log))
        self.own: set[tuple[str, int]] = set()
        self.credentials: dict[SpiffeId, Any] = {}
        self.establish_error: TunnelError | None = None
        self.established: list[OutboundTarget] = []
        self.connects: list[tuple[str, int, IPAddress | None]] = []

    @property
    def store(self) -> WorkloadStore:
        return self._store

    def credential(self, spiffe_id: SpiffeId) -> Any:
        try:
            return self.credentials[spiffe_id]
        except KeyError:
            raise NoCredentialError(spiffe_id, f"no certificate held for {spiffe_id}") from None

    async def establish(self, target: OutboundTarget, reset_local: Callable[[], None]) -> Any:
        self.established.append(target)
        if self.establish_error is not None:
            raise self.establish_error
        raise AssertionError("this test expects the tunnel to fail")

    async def connect_upstream(self, ip: str, port: int, source_ip: IPAddress | None) -> socket.socket:
        self.connects.append((ip, port, source_ip))
        raise ConnectionRefusedError(111, "Connection refused")

    def is_own_listener(self, addr: tuple[str, int]) -> bool:
        return addr in self.own

    def failures(self, direction: str = "outbound") -> dict[str, float]:
        out = {}
        for metric in self.metrics.registry.collect():
            if metric.name == "ztagent_handshake_failures":
                for s in metric.samples:
                    if s.name.endswith("_total") and s.labels["direction"] == direction:
                        out[s.labels["reason"]] = s.value
        return out

    def log_events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines()]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --------------------------------------------------------------------------------------------
# Outbound: the proxy's refusals


def test_outbound_to_a_waypoint_fronted_destination_is_refused_not_bypassed() -> None:
    store = store_for()
    real_route = store.route

    def route_with_waypoint(ip: str, port: int) -> Any:
        r = real_route(ip, port)
        return dataclasses.replace(r, waypoint="ns2/waypoint") if r is not None else None

    store.route = route_with_waypoint  # type: ignore[method-assign]
    ctx = FakeContext(store)
    ctx.credentials[SLEEP] = object()
    down = FakeDownstream(("10.244.1.2", 40000))
    run(handle_outbound(ctx, down, ("10.96.0.10", 80)))  # type: ignore[arg-type]
    assert down.reset_called and down.handed_over is None
    assert ctx.established == []  # no tunnel was even tried
    assert ctx.failures() == {"waypoint-unsupported": 1.0}


def test_outbound_to_the_agents_own_listener_is_a_loop_and_refused() -> None:
    ctx = FakeContext(store_for())
    ctx.own.add(("10.250.0.1", 15001))
    down = FakeDownstream(("10.244.1.2", 40000))
    run(handle_outbound(ctx, down, ("10.250.0.1", 15001)))  # type: ignore[arg-type]
    assert down.reset_called
    assert ctx.failures() == {"loop": 1.0}
    assert ctx.connects == [] and ctx.established == []


def test_outbound_without_a_certificate_is_refused_and_never_sent_plaintext() -> None:
    ctx = FakeContext(store_for())  # no credentials held at all
    down = FakeDownstream(("10.244.1.2", 40000))
    run(handle_outbound(ctx, down, ("10.96.0.10", 80)))  # type: ignore[arg-type]
    assert down.reset_called
    assert ctx.failures() == {"no-credential": 1.0}
    assert ctx.established == [] and ctx.connects == []  # neither HBONE nor a plaintext fallback


def test_outbound_from_an_unknown_source_is_refused() -> None:
    ctx = FakeContext(store_for())
    for src in ("10.244.1.3", "10.244.2.2", "192.0.2.1"):  # unenrolled, another node's, outside
        down = FakeDownstream((src, 40000))
        run(handle_outbound(ctx, down, ("10.96.0.10", 80)))  # type: ignore[arg-type]
        assert down.reset_called
    assert ctx.failures() == {"unknown-source": 3.0}


def test_outbound_to_a_service_without_endpoints_is_refused() -> None:
    ctx = FakeContext(store_for())
    down = FakeDownstream(("10.244.1.2", 40000))
    run(handle_outbound(ctx, down, ("10.96.0.11", 80)))  # type: ignore[arg-type]
    assert down.reset_called and ctx.failures() == {"no-endpoint": 1.0}


def test_a_refused_tunnel_marks_the_endpoint_unhealthy_and_the_next_connection_fails_over() -> None:
    ctx = FakeContext(store_for())
    ctx.credentials[SLEEP] = object()
    ctx.establish_error = TunnelError("connect-refused", "nothing listens on 10.244.2.x:15008")
    run(handle_outbound(ctx, FakeDownstream(("10.244.1.2", 40000)), ("10.96.0.10", 80)))  # type: ignore[arg-type]
    first = ctx.established[0].destination
    run(handle_outbound(ctx, FakeDownstream(("10.244.1.2", 40001)), ("10.96.0.10", 80)))  # type: ignore[arg-type]
    second = ctx.established[1].destination
    assert first.ip != second.ip, "the second connection must go to the other endpoint"
    assert not ctx.store.is_healthy(str(first.ip), first.port)
    assert ctx.failures() == {"connect-refused": 2.0}
    failed = [e for e in ctx.log_events() if e["event"] == "connection_failed"]
    assert [e["kind"] for e in failed] == ["connect-refused", "connect-refused"]
    assert failed[0]["source_workload"] == "ns1/sleep" and failed[0]["destination_service"].startswith("web.ns2")


def test_a_denied_same_node_connection_is_reset_and_logged_with_the_policy() -> None:
    ctx = FakeContext(store_for())
    down = FakeDownstream(("10.244.1.2", 40000))
    run(handle_outbound(ctx, down, ("10.244.1.5", 8080)))  # type: ignore[arg-type]
    assert down.reset_called and ctx.connects == []
    denied = [e for e in ctx.log_events() if e["event"] == "connection_denied"]
    assert len(denied) == 1
    assert denied[0]["policy"] == "ns1/deny-sleep-to-web"
    assert denied[0]["source_principal"] == str(SLEEP) and denied[0]["path"] == "same-node"


# --------------------------------------------------------------------------------------------
# Admission tables


@pytest.mark.parametrize(
    ("local_ip", "dest_ip", "claimed", "kind", "status"),
    [
        ("10.244.1.5", "10.244.1.2", None, RejectKind.NOT_LOCAL, 400),  # authority is not the conn's IP
        ("10.244.2.2", "10.244.2.2", None, RejectKind.NOT_LOCAL, 400),  # another node's workload: no relay
        ("10.244.1.3", "10.244.1.3", None, RejectKind.NOT_LOCAL, 400),  # local but not enrolled
        ("10.244.1.5", "10.244.1.5", "10.244.2.2", RejectKind.DENIED, 401),  # sleep's identity claims web-1's IP:
    ],
)
def test_hbone_admission_refusals(local_ip: str, dest_ip: str, claimed: str | None, kind: RejectKind,
                                  status: int) -> None:  # fmt: skip
    out = admit_hbone(
        store_for(),
        peer_identity=SLEEP,
        peer_ip=parse_ip("10.250.0.2"),
        local_ip=parse_ip(local_ip),
        destination_ip=parse_ip(dest_ip),
        destination_port=8080,
        claimed_source=parse_ip(claimed) if claimed else None,
    )
    assert isinstance(out, Rejected) and out.kind is kind and out.status == status


def test_hbone_forwarded_source_is_believed_only_for_the_peers_own_workload() -> None:
    store = store_for()
    args = dict(peer_ip=parse_ip("10.250.0.2"), local_ip=parse_ip("10.244.1.7"),
                destination_ip=parse_ip("10.244.1.7"), destination_port=5432)  # fmt: skip
    ok = admit_hbone(store, peer_identity=WEB, claimed_source=parse_ip("10.244.2.2"), **args)  # type: ignore[arg-type]
    assert isinstance(ok, Admitted)
    assert ok.deliver_from == parse_ip("10.244.2.2") and ok.untrusted_claim is None
    assert ok.record.source_workload is not None and ok.record.source_workload.key == "ns2/web-1"
    # The same identity claiming sleep's address: not believed, the peer's address stands in.
    forged = admit_hbone(store, peer_identity=WEB, claimed_source=parse_ip("10.244.1.2"), **args)  # type: ignore[arg-type]
    assert isinstance(forged, Admitted)
    assert forged.untrusted_claim == parse_ip("10.244.1.2") and forged.deliver_from is None
    assert forged.record.source_ip == parse_ip("10.250.0.2") and forged.record.source_workload is None
    assert forged.record.policy_input is not None and forged.record.policy_input.source_ip == parse_ip("10.250.0.2")


def test_plaintext_admission_refuses_strict_and_unknown_destinations() -> None:
    store = store_for()
    strict = admit_plaintext(store, source_ip=parse_ip("192.0.2.9"), destination_ip=parse_ip("10.244.1.7"),
                             destination_port=5432)  # fmt: skip
    assert isinstance(strict, Rejected) and strict.kind is RejectKind.DENIED
    assert strict.record is not None and strict.record.decision is not None
    assert strict.record.decision.code == "mtls-required"
    unknown = admit_plaintext(store, source_ip=parse_ip("192.0.2.9"), destination_ip=parse_ip("10.244.2.2"),
                              destination_port=80)  # fmt: skip
    assert isinstance(unknown, Rejected) and unknown.kind is RejectKind.UNKNOWN_DESTINATION
    ok = admit_plaintext(store, source_ip=parse_ip("192.0.2.9"), destination_ip=parse_ip("10.244.1.2"),
                         destination_port=80)  # fmt: skip
    assert isinstance(ok, Admitted) and ok.deliver_from == parse_ip("192.0.2.9")


@pytest.mark.parametrize(
    ("src", "dst", "expect"),
    [
        ("10.244.1.2", ("10.96.0.10", 80), Path.HBONE),
        ("10.244.1.2", ("10.244.1.5", 8080), Path.SAME_NODE),
        ("10.244.1.2", ("10.244.1.3", 80), Path.PASSTHROUGH),  # unenrolled destination
        ("10.244.1.2", ("198.51.100.1", 443), Path.PASSTHROUGH),  # outside the mesh
        ("10.244.1.3", ("10.96.0.10", 80), RejectKind.UNKNOWN_SOURCE),
        ("10.244.1.2", ("10.96.0.11", 80), RejectKind.NO_ENDPOINT),
        ("10.244.1.2", ("10.96.0.10", 81), RejectKind.NO_ENDPOINT),  # VIP on a port it does not expose
    ],
)
def test_outbound_plans(src: str, dst: tuple[str, int], expect: Path | RejectKind) -> None:
    plan = plan_outbound(store_for(), local_node="node-a", source_ip=parse_ip(src), original=dst,
                         to_own_listener=False)  # fmt: skip
    if isinstance(expect, Path):
        assert not isinstance(plan, Rejected), plan
        assert plan.path is expect
    else:
        assert isinstance(plan, Rejected) and plan.kind is expect


def test_recheck_closes_when_the_destination_leaves_or_policy_now_denies() -> None:
    store = store_for()
    ok = admit_hbone(store, peer_identity=SLEEP, peer_ip=parse_ip("10.250.0.2"), local_ip=parse_ip("10.244.1.2"),
                     destination_ip=parse_ip("10.244.1.2"), destination_port=80, claimed_source=None)  # fmt: skip
    assert isinstance(ok, Admitted)
    assert recheck(store, ok.record, "node-a") is None
    unenrolled = store_for(text=CFG.replace(
        "{name: sleep, namespace: ns1, serviceAccount: sleep, node: node-a, ips: [10.244.1.2], labels: {app: sleep}}",
        "{name: sleep, namespace: ns1, serviceAccount: sleep, node: node-a, ips: [10.244.1.2], labels: {app: sleep}, enrolled: false}"))  # fmt: skip
    assert recheck(unenrolled, ok.record, "node-a") == "destination no longer an enrolled workload on this node"
    denying = store_for(text=CFG + textwrap.dedent(
        """\
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-all-sleep, namespace: ns1}
        spec: {selector: {matchLabels: {app: sleep}}, action: DENY, rules: [{}]}
        """))  # fmt: skip
    d = recheck(denying, ok.record, "node-a")
    assert d is not None and not isinstance(d, str) and d.policies == ("ns1/deny-all-sleep",)


def test_a_config_naming_no_such_node_is_refused_with_a_domain_error() -> None:
    from agent.supervisor import ConfigRefused

    with pytest.raises(ConfigRefused, match="node 'node-z' is not in the config"):
        build_store(parse_config(CFG), "node-z")


# --------------------------------------------------------------------------------------------
# Supervisor: a reload whose steps fail one by one


class _FailingCerts:
    def __init__(self) -> None:
        self.held: set[SpiffeId] = set()
        self.tried: list[SpiffeId] = []

    def identities(self) -> list[SpiffeId]:
        return sorted(self.held)

    async def add_identity(self, sid: SpiffeId) -> bool:
        self.tried.append(sid)
        raise RuntimeError("CA unreachable")

    def remove_identity(self, sid: SpiffeId) -> None:
        self.held.discard(sid)


class _FailingCapture(NullCapture):
    def __init__(self) -> None:
        self.synced = 0

    def sync(self, workloads: Any) -> None:
        self.synced += 1
        raise RuntimeError("pod interface not found")


class _RecordingWorker:
    def __init__(self) -> None:
        self.rechecks = 0
        self.listener_syncs = 0

    async def sync_hbone_listeners(self) -> None:
        self.listener_syncs += 1

    def recheck(self, destinations: Any = None) -> int:
        self.rechecks += 1
        return 0


def test_reload_with_a_failed_identity_add_and_capture_sync_still_rechecks(caplog: pytest.LogCaptureFixture) -> None:
    agent = NodeAgent(AgentOptions(config="unused", node="node-a", capture="none"))
    agent._store = store_for()
    certs, capture, worker = _FailingCerts(), _FailingCapture(), _RecordingWorker()
    agent._certs = certs  # type: ignore[assignment]
    agent.capture = capture
    agent.worker = worker  # type: ignore[assignment]
    with caplog.at_level("ERROR"):
        run(agent._converge())
    assert set(certs.tried) == {w.spiffe_id for w in agent.store.local_enrolled}
    assert capture.synced == 1 and worker.listener_syncs == 1
    assert worker.rechecks == 1, "open connections must be re-checked even when other steps failed"
    events = [getattr(r, "event", None) for r in caplog.records]
    assert "cert_add_failed" in events and "capture_error" in events
