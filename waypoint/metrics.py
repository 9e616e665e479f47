"""Istio's standard HTTP metrics, as a waypoint reports them (``reporter="waypoint"``).

Names and labels are Istio's (istio.io/latest/docs/reference/config/metrics): dashboards and
alerts written for Istio's waypoints work unchanged. Values we cannot know are ``unknown``.
One registry per waypoint, so two in one test process never share counters.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from identity.spiffe import SpiffeId
from mesh.model import Service, Waypoint, Workload

UNKNOWN: Final = "unknown"
# Envoy's default histogram buckets for Istio's duration (ms) and size (bytes) series.
DURATION_BUCKETS: Final = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
SIZE_BUCKETS: Final = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000)


@dataclass(frozen=True)
class RequestLabels:
    reporter: str
    source_workload: str
    source_canonical_service: str
    source_canonical_revision: str
    source_workload_namespace: str
    source_principal: str
    source_app: str
    source_version: str
    source_cluster: str
    destination_service: str
    destination_service_namespace: str
    destination_service_name: str
    destination_workload: str
    destination_canonical_service: str
    destination_canonical_revision: str
    destination_workload_namespace: str
    destination_principal: str
    destination_app: str
    destination_version: str
    destination_cluster: str
    request_protocol: str
    response_code: str
    grpc_response_status: str
    response_flags: str
    connection_security_policy: str

    @classmethod
    def of(
        cls,
        wp: Waypoint,
        peer: SpiffeId,
        src: Workload | None,
        svc: Service | None,
        dst: Workload | None,
        status: int,
        protocol: str,
        grpc_status: str | None,
    ) -> RequestLabels:
        def w(x: Workload | None) -> tuple[str, str, str, str, str, str]:
            if x is None:
                return (UNKNOWN,) * 6
            app = x.labels.get("app", x.name)
            ver = x.labels.get("version", "latest")
            return (
                x.name,
                x.labels.get("service.istio.io/canonical-name", app),
                x.labels.get("service.istio.io/canonical-revision", ver),
                x.namespace,
                app,
                ver,
            )

        s, d = w(src), w(dst)
        return cls(
            "waypoint",
            s[0],
            s[1],
            s[2],
            s[3],
            str(peer),
            s[4],
            s[5],
            "Kubernetes",
            svc.hostname if svc else UNKNOWN,
            svc.namespace if svc else UNKNOWN,
            svc.name if svc else UNKNOWN,
            d[0],
            d[1],
            d[2],
            d[3],
            str(dst.spiffe_id) if dst else UNKNOWN,
            d[4],
            d[5],
            "Kubernetes",
            protocol,
            str(status),
            grpc_status or "",
            "-",
            "mutual_tls",
        )


LABEL_NAMES: Final = tuple(f.name for f in fields(RequestLabels))


class WaypointMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("istio_requests_total", "HTTP/gRPC requests", LABEL_NAMES, registry=r)
        self.duration = Histogram(
            "istio_request_duration_milliseconds",
            "request duration (ms)",
            LABEL_NAMES,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.request_bytes = Histogram(
            "istio_request_bytes", "request body size (bytes)", LABEL_NAMES, buckets=SIZE_BUCKETS, registry=r
        )
        self.response_bytes = Histogram(
            "istio_response_bytes",
            "response body size (bytes)",
            LABEL_NAMES,
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.refused = Counter(
            "ztagent_waypoint_refused",
            "HBONE streams or connections the waypoint refused",
            ("reason",),
            registry=r,
        )
        self.jwks_ready = Gauge(
            "ztagent_waypoint_jwks_ready", "1 when a JWKS source has a good key set", ("source",), registry=r
        )
        self.jwks_failures = Counter(
            "ztagent_waypoint_jwks_fetch_failures", "failed JWKS fetches", ("source",), registry=r
        )

    def observe(self, labels: RequestLabels, ms: float, request_bytes: int, response_bytes: int) -> None:
        values = astuple(labels)
        self.requests.labels(*values).inc()
        self.duration.labels(*values).observe(ms)
        self.request_bytes.labels(*values).observe(request_bytes)
        self.response_bytes.labels(*values).observe(response_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["LABEL_NAMES", "RequestLabels", "WaypointMetrics"]
