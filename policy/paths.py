"""Request-path normalization for L7 policy, as Istio configures Envoy's HTTP connection manager.

Istio's mesh setting ``pathNormalization`` maps to three HCM options (pilot's listener builder):

============================  ==============  =============  ===================================
mode                          normalize_path  merge_slashes  path_with_escaped_slashes_action
============================  ==============  =============  ===================================
NONE                          false           false          KEEP_UNCHANGED
BASE (Istio's DEFAULT)        true            false          KEEP_UNCHANGED
MERGE_SLASHES                 true            true           KEEP_UNCHANGED
DECODE_AND_MERGE_SLASHES      true            true           UNESCAPE_AND_FORWARD
============================  ==============  =============  ===================================

``normalize_path`` is Envoy's RFC 3986 normalization: percent-encoded *unreserved* characters
(``A-Z a-z 0-9 - . _ ~``) are decoded once (no double decoding), ``\\`` becomes ``/``, and ``.``/``..``
segments are removed (RFC 3986 §5.2.4; ``..`` above the root is dropped). ``%2F``/``%5C`` stay
encoded unless the mode decodes them, other escapes are kept as written. ``%00`` is always refused.
The query (``?``) is kept for the upstream request but never takes part in path matching, and a
fragment (``#``) is stripped, as current Envoy does. Vectors: Istio's integration test
``tests/integration/security/normalization_test.go`` (reproduced in tests/policy/test_paths.py).

ztagent's default is :attr:`PathNormalization.MERGE_SLASHES`, not Istio's BASE: DESIGN §5 asks
for merged slashes, and BASE leaves ``//admin`` unequal to ``/admin`` (CVE-2021-31920, for which
Istio's own advice is MERGE_SLASHES). The backslash follows Istio's BASE: it is a ``/``.

Where Istio's reading and a common backend's reading of a path differ in a way that changes which
resource is meant, the request is refused with 400 rather than guessed at ("cannot be normalized
safely"): a malformed escape (``%4``, ``%zz``), a control character or space, a path that is not
origin-form, and a dot segment carrying path parameters (``/..;/admin``, ``/.;x/``), which Istio
forwards untouched but servlet containers resolve as ``..``. Other ``;`` parameters (``/a;v=1``)
are kept as Istio keeps them; note that ``/admin;x`` then does not equal ``/admin``, so write
DENY rules on such paths as prefixes (``/admin*``) or prefer ALLOW lists.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final


class PathNormalization(enum.Enum):
    NONE = "NONE"
    BASE = "BASE"
    MERGE_SLASHES = "MERGE_SLASHES"
    DECODE_AND_MERGE_SLASHES = "DECODE_AND_MERGE_SLASHES"


DEFAULT_NORMALIZATION: Final = PathNormalization.MERGE_SLASHES

# Envoy refuses longer request lines by default (max_request_headers_kb = 60); bound the work here too.
MAX_PATH_BYTES: Final = 16 * 1024

_UNRESERVED: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX: Final = frozenset("0123456789abcdefABCDEF")
_CONTROL: Final = re.compile(r"[\x00-\x20\x7f]")


class PathRejected(ValueError):
    """The path cannot be normalized safely: answer ``status`` (400) and never evaluate policy."""

    status = 400

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"path {path[:200]!r} rejected: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class NormalizedPath:
    path: str  # normalized path (no query, no fragment): what `paths`/`notPaths` match
    query: str | None  # the query without "?", kept for the upstream request; None if absent

    @property
    def upstream(self) -> str:
        """The request target forwarded upstream (Istio forwards the normalized path)."""
        return self.path if self.query is None else f"{self.path}?{self.query}"


def normalize_path(raw: str, mode: PathNormalization = DEFAULT_NORMALIZATION) -> NormalizedPath:
    """Normalize a request target as received (``:path`` / the HTTP/1.1 request-target).

    Raises :class:`PathRejected` (400) for anything that cannot be normalized safely.
    """
    if len(raw) > MAX_PATH_BYTES:
        raise PathRejected(raw, f"longer than {MAX_PATH_BYTES} bytes")
    if not raw.startswith("/"):
        raise PathRejected(raw, "not an origin-form path (must start with '/')")
    bad = _CONTROL.search(raw)
    if bad is not None:
        raise PathRejected(raw, f"control character or space {bad.group()!r}")
    path, _, _fragment = raw.partition("#")
    path, sep, query = path.partition("?")
    q = query if sep else None
    if mode is PathNormalization.NONE:
        _check_escapes(raw, path)
        return NormalizedPath(path, q)
    path = _decode(raw, path, decode_slashes=mode is PathNormalization.DECODE_AND_MERGE_SLASHES)
    path = path.replace("\\", "/")
    path = _remove_dot_segments(raw, path)
    if mode in (PathNormalization.MERGE_SLASHES, PathNormalization.DECODE_AND_MERGE_SLASHES):
        path = _merge_slashes(path)
    return NormalizedPath(path, q)


def _check_escapes(raw: str, path: str) -> None:
    i = path.find("%")
    while i != -1:
        h = path[i + 1 : i + 3]
        if len(h) != 2 or not (h[0] in _HEX and h[1] in _HEX):
            raise PathRejected(raw, f"malformed percent-escape at offset {i}")
        if h == "00":
            raise PathRejected(raw, "%00 in path")
        i = path.find("%", i + 3)


def _decode(raw: str, path: str, decode_slashes: bool) -> str:
    """Decode unreserved escapes once (and %2F/%5C when asked); keep other escapes as written.

    Non-ASCII characters are percent-encoded as UTF-8, as Envoy's (Chromium's) canonicalizer does,
    so a policy written with escapes matches the same bytes however the client sent them.
    """
    if "%" not in path and path.isascii():
        return path
    out: list[str] = []
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c == "%":
            h = path[i + 1 : i + 3]
            if len(h) != 2 or not (h[0] in _HEX and h[1] in _HEX):
                raise PathRejected(raw, f"malformed percent-escape at offset {i}")
            b = int(h, 16)
            if b == 0:
                raise PathRejected(raw, "%00 in path")
            if b in _UNRESERVED or (decode_slashes and b in (0x2F, 0x5C)):
                out.append(chr(b))
            else:
                out.append(path[i : i + 3])
            i += 3
            continue
        if not c.isascii():
            out.append("".join(f"%{x:02X}" for x in c.encode("utf-8", "surrogatepass")))
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _remove_dot_segments(raw: str, path: str) -> str:
    """RFC 3986 §5.2.4 on an absolute path; refuses dot segments with ``;`` parameters."""
    segs = path.split("/")[1:]  # path starts with "/"
    out: list[str] = []
    for i, s in enumerate(segs):
        last = i == len(segs) - 1
        if ";" in s and s.split(";", 1)[0] in (".", ".."):
            raise PathRejected(raw, f"dot segment with path parameters {s!r} (ambiguous between servers)")
        if s == ".":
            if last:
                out.append("")
            continue
        if s == "..":
            if out:
                out.pop()
            if last:
                out.append("")
            continue
        out.append(s)
    return "/" + "/".join(out)


def _merge_slashes(path: str) -> str:
    while "//" in path:
        path = path.replace("//", "/")
    return path
