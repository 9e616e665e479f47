"""PeerAuthentication: the effective mTLS mode for one workload port, and which policy decided it.

Istio's precedence, as istiod computes it for ambient (pilot's ambient/authorization.go):

1. mesh level: a policy in the root namespace without a selector;
2. namespace level: a policy in the workload's namespace without a selector;
3. workload level: a policy in the workload's namespace whose ``selector.matchLabels`` are a
   subset of the workload's labels (a selector policy in the root namespace is ignored);
4. port level: ``portLevelMtls`` of that workload policy, keyed by the *workload* (target) port.

``UNSET`` (or no ``mtls``) inherits from the level above; with nothing set the mode is PERMISSIVE.
When several policies sit at one level the oldest wins (creationTimestamp, then name, so the
choice is deterministic when timestamps are missing or equal).

At the node agent DISABLE behaves as PERMISSIVE: HBONE is always mTLS, so the only question is
whether plaintext is also accepted. A poisoned (invalid) PeerAuthentication counts as STRICT at
its level and its port overrides are ignored: fail closed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from policy.model import DEFAULT_ROOT_NAMESPACE, MtlsMode, PeerAuthentication

_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True)
class MtlsDecision:
    """The effective mode (never UNSET) and where it came from."""

    mode: MtlsMode
    policy: str | None  # "namespace/name" of the deciding PeerAuthentication; None = built-in default
    level: str  # "default" | "mesh" | "namespace" | "workload" | "port"
    invalid: bool = False  # the deciding policy is poisoned (treated as STRICT)

    @property
    def strict(self) -> bool:
        """Plaintext must be refused (STRICT)."""
        return self.mode is MtlsMode.STRICT

    def describe(self) -> str:
        if self.policy is None:
            return f"{self.mode.value} (mesh default: no PeerAuthentication applies)"
        what = f"{self.mode.value} from PeerAuthentication {self.policy} ({self.level} level)"
        return what + (" [invalid policy, failing closed]" if self.invalid else "")


def _age_key(p: PeerAuthentication) -> tuple[datetime, str]:
    return (p.meta.creation_timestamp or _FAR_FUTURE, p.meta.name)


def _mode(p: PeerAuthentication) -> MtlsMode:
    return MtlsMode.STRICT if p.poisoned else p.mode


class PeerAuthIndex:
    """PeerAuthentication policies grouped by namespace for per-connection lookups.

    A lookup reads the root namespace's mesh policy and the workload namespace's policies only.
    """

    def __init__(
        self, policies: Iterable[PeerAuthentication], root_namespace: str = DEFAULT_ROOT_NAMESPACE
    ) -> None:
        self.root_namespace = root_namespace
        mesh: list[PeerAuthentication] = []
        ns_level: dict[str, list[PeerAuthentication]] = {}
        workload: dict[str, list[PeerAuthentication]] = {}
        for p in policies:
            has_selector = p.selector is not None and bool(p.selector.match_labels)
            # An unknown namespace ("" after a parse error) is placed at mesh level: fail closed.
            if p.meta.namespace in (root_namespace, ""):
                if not has_selector:
                    mesh.append(p)
                # istiod ignores selector policies in the root namespace for ambient workloads.
            elif has_selector:
                workload.setdefault(p.meta.namespace, []).append(p)
            else:
                ns_level.setdefault(p.meta.namespace, []).append(p)
        self._mesh = min(mesh, key=_age_key) if mesh else None
        self._namespace = {ns: min(ps, key=_age_key) for ns, ps in ns_level.items()}
        self._workload = {ns: sorted(ps, key=_age_key) for ns, ps in workload.items()}

    def workload_policy(self, namespace: str, labels: Mapping[str, str]) -> PeerAuthentication | None:
        for p in self._workload.get(namespace, ()):  # oldest first: the first match wins
            assert p.selector is not None
            if p.selector.matches(labels):
                return p
        return None

    def effective(self, namespace: str, labels: Mapping[str, str], port: int) -> MtlsDecision:
        decision = MtlsDecision(MtlsMode.PERMISSIVE, None, "default")
        for level, p in (
            ("mesh", self._mesh),
            ("namespace", self._namespace.get(namespace)),
            ("workload", self.workload_policy(namespace, labels)),
        ):
            if p is None:
                continue
            m = _mode(p)
            if m is not MtlsMode.UNSET:
                decision = MtlsDecision(m, p.key, level, p.poisoned)
            if level == "workload" and not p.poisoned:
                pm = p.port_level.get(port)
                if pm is not None and pm is not MtlsMode.UNSET:
                    decision = MtlsDecision(pm, p.key, "port")
        return decision


def effective_mtls(
    policies: Iterable[PeerAuthentication],
    namespace: str,
    labels: Mapping[str, str],
    port: int,
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
) -> MtlsDecision:
    """One-shot form of :meth:`PeerAuthIndex.effective` (builds the index each call)."""
    return PeerAuthIndex(policies, root_namespace).effective(namespace, labels, port)
