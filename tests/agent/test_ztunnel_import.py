"""Issue 17: ztunnel's local config (LOCAL_XDS_PATH) translated to the mesh model.

A file in the shape of ztunnel's examples/localhost.yaml (written for this test) loads, attaches
workloads to services and policies by name, and the translated policies decide as ztunnel's RBAC
would; what ztagent does not carry out is refused naming the field; the importer command and the
agent's source read it."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.errors import ConfigError
from mesh.store import WorkloadStore
from mesh.ztunnel import POLICY_LABEL, SERVICE_LABEL, translate
from policy import Connection
from sources.ztunnel_local import ZtunnelLocalSource, load_ztunnel_local

ZTAGENT = [sys.executable, "-m", "cli.main"]

LOCAL = """\
workloads:
- uid: Kubernetes//Pod/default/local
  name: local
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  node: local
  network: ""
  authorizationPolicies: [default/only-client]
  services:
    "default/example.com":
      80: 8080
- uid: Kubernetes//Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["127.0.0.3"]
  protocol: HBONE
  node: local
- uid: Kubernetes//Pod/default/local-tcp
  name: local-tcp
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.2"]
  protocol: TCP
  node: local
  services:
    "default/example.com":
      80: 8080
policies:
- name: deny-9999
  namespace: default
  scope: Namespace
  action: Allow
  rules:
  - - - notDestinationPorts: [9999]
- name: only-client
  namespace: default
  scope: WorkloadSelector
  action: Deny
  rules:
  - - - notServiceAccounts: [{namespace: default, serviceAccount: client}]
    - - destinationPorts: [8080]
      - destinationPorts: [8081]
