"""CertificateManager driven with injected time against a real CA over real gRPC/mTLS.

The CA runs in-process (same event loop, a real unix socket, real TLS) so a test can stop and
restart it to make renewals fail and recover, and so it signs with the same injected clock the
manager and the client use: everything agrees on "now" while the test jumps half an hour.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from agent.metrics import AgentMetrics
from caserver import store as ca_store
from caserver.server import CaServer
from credentials.client import CaClient, NodeCredentials
from credentials.manager import CertificateManager, NoCredentialError, StartError
from identity.rotation import Backoff
from identity.spiffe import SpiffeId
from identity.svid import WorkloadCredential, verify_svid
from mesh.config import parse_config
from tests.agent.test_ca_helpers import TD, CaEnv, config_text, make_env, short_tmpdir

SLEEP = SpiffeId.parse(f"spiffe://{TD}/ns/ns1/sa/sleep")
OTHER = SpiffeId.parse(f"spiffe://{TD}/ns/ns1/sa/other")  # same node, added by config later
HTTPBIN = SpiffeId.parse(f"spiffe://{TD}/ns/ns2/sa/httpbin")  # placed on node-b


class FakeClock:
    def __init__(self) -> None:
        self.t = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.t

    def advance(self, d: dt.timedelta) -> None:
        self.t += d

    def set(self, t: dt.datetime) -> None:
        assert t >= self.t
        self.t = t


class Harness:
    def __init__(self, env: CaEnv, clock: FakeClock) -> None:
        self.env = env
        self.clock = clock
        cfg = parse_config(
            config_text(
                [
                    ("sleep", "ns1", "sleep", "node-a"),
                    ("other", "ns1", "other", "node-a"),
                    ("httpbin", "ns2", "httpbin", "node-b"),
                ]
            )
        )
        self.server = CaServer(ca_store.load(env.ca_dir), cfg, clock=clock)
        self.address = f"unix:{env.base}/mgr.sock"
        self.client = CaClient(self.address, NodeCredentials.from_dir(env.node_a), clock=clock, timeout=5)
        self.registry = CollectorRegistry()
        self.rotations: list[tuple[SpiffeId, WorkloadCredential | None]] = []
        self.manager = CertificateManager(
            self.client,
            self.client.bundles(),
            registry=self.registry,
            clock=clock,
            rng=random.Random(7).random,
            backoff=Backoff(initial=dt.timedelta(seconds=1), maximum=dt.timedelta(seconds=60)),
        )
        self.manager.on_rotate(lambda sid, cred: self.rotations.append((sid, cred)))

    async def start_ca(self) -> None:
        await self.server.start(self.address)

    async def stop_ca(self) -> None:
        await self.server.stop(grace=None)

    def failures(self, sid: SpiffeId) -> float:
        v = self.registry.get_sample_value("ztagent_cert_rotation_failures_total", {"identity": str(sid)})
        return v or 0.0

    def expiry(self, sid: SpiffeId) -> float | None:
        return self.registry.get_sample_value("ztagent_cert_expiry_timestamp_seconds", {"identity": str(sid)})

    async def to_next_due(self) -> int:
        nxt = self.manager.next_due()
        assert nxt is not None
        self.clock.set(max(nxt, self.clock()))
        return await self.manager.run_due()


@pytest.fixture(scope="module")
def env() -> Iterator[CaEnv]:
    with short_tmpdir() as base:
        yield make_env(base)


@pytest.fixture
async def h(env: CaEnv) -> AsyncIterator[Harness]:
    harness = Harness(env, FakeClock())
    await harness.start_ca()
    try:
        yield harness
    finally:
        await harness.manager.stop()
        await harness.client.close()
        await harness.stop_ca()


async def test_start_fetches_every_identity_and_renews_at_half_life(h: Harness) -> None:
    await h.manager.start([SLEEP, OTHER], background=False)
    first = h.manager.current(SLEEP)
    assert verify_svid(first.chain, h.manager.bundles(), h.clock()) == SLEEP
    assert h.manager.current(OTHER).spiffe_id == OTHER
    assert h.expiry(SLEEP) == first.not_after.timestamp()
    # Renewal is due at half-life ± 5 % of the 1 h lifetime, measured from when it arrived.
    due = next(st.next_action for st in h.manager.status() if st.spiffe_id == SLEEP)
    assert dt.timedelta(minutes=27) <= due - h.clock() <= dt.timedelta(minutes=33)
    # Just before: SLEEP is not renewed (OTHER may be, its jitter differs).
    h.clock.set(due - dt.timedelta(seconds=1))
    await h.manager.run_due()
    assert h.manager.current(SLEEP) is first
    # At the due instant: renewed, subscribers told, gauge moved.
    h.clock.set(due)
    assert await h.manager.run_due() >= 1
    renewed = h.manager.current(SLEEP)
    assert renewed.leaf.serial_number != first.leaf.serial_number
    assert renewed.not_after > first.not_after
    assert (SLEEP, renewed) in h.rotations
    assert h.expiry(SLEEP) == renewed.not_after.timestamp()
    assert h.failures(SLEEP) == 0


async def test_renewal_failure_is_loud_old_cert_serves_then_recovery(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    await h.manager.start([SLEEP], background=False)
    old = h.manager.current(SLEEP)
    await h.stop_ca()
    caplog.set_level(logging.ERROR, logger="ztagent.certs")
    # Half-life passes with the CA down: three failed attempts, each logged and counted.
    for n in range(1, 4):
        assert await h.to_next_due() == 1
        assert h.failures(SLEEP) == n
        assert h.manager.current(SLEEP) is old  # the old certificate keeps serving
    failed = [r for r in caplog.records if getattr(r, "event", "") == "cert_rotation_failed"]
    assert len(failed) == 3
    assert all(r.identity == str(SLEEP) for r in failed)  # type: ignore[attr-defined]
    assert (
        "unreachable" in failed[0].getMessage() and "old certificate serves until" in failed[0].getMessage()
    )
    # Backoff grows: 1 s, 2 s, 4 s ceilings (equal jitter: each in [ceiling/2, ceiling)).
    st = h.manager.status()[0]
    assert st.consecutive_failures == 3
    assert dt.timedelta(seconds=2) <= st.next_action - h.clock() < dt.timedelta(seconds=4)
    # The CA comes back: the next retry succeeds and the failure streak resets.
    await h.start_ca()
    await h.to_next_due()
    new = h.manager.current(SLEEP)
    assert new.leaf.serial_number != old.leaf.serial_number
    assert h.manager.status()[0].consecutive_failures == 0
    assert h.failures(SLEEP) == 3


async def test_after_expiry_identity_has_no_credential_until_renewed(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    await h.manager.start([SLEEP], background=False)
    old = h.manager.current(SLEEP)
    await h.stop_ca()
    caplog.set_level(logging.ERROR, logger="ztagent.certs")
    # Jump past NotAfter: a read fails closed even before the manager's next round.
    h.clock.set(old.not_after + dt.timedelta(seconds=1))
    with pytest.raises(NoCredentialError, match=str(SLEEP)):
        h.manager.current(SLEEP)
    assert (SLEEP, None) in h.rotations  # TLS contexts are told to drop it
    assert any(getattr(r, "event", "") == "cert_expired" for r in caplog.records)
    await h.manager.run_due()
    with pytest.raises(NoCredentialError, match="unreachable"):
        h.manager.current(SLEEP)
    # The gauge keeps the past expiry, so "expiry - time() < 0" alerts fire.
    assert h.expiry(SLEEP) == old.not_after.timestamp()
    await h.start_ca()
    await h.to_next_due()
    assert h.manager.current(SLEEP).not_after > h.clock()


async def test_start_fails_when_any_first_fetch_fails(h: Harness) -> None:
    with pytest.raises(StartError) as ei:
        await h.manager.start([SLEEP, HTTPBIN], background=False)
    assert list(ei.value.failures) == [HTTPBIN]
    assert "PERMISSION_DENIED" in str(ei.value) and str(HTTPBIN) in str(ei.value)
    assert h.failures(HTTPBIN) == 1
    # Nothing is half-held: no identity, no gauge.
    assert h.manager.identities() == []
    assert h.expiry(SLEEP) is None
    with pytest.raises(NoCredentialError):
        h.manager.current(SLEEP)


async def test_start_fails_when_ca_is_down(h: Harness) -> None:
    await h.stop_ca()
    with pytest.raises(StartError, match="unreachable"):
        await h.manager.start([SLEEP], background=False)


async def test_identities_come_and_go_at_runtime(h: Harness) -> None:
    await h.manager.start([SLEEP], background=False)
    assert await h.manager.add_identity(OTHER)
    assert h.manager.current(OTHER).spiffe_id == OTHER
    # Reference counted: two workloads with the same service account share the credential.
    assert await h.manager.add_identity(OTHER)
    h.manager.remove_identity(OTHER)
    assert h.manager.current(OTHER).spiffe_id == OTHER
    h.manager.remove_identity(OTHER)
    with pytest.raises(NoCredentialError, match="not a managed identity"):
        h.manager.current(OTHER)
    assert h.expiry(OTHER) is None
    assert (OTHER, None) in h.rotations
    # A workload the CA refuses: add reports it, the failure is counted and retried later.
    assert not await h.manager.add_identity(HTTPBIN)
    assert h.failures(HTTPBIN) == 1
    nxt = h.manager.next_due()
    assert nxt is not None and nxt - h.clock() <= dt.timedelta(seconds=1)


async def test_registers_on_the_agents_metrics_registry(h: Harness) -> None:
    metrics = AgentMetrics()
    mgr = CertificateManager(h.client, h.client.bundles(), registry=metrics.registry, clock=h.clock)
    await mgr.start([SLEEP], background=False)
    cred = mgr.current(SLEEP)
    assert metrics.registry.get_sample_value(
        "ztagent_cert_expiry_timestamp_seconds", {"identity": str(SLEEP)}
    ) == pytest.approx(cred.not_after.timestamp())
    assert not await mgr.add_identity(HTTPBIN)
    assert (
        metrics.registry.get_sample_value("ztagent_cert_rotation_failures_total", {"identity": str(HTTPBIN)})
        == 1
    )


def test_node_credentials_must_be_valid(tmp_path: Path, env: CaEnv) -> None:
    from credentials.client import CaClientError

    with pytest.raises(CaClientError, match="does not exist"):
        NodeCredentials.from_dir(tmp_path)
    far = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)  # past the node credential's 24 h
    with pytest.raises(CaClientError, match="expired"):
        NodeCredentials.from_dir(env.node_a, now=far)
