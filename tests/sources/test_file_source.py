"""FileConfigSource through the ConfigSource interface: a real file, real polling."""

from __future__ import annotations

import asyncio
import os
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mesh.errors import ConfigError
from mesh.model import Delete, Kind, Upsert, Workload
from mesh.store import WorkloadStore
from sources.base import ChangeSet, ConfigRefused, ConfigSource, SourceEvent
from sources.file import FileConfigSource

GOOD = textwrap.dedent(
    """\
    apiVersion: ztagent.io/v1alpha1
    kind: MeshConfig
    trustDomain: cluster.local
    nodes:
      - {name: node-a, address: 10.250.0.1, podCIDR: 10.244.1.0/24}
    workloads:
      - {name: a, namespace: ns1, node: node-a, ips: [10.244.1.2], labels: {app: a}}
      - {name: b, namespace: ns1, node: node-a, ips: [10.244.1.3], labels: {app: b}}
    services:
      - {name: web, namespace: ns1, vips: [10.96.0.10], ports: [{port: 80}], selector: {app: b}}
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: allow-a, namespace: ns1}
    spec: {rules: [{from: [{source: {principals: ["cluster.local/ns/ns1/sa/default"]}}]}]}
    """
)


def _write(path: Path, text: str) -> None:
    # Replaced by rename, as editors and ConfigMap updates do; a fresh inode is always seen.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def _next(it: AsyncIterator[SourceEvent], limit: float = 5.0) -> SourceEvent:
    return await asyncio.wait_for(it.__anext__(), limit)


async def test_initial_then_minimal_change_sets_then_refusals(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(GOOD)
    src = FileConfigSource(path, interval=0.01)
    assert isinstance(src, ConfigSource) and src.name == f"file:{path}"
    snap = await src.initial()
    assert [w.key for w in snap.workloads] == ["ns1/a", "ns1/b"] and snap.source == str(path)
    store = WorkloadStore(snap, "node-a")
    it = src.changes()
    try:
        # One label changed: one Upsert of that workload, nothing else.
        _write(path, GOOD.replace("labels: {app: b}", "labels: {app: c}"))
        ev = await _next(it)
        assert isinstance(ev, ChangeSet) and ev.source == str(path)
        assert [(type(c), c.kind, c.key) for c in ev.changes] == [(Upsert, Kind.WORKLOAD, "ns1/b")]
        applied = store.apply(ev.changes, source=ev.source, digest=ev.digest)
        assert applied.endpoints_changed == {"ns1/web"} and store.digest == ev.digest
        assert store.endpoints(store.service("ns1", "web")) == ()  # type: ignore[arg-type]
        # A workload removed and a policy changed: one Delete and one Upsert.
        text2 = GOOD.replace("labels: {app: b}", "labels: {app: c}")
        text2 = text2.replace(
            "  - {name: a, namespace: ns1, node: node-a, ips: [10.244.1.2], labels: {app: a}}\n", ""
        )
        text2 = text2.replace("sa/default", "sa/other")
        _write(path, text2)
        ev = await _next(it)
        assert isinstance(ev, ChangeSet)
        assert [(type(c), c.kind, c.key) for c in ev.changes] == [
            (Delete, Kind.WORKLOAD, "ns1/a"),
            (Upsert, Kind.POLICY, "AuthorizationPolicy/ns1/allow-a"),
        ]
        applied = store.apply(ev.changes, digest=ev.digest)
        assert [w.key for w in applied.local_removed] == ["ns1/a"] and applied.recheck_all
        good = src.current
        # A bad update: refused, naming file, document and field; the last good state stays.
        _write(path, text2.replace("10.244.1.3]", "10.244.1.999]"))
        ev = await _next(it)
        assert isinstance(ev, ConfigRefused)
        assert [str(i) for i in ev.issues] == [
            f"{path}: document 0 (MeshConfig): workloads[0].ips[0]: '10.244.1.999' is not an IP address"
        ]
        assert src.current is good and src.last_error is ev.error
        # A second bad version (a policy envelope error in document 1) is reported too.
        _write(path, text2.replace("namespace: ns1}\nspec", "namespace: NS1}\nspec"))
        ev = await _next(it)
        assert isinstance(ev, ConfigRefused)
        assert any(
            i.document == 1 and i.kind == "AuthorizationPolicy" and i.path == "metadata.namespace"
            for i in ev.issues
        ), ev.issues
        # Back to the serving version: an empty change set says "good again", nothing to apply.
        _write(path, text2)
        ev = await _next(it)
        assert isinstance(ev, ChangeSet) and ev.changes == () and not ev and src.last_error is None
        # Back to a good new version after the refusal: relative to the last good, not the bad.
        _write(path, text2.replace("ips: [10.244.1.3]", "ips: [10.244.1.4]"))
        ev = await _next(it)
        assert isinstance(ev, ChangeSet) and [c.key for c in ev.changes] == ["ns1/b"]
        ch = ev.changes[0]
        assert isinstance(ch, Upsert) and isinstance(ch.obj, Workload) and str(ch.obj.ips[0]) == "10.244.1.4"
        store.apply(ev.changes)
        assert store.by_ip("10.244.1.4") is not None and store.by_ip("10.244.1.3") is None
    finally:
        await it.aclose()  # type: ignore[attr-defined]


async def test_an_unreadable_or_bad_initial_file_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        await FileConfigSource(tmp_path / "missing.yaml").initial()
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("trustDomain", "trustdomain"))
    with pytest.raises(ConfigError, match=r"document 0 \(MeshConfig\): trustdomain: unknown field"):
        await FileConfigSource(bad).initial()


async def test_a_touched_but_unchanged_file_emits_nothing(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(GOOD)
    src = FileConfigSource(path, interval=0.01)
    await src.initial()
    _write(path, GOOD)  # new inode, same bytes
    assert src.poll() is None
    os.utime(path, ns=(1, 1))
    assert src.poll() is None


async def test_without_initial_the_first_poll_delivers_everything(tmp_path: Path) -> None:
    # The CA server follows a file it loaded itself: the first poll is the whole file.
    path = tmp_path / "mesh.yaml"
    path.write_text(GOOD)
    src = FileConfigSource(path)
    ev = src.poll()
    assert isinstance(ev, ChangeSet) and all(isinstance(c, Upsert) for c in ev.changes)
    assert {c.key for c in ev.changes} >= {"ns1/a", "ns1/b", "ns1/web", "node-a"}
    assert src.poll() is None and src.current.digest == ev.digest
