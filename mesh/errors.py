"""Errors of the mesh model: a refused config (parse) and a refused change (store).

Both name where the problem is (file or source, document, field path) so an operator can find
it; both are domain errors, never ``KeyError`` or ``TypeError`` leaking out of an index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ConfigIssue:
    """One thing wrong with a config: where (file, document, field path) and what."""

    file: str
    document: int | None  # 0-based index in the YAML stream; None for whole-stream problems
    kind: str | None  # the document's kind, when known, to help a reader find it
    path: str  # field path inside the document, e.g. "workloads[1].ips[0]"; "" for the document
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.document is not None:
            where += f": document {self.document}"
            if self.kind:
                where += f" ({self.kind})"
        if self.path:
            where += f": {self.path}"
        return f"{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "document": self.document,
            "kind": self.kind,
            "path": self.path,
            "message": self.message,
        }


class ConfigError(Exception):
    """A config was refused; ``issues`` lists every problem found (at least one)."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        if not issues:
            raise ValueError("ConfigError needs at least one issue")
        self.issues: tuple[ConfigIssue, ...] = tuple(issues)
        lines = [str(i) for i in self.issues]
        super().__init__(lines[0] if len(lines) == 1 else f"{len(lines)} errors:\n  " + "\n  ".join(lines))

    def __str__(self) -> str:
        return str(self.args[0])


class ChangeRefused(ConfigError):
    """A change (or a whole snapshot) the store cannot apply: it would break an invariant (an IP
    owned twice, a workload on an unknown node, this agent's node removed). The store is left
    exactly as it was.

    Each issue names the source (``file``), the object kind (``kind``, e.g. ``Workload``), and
    the field (``path``, prefixed by the object's key: ``ns1/web.ips[0]``).
    """
