"""Config validation: a table of bad inputs, each naming file, document and field path."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import textwrap
from pathlib import Path

import pytest

from agent.admin import build_admin_app
from cli.commands import status as status_cmd
from mesh.config import ConfigError, MeshConfig, parse_config
from mesh.store import WorkloadStore
from policy import Connection, Verdict
from serving.http import serve
from sources.file import FileConfigSource, load_config

GOOD = textwrap.dedent(
    """\
    apiVersion: ztagent.io/v1alpha1
    kind: MeshConfig
    trustDomain: cluster.local
    nodes:
      - name: node-a
        address: 10.250.0.1
        podCIDR: 10.244.1.0/24
      - name: node-b
        address: 10.250.0.2
        podCIDR: 10.244.2.0/24
    workloads:
      - name: sleep
        namespace: ns1
        serviceAccount: sleep
        node: node-a
        ips: [10.244.1.2]
        labels: {app: sleep}
      - name: httpbin
        namespace: ns2
        serviceAccount: httpbin
        node: node-b
        ips: [10.244.2.2]
        labels: {app: httpbin}
        enrolled: false
    services:
      - name: httpbin
        namespace: ns2
        vips: [10.96.0.10]
        ports: [{port: 8000, targetPort: 8080, name: http}]
        selector: {app: httpbin}
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: allow-sleep, namespace: ns2}
    spec:
      action: ALLOW
      rules: [{from: [{source: {principals: ["cluster.local/ns/ns1/sa/sleep"]}}]}]
    """
)


def test_good_config_parses_into_immutable_models() -> None:
    cfg = parse_config(GOOD, file="mesh.yaml")
    assert isinstance(cfg, MeshConfig)
    assert str(cfg.trust_domain) == "cluster.local" or cfg.trust_domain.name == "cluster.local"
    assert cfg.root_namespace == "istio-system"
    assert [n.name for n in cfg.nodes] == ["node-a", "node-b"]
    sleep, httpbin = cfg.workloads
    assert sleep.ips == (ipaddress.ip_address("10.244.1.2"),)
    assert str(sleep.spiffe_id) == "spiffe://cluster.local/ns/ns1/sa/sleep"
    assert sleep.enrolled is True and httpbin.enrolled is False
    svc = cfg.services[0]
    assert svc.port(8000) is not None and svc.port(8000).target_port == 8080  # type: ignore[union-attr]
    assert svc.port(9999) is None
    assert [p.key for p in cfg.policies] == ["AuthorizationPolicy/ns2/allow-sleep"]
    assert cfg.policies[0].document == 1
    with pytest.raises(TypeError):
        sleep.labels["app"] = "x"  # type: ignore[index]
    with pytest.raises(AttributeError):
        sleep.name = "x"  # type: ignore[misc]


def test_defaults_service_account_and_enrolled() -> None:
    text = GOOD.replace("    serviceAccount: sleep\n", "")
    sleep = parse_config(text).workloads[0]
    assert sleep.service_account == "default" and sleep.enrolled is True


def test_policies_listed_inside_meshconfig() -> None:
    head, pol = GOOD.split("---\n")
    embedded = head + "policies:\n" + textwrap.indent("- " + pol.replace("\n", "\n  ").rstrip() + "\n", "  ")
    cfg = parse_config(embedded, file="m.yaml")
    assert cfg.policies[0].path == "policies[0]" and cfg.policies[0].document == 0


# (mutation of GOOD, expected substring of the one error: "file: document N (Kind): path: message")
BAD = [
    (("trustDomain: cluster.local", "trustDomain: Cluster.Local"), "document 0 (MeshConfig): trustDomain:"),
    (("kind: MeshConfig", "kind: MeshConfig\nbogus: 1"), "document 0 (MeshConfig): bogus: unknown field"),
    (("apiVersion: ztagent.io/v1alpha1", "apiVersion: ztagent.io/v2"), "apiVersion: unsupported apiVersion"),
    (("address: 10.250.0.1", "address: 10.250.0.300"), "nodes[0].address: '10.250.0.300' is not an IP"),
    (("podCIDR: 10.244.1.0/24", "podCIDR: 10.244.1.1/24"), "nodes[0].podCIDR: '10.244.1.1/24' is not a CIDR"),
    (("name: node-b", "name: node-a"), "nodes[1].name: duplicate node name 'node-a'"),
    (("address: 10.250.0.2", "address: 10.250.0.1"), "nodes[1].address: duplicate node address"),
    (
        ("podCIDR: 10.244.2.0/24", "podCIDR: 10.244.0.0/16"),
        "nodes: podCIDR 10.244.1.0/24 of 'node-a' overlaps",
    ),
    (("node: node-a", "node: node-z"), "workloads[0].node: unknown node 'node-z'"),
    (("ips: [10.244.1.2]", "ips: [10.244.1.x]"), "workloads[0].ips[0]: '10.244.1.x' is not an IP"),
    (("ips: [10.244.1.2]", "ips: []"), "workloads[0].ips: a workload needs at least one IP"),
    (("ips: [10.244.1.2]", "ips: 10.244.1.2"), "workloads[0].ips: expected a list, got string"),
    (("ips: [10.244.1.2]", "ips: [10.244.2.9]"), "workloads[0].ips[0]: IP 10.244.2.9 is outside podCIDR"),
    (("ips: [10.244.2.2]", "ips: [10.244.1.2]"), "IP 10.244.1.2 is already used by workload ns1/sleep"),
    (("namespace: ns1", "namespace: NS1"), "workloads[0].namespace: 'NS1' is not a valid namespace"),
    (("name: sleep", "name: sleep_1"), "workloads[0].name: 'sleep_1' is not a valid name"),
    (("labels: {app: sleep}", "labels: {app: 1}"), "workloads[0].labels.app: label value must be a string"),
    (
        ("labels: {app: sleep}", "labels: {'a b': x}"),
        "workloads[0].labels.a b: 'a b' is not a valid label key",
    ),
    (("enrolled: false", "enrolled: 'no'"), "workloads[1].enrolled: expected true or false"),
    (("serviceAccount: sleep", "serviceAccount: sleep\n    extra: 1"), "workloads[0].extra: unknown field"),
    (("vips: [10.96.0.10]", "vips: [10.244.1.2]"), "services[0].vips[0]: VIP 10.244.1.2 is already used"),
    (("vips: [10.96.0.10]", "vips: [10.96.0.300]"), "services[0].vips[0]: '10.96.0.300' is not an IP"),
    (("port: 8000", "port: 80000"), "services[0].ports[0].port: port 80000 is out of range 1-65535"),
    (("targetPort: 8080", "targetPort: 0"), "services[0].ports[0].targetPort: port 0 is out of range"),
    (("name: http}", "name: http, protocol: UDP}"), "services[0].ports[0].protocol: only TCP is supported"),
    (("name: http}]", "name: http}, {port: 8000}]"), "services[0].ports[1].port: duplicate port 8000"),
    (("selector: {app: httpbin}", "selector: [app]"), "services[0].selector: expected a mapping"),
    (
        ("kind: AuthorizationPolicy", "kind: AuthorisationPolicy"),
        "document 1 (AuthorisationPolicy): kind: unsupported kind",
    ),
    (
        ("security.istio.io/v1", "security.istio.io/v2"),
        "document 1 (AuthorizationPolicy): apiVersion: unsupported",
    ),
    (
        ("metadata: {name: allow-sleep, namespace: ns2}", "metadata: {name: allow-sleep}"),
        "document 1 (AuthorizationPolicy): metadata.namespace:",
    ),
    (
        ("trustDomain: cluster.local", "trustDomain: cluster.local\ntrustDomain: x"),
        "invalid YAML: line 4, column 1: duplicate key 'trustDomain'",
    ),
    (("spec:\n  action", "spec:\n action: [\n  action"), "document 1: invalid YAML"),
]


@pytest.mark.parametrize(("mutation", "expected"), BAD, ids=[b[1][:50] for b in BAD])
def test_bad_config_names_file_document_and_field(mutation: tuple[str, str], expected: str) -> None:
    old, new = mutation
    assert old in GOOD, old
    text = GOOD.replace(old, new, 1)
    with pytest.raises(ConfigError) as ei:
        parse_config(text, file="mesh.yaml")
    msgs = [str(i) for i in ei.value.issues]
    assert any(m.startswith("mesh.yaml") and expected in m for m in msgs), msgs


def test_duplicate_policy_and_missing_or_second_meshconfig() -> None:
    _, pol = GOOD.split("---\n")
    with pytest.raises(ConfigError, match=r"document 2 \(AuthorizationPolicy\): metadata.name: duplicate"):
        parse_config(GOOD + "---\n" + pol, file="f")
    with pytest.raises(ConfigError, match="no document of kind MeshConfig"):
        parse_config(pol, file="f")
    head, _ = GOOD.split("---\n")
    with pytest.raises(ConfigError, match=r"document 1 \(MeshConfig\): a second MeshConfig"):
        parse_config(head + "---\n" + head, file="f")


def test_all_errors_reported_together() -> None:
    text = GOOD.replace("10.250.0.1", "bad-ip").replace("port: 8000", "port: -1")
    with pytest.raises(ConfigError) as ei:
        parse_config(text, file="f")
    paths = {i.path for i in ei.value.issues}
    assert {"nodes[0].address", "services[0].ports[0].port"} <= paths


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


async def test_file_source_reloads_and_refuses_bad_updates(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(GOOD)
    src = FileConfigSource(path, interval=0.02)
    first = await src.initial()
    updates: list[MeshConfig] = []
    errors: list[ConfigError] = []
    task = asyncio.create_task(src.run(updates.append, errors.append))
    try:

        async def wait_for(pred: object, limit: float = 5.0) -> None:
            for _ in range(int(limit / 0.02)):
                if pred():  # type: ignore[operator]
                    return
                await asyncio.sleep(0.02)
            raise AssertionError("condition not reached")

        # Bad update: refused, reported with file/document/field, nothing delivered.
        path.write_text(GOOD.replace("10.244.1.2]", "10.244.1.999]"))
        os.utime(path, ns=(1, 1))
        await wait_for(lambda: errors)
        assert "workloads[0].ips[0]" in str(errors[0]) and str(path) in str(errors[0])
        assert src.last_error is errors[0] and updates == []
        # Good update: delivered, error cleared.
        path.write_text(GOOD.replace("10.244.1.2]", "10.244.1.3]"))
        await wait_for(lambda: updates)
        assert str(updates[0].workloads[0].ips[0]) == "10.244.1.3"
        assert updates[0].digest != first.digest and src.last_error is None
        # Bad again, then back to exactly the serving version: delivered, so the error clears.
        serving = path.read_text()
        path.write_text(serving.replace("trustDomain", "trustdomain"))
        await wait_for(lambda: len(errors) == 2)
        path.write_text(serving)
        await wait_for(lambda: len(updates) == 2)
        assert updates[1].digest == updates[0].digest and src.last_error is None
        # Replaced by rename (how editors and ConfigMaps update files) is seen too.
        tmp = tmp_path / "new.yaml"
        tmp.write_text(GOOD.replace("10.244.1.2]", "10.244.1.4]"))
        os.replace(tmp, path)
        await wait_for(lambda: len(updates) == 3)
        assert str(updates[2].workloads[0].ips[0]) == "10.244.1.4"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# A DENY on httpbin with a typo in a field name: it cannot be parsed, so (DESIGN.md §5) it must
# deny everything it selects rather than be dropped or hold the whole config back.
TYPO_DENY = textwrap.dedent(
    """\
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-evil, namespace: ns2}
    spec:
      selector: {matchLabels: {app: httpbin}}
      action: DENY
      rules: [{from: [{source: {principles: ["cluster.local/ns/evil/sa/evil"]}}]}]
    """
)


def _sleep_to_httpbin(cfg: MeshConfig) -> Verdict:
    store = WorkloadStore(cfg, "node-b")
    conn = Connection(
        source_principal="cluster.local/ns/ns1/sa/sleep",
        source_ip=ipaddress.ip_address("10.244.1.2"),
        destination_namespace="ns2",
        destination_port=8080,
        destination_labels={"app": "httpbin"},
        destination_ip=ipaddress.ip_address("10.244.2.2"),
    )
    return store.policy_index.evaluate(conn).verdict


def test_policy_spec_errors_are_accepted_poisoned_and_named() -> None:
    # Without the bad DENY, allow-sleep lets sleep reach httpbin.
    assert _sleep_to_httpbin(parse_config(GOOD, file="mesh.yaml")) is Verdict.ALLOW
    cfg = parse_config(GOOD + TYPO_DENY, file="mesh.yaml")
    # Accepted, the poisoned DENY in force: it denies everything it selects, even allowed traffic.
    assert _sleep_to_httpbin(cfg) is Verdict.DENY
    assert {(i.file, i.document, i.kind) for i in cfg.policy_errors} == {
        ("mesh.yaml", 2, "AuthorizationPolicy")
    }
    where = "mesh.yaml: document 2 (AuthorizationPolicy): spec.rules[0].from[0].source.principles:"
    assert any(str(i).startswith(where) and "unknown field" in i.message for i in cfg.policy_errors), (
        cfg.policy_errors
    )
    # A poisoned ALLOW allows nothing (and is reported with its field), also when embedded.
    bad_allow = parse_config(GOOD.replace("action: ALLOW", "action: ALOW"), file="mesh.yaml")
    assert [(i.document, i.path) for i in bad_allow.policy_errors] == [(1, "spec.action")]
    assert _sleep_to_httpbin(bad_allow) is Verdict.DENY
    head, pol = GOOD.split("---\n")
    embedded = (
        head
        + "policies:\n"
        + textwrap.indent(
            "- " + pol.replace("action: ALLOW", "action: ALOW").replace("\n", "\n  ").rstrip() + "\n", "  "
        )
    )
    emb = parse_config(embedded, file="m.yaml")
    assert [(i.document, i.path) for i in emb.policy_errors] == [(0, "policies[0].spec.action")]
    # A clean config has none.
    assert parse_config(GOOD, file="mesh.yaml").policy_errors == ()


async def test_file_source_applies_a_poisoned_deny_and_logs_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(GOOD)
    src = FileConfigSource(path, interval=0.02)
    assert (await src.initial()).policy_errors == ()
    updates: list[MeshConfig] = []
    errors: list[ConfigError] = []
    task = asyncio.create_task(src.run(updates.append, errors.append))
    try:
        path.write_text(GOOD + TYPO_DENY)
        os.utime(path, ns=(1, 1))
        for _ in range(250):
            if updates or errors:
                break
            await asyncio.sleep(0.02)
        # Delivered, not refused: the last good config (which lacks the DENY) must not keep serving.
        assert errors == [] and len(updates) == 1 and src.last_error is None
        assert _sleep_to_httpbin(updates[0]) is Verdict.DENY
        logged = [r for r in caplog.records if getattr(r, "event", None) == "config_policy_errors"]
        assert logged and logged[0].levelname == "ERROR"
        assert "spec.rules[0].from[0].source.principles" in logged[0].getMessage()
        assert str(path) in logged[0].getMessage()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


class _View:
    """The admin view's read side for one loaded config (what NodeAgent exposes)."""

    def __init__(self, cfg: MeshConfig) -> None:
        self.config = cfg

    def status(self) -> dict[str, object]:
        return {"healthy": True, "problems": [], "node": "node-b", "config": {"errors": []}}

    def config_dump(self) -> dict[str, object]:
        return {"source": self.config.source}

    def certs(self) -> list[dict[str, object]]:
        return []

    def workloads(self) -> list[dict[str, object]]:
        return []

    def policies(self) -> list[dict[str, object]]:
        return []


async def test_status_is_unhealthy_while_a_policy_is_poisoned(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import json
    import urllib.request

    for text, healthy in ((GOOD, True), (GOOD + TYPO_DENY, False)):
        site = await serve(build_admin_app(_View(parse_config(text, file="mesh.yaml"))), "127.0.0.1", 0)
        try:
            args = argparse.Namespace(admin=site.url, output="table", timeout=3.0)
            rc = await asyncio.to_thread(status_cmd.run, args)
            out = capsys.readouterr().out
            with await asyncio.to_thread(urllib.request.urlopen, site.url + "/config_dump", timeout=3) as r:
                dump = json.load(r)
        finally:
            await site.close()
        if healthy:
            assert rc == status_cmd.EXIT_HEALTHY and "policy error" not in out
            assert dump["policyErrors"] == []
        else:
            assert rc == status_cmd.EXIT_UNHEALTHY and out.startswith("UNHEALTHY")
            assert "policy error (enforced fail-closed): mesh.yaml: document 2 (AuthorizationPolicy): " in out
            assert (2, "spec.rules[0].from[0].source.principles") in [
                (e["document"], e["path"]) for e in dump["policyErrors"]
            ]
