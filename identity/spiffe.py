"""SPIFFE IDs and trust domains, parsed strictly (SPIFFE-ID spec §2, go-spiffe's rules).

A SPIFFE ID is ``spiffe://<trust-domain><path>``. We accept only the canonical form, so that
two IDs that compare unequal can never name the same workload and an authorization decision
on the string is the same as one on the parsed value:

* scheme exactly ``spiffe://`` (lowercase);
* trust domain ``[a-z0-9._-]``, non-empty, at most 255 bytes; no userinfo, port, uppercase
  or percent-encoding (they would create aliases of one domain);
* path empty (the trust domain's own ID) or ``/seg/seg...`` with segments ``[A-Za-z0-9._-]``,
  no empty, ``.`` or ``..`` segments and no trailing slash;
* no query or fragment; the whole ID at most 2048 bytes.

Every rejection raises :class:`SpiffeIdError` whose ``rule`` names the rule that failed, so
callers (CLI, logs, tests) can report it without parsing prose.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Final

SCHEME_PREFIX: Final = "spiffe://"
MAX_ID_BYTES: Final = 2048
MAX_TRUST_DOMAIN_BYTES: Final = 255

_TD_CHARS = re.compile(r"[a-z0-9._-]+")
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._-]+")


class SpiffeIdError(ValueError):
    """A string is not a valid SPIFFE ID / trust domain; ``rule`` names the rule it broke."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{rule}: {message}")
        self.rule = rule
        self.message = message


