from __future__ import annotations

import datetime as dt
import itertools
import random

import pytest

from identity.ca import CertificateAuthority
from identity.keys import build_csr
from identity.rotation import Backoff, is_expired, renewal_time, retry_time
from identity.spiffe import SpiffeId
from tests.identity.certgen import NOW, key

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
S = dt.timedelta(seconds=1)


def const(u: float):  # type: ignore[no-untyped-def]
    return lambda: u


@pytest.mark.parametrize(
    ("u", "jitter", "expected"),
    [
        (0.5, 0.05, T0 + 30 * 60 * S),  # no jitter drawn: exactly half-life
        (0.0, 0.05, T0 + 27 * 60 * S),  # earliest: 0.45 of the lifetime
        (0.75, 0.05, T0 + dt.timedelta(minutes=31, seconds=30)),
        (0.0, 0.0, T0 + 30 * 60 * S),  # jitter disabled
        (0.0, 0.2, T0 + 18 * 60 * S),
    ],
)
def test_renewal_at_half_life_with_jitter(u: float, jitter: float, expected: dt.datetime) -> None:
    assert renewal_time(T0, T0 + HOUR, rng=const(u), jitter_fraction=jitter) == expected


def test_renewal_jitter_stays_in_band_and_spreads() -> None:
    rng = random.Random(1234).random
    times = [renewal_time(T0, T0 + HOUR, rng=rng) for _ in range(500)]
    assert all(T0 + 27 * 60 * S <= t <= T0 + 33 * 60 * S for t in times)
    assert max(times) - min(times) > 5 * 60 * S  # actually spread, not a constant
    again = random.Random(1234).random
    assert times == [renewal_time(T0, T0 + HOUR, rng=again) for _ in range(500)]  # reproducible


def test_renewal_of_an_issued_certificate() -> None:
    # With the CA's 2-minute backdating the half-life is measured from the real NotBefore.
    ca = CertificateAuthority.create_root("cluster.local", NOW - HOUR, key=key(40))
    issued = ca.sign_csr(
        build_csr(key(41), SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b")),
        allowed=lambda _: True,
        ttl=HOUR,
        now=NOW,
    )
    t = renewal_time(issued.not_before, issued.not_after, rng=const(0.5))
    assert t == NOW + dt.timedelta(minutes=29)
    assert not is_expired(issued.not_after, t)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"not_before": T0, "not_after": T0}, "lifetime"),
        ({"not_before": T0 + S, "not_after": T0}, "lifetime"),
        ({"not_before": T0, "not_after": T0 + HOUR, "jitter_fraction": 0.5}, "jitter_fraction"),
        ({"not_before": T0, "not_after": T0 + HOUR, "jitter_fraction": -0.1}, "jitter_fraction"),
    ],
)
def test_renewal_rejects_nonsense(kwargs: dict[str, object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        renewal_time(rng=const(0.5), **kwargs)  # type: ignore[arg-type]


def test_rng_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="rng"):
        renewal_time(T0, T0 + HOUR, rng=const(1.0))


def test_backoff_grows_exponentially_to_the_cap() -> None:
    b = Backoff(initial=S, maximum=60 * S, multiplier=2.0)
    assert [b.ceiling(n) for n in range(8)] == [1 * S, 2 * S, 4 * S, 8 * S, 16 * S, 32 * S, 60 * S, 60 * S]
    assert b.ceiling(10_000) == 60 * S  # no overflow for long outages


@pytest.mark.parametrize(
    ("u", "attempt", "expected"), [(0.0, 0, 0.5 * S), (0.999, 3, 8 * S * 0.9995), (0.5, 10, 45 * S)]
)
def test_backoff_jitter_is_between_half_and_full(u: float, attempt: int, expected: dt.timedelta) -> None:
    assert Backoff().delay(attempt, const(u)) == expected


def test_retry_schedule_failure_then_recovery() -> None:
    # A CA outage: four failed attempts, then success; the next renewal is at half-life of the
    # new certificate, and the old one stays usable throughout (expiry 1 h after issue).
    rng = random.Random(7).random
    old_not_after = T0 + HOUR
    now = renewal_time(T0, old_not_after, rng=const(0.5))
    attempts = []
    for attempt in range(4):
        now = retry_time(now, attempt, rng=rng)
        attempts.append(now)
    assert all(b > a for a, b in itertools.pairwise(attempts))
    assert not is_expired(old_not_after, now)  # still serving the old certificate
    new_nb, new_na = now - 2 * 60 * S, now - 2 * 60 * S + HOUR
    assert renewal_time(new_nb, new_na, rng=const(0.5)) == new_nb + HOUR / 2


@pytest.mark.parametrize(
    ("now", "expired"),
    [(T0 + HOUR - S, False), (T0 + HOUR, False), (T0 + HOUR + dt.timedelta(microseconds=1), True)],
)
def test_is_expired(now: dt.datetime, expired: bool) -> None:
    assert is_expired(T0 + HOUR, now) is expired


def test_backoff_validates_its_parameters() -> None:
    with pytest.raises(ValueError):
        Backoff(initial=dt.timedelta(0))
    with pytest.raises(ValueError):
        Backoff(initial=10 * S, maximum=S)
    with pytest.raises(ValueError):
        Backoff().ceiling(-1)