services:
- name: local
  namespace: default
  hostname: example.com
  vips: [/127.10.0.1]
  ports:
    80: 8080
  subjectAltNames: [spiffe://cluster.local/ns/default/sa/default]
"""
NODES = "nodes:\n  - {name: local, address: 127.0.0.100}\n"


def docs(local: str = LOCAL, nodes: str = NODES) -> list[dict[str, Any]]:
    return translate(yaml.safe_load(local), yaml.safe_load(nodes), file="local.yaml", nodes_file="nodes.yaml")


def refused(local: str, nodes: str = NODES) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        docs(local, nodes)
    return [str(i) for i in exc.value.issues]


def write(tmp: Path, local: str = LOCAL) -> tuple[Path, Path]:
    (tmp / "local.yaml").write_text(local)
    (tmp / "nodes.yaml").write_text(NODES)
    return tmp / "local.yaml", tmp / "nodes.yaml"


def test_translation_attaches_by_name() -> None:
    mesh, *policies = docs()
    wl = {w["name"]: w for w in mesh["workloads"]}
    assert wl["local"]["enrolled"] is True and wl["local-tcp"]["enrolled"] is False
    assert wl["local"]["labels"] == {f"{POLICY_LABEL}/only-client": "true", f"{SERVICE_LABEL}/local": "true"}
    (svc,) = mesh["services"]
    assert svc == {
        "name": "local",
        "namespace": "default",
        "vips": ["127.10.0.1"],
        "ports": [{"port": 80, "targetPort": 8080}],
        "selector": {f"{SERVICE_LABEL}/local": "true"},
    }
    assert [p["metadata"] for p in policies] == [
        {"name": "deny-9999", "namespace": "default"},
        {"name": "only-client", "namespace": "default"},
    ]
    assert policies[0]["spec"] == {
        "action": "ALLOW",
        "rules": [{"when": [{"key": "destination.port", "notValues": ["9999"]}]}],
    }
    assert policies[1]["spec"] == {
        "action": "DENY",
        "selector": {"matchLabels": {f"{POLICY_LABEL}/only-client": "true"}},
        "rules": [
            {
                "when": [{"key": "source.principal", "notValues": ["cluster.local/ns/default/sa/client"]}],
                "to": [{"operation": {"ports": ["8080"]}}, {"operation": {"ports": ["8081"]}}],
            }
        ],
    }


def test_loads_and_decides_as_ztunnels_rbac(tmp_path: Path) -> None:
    snap = load_ztunnel_local(*write(tmp_path))
    assert snap.policy_errors == ()
    store = WorkloadStore(snap, "local")
    (svc,) = store.services
    assert [w.name for w in store.endpoints(svc)] == ["local", "local-tcp"]
    local = next(w for w in store.workloads if w.name == "local")

    def decide(principal: str, port: int) -> bool:
        conn = Connection(
            source_principal=principal,
            source_ip=ipaddress.ip_address("127.0.0.9"),
            destination_namespace=local.namespace,
            destination_port=port,
            destination_labels=local.labels,
            destination_ip=ipaddress.ip_address("127.0.0.1"),
        )
        return store.policy_index.evaluate(conn).allowed

    assert decide("spiffe://cluster.local/ns/default/sa/client", 8080) is True
    assert decide("spiffe://cluster.local/ns/default/sa/other", 8080) is False  # DENY only-client
    assert decide("spiffe://cluster.local/ns/default/sa/other", 7000) is True  # the deny is for 8080/8081
    assert decide("spiffe://cluster.local/ns/default/sa/client", 9999) is False  # ALLOW notDestinationPorts


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (
            ("vips: [/127.10.0.1]", "vips: [remote/127.10.0.1]"),
            "services[0].vips[0]: 'remote/127.10.0.1': network 'remote'",
        ),
        (
            ('network: ""', "network: east"),
            "workloads[0].network: 'east': not supported by ztagent (one network",
        ),
        (("protocol: TCP", "protocol: UDP"), "workloads[2].protocol: 'UDP': expected HBONE or TCP"),
        (
            ("  node: local\n  network", "  node: local\n  waypoint: {destination: /10.0.0.9}\n  network"),
            "workloads[0].waypoint",
        ),
        (
            (
                "      80: 8080\n- uid: Kubernetes//Pod/default/client",
                "      80: 9090\n- uid: Kubernetes//Pod/default/client",
            ),
            "workloads[0].services[default/example.com][80]: default/local maps port 80 to 9090",
        ),
        (
            (
                "subjectAltNames: [spiffe://cluster.local/ns/default/sa/default]",
                "subjectAltNames: [spiffe://cluster.local/ns/other/sa/x]",
            ),
            "services[0].subjectAltNames[0]",
        ),
        (("  action: Deny", "  action: Deny\n  dryRun: true"), "policies[1].dryRun: True: not supported"),
        (("  action: Deny", "  action: Audit"), "policies[1].action: 'Audit': expected Allow or Deny"),
        (
            ("notDestinationPorts: [9999]", "notDestinationPort: [9999]"),
            "policies[0].rules[0][0][0].notDestinationPort: unknown match field",
        ),
        (
            (
                "    - - destinationPorts: [8080]\n      - destinationPorts: [8081]",
                "    - - destinationPorts: [8080]\n      - principals: [{Exact: a}]",
            ),
            "policies[1].rules[0][1]: a clause that ORs",
        ),
        (
            ("serviceAccount: client\n  workloadIps", "serviceAcount: client\n  workloadIps"),
            "workloads[1].serviceAcount: unknown field",
        ),
        (
            (
                '"default/example.com":\n      80: 8080\n- uid: Kubernetes//Pod/default/client',
                '"default/nope.com":\n      80: 8080\n- uid: Kubernetes//Pod/default/client',
            ),
            "workloads[0].services[default/nope.com]: no service with namespace/hostname",
        ),
        (
            ("authorizationPolicies: [default/only-client]", "authorizationPolicies: []"),
            "policies[1].scope: WorkloadSelector, but no workload lists 'default/only-client'",
        ),
    ],
)
def test_unsupported_parts_are_refused_naming_the_field(edit: tuple[str, str], where: str) -> None:
    old, new = edit
    assert old in LOCAL
    issues = refused(LOCAL.replace(old, new, 1))
    assert any(where in i for i in issues), issues
    assert all(i.startswith("local.yaml: document 0 (ztunnel local config): ") for i in issues)


def test_old_format_and_node_map_problems() -> None:
    assert "a bare list of workloads is ztunnel's old local format" in refused("- name: local\n")[0]
    (issue,) = refused(LOCAL, "nodes: []\n")
    assert issue.startswith("nodes.yaml") and "expected at least one node" in issue
    assert any("node map carries nodes" in i for i in refused(LOCAL, NODES + "workloads: []\n"))


def test_the_importer_command_and_the_agents_source(tmp_path: Path) -> None:
    local, nodes = write(tmp_path)
    out = tmp_path / "mesh.yaml"
    got = subprocess.run(
        [*ZTAGENT, "ztunnel-import", str(local), "--nodes", str(nodes), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert got.returncode == 0, got.stderr
    from sources.file import load_config

    assert [w.name for w in load_config(out).workloads] == ["local", "client", "local-tcp"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(LOCAL.replace("protocol: TCP", "protocol: QUIC"))
    got = subprocess.run(
        [*ZTAGENT, "ztunnel-import", str(bad), "--nodes", str(nodes), "-o", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert got.returncode == 2 and "workloads[2].protocol: 'QUIC'" in got.stderr
    assert not (tmp_path / "x").exists()

    async def follow() -> list[str]:
        src = ZtunnelLocalSource(local, nodes, interval=0.05)
        snap = await src.initial()
        names = [w.name for w in snap.workloads]
        local.write_text(
            LOCAL.replace("name: client", "name: client2").replace(
                "Pod/default/client", "Pod/default/client2"
            )
        )
        it = src.changes().__aiter__()
        ev = await asyncio.wait_for(it.__anext__(), 10)
        assert not hasattr(ev, "error"), ev
        return names + [w.name for w in src.current.workloads]

    got_names = asyncio.run(follow())
    assert got_names == ["local", "client", "local-tcp", "local", "client2", "local-tcp"]
