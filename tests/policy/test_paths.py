"""Path normalization vectors: Istio's own (tests/integration/security/normalization_test.go) plus
the cases where ztagent refuses what Istio would forward."""

from __future__ import annotations

import urllib.parse

import pytest

from policy.paths import (
    DEFAULT_NORMALIZATION,
    MAX_PATH_BYTES,
    PathNormalization,
    PathRejected,
    normalize_path,
)

N = PathNormalization

# (input, NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES): Istio's table.
ISTIO = [
    ("/", "/", "/", "/", "/"),
    ("/app#foo", "/app", "/app", "/app", "/app"),
    ("/app/", "/app/", "/app/", "/app/", "/app/"),
    ("/app/../admin", "/app/../admin", "/admin", "/admin", "/admin"),
    ("/app", "/app", "/app", "/app", "/app"),
    ("/app//", "/app//", "/app//", "/app/", "/app/"),
    ("/app/%2f", "/app/%2f", "/app/%2f", "/app/%2f", "/app/"),
    ("/app%2f/", "/app%2f/", "/app%2f/", "/app%2f/", "/app/"),
    ("/xyz%30..//abc", "/xyz%30..//abc", "/xyz0..//abc", "/xyz0../abc", "/xyz0../abc"),
    ("/app/%2E./admin", "/app/%2E./admin", "/admin", "/admin", "/admin"),
    ("/app\\admin", "/app\\admin", "/app/admin", "/app/admin", "/app/admin"),
    ("/app/\\/\\/\\admin", "/app/\\/\\/\\admin", "/app//////admin", "/app/admin", "/app/admin"),
    (
        "/%2Fapp%5cadmin%5Cabc",
        "/%2Fapp%5cadmin%5Cabc",
        "/%2Fapp%5cadmin%5Cabc",
        "/%2Fapp%5cadmin%5Cabc",
        "/app/admin/abc",
    ),
    (
        "/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc",
        "/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc",
        "/%5Capp%2f%5c%2F..%2fadmin%5c/abc",
        "/%5Capp%2f%5c%2F..%2fadmin%5c/abc",
        "/app/admin/abc",
    ),
    ("/app//../admin", "/app//../admin", "/app/admin", "/app/admin", "/app/admin"),
    ("/app//../../admin", "/app//../../admin", "/admin", "/admin", "/admin"),
]


@pytest.mark.parametrize("raw,none,base,merge,decode", ISTIO)
def test_istio_vectors(raw: str, none: str, base: str, merge: str, decode: str) -> None:
    assert normalize_path(raw, N.NONE).path == none
    assert normalize_path(raw, N.BASE).path == base
    assert normalize_path(raw, N.MERGE_SLASHES).path == merge
    assert normalize_path(raw, N.DECODE_AND_MERGE_SLASHES).path == decode


@pytest.mark.parametrize(
    "raw,out",
    [
        ("/%c0%2e%c0%2e/admin", "/%c0.%c0./admin"),
        ("/%c0%2fadmin", "/%c0/admin"),
        # Istio's "NotNormalized" group: left alone.
        ("/0x2e0x2e/admin", "/0x2e0x2e/admin"),
        ("/%25c0%25ae%25c1%259cadmin", "/%25c0%25ae%25c1%259cadmin"),
        ("/%252e%252e/admin", "/%252e%252e/admin"),  # no double decoding
        ("/%252e%252e%252fadmin", "/%252e%252e%252fadmin"),
        ("/%c0%ae%c0%ae/admin", "/%c0%ae%c0%ae/admin"),
        ("/.../admin", "/.../admin"),
        ("/..../admin", "/..../admin"),
        ("/;/admin", "/;/admin"),
        ("/admin;a=b", "/admin;a=b"),
        ("/admin;a=b/xyz", "/admin;a=b/xyz"),
        ("/admin,a=b/xyz", "/admin,a=b/xyz"),
        ("/Admin", "/Admin"),
        ("/ADMIN", "/ADMIN"),
    ],
)
def test_istio_decode_and_merge_extras(raw: str, out: str) -> None:
    assert normalize_path(raw, N.DECODE_AND_MERGE_SLASHES).path == out


