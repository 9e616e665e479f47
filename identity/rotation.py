"""When to renew a certificate and when to retry a failed renewal (DESIGN §3). Pure arithmetic:
time and randomness come in as arguments, so the schedule is testable to the microsecond.

* Renew at half-life, jittered by ±``jitter_fraction`` of the lifetime, so a node whose
  workloads all got certificates at once does not stampede the CA at one instant later.
  With the default 1 h TTL and 5 % jitter, renewal falls in [27 min, 33 min]: well before
  expiry, leaving about half the lifetime for retries.
* Retry failures with exponential backoff, capped, with "equal jitter" (half fixed, half
  random) so retries spread out but never collapse to zero delay.
* A certificate is usable through its NotAfter instant, as in RFC 5280 path validation.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

Uniform = Callable[[], float]  # returns a float in [0, 1), e.g. random.Random(seed).random

DEFAULT_JITTER_FRACTION = 0.05


def _unit(rng: Uniform) -> float:
    u = rng()
    if not 0.0 <= u < 1.0:
        raise ValueError(f"rng must return a float in [0, 1), got {u!r}")
    return u


def renewal_time(
    not_before: dt.datetime,
    not_after: dt.datetime,
    *,
    rng: Uniform,
    jitter_fraction: float = DEFAULT_JITTER_FRACTION,
) -> dt.datetime:
    """The instant to start renewing: half-life ± ``jitter_fraction`` x lifetime."""
    if not 0.0 <= jitter_fraction < 0.5:
        raise ValueError(f"jitter_fraction must be in [0, 0.5), got {jitter_fraction}")
    lifetime = not_after - not_before
    if lifetime <= dt.timedelta(0):
        raise ValueError(
            f"certificate lifetime must be positive (not_before {not_before}, not_after {not_after})"
        )
    offset = 0.5 + jitter_fraction * (2.0 * _unit(rng) - 1.0)
    return not_before + lifetime * offset


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: ``initial x multiplier^attempt`` capped at ``maximum``, then jittered
    to a value in [delay/2, delay)."""

    initial: dt.timedelta = dt.timedelta(seconds=1)
    maximum: dt.timedelta = dt.timedelta(seconds=60)
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.initial <= dt.timedelta(0) or self.maximum < self.initial or self.multiplier < 1.0:
            raise ValueError("backoff needs 0 < initial <= maximum and multiplier >= 1")

    def ceiling(self, attempt: int) -> dt.timedelta:
        """The un-jittered delay before retry number ``attempt`` (0 = first retry)."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        # Stop multiplying once past the cap: avoids float overflow for huge attempt counts.
        delay = self.initial
        for _ in range(attempt):
            delay = delay * self.multiplier
            if delay >= self.maximum:
                return self.maximum
        return min(delay, self.maximum)

    def delay(self, attempt: int, rng: Uniform) -> dt.timedelta:
        ceiling = self.ceiling(attempt)
        return ceiling / 2 + (ceiling / 2) * _unit(rng)


def retry_time(
    now: dt.datetime,
    attempt: int,
    *,
    rng: Uniform,
    backoff: Backoff = Backoff(),  # immutable dataclass: safe as a default
) -> dt.datetime:
    """When to retry after failed attempt number ``attempt`` (0-based), from ``now``."""
    return now + backoff.delay(attempt, rng)


def is_expired(not_after: dt.datetime, now: dt.datetime) -> bool:
    """True once ``now`` is past NotAfter (the NotAfter instant itself is still valid)."""
    return now > not_after
