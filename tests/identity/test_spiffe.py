from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from identity.spiffe import SpiffeId, SpiffeIdError, TrustDomain

VALID = [
    # (text, trust domain, path)
    ("spiffe://cluster.local/ns/default/sa/sleep", "cluster.local", "/ns/default/sa/sleep"),
    ("spiffe://example.org", "example.org", ""),
    ("spiffe://a/b", "a", "/b"),
    ("spiffe://td-1_x.y/A-Z_a.z-09", "td-1_x.y", "/A-Z_a.z-09"),
    ("spiffe://td/...", "td", "/..."),  # three dots is a name, not a dot segment
    ("spiffe://td/.hidden/..x", "td", "/.hidden/..x"),
    ("spiffe://" + "a" * 255 + "/x", "a" * 255, "/x"),
    ("spiffe://td/" + "p" * (2048 - len("spiffe://td/")), "td", "/" + "p" * (2048 - len("spiffe://td/"))),
]

INVALID = [
    # (text, rule)
    ("", "empty"),
    ("http://td/x", "scheme"),
    ("SPIFFE://td/x", "scheme"),
    ("Spiffe://td/x", "scheme"),
    ("spiffe:/td/x", "scheme"),
    ("spiffe:td/x", "scheme"),
    ("td/ns/a", "scheme"),
    ("spiffe://", "trust-domain-empty"),
    ("spiffe:///ns/a", "trust-domain-empty"),
    ("spiffe://?q", "trust-domain-empty"),
    ("spiffe://user@td/x", "trust-domain-userinfo"),
    ("spiffe://td:8080/x", "trust-domain-port"),
    ("spiffe://td:/x", "trust-domain-port"),
    ("spiffe://t%64/x", "trust-domain-percent-encoding"),
    ("spiffe://Cluster.local/x", "trust-domain-uppercase"),
    ("spiffe://CLUSTER/x", "trust-domain-uppercase"),
    ("spiffe://td$/x", "trust-domain-charset"),
    ("spiffe://t d/x", "trust-domain-charset"),
    ("spiffe://tdé/x", "trust-domain-charset"),
    ("spiffe://[::1]/x", "trust-domain-charset"),
    ("spiffe://" + "a" * 256 + "/x", "trust-domain-length"),
    ("spiffe://td/", "path-trailing-slash"),
    ("spiffe://td/a/", "path-trailing-slash"),
    ("spiffe://td//a", "path-empty-segment"),
    ("spiffe://td/a//b", "path-empty-segment"),
    ("spiffe://td/./a", "path-dot-segment"),
    ("spiffe://td/a/..", "path-dot-segment"),
    ("spiffe://td/a/./b", "path-dot-segment"),
    ("spiffe://td/a%20b", "path-percent-encoding"),
    ("spiffe://td/a b", "path-charset"),
    ("spiffe://td/a:b", "path-charset"),
    ("spiffe://td/a@b", "path-charset"),
    ("spiffe://td/ñ", "path-charset"),
    ("spiffe://td/a?x=1", "query"),
    ("spiffe://td?x=1", "query"),
    ("spiffe://td/a#frag", "fragment"),
    ("spiffe://td#frag", "fragment"),
    ("spiffe://td/" + "p" * (2049 - len("spiffe://td/")), "too-long"),
    ("spiffe://td/" + "p" * 100_000, "too-long"),
]


@pytest.mark.parametrize(("text", "td", "path"), VALID)
def test_valid_ids_parse_and_format_back(text: str, td: str, path: str) -> None:
    sid = SpiffeId.parse(text)
    assert sid.trust_domain == TrustDomain(td)
    assert sid.path == path
    assert str(sid) == text


@pytest.mark.parametrize(("text", "rule"), INVALID)
def test_invalid_ids_name_the_rule(text: str, rule: str) -> None:
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId.parse(text)
    assert info.value.rule == rule
    assert str(info.value).startswith(f"{rule}: ")


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("", "trust-domain-empty"),
        ("a" * 256, "trust-domain-length"),
        ("Example.org", "trust-domain-uppercase"),
        ("example.org:443", "trust-domain-port"),
        ("spiffe://example.org", "trust-domain-port"),  # a trust domain is a name, not an ID
        ("ex/ample", "trust-domain-charset"),
    ],
)
def test_trust_domain_rules(name: str, rule: str) -> None:
    with pytest.raises(SpiffeIdError) as info:
        TrustDomain.parse(name)
    assert info.value.rule == rule


