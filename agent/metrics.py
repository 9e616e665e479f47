"""Prometheus metrics, with Istio's standard TCP metric names and labels.

Istio's dashboards and alerts query ``istio_tcp_*`` with the standard label set (the same one
ztunnel exports), so we export exactly those names and labels; values we cannot know are
``unknown`` as in Istio. Everything lives in one :class:`AgentMetrics` with its own registry,
so two agents in one test process (or the CA and the agent) never share counters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

# ztunnel exports no ``*_created`` series; prometheus-client adds one per counter child unless
# told not to (process-wide switch: every registry in this process renders without them).
disable_created_metrics()  # type: ignore[no-untyped-call]

UNKNOWN: Final = "unknown"
# ztunnel's cluster ID default (its CLUSTER_ID), which source_cluster/destination_cluster carry.
DEFAULT_CLUSTER_ID: Final = "Kubernetes"
# istio_build's component label: dashboards select ``istio_build{component="ztunnel"}``, and the
# agent stands in for ztunnel on the node.
BUILD_COMPONENT: Final = "ztunnel"

# Istio's response_flags values at ztunnel's destination reporter (src/proxy/metrics.rs).
FLAG_NONE: Final = "-"
FLAG_DENY: Final = "DENY"  # denied by authorization policy
FLAG_CONNECT: Final = "CONNECT"  # no upstream connection could be made

# Istio standard metric labels (istio.io/latest/docs/reference/config/metrics), in the order
# ztunnel exports them for TCP.
ISTIO_TCP_LABELS: Final = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)


@dataclass(frozen=True)
class ConnectionLabels:
    """One connection's Istio labels. ``reporter`` is ``source`` or ``destination``."""

    reporter: str
    source_workload: str = UNKNOWN
    source_canonical_service: str = UNKNOWN
    source_canonical_revision: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    source_app: str = UNKNOWN
    source_version: str = UNKNOWN
    source_cluster: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_canonical_service: str = UNKNOWN
    destination_canonical_revision: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_app: str = UNKNOWN
    destination_version: str = UNKNOWN
    destination_cluster: str = UNKNOWN
    request_protocol: str = "tcp"
    response_flags: str = FLAG_NONE
    # "mutual_tls" for HBONE (at both reporters, as ztunnel), "none" for plaintext.
    connection_security_policy: str = UNKNOWN

    def values(self) -> tuple[str, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))


assert tuple(f.name for f in fields(ConnectionLabels)) == ISTIO_TCP_LABELS


class ConnectionStats:
    """Counters for one open connection: byte counts go to Prometheus as they flow.

    Sent/received follow Istio's convention at each reporter: ``received`` are bytes from the
    downstream (request direction), ``sent`` bytes towards the downstream (response direction).
    """

    __slots__ = ("_closed", "_done", "_received", "_sent", "labels", "received", "sent")

    def __init__(self, metrics: AgentMetrics, labels: ConnectionLabels) -> None:
        self.labels = labels
        opened, self._closed, self._sent, self._received = metrics.connection_series(labels)
        self.sent = 0
        self.received = 0
        self._done = False
        opened.inc()

    def add_sent(self, n: int) -> None:
        self.sent += n
        self._sent.inc(n)

    def add_received(self, n: int) -> None:
        self.received += n
        self._received.inc(n)

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._closed.inc()


# Label sets whose four TCP series are kept resolved (then the cache starts over).
SERIES_CACHE_LIMIT = 4096


