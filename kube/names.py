"""Kubernetes names and labels, validated as the Kubernetes API server validates them.

One module for every config path (the file source, a Kubernetes watch, and later policy/'s
selectors), so a name the API server accepts is accepted everywhere and nothing else is.
It depends on nothing but ``re`` so that it can move below policy/ (the lowest ring that needs
it) without dragging the mesh model along.

Which rule applies to which kind (apimachinery ``validation.go`` and the core validators):

=====================================  ===========================  =====
object                                 rule                         max
=====================================  ===========================  =====
Namespace                              RFC 1123 label               63
Pod, ServiceAccount, Node, CRD objects RFC 1123 subdomain           253
  (AuthorizationPolicy, Gateway, ...)
Service                                RFC 1035 label (starts with  63
                                       a letter)
Service port name                      RFC 1123 label               63
label key                              [prefix/]name: prefix an     253 / 63
                                       RFC 1123 subdomain, name
                                       alnum with ``-_.`` inside
label value                            empty, or alnum with         63
                                       ``-_.`` inside
=====================================  ===========================  =====

Each check returns ``None`` when the value is valid, else a short reason; callers put it in
their own error (which names file, document and field).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

_LABEL_CHARS = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_LABEL: Final = re.compile(_LABEL_CHARS)
DNS1123_SUBDOMAIN: Final = re.compile(rf"{_LABEL_CHARS}(\.{_LABEL_CHARS})*")
DNS1035_LABEL: Final = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME: Final = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_VALUE: Final = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")

LABEL_MAX: Final = 63
SUBDOMAIN_MAX: Final = 253


@dataclass(frozen=True)
class NameRule:
    """One Kubernetes naming rule; ``what`` is how errors describe it."""

    what: str
    pattern: re.Pattern[str]
    max_len: int

    def check(self, value: str) -> str | None:
        """None if ``value`` is valid, else the reason (pattern first, then length, like the
        API server's messages)."""
        if not self.pattern.fullmatch(value):
            return f"{value!r} is not a valid {self.what}"
        if len(value) > self.max_len:
            return f"is longer than {self.max_len} characters"
        return None


NAMESPACE: Final = NameRule("namespace (lowercase RFC 1123 label)", DNS1123_LABEL, LABEL_MAX)
# Pods, service accounts, nodes and custom resources (Istio policies, Gateways).
OBJECT_NAME: Final = NameRule("name (lowercase RFC 1123 subdomain)", DNS1123_SUBDOMAIN, SUBDOMAIN_MAX)
# Services are DNS-1035 labels: their name is the first label of name.namespace.svc.<domain>.
SERVICE_NAME: Final = NameRule(
    "service name (lowercase RFC 1035 label: starts with a letter, no dots)", DNS1035_LABEL, LABEL_MAX
)
PORT_NAME: Final = NameRule("port name", DNS1123_LABEL, LABEL_MAX)


def label_key_error(key: str) -> str | None:
    """None for a valid label key (``[prefix/]name``), else the reason."""
    if key.count("/") > 1:
        return "has more than one '/'"
    prefix, slash, name = key.rpartition("/")
    if slash and not prefix:
        return "has an empty prefix before '/'"
    if prefix:
        if not DNS1123_SUBDOMAIN.fullmatch(prefix):
            return f"prefix {prefix!r} is not a lowercase RFC 1123 subdomain"
        if len(prefix) > SUBDOMAIN_MAX:
            return f"prefix is longer than {SUBDOMAIN_MAX} characters"
    if not name:
        return "name part is empty"
    if not _QUALIFIED_NAME.fullmatch(name):
        return "name part must be alphanumeric, with '-', '_' or '.' only between alphanumerics"
    if len(name) > LABEL_MAX:
        return f"name part is longer than {LABEL_MAX} characters"
    return None


def label_value_error(value: str) -> str | None:
    """None for a valid label value (may be empty), else the reason."""
    if len(value) > LABEL_MAX:
        return f"is longer than {LABEL_MAX} characters"
    if not _LABEL_VALUE.fullmatch(value):
        return "must be empty or alphanumeric, with '-', '_' or '.' only between alphanumerics"
    return None


def is_label_key(key: str) -> bool:
    return label_key_error(key) is None


def is_label_value(value: str) -> bool:
    return label_value_error(value) is None
