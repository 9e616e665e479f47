"""The agent's certificate manager: one credential per workload identity, kept fresh.

Lifecycle of an identity (DESIGN §3):

* fetched when added (``start`` fetches every initial identity and raises if any first fetch
  fails: an agent that cannot get its certificates must not start serving);
* renewed at half-life with jitter (identity.rotation.renewal_time), measured from when we got
  the certificate, not from its back-dated NotBefore, so a short-lived certificate is not
  renewed the moment it arrives;
* a failed renewal is logged (naming the identity and the cause: credentials.causes), counted in
  ``ztagent_cert_rotation_failures_total{identity}`` and ``ztagent_cert_fetch_failures_total{reason}``
  and retried with exponential backoff capped at :data:`DEFAULT_BACKOFF`'s 30 s, so renewals
  resume within half a minute of the CA coming back; the old certificate keeps serving meanwhile;
* once NotAfter passes without a successful renewal the identity has *no* credential:
  :meth:`current` raises :class:`NoCredentialError`, subscribers are told (``None``) so TLS
  contexts drop it, and an error is logged. Retries continue.

Subscribers (:meth:`on_rotate`) are called with ``(spiffe_id, credential_or_None)`` on every
change, so the TLS layer rebuilds contexts and new handshakes use the new certificate without a
restart; existing connections keep the certificate they were established with.

Time and randomness are injected (``clock``, ``rng``) and :meth:`run_due` does one round of due
work at the injected time, so tests drive rotation deterministically; :meth:`start` with
``background=True`` runs the same round in a task that sleeps until the next due instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from credentials import causes
from identity.bundle import TrustBundleSet
from identity.rotation import DEFAULT_JITTER_FRACTION, Backoff, Uniform, is_expired, renewal_time, retry_time
from identity.spiffe import SpiffeId
from identity.svid import WorkloadCredential

log = logging.getLogger("ztagent.certs")

Clock = Callable[[], dt.datetime]
RotateCallback = Callable[[SpiffeId, WorkloadCredential | None], None]

# Longest the background task sleeps without re-checking (bounds the effect of clock jumps).
MAX_SLEEP_SECONDS = 30.0
# How many fetches one round runs at once: a node with many new workloads must not open
# hundreds of concurrent RPCs to the CA.
MAX_CONCURRENT_FETCHES = 16
# Retry delays 1 s, 2 s, ... capped at 30 s (jittered to [cap/2, cap)): an agent learns the CA is
# back within 30 s of it, whatever the outage's length, and a node retrying every identity every
# 15-30 s is a handful of handshakes per second for a CA serving hundreds of nodes.
DEFAULT_BACKOFF = Backoff(initial=dt.timedelta(seconds=1), maximum=dt.timedelta(seconds=30))


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Fetcher(Protocol):
    async def fetch(self, spiffe_id: SpiffeId, ttl: dt.timedelta | None = None) -> WorkloadCredential: ...


class _BadAnswer(ValueError):
    reason = causes.BAD_ANSWER


class NoCredentialError(LookupError):
    def __init__(self, spiffe_id: SpiffeId, message: str) -> None:
        super().__init__(message)
        self.spiffe_id = spiffe_id


class StartError(RuntimeError):
    """The first fetch failed for at least one identity; ``failures`` maps identity -> error."""

    def __init__(self, failures: dict[SpiffeId, BaseException]) -> None:
        lines = "; ".join(f"{sid}: {err}" for sid, err in sorted(failures.items()))
        super().__init__(
            f"certificate manager cannot start: no certificate for {len(failures)} identities: {lines}"
        )
        self.failures = failures


@dataclass
class _State:
    spiffe_id: SpiffeId
    refs: int
    due: dt.datetime
    credential: WorkloadCredential | None = None
    attempt: int = 0  # consecutive failures
    last_error: str = ""
    last_reason: str = ""  # credentials.causes reason of last_error
    failing_since: dt.datetime | None = None  # first failure of the current run of failures
    in_flight: bool = False


@dataclass(frozen=True)
class CredentialStatus:
    """A snapshot of one identity, for the admin endpoint and tests."""

    spiffe_id: SpiffeId
    credential: WorkloadCredential | None
    next_action: dt.datetime
    consecutive_failures: int
    last_error: str
    last_error_reason: str = ""  # credentials.causes reason ("" when the last attempt succeeded)
    failing_since: dt.datetime | None = None


class CertificateManager:
    def __init__(
        self,
        fetcher: Fetcher,
        bundles: TrustBundleSet,
        *,
        registry: CollectorRegistry,
        ttl: dt.timedelta | None = None,
        clock: Clock = utc_now,
        rng: Uniform | None = None,
        jitter_fraction: float = DEFAULT_JITTER_FRACTION,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        self._fetcher = fetcher
        self._bundles = bundles
        self._ttl = ttl
        self._clock = clock
        self._rng: Uniform = rng if rng is not None else random.SystemRandom().random
        self._jitter = jitter_fraction
        self._backoff = backoff
        self._states: dict[SpiffeId, _State] = {}
        self._subscribers: list[RotateCallback] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._sem = asyncio.Semaphore(MAX_CONCURRENT_FETCHES)
        # Registered on the caller's registry (the agent passes AgentMetrics.registry, which
        # leaves these two series to us).
        self.failures = Counter(
            "ztagent_cert_rotation_failures",
            "Failed certificate fetches/renewals, by workload identity",
            ["identity"],
            registry=registry,
        )
        # The cause, without the identity: a fixed, small label set (credentials.causes.REASONS).
        self.failure_reasons = Counter(
            "ztagent_cert_fetch_failures",
            "Failed certificate fetches/renewals, by cause (node_credential_expired, ca_unreachable, "
            "ca_refused, ...)",
            ["reason"],
            registry=registry,
        )
        self.expiry = Gauge(
            "ztagent_cert_expiry_timestamp_seconds",
            "NotAfter of the certificate held for each identity (Unix seconds); kept after expiry",
            ["identity"],
            registry=registry,
        )

    # -- queries ------------------------------------------------------------------------------

    def current(self, spiffe_id: SpiffeId) -> WorkloadCredential:
        """The credential to present for ``spiffe_id`` now, or NoCredentialError (fail closed)."""
        st = self._states.get(spiffe_id)
        if st is None:
            raise NoCredentialError(spiffe_id, f"no certificate for {spiffe_id}: not a managed identity")
        cred = st.credential
        if cred is not None and is_expired(cred.not_after, self._clock()):
            self._expire(st)
            cred = None
        if cred is None:
            why = f" (last error: {st.last_error})" if st.last_error else ""
            raise NoCredentialError(spiffe_id, f"no valid certificate for {spiffe_id}{why}")
        return cred

    def bundles(self) -> TrustBundleSet:
        return self._bundles

    def set_bundles(self, bundles: TrustBundleSet) -> None:
        self._bundles = bundles

    def identities(self) -> list[SpiffeId]:
        return sorted(self._states)

    def status(self) -> list[CredentialStatus]:
        return [
            CredentialStatus(
                s.spiffe_id, s.credential, s.due, s.attempt, s.last_error, s.last_reason, s.failing_since
            )
            for _, s in sorted(self._states.items())
        ]

    def on_rotate(self, callback: RotateCallback) -> Callable[[], None]:
        """Call ``callback(spiffe_id, credential_or_None)`` on every change; returns unsubscribe."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def next_due(self) -> dt.datetime | None:
        """The earliest instant at which :meth:`run_due` has work (renewal, retry or expiry)."""
        times: list[dt.datetime] = []
        for s in self._states.values():
            if not s.in_flight:
                times.append(s.due)
            if s.credential is not None:
                # is_expired is strict (> not_after): the first instant with work is just after.
                times.append(s.credential.not_after + dt.timedelta(microseconds=1))
        return min(times, default=None)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, identities: Iterable[SpiffeId], *, background: bool = True) -> None:
        """Fetch every identity; raise StartError (holding nothing) if any first fetch fails."""
        if self._task is not None:
            raise RuntimeError("certificate manager already started")
        now = self._clock()
        for sid in identities:
            st = self._states.get(sid)
            if st is None:
                self._states[sid] = _State(sid, refs=1, due=now)
            else:
                st.refs += 1
        pending = [s for s in self._states.values() if s.credential is None]
        results = await asyncio.gather(*(self._attempt(s) for s in pending))
        failures = {s.spiffe_id: err for s, err in zip(pending, results, strict=True) if err is not None}
        if failures:
            for s in self._states.values():
                self._set_expiry(s.spiffe_id, None)
            self._states.clear()
            raise StartError(failures)
        if background:
            self._task = asyncio.create_task(self._loop(), name="ztagent-cert-manager")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def add_identity(self, spiffe_id: SpiffeId) -> bool:
        """Manage ``spiffe_id`` (reference-counted: workloads sharing a service account share it).

        Fetches at once if new; returns whether a credential is held. A failed first fetch is
        logged, counted and retried in the background like a failed renewal.
        """
        st = self._states.get(spiffe_id)
        if st is not None:
            st.refs += 1
            return st.credential is not None
        st = _State(spiffe_id, refs=1, due=self._clock())
        self._states[spiffe_id] = st
        err = await self._attempt(st)
        self._wake.set()  # the background task may need to wake earlier for this identity
        return err is None

    def remove_identity(self, spiffe_id: SpiffeId) -> None:
        st = self._states.get(spiffe_id)
        if st is None:
            return
        st.refs -= 1
        if st.refs > 0:
            return
        del self._states[spiffe_id]
        self._set_expiry(spiffe_id, None)
        log.info(
            f"stopped managing {spiffe_id}",
            extra={"event": "cert_identity_removed", "identity": str(spiffe_id)},
        )
        if st.credential is not None:
            self._notify(spiffe_id, None)

    # -- the work -----------------------------------------------------------------------------

    async def run_due(self) -> int:
        """Expire what has expired and (re)fetch what is due at ``clock()``; returns attempts made."""
        now = self._clock()
        for st in list(self._states.values()):
            if st.credential is not None and is_expired(st.credential.not_after, now):
                self._expire(st)
        due = [s for s in self._states.values() if not s.in_flight and s.due <= now]
        await asyncio.gather(*(self._attempt(s) for s in due))
        return len(due)

    def _expire(self, st: _State) -> None:
        cred = st.credential
        if cred is None:
            return
        st.credential = None
        log.error(
            f"certificate for {st.spiffe_id} expired at {cred.not_after.isoformat()} and was not renewed; "
            f"the identity has no credential, handshakes for it fail (last error: {st.last_error or 'none'})",
            extra={
                "event": "cert_expired",
                "identity": str(st.spiffe_id),
                "not_after": cred.not_after.isoformat(),
            },
        )
        # The gauge keeps the (past) expiry so alerts on expiry - time() < 0 fire.
        self._notify(st.spiffe_id, None)

    async def _attempt(self, st: _State) -> BaseException | None:
        """One fetch for ``st``; returns the error or None. Never raises (except cancellation)."""
        st.in_flight = True
        try:
            async with self._sem:
                cred = await self._fetcher.fetch(st.spiffe_id, self._ttl)
        except Exception as exc:  # every failure class counts: unreachable, denied, malformed
            error: BaseException | None = exc
            cred = None
        else:
            error = None
        finally:
            st.in_flight = False
        if self._states.get(st.spiffe_id) is not st:
            return error  # removed while fetching: drop the result
        now = self._clock()
        if cred is not None and cred.spiffe_id != st.spiffe_id:
            error = _BadAnswer(f"fetcher returned a credential for {cred.spiffe_id}")
            cred = None
        if cred is not None and is_expired(cred.not_after, now):
            error = _BadAnswer(f"fetched certificate already expired at {cred.not_after.isoformat()}")
            cred = None
        if cred is None:
            assert error is not None
            self._record_failure(st, error, now)
            return error
        recovered = st.attempt > 0
        st.credential = cred
        st.attempt = 0
        st.last_error = st.last_reason = ""
        since, st.failing_since = st.failing_since, None
        start = max(cred.not_before, now)
        st.due = renewal_time(start, cred.not_after, rng=self._rng, jitter_fraction=self._jitter)
        self._set_expiry(st.spiffe_id, cred.not_after.timestamp())
        log.info(
            f"certificate for {st.spiffe_id} installed, valid until {cred.not_after.isoformat()}, "
            f"renewal at {st.due.isoformat()}",
            extra={
                "event": "cert_rotated",
                "identity": str(st.spiffe_id),
                "serial": format(cred.leaf.serial_number, "x"),
                "not_after": cred.not_after.isoformat(),
                "renew_at": st.due.isoformat(),
            },
        )
        if recovered and since is not None:
            log.info(
                f"certificate fetches for {st.spiffe_id} work again after failing for "
                f"{(now - since).total_seconds():.1f}s",
                extra={"event": "cert_recovered", "identity": str(st.spiffe_id)},
            )
        self._notify(st.spiffe_id, cred)
        return None

    def _record_failure(self, st: _State, error: BaseException, now: dt.datetime) -> None:
        reason = causes.reason_of(error)
        st.last_error = str(error)
        st.last_reason = reason
        if st.failing_since is None:
            st.failing_since = now
        st.due = retry_time(now, st.attempt, rng=self._rng, backoff=self._backoff)
        st.attempt += 1
        self.failures.labels(str(st.spiffe_id)).inc()
        self.failure_reasons.labels(reason).inc()
        old = st.credential
        serving = (
            f"the old certificate serves until {old.not_after.isoformat()}"
            if old is not None
            else "no certificate is held for it"
        )
        log.error(
            f"certificate fetch for {st.spiffe_id} failed (attempt {st.attempt}, cause: "
            f"{causes.describe(reason)}): {error}; {serving}; retrying at {st.due.isoformat()}",
            extra={
                "event": "cert_rotation_failed",
                "identity": str(st.spiffe_id),
                "attempt": st.attempt,
                "reason": reason,
                "error": str(error),
                "retry_at": st.due.isoformat(),
            },
        )

    def _set_expiry(self, spiffe_id: SpiffeId, not_after: float | None) -> None:
        if not_after is None:
            with contextlib.suppress(KeyError):
                self.expiry.remove(str(spiffe_id))
        else:
            self.expiry.labels(str(spiffe_id)).set(not_after)

    def _notify(self, spiffe_id: SpiffeId, cred: WorkloadCredential | None) -> None:
        for cb in list(self._subscribers):
            try:
                cb(spiffe_id, cred)
            except Exception:
                log.exception(
                    f"on_rotate subscriber failed for {spiffe_id}",
                    extra={"event": "cert_subscriber_failed", "identity": str(spiffe_id)},
                )

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_due()
            except Exception:
                # A bug here must not silently stop all renewals: log it and keep going.
                log.exception("certificate manager round failed", extra={"event": "cert_manager_error"})
                await asyncio.sleep(1.0)
            nxt = self.next_due()
            delay = MAX_SLEEP_SECONDS
            if nxt is not None:
                delay = min(max((nxt - self._clock()).total_seconds(), 0.01), MAX_SLEEP_SECONDS)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
