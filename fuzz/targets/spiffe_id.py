"""identity/spiffe.py: SPIFFE ID and trust-domain parsing.

Refusals must be :class:`SpiffeIdError` with one of the documented rules. An accepted ID must be
canonical (it formats back to exactly the input, so two IDs that compare unequal can never name
the same workload) and satisfy every rule of DESIGN §3 checked independently here.
"""

from __future__ import annotations

import re

from identity.spiffe import MAX_ID_BYTES, MAX_TRUST_DOMAIN_BYTES, SpiffeId, SpiffeIdError, TrustDomain

RULES = frozenset(
    {
        "empty",
        "scheme",
        "too-long",
        "type",
        "query",
        "fragment",
        *(
            f"trust-domain-{r}"
            for r in ("empty", "length", "userinfo", "port", "percent-encoding", "uppercase", "charset")
        ),
        *(
            f"path-{r}"
            for r in (
                "leading-slash",
                "trailing-slash",
                "empty-segment",
                "dot-segment",
                "percent-encoding",
                "charset",
            )
        ),
    }
)
# Independent restatement of the accepted grammar (not the module's own regexes).
_TD = re.compile(r"[a-z0-9._-]{1,255}", re.ASCII)
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+", re.ASCII)

MAX_LEN = 2200  # a little over MAX_ID_BYTES, so the length rule is reachable

SEEDS = [
    s.encode()
    for s in (
        "spiffe://cluster.local/ns/default/sa/sleep",
        "spiffe://cluster.local",
        "spiffe://example.org/a/b/c",
        "spiffe://td/ns/x/sa/y/node/n-1",
        "spiffe://cluster.local/ns/a/sa/b?x=1",
        "spiffe://cluster.local/ns/a/sa/b#f",
        "spiffe://Cluster.local/ns/a",
        "spiffe://u@td/x",
        "spiffe://td:8080/x",
        "spiffe://td/a/../b",
        "spiffe://td/a//b",
        "spiffe://td/a/",
        "spiffe://td/%41",
        "SPIFFE://td/x",
        "spiffe://[::1]/x",
        "spiffe://" + "a" * 256,
        "spiffe://td/" + "a" * 2040,
        "cluster.local",
    )
]


def _check_refusal(exc: SpiffeIdError) -> None:
    if exc.rule not in RULES:
        raise AssertionError(f"undocumented SpiffeIdError rule {exc.rule!r}: {exc}")
    if str(exc) != f"{exc.rule}: {exc.message}":
        raise AssertionError(f"SpiffeIdError text is not '<rule>: <message>': {exc!s}")


def _check_accepted(text: str, sid: SpiffeId) -> None:
    if str(sid) != text:
        raise AssertionError(f"accepted {text!r} but formats as {str(sid)!r} (not canonical)")
    if SpiffeId.parse(str(sid)) != sid:
        raise AssertionError(f"{text!r} does not round-trip")
    if len(text.encode("utf-8")) > MAX_ID_BYTES:
        raise AssertionError(f"accepted an ID of {len(text.encode())} bytes")
    td = sid.trust_domain.name
    if not _TD.fullmatch(td) or len(td.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise AssertionError(f"accepted trust domain {td!r}")
    if sid.path:
        segments = sid.path.split("/")
        if segments[0] != "" or not all(_SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments[1:]):
            raise AssertionError(f"accepted path {sid.path!r}")
    if sid.principal != text[len("spiffe://") :]:
        raise AssertionError(f"principal {sid.principal!r} of {text!r}")
    if not sid.member_of(TrustDomain(td)) or TrustDomain(td).id != SpiffeId(TrustDomain(td), ""):
        raise AssertionError(f"trust domain of {text!r} is not consistent")
    ns, sa = sid.namespace, sid.service_account
    if (ns is None) != (sa is None):
        raise AssertionError(f"{text!r}: namespace {ns!r} without service account {sa!r} or back")
    if ns is not None and sa is not None and SpiffeId.for_workload(td, ns, sa) != sid:
        raise AssertionError(f"{text!r}: for_workload({td}, {ns}, {sa}) differs")


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # every byte a code point: non-ASCII input still reaches us


def fuzz_one(data: bytes) -> None:
    text = _decode(data)
    try:
        sid = SpiffeId.parse(text)
    except SpiffeIdError as exc:
        _check_refusal(exc)
    else:
        _check_accepted(text, sid)
    # The trust-domain parser on its own (what `ca init --trust-domain` and the config use).
    try:
        td = TrustDomain.parse(text)
    except SpiffeIdError as exc:
        _check_refusal(exc)
    else:
        if td.name != text or str(td.id) != "spiffe://" + text:
            raise AssertionError(f"trust domain {text!r} is not canonical: {td!r}")
    # Istio's constructor from (namespace, service account), split at the first NUL.
    ns, _, sa = text.partition("\0")
    try:
        wid = SpiffeId.for_workload("cluster.local", ns, sa)
    except SpiffeIdError as exc:
        _check_refusal(exc)
    else:
        if (wid.namespace, wid.service_account) != (ns, sa):
            raise AssertionError(f"for_workload({ns!r}, {sa!r}) reads back as {wid}")
        _check_accepted(str(wid), wid)