def _supported(i: int) -> bool:
    special = i in (0x2D, 0x2E, 0x2F, 0x5C, 0x5F, 0x7E)
    return special or 0x30 <= i <= 0x39 or 0x41 <= i <= 0x5A or 0x61 <= i <= 0x7A


@pytest.mark.parametrize("i", range(1, 0x100))
def test_every_single_escape(i: int) -> None:
    """Istio's PercentEncoded group (%01..%ff) under DECODE_AND_MERGE_SLASHES."""
    raw = f"/admin%{i:02x}"
    want = raw
    if _supported(i):
        want = urllib.parse.unquote(raw).replace("\\", "/")
    assert normalize_path(raw, N.DECODE_AND_MERGE_SLASHES).path == want


def test_default_is_merge_slashes_and_the_issue_tricks() -> None:
    assert DEFAULT_NORMALIZATION is N.MERGE_SLASHES
    d = DEFAULT_NORMALIZATION
    assert normalize_path("/a/../admin", d).path == "/admin"
    assert normalize_path("/%61dmin", d).path == "/admin"
    assert normalize_path("/%41DMIN", d).path == "/ADMIN"
    assert normalize_path("//admin", d).path == "/admin"
    assert normalize_path("///admin//x", d).path == "/admin/x"
    assert normalize_path("/\\admin", d).path == "/admin"
    assert normalize_path("/x/.%2e/admin", d).path == "/admin"
    assert normalize_path("/x/%2E%2E/admin", d).path == "/admin"
    # The encoded slash stays encoded (KEEP_UNCHANGED): one segment, not /admin.
    assert normalize_path("/x%2F..%2Fadmin", d).path == "/x%2F..%2Fadmin"
    assert normalize_path("/..", d).path == "/"
    assert normalize_path("/a/b/..", d).path == "/a/"
    assert normalize_path("/a/.", d).path == "/a/"


def test_query_and_fragment() -> None:
    n = normalize_path("/a/../admin?x=/../y&z=%2e#frag")
    assert n.path == "/admin"
    assert n.query == "x=/../y&z=%2e"  # the query is never normalized, only carried
    assert n.upstream == "/admin?x=/../y&z=%2e"
    n = normalize_path("/admin?")
    assert (n.path, n.query, n.upstream) == ("/admin", "", "/admin?")
    n = normalize_path("/admin#x?y")
    assert (n.path, n.query) == ("/admin", None)


def test_non_ascii_is_percent_encoded_as_utf8() -> None:
    assert normalize_path("/caf\u00e9").path == "/caf%C3%A9"


@pytest.mark.parametrize(
    "raw",
    [
        "/admin%00",
        "/admin%00x",
        "/a%4",
        "/a%zz",
        "/a%",
        "/..;/admin",
        "/a/..;x/admin",
        "/a/.;/admin",
        "admin",
        "\\admin",
        "*",
        "http://evil/admin",
        "/a b",
        "/a\tb",
        "/a\x00",
        "/a\x7f",
        "/" + "a" * MAX_PATH_BYTES,
    ],
)
@pytest.mark.parametrize("mode", [N.BASE, N.MERGE_SLASHES, N.DECODE_AND_MERGE_SLASHES])
def test_rejected_with_400(raw: str, mode: PathNormalization) -> None:
    with pytest.raises(PathRejected) as ei:
        normalize_path(raw, mode)
    assert ei.value.status == 400
    assert ei.value.reason


def test_none_mode_still_refuses_nul_and_bad_escapes() -> None:
    for raw in ("/admin%00", "/a%zz"):
        with pytest.raises(PathRejected):
            normalize_path(raw, N.NONE)