def _byte_len(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


def _check_trust_domain(name: str) -> None:
    if not isinstance(name, str):
        raise SpiffeIdError("type", f"trust domain must be a string, got {type(name).__name__}")
    if name == "":
        raise SpiffeIdError("trust-domain-empty", "trust domain is empty")
    if _byte_len(name) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeIdError(
            "trust-domain-length",
            f"trust domain is {_byte_len(name)} bytes, at most {MAX_TRUST_DOMAIN_BYTES} allowed",
        )
    if _TD_CHARS.fullmatch(name):
        return
    # Name the most specific rule: these are the usual ways a URI authority smuggles aliases.
    if "@" in name:
        raise SpiffeIdError("trust-domain-userinfo", f"trust domain {name!r} contains userinfo ('@')")
    if "[" in name or "]" in name:
        raise SpiffeIdError("trust-domain-charset", f"trust domain {name!r} is an IP literal; names only")
    if ":" in name:
        raise SpiffeIdError("trust-domain-port", f"trust domain {name!r} contains a port (':')")
    if "%" in name:
        raise SpiffeIdError(
            "trust-domain-percent-encoding", f"trust domain {name!r} contains percent-encoding"
        )
    if any("A" <= c <= "Z" for c in name):
        raise SpiffeIdError("trust-domain-uppercase", f"trust domain {name!r} contains uppercase letters")
    bad = next(c for c in name if not _TD_CHARS.fullmatch(c))
    raise SpiffeIdError(
        "trust-domain-charset",
        f"trust domain {name!r} contains {bad!r}; only [a-z0-9._-] are allowed",
    )


def _check_path(path: str) -> None:
    """Validate a path: "" or "/seg(/seg)*"."""
    if not isinstance(path, str):
        raise SpiffeIdError("type", f"path must be a string, got {type(path).__name__}")
    if path == "":
        return
    if "?" in path:
        raise SpiffeIdError("query", "SPIFFE ID must not contain a query ('?')")
    if "#" in path:
        raise SpiffeIdError("fragment", "SPIFFE ID must not contain a fragment ('#')")
    if not path.startswith("/"):
        raise SpiffeIdError("path-leading-slash", f"path {path!r} must begin with '/'")
    segments = path[1:].split("/")
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if seg == "":
            if i == last:
                raise SpiffeIdError("path-trailing-slash", f"path {path!r} ends with '/'")
            raise SpiffeIdError("path-empty-segment", f"path {path!r} has an empty segment ('//')")
        if seg in (".", ".."):
            raise SpiffeIdError("path-dot-segment", f"path {path!r} has a {seg!r} segment")
        if not _SEGMENT_CHARS.fullmatch(seg):
            if "%" in seg:
                raise SpiffeIdError("path-percent-encoding", f"path {path!r} contains percent-encoding")
            bad = next(c for c in seg if not _SEGMENT_CHARS.fullmatch(c))
            raise SpiffeIdError(
                "path-charset",
                f"path segment {seg!r} contains {bad!r}; only [A-Za-z0-9._-] are allowed",
            )


@dataclass(frozen=True, order=True)
class TrustDomain:
    """A SPIFFE trust domain name, e.g. ``cluster.local``. Validated on construction."""

    name: str

    def __post_init__(self) -> None:
        _check_trust_domain(self.name)

    @classmethod
    def parse(cls, name: str) -> TrustDomain:
        return cls(name)

    @property
    def id(self) -> SpiffeId:
        """The trust domain's own SPIFFE ID (``spiffe://td``, empty path), as used by CAs."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A validated SPIFFE ID. ``path`` is "" (trust domain ID) or begins with "/"."""

    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise SpiffeIdError("type", "trust_domain must be a TrustDomain")
        _check_path(self.path)
        total = len(SCHEME_PREFIX) + _byte_len(self.trust_domain.name) + _byte_len(self.path)
        if total > MAX_ID_BYTES:
            raise SpiffeIdError("too-long", f"SPIFFE ID is {total} bytes, at most {MAX_ID_BYTES} allowed")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        if not isinstance(text, str):
            raise SpiffeIdError("type", f"SPIFFE ID must be a string, got {type(text).__name__}")
        if text == "":
            raise SpiffeIdError("empty", "SPIFFE ID is empty")
        # Length first: bounds the work done on hostile input before any scanning.
        if len(text) > MAX_ID_BYTES or _byte_len(text) > MAX_ID_BYTES:
            raise SpiffeIdError(
                "too-long", f"SPIFFE ID is {_byte_len(text)} bytes, at most {MAX_ID_BYTES} allowed"
            )
        if not text.startswith(SCHEME_PREFIX):
            if text[: len(SCHEME_PREFIX)].lower() == SCHEME_PREFIX:
                raise SpiffeIdError("scheme", "scheme must be lowercase 'spiffe://'")
            raise SpiffeIdError("scheme", "SPIFFE ID must begin with 'spiffe://'")
        rest = text[len(SCHEME_PREFIX) :]
        # The authority ends at the first '/', '?' or '#' (RFC 3986 §3.2).
        end = len(rest)
        for delim in "/?#":
            pos = rest.find(delim)
            if pos != -1:
                end = min(end, pos)
        authority, path = rest[:end], rest[end:]
        if authority == "":
            raise SpiffeIdError("trust-domain-empty", "SPIFFE ID has no trust domain")
        td = TrustDomain(authority)
        if path.startswith(("?", "#")):
            _check_path("/x" + path)  # raises the query/fragment rule
        return cls(td, path)

    @classmethod
    def for_workload(cls, trust_domain: TrustDomain | str, namespace: str, service_account: str) -> SpiffeId:
        """Istio's workload identity ``spiffe://<td>/ns/<namespace>/sa/<service-account>``."""
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain(trust_domain)
        for what, value in (("namespace", namespace), ("service account", service_account)):
            if not isinstance(value, str) or value == "":
                raise SpiffeIdError("path-empty-segment", f"{what} is empty")
            if "/" in value:
                raise SpiffeIdError("path-charset", f"{what} {value!r} contains '/'")
        return cls(td, f"/ns/{namespace}/sa/{service_account}")

    def _istio_parts(self) -> tuple[str, str] | None:
        parts = self.path.split("/")
        if len(parts) == 5 and parts[0] == "" and parts[1] == "ns" and parts[3] == "sa":
            return parts[2], parts[4]
        return None

    @property
    def principal(self) -> str:
        """Istio's principal form: the ID without ``spiffe://``."""
        return f"{self.trust_domain.name}{self.path}"

    @property
    def namespace(self) -> str | None:
        parts = self._istio_parts()
        return parts[0] if parts else None

    @property
    def service_account(self) -> str | None:
        parts = self._istio_parts()
        return parts[1] if parts else None

    def member_of(self, trust_domain: TrustDomain) -> bool:
        return self.trust_domain == trust_domain

    @functools.cached_property
    def _uri(self) -> str:
        # Formatted once per ID: the agent names principals in the labels, logs and headers of
        # every connection, and one shared string beats a fresh copy for each (issue 6 memory).
        return f"{SCHEME_PREFIX}{self.trust_domain.name}{self.path}"

    def __str__(self) -> str:
        return self._uri