class AgentMetrics:
    """All metrics of one agent, in one registry.

    ``cluster_id`` is what source_cluster/destination_cluster say for known workloads;
    ``version`` goes to ``istio_build``'s ``tag``. ``process`` adds prometheus-client's
    ``process_*`` series (this process's CPU, memory, file descriptors) to the registry.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        cluster_id: str = DEFAULT_CLUSTER_ID,
        version: str = UNKNOWN,
        process: bool = True,
    ) -> None:
        if not cluster_id:
            raise ValueError("cluster_id: expected a non-empty string")
        self.cluster_id = cluster_id
        # (opened, closed, sent, received) series per label set: resolving a child takes a lock
        # and a 20-tuple of label values, four times per connection, for the same few pairs.
        self._series: dict[ConnectionLabels, tuple[Any, Any, Any, Any]] = {}
        self._failed: dict[tuple[ConnectionLabels, str], tuple[Any, Any]] = {}
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        if process:
            ProcessCollector(registry=r)
        self.build = Gauge("istio_build", "Istio component build info", ("component", "tag"), registry=r)
        self.build.labels(BUILD_COMPONENT, version).set(1)
        self.tcp_connections_opened = Counter(
            "istio_tcp_connections_opened", "TCP connections opened", ISTIO_TCP_LABELS, registry=r
        )
        self.tcp_connections_closed = Counter(
            "istio_tcp_connections_closed", "TCP connections closed", ISTIO_TCP_LABELS, registry=r
        )
        self.tcp_sent_bytes = Counter(
            "istio_tcp_sent_bytes",
            "Bytes sent towards the downstream (response direction) on TCP connections",
            ISTIO_TCP_LABELS,
            registry=r,
        )
        self.tcp_received_bytes = Counter(
            "istio_tcp_received_bytes",
            "Bytes received from the downstream (request direction) on TCP connections",
            ISTIO_TCP_LABELS,
            registry=r,
        )
        # ztunnel's (unstable) failure counter: connections that never carried data, by
        # response_flags (DENY: policy, CONNECT: no upstream).
        self.tcp_connections_failed = Counter(
            "istio_tcp_connections_failed",
            "TCP connections that failed to establish (denied by policy or no upstream connection)",
            ISTIO_TCP_LABELS,
            registry=r,
        )
        # ztunnel's workload manager gauges (Istio's ztunnel dashboard): the pods this node's
        # agent proxies, and those it has not yet been able to (no certificate or capture yet).
        self.active_proxies = Gauge(
            "workload_manager_active_proxy_count", "Enrolled local workloads being proxied", registry=r
        )
        self.pending_proxies = Gauge(
            "workload_manager_pending_proxy_count",
            "Enrolled local workloads not yet proxied (waiting for a certificate)",
            registry=r,
        )
        self.policy_decisions = Counter(
            "ztagent_policy_decisions",
            "Authorization decisions at this (destination) agent",
            ("action", "reason"),
            registry=r,
        )
        self.handshake_failures = Counter(
            "ztagent_handshake_failures",
            "Failed mTLS/HBONE handshakes by reason and direction",
            ("direction", "reason"),
            registry=r,
        )
        self.plaintext_connections = Counter(
            "ztagent_plaintext_connections",
            "Captured inbound connections accepted in plaintext (PERMISSIVE), by destination namespace: "
            "watch it fall to zero before switching a namespace to STRICT",
            ("namespace",),
            registry=r,
        )
        self.connections_closed_by_policy = Counter(
            "ztagent_connections_closed_by_policy",
            "Open connections closed because a policy change now denies them",
            ("namespace",),
            registry=r,
        )
        self.config_reloads = Counter(
            "ztagent_config_reloads", "Config reload attempts by result", ("result",), registry=r
        )
        self.open_tunnels = Gauge(
            "ztagent_open_tunnels", "Open HBONE streams by direction", ("direction",), registry=r
        )
        self.ready = Gauge("ztagent_ready", "1 when certificates and capture are in place", registry=r)
        self.policies_last_good = Gauge(
            "ztagent_policies_last_good_in_force",
            "Policies whose latest version was refused; their last good version is enforced",
            registry=r,
        )
        self.policies_invalid = Gauge(
            "ztagent_policies_invalid",
            "Policies that never had a good version, enforced fail-closed",
            registry=r,
        )
        # Certificate expiry and rotation failures (ztagent_cert_expiry_timestamp_seconds,
        # ztagent_cert_rotation_failures_total) are registered here by credentials'
        # CertificateManager, which owns those facts.

    def connection_series(self, labels: ConnectionLabels) -> tuple[Any, Any, Any, Any]:
        """The (opened, closed, sent, received) TCP counters for ``labels``. Series are never
        removed from these metrics, so a resolved child stays the one the registry exports."""
        got = self._series.get(labels)
        if got is None:
            v = labels.values()
            got = (
                self.tcp_connections_opened.labels(*v),
                self.tcp_connections_closed.labels(*v),
                self.tcp_sent_bytes.labels(*v),
                self.tcp_received_bytes.labels(*v),
            )
            if len(self._series) >= SERIES_CACHE_LIMIT:
                self._series.clear()
            self._series[labels] = got
        return got

    def connection_failed(self, labels: ConnectionLabels, flag: str) -> None:
        """A connection that was refused or could not be carried, counted as ztunnel counts it:
        opened (with its labels as at open, ``response_flags="-"``) and the byte series created at
        zero, then closed and failed with ``flag`` (``DENY``, ``CONNECT`` or ``-``)."""
        opened, _closed, _sent, _received = self.connection_series(labels)
        opened.inc()
        got = self._failed.get((labels, flag))
        if got is None:
            # Resolved once per (label set, flag): a flood of denied connections between the same
            # two workloads must not cost a dataclass copy and two child lookups each.
            v = dataclasses.replace(labels, response_flags=flag).values()
            got = (self.tcp_connections_closed.labels(*v), self.tcp_connections_failed.labels(*v))
            if len(self._failed) >= SERIES_CACHE_LIMIT:
                self._failed.clear()
            self._failed[(labels, flag)] = got
        got[0].inc()
        got[1].inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
