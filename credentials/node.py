"""Which node credential the CA client presents at a given instant (pure: ``now`` is a parameter).

A node holds up to two credentials for talking to the CA:

* the **bootstrap** credential (``ztagent ca bootstrap-node`` output, ``--node-credentials``):
  long-lived (days) and never overwritten by the agent, so it is there to fall back on;
* the **renewed** credential: the node identity as renewed through the certificate manager, with
  the workload TTL (short), kept in memory and persisted beside the bootstrap one.

Rule: present the *newest valid* one: among those whose whole chain (leaf and intermediates) is
inside its validity window at ``now``, the latest NotBefore (then the latest NotAfter). That is
the renewed one in steady state; the bootstrap one once the renewed one has expired (a CA outage
longer than the workload TTL), so the node heals by itself when the CA is back; and a
bootstrap credential the operator re-issued wins over an older renewed one left on disk.

Neither valid: :class:`NoValidNodeCredential` says why (expired, or not yet valid: clock skew),
naming each credential and its window.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Final

from credentials.causes import NODE_CREDENTIAL_EXPIRED, NODE_CREDENTIAL_NOT_YET_VALID
from identity.svid import WorkloadCredential

BOOTSTRAP: Final = "bootstrap"
RENEWED: Final = "renewed"


@dataclass(frozen=True)
class Choice:
    which: str  # BOOTSTRAP | RENEWED
    credential: WorkloadCredential


class NoValidNodeCredential(Exception):
    """No node credential is valid at ``now``; ``reason`` is a credentials.causes reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def validity_window(cred: WorkloadCredential) -> tuple[dt.datetime, dt.datetime]:
    """When the whole presented chain is valid: a CA checks the intermediates' dates too."""
    return (
        max(c.not_valid_before_utc for c in cred.chain),
        min(c.not_valid_after_utc for c in cred.chain),
    )


def is_valid_at(cred: WorkloadCredential, now: dt.datetime) -> bool:
    start, end = validity_window(cred)
    return start <= now <= end  # NotAfter itself is still valid (RFC 5280)


def _candidates(
    bootstrap: WorkloadCredential, renewed: WorkloadCredential | None
) -> list[tuple[str, WorkloadCredential]]:
    out = [(BOOTSTRAP, bootstrap)]
    if renewed is not None:
        out.insert(0, (RENEWED, renewed))
    return out


def _newest(cands: list[tuple[str, WorkloadCredential]]) -> tuple[str, WorkloadCredential]:
    # NotBefore has one-second precision, and a node renews its identity right after its first
    # start: a tie goes to the renewed one, the credential the node is meant to use.
    return max(cands, key=lambda wc: (wc[1].not_before, wc[0] == RENEWED, wc[1].not_after))


def newest(bootstrap: WorkloadCredential, renewed: WorkloadCredential | None) -> Choice:
    """The most recently issued credential, valid or not (what to try when none is valid)."""
    which, cred = _newest(_candidates(bootstrap, renewed))
    return Choice(which, cred)


def describe_window(which: str, cred: WorkloadCredential, now: dt.datetime) -> str:
    start, end = validity_window(cred)
    if now > end:
        return f"{which} credential expired at {end.isoformat()}"
    if now < start:
        return f"{which} credential is not valid before {start.isoformat()}"
    return f"{which} credential valid until {end.isoformat()}"


def select_node_credential(
    bootstrap: WorkloadCredential, renewed: WorkloadCredential | None, now: dt.datetime
) -> Choice:
    """The credential to present at ``now`` (see the module docstring), or NoValidNodeCredential."""
    if now.tzinfo is None:
        raise ValueError("`now` must be timezone-aware (UTC)")
    if renewed is not None and renewed.spiffe_id != bootstrap.spiffe_id:
        raise ValueError(f"renewed credential is for {renewed.spiffe_id}, not {bootstrap.spiffe_id}")
    cands = _candidates(bootstrap, renewed)
    valid = [(w, c) for w, c in cands if is_valid_at(c, now)]
    if valid:
        which, cred = _newest(valid)
        return Choice(which, cred)
    # A credential that starts later will become usable by itself: name that (clock skew) first.
    pending = any(now < validity_window(c)[0] for _, c in cands)
    reason = NODE_CREDENTIAL_NOT_YET_VALID if pending else NODE_CREDENTIAL_EXPIRED
    what = "not valid yet" if pending else "expired"
    states = ", ".join(describe_window(w, c, now) for w, c in cands)
    fix = (
        "check the clocks of this node and the CA host"
        if pending
        else "issue a new one with `ztagent ca bootstrap-node` and restart the agent"
    )
    raise NoValidNodeCredential(
        reason,
        f"node credential {bootstrap.spiffe_id} {what} at {now.isoformat()}: {states}; {fix}",
    )
