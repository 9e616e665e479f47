"""A container runtime's side of CNI, as SPEC.md 1.0.0 section 3 prescribes it (and libcni does it),
to drive real plugin chains in tests: Debian ships no ``cnitool``, so this is its stand-in.

- ADD runs ``plugins`` in order; each gets the plugin object minus ``capabilities``, plus the list's
  ``cniVersion`` and ``name``, ``runtimeConfig`` (the capabilities it declares that the runtime
  supplies) and, from the second plugin on, ``prevResult`` = the previous plugin's result. The
  first error halts. The final result is cached on disk (the runtime needs it for CHECK and DEL).
- DEL runs them in reverse with the cached ADD result as ``prevResult`` (none if ADD failed), then
  drops the cache; CHECK runs them in order with it, unless ``disableCheck``.
- Each plugin is found in ``CNI_PATH`` by its ``type`` and exec'd with the ``CNI_*`` environment
  and the configuration on stdin; stdout carries the result or the error JSON. ``node_netns``
  runs the plugins inside a named network namespace standing in for the node's root namespace, so
  a test never touches the host's own links, routes or sysctls.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class CniPluginError(Exception):
    def __init__(self, plugin: str, command: str, error: dict[str, Any], stderr: str) -> None:
        super().__init__(f"{plugin} {command} failed: {error} (stderr: {stderr.strip()})")
        self.plugin = plugin
        self.command = command
        self.error = error
        self.stderr = stderr

    @property
    def code(self) -> int:
        return int(self.error.get("code", -1))


@dataclass(frozen=True)
class Attachment:
    container_id: str
    netns: str | None
    ifname: str = "eth0"
    args: tuple[tuple[str, str], ...] = ()  # CNI_ARGS pairs
    capability_args: dict[str, Any] = field(default_factory=dict)

    def cni_args(self) -> str:
        return ";".join(f"{k}={v}" for k, v in self.args)


@dataclass
class CniRuntime:
    conflist: dict[str, Any]
    cni_path: list[str]
    cache_dir: Path
    node_netns: str | None = None
    timeout_s: float = 60.0
    timings: list[tuple[str, str, float]] = field(default_factory=list)  # (plugin, command, seconds)

    @classmethod
    def from_conf_dir(cls, conf_dir: Path, **kw: Any) -> CniRuntime:
        """Load the network configuration the way containerd does: the first file by name."""
        files = sorted(p for p in conf_dir.iterdir() if p.suffix in (".conf", ".conflist", ".json"))
        if not files:
            raise FileNotFoundError(f"no network configuration in {conf_dir}")
        obj = json.loads(files[0].read_text())
        if "plugins" not in obj:  # a single-plugin .conf is a one-entry list (libcni ConfListFromConf)
            obj = {"cniVersion": obj["cniVersion"], "name": obj["name"], "plugins": [obj]}
        return cls(conflist=obj, **kw)

    @property
    def name(self) -> str:
        return str(self.conflist["name"])

    def _cache(self, att: Attachment) -> Path:
        return self.cache_dir / f"{self.name}-{att.container_id}-{att.ifname}.json"

    def cached_result(self, att: Attachment) -> dict[str, Any] | None:
        p = self._cache(att)
        return json.loads(p.read_text()) if p.exists() else None

    def _find(self, ptype: str) -> str:
        for d in self.cni_path:
            exe = os.path.join(d, ptype)
            if os.access(exe, os.X_OK):
                return exe
        raise FileNotFoundError(f"failed to find plugin {ptype!r} in path {self.cni_path}")

    def _derive(self, plugin: dict[str, Any], att: Attachment, prev: dict[str, Any] | None) -> dict[str, Any]:
        conf = {k: v for k, v in plugin.items() if k != "capabilities"}
        conf["cniVersion"] = self.conflist["cniVersion"]
        conf["name"] = self.name
        caps = plugin.get("capabilities") or {}
        runtime_config = {k: v for k, v in att.capability_args.items() if caps.get(k)}
        if runtime_config:
            conf["runtimeConfig"] = runtime_config
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def _exec(self, command: str, plugin: dict[str, Any], att: Attachment,
              prev: dict[str, Any] | None) -> dict[str, Any] | None:
        ptype = plugin["type"]
        exe = self._find(ptype)
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": att.container_id,
            "CNI_IFNAME": att.ifname,
            "CNI_ARGS": att.cni_args(),
            "CNI_PATH": ":".join(self.cni_path),
        }
        if att.netns is not None:
            env["CNI_NETNS"] = att.netns
        argv = [exe] if self.node_netns is None else ["ip", "netns", "exec", self.node_netns, exe]
        stdin = json.dumps(self._derive(plugin, att, prev)).encode()
        t0 = time.perf_counter()
        p = subprocess.run(argv, input=stdin, env=env, capture_output=True, timeout=self.timeout_s)
        self.timings.append((ptype, command, time.perf_counter() - t0))
        out, err = p.stdout.decode(), p.stderr.decode()
        if p.returncode != 0:
            try:
                error = json.loads(out)
            except ValueError:
                error = {"code": -1, "msg": f"exit {p.returncode}, stdout is no error result", "details": out}
            raise CniPluginError(ptype, command, error, err)
        if command != "ADD":
            return None
        result: dict[str, Any] = json.loads(out)
        return result

    def add(self, att: Attachment) -> dict[str, Any]:
        prev: dict[str, Any] | None = None
        for plugin in self.conflist["plugins"]:
            prev = self._exec("ADD", plugin, att, prev)
        assert prev is not None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._cache(att).with_suffix(".tmp")
        tmp.write_text(json.dumps(prev))
        tmp.replace(self._cache(att))
        return prev

    def check(self, att: Attachment) -> None:
        if self.conflist.get("disableCheck"):
            return
        prev = self.cached_result(att)
        if prev is None:
            raise RuntimeError("CHECK for an attachment that was not added (a runtime must not do that)")
        for plugin in self.conflist["plugins"]:
            self._exec("CHECK", plugin, att, prev)

    def delete(self, att: Attachment) -> None:
        prev = self.cached_result(att)
        for plugin in reversed(self.conflist["plugins"]):
            self._exec("DEL", plugin, att, prev)
        self._cache(att).unlink(missing_ok=True)