def test_direct_construction_is_validated_too() -> None:
    # Fail closed: the dataclass constructor cannot smuggle in an unvalidated ID.
    with pytest.raises(SpiffeIdError, match="path-dot-segment"):
        SpiffeId(TrustDomain("td"), "/a/../b")
    with pytest.raises(SpiffeIdError, match="path-leading-slash"):
        SpiffeId(TrustDomain("td"), "a")
    with pytest.raises(SpiffeIdError, match="trust-domain-uppercase"):
        TrustDomain("TD")
    with pytest.raises(SpiffeIdError, match="too-long"):
        SpiffeId(TrustDomain("td"), "/" + "x" * 2048)


def test_non_string_input_is_a_typed_error() -> None:
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId.parse(b"spiffe://td/x")  # type: ignore[arg-type]
    assert info.value.rule == "type"


@pytest.mark.parametrize(
    ("text", "ns", "sa", "principal"),
    [
        ("spiffe://cluster.local/ns/foo/sa/bar", "foo", "bar", "cluster.local/ns/foo/sa/bar"),
        ("spiffe://td/ns/foo/sa/bar/extra", None, None, "td/ns/foo/sa/bar/extra"),
        ("spiffe://td/ns/foo", None, None, "td/ns/foo"),
        ("spiffe://td/sa/bar/ns/foo", None, None, "td/sa/bar/ns/foo"),
        ("spiffe://td", None, None, "td"),
    ],
)
def test_istio_view(text: str, ns: str | None, sa: str | None, principal: str) -> None:
    sid = SpiffeId.parse(text)
    assert sid.namespace == ns
    assert sid.service_account == sa
    assert sid.principal == principal


def test_for_workload_builds_istio_ids_and_validates_parts() -> None:
    sid = SpiffeId.for_workload("cluster.local", "ns1", "sleep")
    assert str(sid) == "spiffe://cluster.local/ns/ns1/sa/sleep"
    assert (sid.namespace, sid.service_account) == ("ns1", "sleep")
    assert SpiffeId.for_workload(TrustDomain("td"), "a", "b") == SpiffeId.parse("spiffe://td/ns/a/sa/b")
    for ns, sa, rule in [
        ("", "b", "path-empty-segment"),
        ("a/b", "c", "path-charset"),
        ("a", "..", "path-dot-segment"),
        ("a", "b c", "path-charset"),
    ]:
        with pytest.raises(SpiffeIdError) as info:
            SpiffeId.for_workload("td", ns, sa)
        assert info.value.rule == rule


def test_equality_ordering_hashing() -> None:
    a = SpiffeId.parse("spiffe://a/x")
    assert a == SpiffeId.parse("spiffe://a/x")
    assert a != SpiffeId.parse("spiffe://a/X")  # paths are case-sensitive
    assert len({a, SpiffeId.parse("spiffe://a/x")}) == 1
    assert sorted([SpiffeId.parse("spiffe://b/a"), a]) == [a, SpiffeId.parse("spiffe://b/a")]
    assert a.member_of(TrustDomain("a")) and not a.member_of(TrustDomain("b"))
    assert TrustDomain("td").id == SpiffeId.parse("spiffe://td")


_td_chars = st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789._-")
_seg_chars = st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
trust_domains = st.text(_td_chars, min_size=1, max_size=64)
segments = st.text(_seg_chars, min_size=1, max_size=24).filter(lambda s: s not in (".", ".."))
valid_ids = st.builds(
    lambda td, segs: f"spiffe://{td}" + "".join("/" + s for s in segs),
    trust_domains,
    st.lists(segments, max_size=12),
)


@given(valid_ids)
def test_format_parse_round_trip(text: str) -> None:
    sid = SpiffeId.parse(text)
    assert str(sid) == text
    assert SpiffeId.parse(str(sid)) == sid
    assert sid.principal == text.removeprefix("spiffe://")


@given(st.text(max_size=80) | st.builds(lambda s: "spiffe://" + s, st.text(max_size=80)))
def test_arbitrary_text_is_accepted_canonically_or_rejected_with_a_rule(text: str) -> None:
    try:
        sid = SpiffeId.parse(text)
    except SpiffeIdError as exc:
        assert exc.rule  # every rejection names a rule
    else:
        assert str(sid) == text  # nothing is accepted in a non-canonical form
