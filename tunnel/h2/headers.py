"""Header blocks: our (static-table + literal) HPACK output, and checks on decoded peer fields.

Output. Every header block we send uses only the HPACK static table and literals "without
indexing" (RFC 7541 §6.2.2), never the dynamic table. A CONNECT's values (authority, trace id,
source port) rarely repeat, so indexing them mostly evicts entries, and without a dynamic table a
response is a constant: ``:status 200`` is the single byte 0x88. ``bench/h2core_bench.py``
("headers" rows) measured ``hpack.Encoder.encode`` (already without Huffman) at 5.7 µs for a
request with ztunnel's headers against 3.0 µs here, and 1.1 µs against 0.17 µs for the 200;
together with keeping no encoder state per connection, that is why this small literal encoder
exists instead of the library's. Input is the
opposite: peers (Envoy, ztunnel, h2) do use their dynamic tables, so decoding keeps the real
``hpack.Decoder`` with a bounded table and header-list size.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# RFC 7541 Appendix A indices we use.
_STATIC_AUTHORITY = 1
_STATIC_METHOD = 2
_STATIC_STATUS = 8
_STATUS_INDEXED = {200: 8, 204: 9, 206: 10, 304: 11, 400: 12, 404: 13, 500: 14}
# A dynamic table size update to 0 (RFC 7541 §6.3): we never add entries, and saying so up front
# means a peer that lowers SETTINGS_HEADER_TABLE_SIZE (nghttp2 then expects an update at the
# start of the next block, RFC 7541 §4.2) is always satisfied.
TABLE_SIZE_ZERO = b"\x20"

_REQUEST_PSEUDO = frozenset({":method", ":scheme", ":authority", ":path", ":protocol"})
_CONNECTION_SPECIFIC = frozenset(
    {"connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade"}
)
# RFC 9113 §8.2.1: no NUL/CR/LF anywhere in a value, no leading or trailing SP/HTAB.
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")
# RFC 9113 §8.2.1: names are lowercase, no controls, SP, DEL or non-ASCII; RFC 9110 tokens.
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_OUT_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class MalformedHeaders(Exception):
    """A header block that RFC 9113 §8.1.1 calls malformed (a stream error, PROTOCOL_ERROR)."""


def _int(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 §5.1 integer with an N-bit prefix; ``first`` holds the representation's flag bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name_index: int, name: bytes, value: bytes) -> bytes:
    # Literal without indexing: 0000 + 4-bit name index (0 = new name), no Huffman.
    if name_index:
        return _int(name_index, 4, 0x00) + _int(len(value), 7, 0) + value
    return b"\x00" + _int(len(name), 7, 0) + name + _int(len(value), 7, 0) + value


_CONNECT = _literal(_STATIC_METHOD, b"", b"CONNECT")


def status_block(status: int) -> bytes:
    index = _STATUS_INDEXED.get(status)
    if index is not None:
        return bytes((0x80 | index,))
    return _literal(_STATIC_STATUS, b"", str(status).encode("ascii"))


# The HBONE answers, built once.
STATUS_BLOCKS: dict[int, bytes] = {
    code: status_block(code) for code in (200, 400, 401, 403, 500, 502, 503, 504)
}


def check_outbound(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """Caller-supplied request/response headers, validated (names a field) and encoded to bytes."""
    out = []
    for name, value in headers.items():
        lname = name.lower()
        if lname.startswith(":") or lname in _CONNECTION_SPECIFIC or lname in ("host", "te"):
            raise ValueError(f"header {name!r} may not be set on an HBONE CONNECT")
        if not _TOKEN.fullmatch(lname):
            raise ValueError(f"header name {name!r} is not a valid HTTP token")
        if _BAD_OUT_VALUE.search(value) or value != value.strip(" \t"):
            raise ValueError(f"header {name!r} has a value with control characters or edge whitespace")
        out.append((lname.encode("ascii"), value.encode("latin-1")))
    return out


def request_block(authority: str, fields: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """``:method CONNECT``, ``:authority`` and already-checked fields (RFC 9113 §8.5)."""
    parts = [_CONNECT, _literal(_STATIC_AUTHORITY, b"", authority.encode("ascii"))]
    parts.extend(_literal(0, n, v) for n, v in fields)
    return b"".join(parts)


def literal_fields(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"".join(_literal(0, n, v) for n, v in fields)


def response_block(status: int, fields: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    head = STATUS_BLOCKS.get(status) or status_block(status)
    extra = [_literal(0, n, v) for n, v in fields]
    return head + b"".join(extra) if extra else head


def _check_fields(fields: Iterable[tuple[bytes, bytes]], allowed_pseudo: frozenset[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    regular = False
    for raw_name, raw_value in fields:
        if _BAD_VALUE.search(raw_value):
            raise MalformedHeaders(f"header {raw_name[:64]!r} has a forbidden character or edge whitespace")
        if raw_name[:1] == b":":
            name = raw_name.decode("latin-1")
            if regular:
                raise MalformedHeaders(f"pseudo-header {name!r} after a regular header")
            if name not in allowed_pseudo:
                raise MalformedHeaders(f"pseudo-header {name!r} is not allowed here")
            if name in out:
                raise MalformedHeaders(f"pseudo-header {name!r} repeated")
            out[name] = raw_value.decode("latin-1")
            continue
        regular = True
        if not _NAME.fullmatch(raw_name):
            raise MalformedHeaders(f"header name {raw_name[:64]!r} is not a lowercase HTTP token")
        name = raw_name.decode("ascii")
        value = raw_value.decode("latin-1")
        if name in _CONNECTION_SPECIFIC or (name == "te" and value != "trailers"):
            raise MalformedHeaders(f"connection-specific header {name!r} is not allowed in HTTP/2")
        # Repeated fields fold with ", " (RFC 9110 §5.3).
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def check_request(fields: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """RFC 9113 §8.2-8.3 request checks (generic HTTP/2; the HBONE rules come after)."""
    out = _check_fields(fields, _REQUEST_PSEUDO)
    if ":method" not in out:
        raise MalformedHeaders("request without :method")
    if out[":method"] != "CONNECT" and not {":scheme", ":path"} <= out.keys():
        raise MalformedHeaders("non-CONNECT request without :scheme and :path")
    return out


def check_response(fields: Iterable[tuple[bytes, bytes]]) -> tuple[int, dict[str, str]]:
    out = _check_fields(fields, frozenset({":status"}))
    text = out.get(":status", "")
    # str.isdigit() is true for '¹' and other non-ASCII digits, which int() refuses (found by
    # fuzz/targets/hbone_frames.py): only the ASCII digits are a status code.
    if len(text) != 3 or not all("0" <= ch <= "9" for ch in text):
        raise MalformedHeaders(f"response :status {text!r} is not a 3-digit code")
    status = int(text)
    if status == 101:
        raise MalformedHeaders("101 Switching Protocols does not exist in HTTP/2 (RFC 9113 §8.6)")
    return status, out


def check_trailers(fields: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    return _check_fields(fields, frozenset())
