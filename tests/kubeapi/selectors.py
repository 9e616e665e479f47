"""Label and field selectors, parsed with the grammar of apimachinery's labels.Parse and
fields.ParseSelector, so a selector a real server rejects is rejected here with a 400 too."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class SelectorError(ValueError):
    pass


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!":
            return self.key not in labels
        if self.op in ("=", "in"):
            return self.key in labels and labels[self.key] in self.values
        # "!=" and "notin" match objects without the key, as labels.Requirement.Matches does.
        return self.key not in labels or labels[self.key] not in self.values


_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_TOKEN = re.compile(r"\s*(\(|\)|,|!=|==|=|!|[^\s(),!=]+)")


def _check_key(key: str) -> str:
    if not _KEY.match(key) or len(key.rsplit("/", 1)[-1]) > 63:
        raise SelectorError(f"unable to parse requirement: invalid label key {key!r}")
    return key


def _check_value(v: str) -> str:
    if len(v) > 63 or not _VALUE.match(v):
        raise SelectorError(f"unable to parse requirement: invalid label value: {v!r}")
    return v


def parse_label_selector(text: str) -> list[Requirement]:
    tokens: list[str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise SelectorError(f"unable to parse requirement: unexpected input at {text[pos:]!r}")
        tokens.append(m.group(1))
        pos = m.end()
    reqs: list[Requirement] = []
    i = 0

    def take() -> str:
        nonlocal i
        if i >= len(tokens):
            raise SelectorError("unable to parse requirement: unexpected end of selector")
        i += 1
        return tokens[i - 1]

    while i < len(tokens):
        t = take()
        if t == "!":
            reqs.append(Requirement(_check_key(take()), "!"))
        else:
            key = _check_key(t)
            if i >= len(tokens) or tokens[i] == ",":
                reqs.append(Requirement(key, "exists"))
            else:
                op = take()
                if op in ("=", "=="):
                    reqs.append(Requirement(key, "=", (_check_value(_value_or_empty(tokens, i, take)),)))
                elif op == "!=":
                    reqs.append(Requirement(key, "!=", (_check_value(_value_or_empty(tokens, i, take)),)))
                elif op in ("in", "notin"):
                    if take() != "(":
                        raise SelectorError(f"unable to parse requirement: found {op} without '('")
                    vals: list[str] = []
                    while True:
                        v = take()
                        if v == ")":
                            break
                        if v == ",":
                            continue
                        vals.append(_check_value(v))
                    reqs.append(Requirement(key, op, tuple(vals)))
                else:
                    raise SelectorError(
                        f"unable to parse requirement: found '{op}', expected: '=', '!=', '==', 'in', notin'"
                    )
        if i < len(tokens):
            if tokens[i] != ",":
                raise SelectorError(f"found '{tokens[i]}', expected: ',' or 'end of string'")
            i += 1
            if i >= len(tokens):
                raise SelectorError("found 'end of string', expected: identifier")
    return reqs


def _value_or_empty(tokens: list[str], i: int, take: Callable[[], str]) -> str:
    # `a=` selects an empty value, as labels.Parse allows.
    if i >= len(tokens) or tokens[i] == ",":
        return ""
    return take()


def labels_match(reqs: list[Requirement], labels: Mapping[str, str] | None) -> bool:
    return all(r.matches(labels or {}) for r in reqs)


@dataclass(frozen=True)
class FieldRequirement:
    field: str
    negate: bool
    value: str


def parse_field_selector(text: str, allowed: tuple[str, ...]) -> list[FieldRequirement]:
    out: list[FieldRequirement] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = re.match(r"^([^=!]+)(==|!=|=)(.*)$", part)
        if not m:
            raise SelectorError(f"invalid selector: '{text}'; can't understand '{part}'")
        key, op, value = m.group(1).strip(), m.group(2), m.group(3).strip()
        if key not in ("metadata.name", "metadata.namespace", *allowed):
            raise SelectorError(f"field label not supported: {key}")
        out.append(FieldRequirement(key, op == "!=", value))
    return out


def field_value(obj: Mapping[str, Any], path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def fields_match(reqs: list[FieldRequirement], obj: Mapping[str, Any]) -> bool:
    return all((field_value(obj, r.field) == r.value) != r.negate for r in reqs)
