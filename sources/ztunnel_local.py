"""ztunnel's local config file (``LOCAL_XDS_PATH``) as a config source, with a node map beside it.

The translation is :func:`mesh.ztunnel.translate` (pure); this module reads the two files, hands
the result to the ordinary parser (so every rule of a ztagent config file applies to it too) and
watches the ztunnel file like :class:`sources.file.FileConfigSource` watches a config file. The
node map is re-read with each change of the ztunnel file: it describes the hosts, and a change to
it alone is picked up at the next change of the ztunnel file (or a restart).
"""

from __future__ import annotations

import os

import yaml

from mesh.errors import ConfigError, ConfigIssue
from mesh.model import Snapshot
from mesh.parse import PolicyParser, parse_config
from mesh.yamlstrict import YamlSyntaxError, load_documents
from mesh.ztunnel import translate
from sources.file import FileConfigSource


def _read_one(path: str) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(path, None, None, "", f"cannot read: {exc}")]) from None
    try:
        docs = [d for d in load_documents(text) if d is not None]
    except YamlSyntaxError as exc:
        raise ConfigError([ConfigIssue(path, exc.document, None, "", f"invalid YAML: {exc}")]) from None
    if len(docs) != 1:
        raise ConfigError(
            [ConfigIssue(path, None, None, "", f"expected one YAML document, found {len(docs)}")]
        )
    return docs[0]


def translate_files(path: str | os.PathLike[str], nodes_path: str | os.PathLike[str]) -> str:
    """The ztagent config stream (YAML text) for a ztunnel local config and a node map."""
    p, n = os.fspath(path), os.fspath(nodes_path)
    docs = translate(_read_one(p), _read_one(n), file=p, nodes_file=n)
    header = f"# Translated from ztunnel's local config {p} with the node map {n} by ztagent.\n"
    return header + yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True)


def load_ztunnel_local(
    path: str | os.PathLike[str],
    nodes_path: str | os.PathLike[str],
    *,
    policy_parser: PolicyParser | None = None,
) -> Snapshot:
    """Read, translate and parse; ConfigError names the ztunnel file's field (or, for a rule of
    ztagent's own config the translation broke, the translated document's)."""
    text = translate_files(path, nodes_path)
    return parse_config(text, file=f"{os.fspath(path)} (translated)", policy_parser=policy_parser)


class ZtunnelLocalSource(FileConfigSource):
    """A ConfigSource over ztunnel's local config file plus a node map."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        nodes_path: str | os.PathLike[str],
        *,
        interval: float = 1.0,
        policy_parser: PolicyParser | None = None,
    ) -> None:
        super().__init__(path, interval=interval, policy_parser=policy_parser)
        self.nodes_path = os.fspath(nodes_path)

    @property
    def name(self) -> str:
        return f"ztunnel-local:{self.path}"

    def _load(self) -> Snapshot:
        return load_ztunnel_local(self.path, self.nodes_path, policy_parser=self._policy_parser)


__all__ = ["ZtunnelLocalSource", "load_ztunnel_local", "translate_files"]
