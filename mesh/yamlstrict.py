"""A strict YAML loader: PyYAML's safe loader, but a duplicate mapping key is an error.

PyYAML keeps the last of two equal keys, which would silently change a config or a policy (the
second ``action:`` wins). Errors keep their position (1-based line and column, and the index of
the document in the stream) so callers can name the exact place.

Used by mesh/parse.py; ``ztagent policy`` has its own copy until it switches to this module.
Pure: text in, documents or :class:`YamlSyntaxError` out.
"""

from __future__ import annotations

from typing import Any

import yaml


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate (and unhashable) mapping keys."""


def _construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "mapping key is not hashable", key_node.start_mark
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = loader.construct_object(value_node, deep=deep)
    return seen


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class YamlSyntaxError(ValueError):
    """The stream is not (strict) YAML. ``line``/``column`` are 1-based, ``document`` 0-based;
    each is None when PyYAML gave no position."""

    def __init__(self, problem: str, line: int | None, column: int | None, document: int | None) -> None:
        self.problem, self.line, self.column, self.document = problem, line, column, document
        where = f"line {line}, column {column}: " if line is not None else ""
        super().__init__(f"{where}{problem}")


def load_documents(text: str) -> list[Any]:
    """Every document of the stream (None for an empty one); raises :class:`YamlSyntaxError`."""
    try:
        return list(yaml.load_all(text, Loader=StrictLoader))
    except RecursionError:  # PyYAML's composer recurses once per nesting level (fuzz finding)
        raise YamlSyntaxError("nested too deeply", None, None, None) from None
    except (yaml.YAMLError, ValueError) as exc:
        # PyYAML's constructors raise plain ValueError for a well-formed scalar they cannot build
        # (`2024-02-30`, `!!int x`); a refusal like any other, never an escape from the parser.
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        if mark is None:
            raise YamlSyntaxError(problem, None, None, None) from None
        raise YamlSyntaxError(
            problem, mark.line + 1, mark.column + 1, document_index_at(text, mark.line)
        ) from None


def document_index_at(text: str, line: int) -> int:
    """0-based index of the document containing 0-based ``line`` (counting '---' separators;
    a leading '---' before any content starts the first document, not a second)."""
    index = 0
    started = False
    for n, ln in enumerate(text.splitlines()):
        if n >= line:
            break
        if ln.startswith("---"):
            if started:
                index += 1
            started = True
        elif ln.strip() and not ln.lstrip().startswith("#") and not ln.startswith("%"):
            started = True
    return index
