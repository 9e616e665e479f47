"""Istio security policy for ztagent: models, parsing, L4 evaluation, PeerAuthentication.

Pure: no I/O, no clock, no randomness. The public API (see docs/contracts.md, ``policy/``):

* :func:`parse_policy`, :func:`parse_policies` -> :class:`PolicySet` (errors name the field path;
  invalid documents are kept "poisoned" so enforcement fails closed; ``default_namespace=`` for
  documents without one, as ``kubectl apply -n``; :data:`NO_NAMESPACE_MESSAGE` when neither);
* :class:`PolicyIndex` (per-destination lookup) with ``check(conn)`` (PeerAuthentication +
  AuthorizationPolicy), ``evaluate(conn)`` and ``mtls(ns, labels, port)``;
* :class:`Connection` in, :class:`Decision` out; :func:`evaluate` is the unindexed scan.
"""

from policy.authz import (
    CODE_ALLOW_MATCHED,
    CODE_CUSTOM_UNSUPPORTED,
    CODE_DENY_MATCHED,
    CODE_INVALID_POLICY,
    CODE_MTLS_REQUIRED,
    CODE_NO_ALLOW_MATCHED,
    CODE_NO_POLICY,
    CompiledPolicy,
    Connection,
    Decision,
    PolicyIndex,
    PolicyMatch,
    Verdict,
    decide,
    evaluate,
)
from policy.model import (
    DEFAULT_ROOT_NAMESPACE,
    L4_CONDITION_KEYS,
    Action,
    AuthorizationPolicy,
    FieldError,
    MtlsMode,
    PeerAuthentication,
    Policy,
    RequestAuthentication,
)
from policy.parse import (
    NO_NAMESPACE_MESSAGE,
    DocumentIssue,
    PolicyParseError,
    PolicySet,
    parse_policies,
    parse_policy,
    valid_namespace,
)
from policy.peerauth import MtlsDecision, PeerAuthIndex, effective_mtls

__all__ = [
    "CODE_ALLOW_MATCHED",
    "CODE_CUSTOM_UNSUPPORTED",
    "CODE_DENY_MATCHED",
    "CODE_INVALID_POLICY",
    "CODE_MTLS_REQUIRED",
    "CODE_NO_ALLOW_MATCHED",
    "CODE_NO_POLICY",
    "DEFAULT_ROOT_NAMESPACE",
    "L4_CONDITION_KEYS",
    "NO_NAMESPACE_MESSAGE",
    "Action",
    "AuthorizationPolicy",
    "CompiledPolicy",
    "Connection",
    "Decision",
    "DocumentIssue",
    "FieldError",
    "MtlsDecision",
    "MtlsMode",
    "PeerAuthIndex",
    "PeerAuthentication",
    "Policy",
    "PolicyIndex",
    "PolicyMatch",
    "PolicyParseError",
    "PolicySet",
    "RequestAuthentication",
    "Verdict",
    "decide",
    "effective_mtls",
    "evaluate",
    "parse_policies",
    "parse_policy",
    "valid_namespace",
]
