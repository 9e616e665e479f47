"""mesh/yamlstrict.py: duplicate keys are errors, positions (line, column, document) are kept."""

from __future__ import annotations

import pytest

from mesh.yamlstrict import YamlSyntaxError, document_index_at, load_documents


def test_loads_every_document_including_empty_ones() -> None:
    assert load_documents("a: 1\n---\n---\nb: [1, 2]\n") == [{"a": 1}, None, {"b": [1, 2]}]


CASES = [
    ("a: 1\na: 2\n", "duplicate key 'a'", 2, 1, 0),
    ("x: {k: 1, k: 2}\n", "duplicate key 'k'", 1, 11, 0),
    ("---\na: 1\n---\nb: 1\nb: 2\n", "duplicate key 'b'", 5, 1, 1),
    ("# c\n---\nok: 1\n---\nbad: [\n", None, None, None, 1),
    ("? [1, 2]\n: x\n", "mapping key is not hashable", 1, 3, 0),
    ("a: 1\n b: 2\n", None, 2, None, 0),
]


@pytest.mark.parametrize(("text", "problem", "line", "column", "document"), CASES)
def test_errors_keep_their_position(
    text: str, problem: str | None, line: int | None, column: int | None, document: int
) -> None:
    with pytest.raises(YamlSyntaxError) as ei:
        load_documents(text)
    e = ei.value
    if problem is not None:
        assert e.problem == problem
    if line is not None:
        assert e.line == line
    if column is not None:
        assert e.column == column
    assert e.document == document
    assert str(e).startswith(f"line {e.line}, column {e.column}: ")


def test_merge_keys_work_but_overriding_a_merged_key_is_refused() -> None:
    # "<<" merges are flattened first, so a key written next to a merge that sets it too is two
    # values for one key: refused like any duplicate (the loader's behaviour since it was
    # written; a reader of the file cannot tell which value wins without knowing YAML's rule).
    assert load_documents("base: &b {x: 1}\nderived:\n  <<: *b\n  y: 3\n")[0]["derived"] == {"x": 1, "y": 3}
    with pytest.raises(YamlSyntaxError, match="duplicate key 'y'"):
        load_documents("base: &b {x: 1, y: 2}\nderived:\n  <<: *b\n  y: 3\n")


@pytest.mark.parametrize(
    ("text", "line", "index"),
    [("a: 1\n", 0, 0), ("---\na: 1\n", 1, 0), ("a: 1\n---\nb: 1\n", 2, 1), ("# x\n---\na\n---\nb\n", 4, 1)],
)
def test_document_index_at(text: str, line: int, index: int) -> None:
    assert document_index_at(text, line) == index
