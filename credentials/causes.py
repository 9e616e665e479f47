"""Why a certificate fetch failed, in words an operator can act on, and as a metric label.

Each cause needs a different action, so the agent names it in the log line, in
``CertificateManager.status()`` (the admin ``/certs`` view and ``ztagent status``) and as the
``reason`` label of ``ztagent_cert_fetch_failures_total``:

==============================  ===========================================================
``node_credential_expired``     no node credential is valid any more: the CA will refuse the
                                node whatever happens; run ``ztagent ca bootstrap-node``
``node_credential_not_yet_valid``  the node credential starts in the future (clock skew
                                between the CA host and this node)
``ca_unreachable``              nothing listens, nothing answers in time, or the TLS handshake
                                failed on our side: heals by itself once the CA is back
``ca_refused``                  the CA answered and said no (its reason is in the message), or
                                refused a node credential that is valid by our clock
``bad_answer``                  the CA answered with something we must not install
``other``                       anything else (a bug: the message says what)
==============================  ===========================================================

The set is closed, so the label's cardinality is fixed.
"""

from __future__ import annotations

from typing import Final

NODE_CREDENTIAL_EXPIRED: Final = "node_credential_expired"
NODE_CREDENTIAL_NOT_YET_VALID: Final = "node_credential_not_yet_valid"
CA_UNREACHABLE: Final = "ca_unreachable"
CA_REFUSED: Final = "ca_refused"
BAD_ANSWER: Final = "bad_answer"
OTHER: Final = "other"

DESCRIPTIONS: Final[dict[str, str]] = {
    NODE_CREDENTIAL_EXPIRED: "node credential expired",
    NODE_CREDENTIAL_NOT_YET_VALID: "node credential not yet valid",
    CA_UNREACHABLE: "CA unreachable",
    CA_REFUSED: "refused by the CA",
    BAD_ANSWER: "bad answer from the CA",
    OTHER: "unexpected error",
}
REASONS: Final = frozenset(DESCRIPTIONS)


def reason_of(error: BaseException) -> str:
    """The cause of ``error``: its ``reason`` attribute when it carries a known one, else other."""
    reason = getattr(error, "reason", None)
    return reason if isinstance(reason, str) and reason in REASONS else OTHER


def describe(reason: str) -> str:
    return DESCRIPTIONS.get(reason, DESCRIPTIONS[OTHER])
