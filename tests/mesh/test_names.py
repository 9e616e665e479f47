"""mesh/names.py: the Kubernetes rules for each kind of name, and for label keys and values."""

from __future__ import annotations

import pytest

from kube import names

VALID = [
    (names.NAMESPACE, "ns1"),
    (names.NAMESPACE, "a"),
    (names.NAMESPACE, "a" * 63),
    (names.NAMESPACE, "istio-system"),
    (names.OBJECT_NAME, "web-1"),
    (names.OBJECT_NAME, "web.v1"),
    (names.OBJECT_NAME, "0abc"),
    (names.OBJECT_NAME, ".".join(["a" * 63] * 3) + "." + "a" * 61),  # 253
    (names.SERVICE_NAME, "httpbin"),
    (names.SERVICE_NAME, "a" * 63),
    (names.PORT_NAME, "http-alt"),
]

INVALID = [
    (names.NAMESPACE, "NS1", "is not a valid namespace"),
    (names.NAMESPACE, "ns.1", "is not a valid namespace"),  # a label: no dots
    (names.NAMESPACE, "-ns", "is not a valid namespace"),
    (names.NAMESPACE, "ns-", "is not a valid namespace"),
    (names.NAMESPACE, "a" * 64, "is longer than 63 characters"),
    (names.OBJECT_NAME, "sleep_1", "is not a valid name"),
    (names.OBJECT_NAME, "a..b", "is not a valid name"),
    (names.OBJECT_NAME, ".".join(["a" * 63] * 4), "is longer than 253 characters"),
    (names.SERVICE_NAME, "1web", "is not a valid service name"),  # RFC 1035: a letter first
    (names.SERVICE_NAME, "web.v1", "is not a valid service name"),
    (names.SERVICE_NAME, "a" * 64, "is longer than 63 characters"),
    (names.PORT_NAME, "HTTP", "is not a valid port name"),
]


@pytest.mark.parametrize(("rule", "value"), VALID, ids=[f"{r.what.split()[0]}:{v[:20]}" for r, v in VALID])
def test_valid_names(rule: names.NameRule, value: str) -> None:
    assert rule.check(value) is None


@pytest.mark.parametrize(
    ("rule", "value", "reason"), INVALID, ids=[f"{r.what.split()[0]}:{v[:20]}" for r, v, _ in INVALID]
)
def test_invalid_names(rule: names.NameRule, value: str, reason: str) -> None:
    problem = rule.check(value)
    assert problem is not None and reason in problem


LABEL_KEYS = [
    ("app", None),
    ("app.kubernetes.io/name", None),
    ("istio.io/use-waypoint", None),
    ("A_b.c-D", None),
    ("a" * 63, None),
    ("example.com/" + "a" * 63, None),
    ("a" * 253 + "/x", None),
    ("a" * 254 + "/x", "prefix is longer than 253"),
    ("", "name part is empty"),
    ("example.com/", "name part is empty"),
    ("/app", "empty prefix"),
    ("a/b/c", "more than one '/'"),
    ("Example.com/app", "prefix 'Example.com' is not a lowercase RFC 1123 subdomain"),
    ("a b", "name part must be alphanumeric"),
    ("-app", "name part must be alphanumeric"),
    ("app-", "name part must be alphanumeric"),
    ("a" * 64, "name part is longer than 63"),
]


@pytest.mark.parametrize(("key", "reason"), LABEL_KEYS, ids=[k[:30] or "<empty>" for k, _ in LABEL_KEYS])
def test_label_keys(key: str, reason: str | None) -> None:
    problem = names.label_key_error(key)
    if reason is None:
        assert problem is None and names.is_label_key(key)
    else:
        assert problem is not None and reason in problem and not names.is_label_key(key)


LABEL_VALUES = [
    ("", None),
    ("v1", None),
    ("a.b_c-d", None),
    ("a" * 63, None),
    ("a" * 64, "longer than 63"),
    ("-v", "must be empty or alphanumeric"),
    ("v 1", "must be empty or alphanumeric"),
    ("v/1", "must be empty or alphanumeric"),
]


@pytest.mark.parametrize(
    ("value", "reason"), LABEL_VALUES, ids=[v[:30] or "<empty>" for v, _ in LABEL_VALUES]
)
def test_label_values(value: str, reason: str | None) -> None:
    problem = names.label_value_error(value)
    if reason is None:
        assert problem is None and names.is_label_value(value)
    else:
        assert problem is not None and reason in problem and not names.is_label_value(value)


def test_names_imports_nothing_from_the_mesh_model() -> None:
    # It is meant to move below policy/: it must stay free of mesh/ (and everything else).
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(names.__file__).read_text())
    imported = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in (n.names if isinstance(n, ast.Import) else [n])  # type: ignore[attr-defined]
    }
    assert imported <= {"__future__", "re", "dataclasses", "typing"}, imported
