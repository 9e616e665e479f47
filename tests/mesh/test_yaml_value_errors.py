"""Fuzz findings in the config loader (fuzz/targets/mesh_config.py): YAML that PyYAML refuses
with something other than a YAMLError (a ValueError from a scalar constructor, a RecursionError
from deep nesting) must still be a ConfigError, so a bad reload is refused and the watch goes on
instead of the exception ending it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from mesh.config import ConfigError, MeshConfig, parse_config
from sources.file import FileConfigSource

GOOD = """\
apiVersion: ztagent.io/v1alpha1
kind: MeshConfig
trustDomain: cluster.local
nodes:
- {name: node-a, address: 10.250.0.1}
"""


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (GOOD + "---\nmetadata: {creationTimestamp: 2024-02-30}\n", "day is out of range"),  # ValueError
        (GOOD + "---\nvalue: !!int x\n", "invalid literal"),
        (GOOD + "---\nvalue: !!float x\n", "could not convert"),
        (GOOD + "---\nvalue: " + "[" * 2000 + "]" * 2000 + "\n", "nested too deeply"),  # RecursionError
    ],
)
def test_yaml_that_pyyaml_refuses_untyped_is_a_config_error(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, file="mesh.yaml")
    (issue,) = info.value.issues
    assert issue.file == "mesh.yaml" and "invalid YAML" in issue.message and why in issue.message


async def test_a_reload_with_an_impossible_date_is_refused_and_the_watch_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(GOOD)
    src = FileConfigSource(path, interval=0.05)
    await src.initial()
    updates: list[MeshConfig] = []
    errors: list[ConfigError] = []
    task = asyncio.create_task(src.run(updates.append, errors.append))
    try:
        path.write_text(GOOD + "---\nmetadata: {creationTimestamp: 2024-02-30}\n")
        for _ in range(100):
            await asyncio.sleep(0.05)
            if errors:
                break
        assert errors and not task.done(), "the bad update was not refused, or it ended the watch"
        path.write_text(GOOD.replace("node-a", "node-b"))
        os.utime(path)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if updates:
                break
        assert [n.name for n in updates[-1].nodes] == ["node-b"]  # later good updates still arrive
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
