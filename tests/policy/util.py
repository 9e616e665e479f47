"""Helpers for the policy table tests: build documents and connections tersely."""

from __future__ import annotations

import ipaddress
import textwrap
from typing import Any

import yaml

from policy import Connection, PolicyIndex, parse_policies

SLEEP = "cluster.local/ns/ns1/sa/sleep"
HTTPBIN_LABELS = {"app": "httpbin", "version": "v1"}


def docs(text: str) -> list[Any]:
    return [d for d in yaml.safe_load_all(textwrap.dedent(text)) if d is not None]


def authz(
    namespace: str, name: str, spec: Any = None, *, dry_run: str | None = None, **meta: Any
) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, "namespace": namespace, **meta}
    if dry_run is not None:
        md["annotations"] = {"istio.io/dry-run": dry_run}
    d: dict[str, Any] = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": md}
    if spec is not None:
        d["spec"] = yaml.safe_load(textwrap.dedent(spec)) if isinstance(spec, str) else spec
    return d


def peer(namespace: str, name: str, spec: Any = None, *, created: str | None = None) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, "namespace": namespace}
    if created is not None:
        md["creationTimestamp"] = created
    d: dict[str, Any] = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": md}
    if spec is not None:
        d["spec"] = yaml.safe_load(textwrap.dedent(spec)) if isinstance(spec, str) else spec
    return d


def conn(
    principal: str | None = SLEEP,
    *,
    src: str | None = "10.244.1.2",
    ns: str = "ns2",
    port: int = 8080,
    labels: dict[str, str] | None = None,
    dst: str | None = "10.244.2.5",
) -> Connection:
    return Connection(
        source_principal=principal,
        source_ip=ipaddress.ip_address(src) if src else None,
        destination_namespace=ns,
        destination_port=port,
        destination_labels=HTTPBIN_LABELS if labels is None else labels,
        destination_ip=ipaddress.ip_address(dst) if dst else None,
    )


def index(*documents: Any, root: str = "istio-system") -> PolicyIndex:
    return PolicyIndex(parse_policies(documents), root)
