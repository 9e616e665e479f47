# ruff: noqa: E501
"""`ztagent waypoint`'s role object: start-up checks, readiness, and config reload (a bad update is
refused and the last good version keeps serving)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from credentials.files import CredentialFiles, write_credentials
from identity.ca import CertificateAuthority
from identity.keys import key_to_pem
from identity.svid import WorkloadCredential
from tests.tunnel.conftest import issue
from waypoint.role import StartupError, WaypointOptions, WaypointRole

CONFIG = """\
apiVersion: ztagent.io/v1alpha1
kind: MeshConfig
trustDomain: cluster.local
nodes: [{name: n1, address: 127.0.1.1}]
workloads:
  - {name: a, namespace: backend, serviceAccount: a, node: n1, ips: [127.0.0.3], labels: {app: a}}
services:
  - {name: a, namespace: backend, vips: [127.0.0.10], ports: [{port: 80}], selector: {app: a},
     labels: {istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: backend}
spec: {gatewayClassName: istio-waypoint, addresses: [{value: 127.0.0.5}]}
"""
POLICY = """\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p1, namespace: backend}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
"""


def _creds(tmp: Path, cred: WorkloadCredential, ca: CertificateAuthority) -> str:
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in cred.chain)
    write_credentials(tmp / "creds", CredentialFiles(key_to_pem(cred.private_key), chain, ca.bundle.to_pem()))
    return str(tmp / "creds")


def _options(cfg: Path, creds: str) -> WaypointOptions:
    return WaypointOptions(config=str(cfg), name="backend/waypoint", credentials=creds, listen_host="127.0.0.5",
                           hbone_port=0, admin=("127.0.0.1", 0), metrics=("127.0.0.1", 0),
                           readiness=("127.0.0.1", 0), access_log=os.devnull, config_interval=0.05)  # fmt: skip


async def test_start_ready_and_reload(tmp_path: Path, ca: CertificateAuthority) -> None:
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(CONFIG)
    role = WaypointRole(_options(cfg, _creds(tmp_path, issue(ca, "backend", "waypoint"), ca)))
    await role.start()
    try:
        assert role.ready() == (True, [])
        assert role.status()["identity"] == "spiffe://cluster.local/ns/backend/sa/waypoint"
        assert role.policies is not None and not role.policies.index.select(role.policies.target(None, None))
        first = role.policies
        cfg.write_text(CONFIG + "---\nkind: Bogus\n")  # refused: the last good version keeps serving
        for _ in range(100):
            await asyncio.sleep(0.05)
            if role.last_config_error:
                break
        assert role.last_config_error and "Bogus" in role.last_config_error
        assert role.policies is first
        cfg.write_text(CONFIG + POLICY)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if role.policies is not first:
                break
        assert role.last_config_error is None
        assert [p.key for p in role.policies.index.select(role.policies.target(None, None))] == ["backend/p1"]
    finally:
        await role.stop()


async def test_credentials_for_another_identity_refuse_to_start(tmp_path: Path, ca: CertificateAuthority) -> None:
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(CONFIG)
    role = WaypointRole(_options(cfg, _creds(tmp_path, issue(ca, "backend", "a"), ca)))
    with pytest.raises(StartupError, match=r"runs as spiffe://cluster\.local/ns/backend/sa/waypoint"):
        await role.start()
    await role.stop()


async def test_unknown_waypoint_name_refuses_to_start(tmp_path: Path, ca: CertificateAuthority) -> None:
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(CONFIG)
    opts = _options(cfg, _creds(tmp_path, issue(ca, "backend", "waypoint"), ca))
    opts.name = "backend/nope"
    with pytest.raises(StartupError, match=r"no waypoint backend/nope"):
        await WaypointRole(opts).start()
