"""RequestAuthentication at the waypoint: find JWTs, verify them, say who the caller is (pure).

Semantics are Istio's (RequestAuthentication reference; the Envoy ``jwt_authn`` provider config
istiod generates, with ``requires_any`` + ``allow_missing``):

* No token in any configured location -> the request passes with no request principal
  (an AuthorizationPolicy decides whether that is acceptable).
* A token that fails verification -> ``401`` (Envoy's ``Jwt is expired``, ``Jwt verification
  fails`` ...); a valid token whose ``aud`` is not one of the rule's ``audiences`` -> ``403``
  (``Audiences in Jwt are not allowed``). Empty ``audiences`` accept any audience.
* The rule is chosen by the token's ``iss`` among the rules that read the location the token was
  found in (a rule without ``issuer`` accepts any issuer; Istio 1.27). No such rule -> 401.
* Locations: ``fromHeaders`` (name + prefix), ``fromParams``, ``fromCookies``; a rule with none
  reads ``Authorization: Bearer <token>`` and the ``access_token`` query parameter (Envoy's
  default). The header prefix compares case-insensitively (RFC 6750's scheme is case-insensitive):
  a token that slipped past extraction would reach the app unverified.
* Several tokens (Istio: "not supported, the output principal is undefined"): ztagent requires
  every token found to be valid (any bad one -> its 401/403) and takes the principal from the
  first location in rule order. Stricter than Envoy's requires_any, deliberately.
* Principal ``iss/sub``; claims listed in ``spaceDelimitedClaims`` (always ``scope`` and
  ``permission``, Istio's defaults) are split on spaces into lists for ``request.auth.claims``.
* Output: the token is removed from the request unless ``forwardOriginalToken`` (header removed,
  query parameter dropped); ``outputPayloadToHeader`` gets the payload as unpadded base64url JSON;
  ``outputClaimToHeaders`` string/number/boolean claims (arrays and objects skipped, as Istio says).
  Every configured output header is removed from the incoming request first, token or not, so a
  client cannot forge one (Envoy only overwrites them when a token verifies).

Verification is PyJWT's (maintained; already a dependency for the CA's TokenReview path; joserfc
would do as well, PyJWT's ``PyJWK``/``PyJWS`` split lets us verify the signature with an algorithm we
chose). Hardening that does not trust the token header:

* allowed algorithms only: RS256/384/512, PS256/384/512, ES256, ES384, EdDSA. ``none`` and every
  HMAC algorithm are refused before any crypto (an ``oct`` key in a JWKS is dropped), so RSA/HMAC
  confusion cannot happen;
* the algorithm comes from the JWK: its ``alg`` if set, else its key type's family (RSA: RS*/PS*;
  EC: by curve; OKP: EdDSA); the token's ``alg`` must be in that set, and only that one algorithm
  is passed to PyJWS. ``jwk``/``jku``/``x5u``/``x5c`` headers are never used; ``crit``/``b64``
  headers are refused;
* a ``kid`` in the token must name a key of the set (unknown kid -> 401); without ``kid`` every key
  of a compatible algorithm is tried (Envoy does the same);
* tokens longer than ``max_token_bytes`` (default 16 KiB) are refused before decoding.

Time is injected (``now``, seconds since the epoch), because PyJWT's own exp/nbf/iat checks read
the wall clock: the signature is verified by PyJWS and the time claims here, with Envoy's 60 s
clock skew. ``exp``/``nbf``/``iat`` must be numbers; ``iat`` in the future beyond the skew is
refused (PyJWT's rule; Envoy does not check iat).

JWKS: :class:`JwksStore` holds one immutable :class:`KeySet`, replaced in one assignment when the
fetcher (an asyncio task elsewhere: fetching is I/O) delivers a new document. A bad document or a
failed fetch keeps the last good set; before the first good set every token for that rule is
refused (fail closed: ``Jwks remote fetch is failed``). ``state()`` reports it for admin/metrics.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Final

import jwt as pyjwt
from jwt.exceptions import PyJWTError

from policy.model import FieldError, JwtHeader, JwtRule, RequestAuthentication
from policy.parse import parse_policy

CLOCK_SKEW_SECONDS: Final = 60
MAX_TOKEN_BYTES: Final = 16 * 1024
DEFAULT_SPACE_DELIMITED: Final = ("scope", "permission")
ALLOWED_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"}
)
_RSA_ALGS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGS: Final = {"P-256": "ES256", "P-384": "ES384"}

# Envoy's jwt_authn status texts, so clients and operators see the same words.
MSG_EXPIRED: Final = "Jwt is expired"
MSG_NOT_YET_VALID: Final = "Jwt not yet valid"
MSG_BAD_FORMAT: Final = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
MSG_UNKNOWN_ISSUER: Final = "Jwt issuer is not configured"
MSG_AUDIENCE: Final = "Audiences in Jwt are not allowed"
MSG_VERIFY: Final = "Jwt verification fails"
MSG_KID: Final = "Jwks doesn't have key to match kid or alg from Jwt"
MSG_ALG: Final = "Jwt header alg is not allowed"
MSG_NO_JWKS: Final = "Jwks remote fetch is failed"
MSG_TOO_BIG: Final = "Jwt is too large"


class JwksError(ValueError):
    """A JWKS document that cannot be used (nothing is changed)."""


# --------------------------------------------------------------------------------------------
# Rules


@dataclass(frozen=True)
class JwtRuleSpec:
    """One ``jwtRules`` entry, everything enforcement needs (model JwtRule + spaceDelimitedClaims)."""

    rule: JwtRule
    space_delimited_claims: tuple[str, ...] = DEFAULT_SPACE_DELIMITED
    policy: str = ""  # "namespace/name" of the RequestAuthentication

    @property
    def key(self) -> str:
        """Identifies the JWKS this rule verifies with (fetcher and store key)."""
        r = self.rule
        return r.jwks_uri or f"inline:{self.policy}:{r.issuer}"

    def header_locations(self) -> tuple[JwtHeader, ...]:
        r = self.rule
        if r.from_headers or r.from_params or r.from_cookies:
            return r.from_headers
        return (JwtHeader("authorization", "Bearer "),)

    def param_locations(self) -> tuple[str, ...]:
        r = self.rule
        if r.from_headers or r.from_params or r.from_cookies:
            return r.from_params
        return ("access_token",)


def rules_from_policy(
    ra: RequestAuthentication, space_delimited: Sequence[Sequence[str]] = ()
) -> list[JwtRuleSpec]:
    out = []
    for i, r in enumerate(ra.jwt_rules):
        extra = tuple(space_delimited[i]) if i < len(space_delimited) else ()
        out.append(JwtRuleSpec(r, tuple(dict.fromkeys((*DEFAULT_SPACE_DELIMITED, *extra))), ra.key))
    return out


def parse_request_authentication(doc: Mapping[str, Any]) -> tuple[RequestAuthentication, list[JwtRuleSpec]]:
    """Parse a RequestAuthentication document including ``spaceDelimitedClaims`` (Istio 1.28).

    policy/parse.py does not know that field yet; it is validated and taken off each rule here and
    the rest goes through ``parse_policy`` unchanged, so every other field keeps its validation.
    Errors come back on the returned policy (``poisoned``), never raised.
    """
    spec = doc.get("spec")
    extras: list[tuple[str, ...]] = []
    errors: list[FieldError] = []
    if isinstance(spec, Mapping) and isinstance(spec.get("jwtRules"), list):
        rules = []
        for i, r in enumerate(spec["jwtRules"]):
            if isinstance(r, Mapping) and "spaceDelimitedClaims" in r:
                v = r["spaceDelimitedClaims"]
                path = f"spec.jwtRules[{i}].spaceDelimitedClaims"
                if v is None:
                    v = []
                if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
                    errors.append(FieldError(path, "expected a list of non-empty strings"))
                    v = []
                extras.append(tuple(v))
                r = {k: x for k, x in r.items() if k != "spaceDelimitedClaims"}
            else:
                extras.append(())
            rules.append(r)
        doc = {**doc, "spec": {**spec, "jwtRules": rules}}
    p = parse_policy(doc)
    if not isinstance(p, RequestAuthentication):
        raise ValueError(f"not a RequestAuthentication: {p.kind}")
    if errors:
        p = replace(p, errors=(*p.errors, *errors))
    return p, rules_from_policy(p, extras)


# --------------------------------------------------------------------------------------------
# Keys


@dataclass(frozen=True)
class VerifyKey:
    kid: str | None
    algorithms: frozenset[str]  # what this key may verify (from the JWK, never the token)
    key: Any  # a cryptography public key object


@dataclass(frozen=True)
class KeySet:
    keys: tuple[VerifyKey, ...]
    loaded_at: float
    dropped: tuple[str, ...] = ()  # keys ignored, and why


def parse_jwks(doc: str | bytes | Mapping[str, Any], now: float) -> KeySet:
    """A JWKS document -> usable verification keys; raises :class:`JwksError` if none is usable."""
    try:
        d = json.loads(doc) if isinstance(doc, str | bytes) else doc
    except ValueError as e:
        raise JwksError(f"JWKS is not JSON: {e}") from None
    if not isinstance(d, Mapping) or not isinstance(d.get("keys"), list):
        raise JwksError('JWKS must be an object with a "keys" list')
    keys: list[VerifyKey] = []
    dropped: list[str] = []
    for i, k in enumerate(d["keys"]):
        where = f"keys[{i}]" + (f" (kid {k.get('kid')!r})" if isinstance(k, Mapping) and k.get("kid") else "")
        if not isinstance(k, Mapping):
            dropped.append(f"{where}: not an object")
            continue
        kty, alg, use = k.get("kty"), k.get("alg"), k.get("use")
        if use not in (None, "sig"):
            dropped.append(f"{where}: use {use!r} is not sig")
            continue
        if kty == "RSA":
            family = _RSA_ALGS
        elif kty == "EC":
            a = _EC_ALGS.get(k.get("crv", ""))
            if a is None:
                dropped.append(f"{where}: curve {k.get('crv')!r} not allowed")
                continue
            family = frozenset({a})
        elif kty == "OKP" and k.get("crv") in ("Ed25519", "Ed448"):
            family = frozenset({"EdDSA"})
        else:
            dropped.append(f"{where}: key type {kty!r} not allowed (HMAC and unknown types are refused)")
            continue
        if alg is not None:
            if alg not in family:
                dropped.append(f"{where}: alg {alg!r} not allowed for {kty}")
                continue
            family = frozenset({alg})
        try:
            pk = pyjwt.PyJWK(dict(k), next(iter(sorted(family))))
        except (PyJWTError, ValueError, TypeError) as e:
            dropped.append(f"{where}: {e}")
            continue
        kid = k.get("kid")
        keys.append(VerifyKey(kid if isinstance(kid, str) else None, family, pk.key))
    if not keys:
        raise JwksError("JWKS has no usable key" + (": " + "; ".join(dropped) if dropped else ""))
    return KeySet(tuple(keys), now, tuple(dropped))


class JwksStore:
    """The current key set of one JWKS source. The fetcher calls :meth:`update` / :meth:`failed`."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.current: KeySet | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.updates = 0
        self.failures = 0

    def update(self, doc: str | bytes | Mapping[str, Any], now: float) -> KeySet:
        """Install a new JWKS. A bad document raises :class:`JwksError` and keeps the last good set."""
        try:
            ks = parse_jwks(doc, now)
        except JwksError as e:
            self.failed(str(e), now)
            raise
        self.current = ks  # one reference assignment: readers see the old set or the new one
        self.updates += 1
        self.last_error = None
        return ks

    def failed(self, error: str, now: float) -> None:
        self.failures += 1
        self.last_error = error
        self.last_error_at = now

    def state(self) -> dict[str, Any]:
        c = self.current
        return {
            "source": self.source,
            "ready": c is not None,
            "keys": len(c.keys) if c else 0,
            "loadedAt": c.loaded_at if c else None,
            "dropped": list(c.dropped) if c else [],
            "updates": self.updates,
            "failures": self.failures,
            "lastError": self.last_error,
        }


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class AuthResult:
    status: int  # 200 pass (token valid, or none), 401 bad token, 403 audience mismatch
    reason: str
    principal: str | None = None  # "iss/sub" of the first valid token
    claims: Mapping[str, Any] | None = None  # normalized payload (space-delimited claims split)
    rule: str | None = None  # issuer (or jwksUri) of the rule that verified it
    remove_headers: tuple[str, ...] = ()  # lower-case names to drop before forwarding upstream
    add_headers: tuple[tuple[str, str], ...] = ()
    remove_params: tuple[str, ...] = ()  # query parameters to drop (token in a query, not forwarded)
    www_authenticate: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass(frozen=True)
class _Found:
    token: str
    where: str  # "header authorization" / "param access_token" / "cookie c"
    header: str | None = None
    param: str | None = None


def _b64json(seg: str) -> Any:
    pad = "=" * (-len(seg) % 4)
    raw = base64.urlsafe_b64decode(seg + pad)
    return json.loads(raw)


_B64URL: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class JwtAuthenticator:
    """Applies the jwtRules of every RequestAuthentication selecting a target. Immutable rules,
    mutable only through the :class:`JwksStore` objects it shares with the fetcher."""

    def __init__(
        self,
        rules: Sequence[JwtRuleSpec],
        stores: Mapping[str, JwksStore] | None = None,
        *,
        now: float = 0.0,
        max_token_bytes: int = MAX_TOKEN_BYTES,
        clock_skew: int = CLOCK_SKEW_SECONDS,
        invalid: Sequence[str] = (),
        cache_size: int = 256,
    ) -> None:
        self.rules = tuple(rules)
        # Verified tokens, as Envoy's jwt_authn caches them (jwt_cache_config): a signature check
        # costs 70-110 us here against ~1 us for the lookup. Keyed by the token; an entry counts
        # only while its rule still reads that location and the rule's key set is the very object
        # that verified it (a JWKS rotation invalidates it); time claims are checked every time.
        self._cache: OrderedDict[str, tuple[JwtRuleSpec, KeySet, dict[str, Any]]] = OrderedDict()
        self.cache_size = cache_size
        self.invalid = tuple(invalid)  # notes on RequestAuthentications that failed to parse
        self.max_token_bytes = max_token_bytes
        self.clock_skew = clock_skew
        st: dict[str, JwksStore] = dict(stores or {})
        for r in self.rules:
            if r.key not in st:
                s = JwksStore(r.key)
                if r.rule.jwks is not None:
                    # A bad inline JWKS stays in s.last_error and the rule refuses every token.
                    with contextlib.suppress(JwksError):
                        s.update(r.rule.jwks, now)
                st[r.key] = s
        self.stores: Mapping[str, JwksStore] = MappingProxyType(st)
        outs: list[str] = []
        for r in self.rules:
            if r.rule.output_payload_to_header:
                outs.append(r.rule.output_payload_to_header.lower())
            outs.extend(h.lower() for h, _ in r.rule.output_claim_to_headers)
        self._output_headers = tuple(dict.fromkeys(outs))

    @classmethod
    def for_policies(
        cls,
        policies: Iterable[tuple[RequestAuthentication, Sequence[JwtRuleSpec]]],
        stores: Mapping[str, JwksStore] | None = None,
        *,
        now: float = 0.0,
        max_token_bytes: int = MAX_TOKEN_BYTES,
    ) -> JwtAuthenticator:
        """The authenticator for the RequestAuthentications that apply to one target (select
        them with ``policy.l7.applies_to_waypoint``; rules from :func:`parse_request_authentication`
        or :func:`rules_from_policy`). A poisoned policy fails closed: every token is refused
        (requests without one still pass without a principal, as with no policy)."""
        rules: list[JwtRuleSpec] = []
        invalid: list[str] = []
        for ra, specs in policies:
            if ra.poisoned:
                invalid.append(f"{ra.key} is invalid ({ra.errors[0]})")
            else:
                rules.extend(specs)
        return cls(rules, stores, now=now, max_token_bytes=max_token_bytes, invalid=invalid)

    def remote_sources(self) -> list[tuple[str, float | None]]:
        """(jwksUri, timeout) for the fetcher: every rule whose keys are not inline."""
        return [
            (r.rule.jwks_uri, r.rule.timeout_seconds)
            for r in self.rules
            if r.rule.jwks_uri and r.rule.jwks is None
        ]

    # ----------------------------------------------------------------------------------------

    def _find(
        self, headers: Iterable[tuple[str, str]], query: str | None
    ) -> list[tuple[_Found, list[JwtRuleSpec]]]:
        hdrs = [(n.lower(), v) for n, v in headers]
        params = urllib.parse.parse_qsl(query, keep_blank_values=True) if query else []
        cookies: list[tuple[str, str]] = []
        for n, v in hdrs:
            if n == "cookie":
                for crumb in v.split(";"):
                    k, sep, val = crumb.strip().partition("=")
                    if sep:
                        cookies.append((k, val.strip('"')))
        found: dict[str, tuple[_Found, list[JwtRuleSpec]]] = {}

        def add(f: _Found, r: JwtRuleSpec) -> None:
            key = f"{f.where}\0{f.token}"
            if key not in found:
                found[key] = (f, [])
            if r not in found[key][1]:
                found[key][1].append(r)

        for r in self.rules:
            for h in r.header_locations():
                name, prefix = h.name.lower(), h.prefix
                for n, v in hdrs:
                    if n != name:
                        continue
                    if prefix:
                        if v[: len(prefix)].lower() != prefix.lower():
                            continue
                        v = v[len(prefix) :]
                    t = v.strip()
                    if t:
                        add(_Found(t, f"header {name}", header=name), r)
            for p in r.param_locations():
                for k, v in params:
                    if k == p and v:
                        add(_Found(v, f"param {p}", param=p), r)
            for c in r.rule.from_cookies:
                for k, v in cookies:
                    if k == c and v:
                        add(_Found(v, f"cookie {c}"), r)
        return list(found.values())

    def authenticate(self, headers: Iterable[tuple[str, str]], query: str | None, now: float) -> AuthResult:
        found = self._find(headers, query)
        base_remove = self._output_headers
        if not found:
            return AuthResult(200, "no token", remove_headers=base_remove)
        if self.invalid:
            return self._fail(
                401, "RequestAuthentication " + "; ".join(self.invalid) + ": tokens are refused"
            )
        principal: str | None = None
        claims: Mapping[str, Any] | None = None
        rule_used: str | None = None
        remove: list[str] = list(base_remove)
        add: list[tuple[str, str]] = []
        remove_params: list[str] = []
        for f, rules in found:
            ok = self._verify(f.token, rules, now)
            if isinstance(ok, AuthResult):
                return ok
            spec, payload = ok
            if principal is None:
                principal = f"{payload['iss']}/{payload['sub']}" if "sub" in payload else None
                claims = _normalize(payload, spec.space_delimited_claims)
                rule_used = spec.rule.issuer or spec.rule.jwks_uri
            r = spec.rule
            if not r.forward_original_token:
                if f.header:
                    remove.append(f.header)
                if f.param:
                    remove_params.append(f.param)
            if r.output_payload_to_header:
                raw = json.dumps(payload, separators=(",", ":")).encode()
                add.append((r.output_payload_to_header.lower(), _b64url(raw)))
            for h, c in r.output_claim_to_headers:
                v = _claim_path(payload, c)
                if isinstance(v, bool):
                    add.append((h.lower(), "true" if v else "false"))
                elif isinstance(v, str | int | float):
                    add.append((h.lower(), str(v)))
        return AuthResult(
            200,
            "token valid",
            principal,
            MappingProxyType(dict(claims)) if claims is not None else None,
            rule_used,
            tuple(dict.fromkeys(remove)),
            tuple(add),
            tuple(dict.fromkeys(remove_params)),
        )

    def _fail(self, status: int, msg: str) -> AuthResult:
        return AuthResult(
            status,
            msg,
            remove_headers=self._output_headers,
            www_authenticate='Bearer error="invalid_token"' if status == 401 else None,
        )

    def _verify(
        self, token: str, rules: list[JwtRuleSpec], now: float
    ) -> AuthResult | tuple[JwtRuleSpec, dict[str, Any]]:
        if len(token) > self.max_token_bytes:
            return self._fail(401, MSG_TOO_BIG)
        hit = self._cache.get(token)
        if hit is not None:
            cspec, cks, cpayload = hit
            if cspec in rules and self.stores[cspec.key].current is cks:
                bad = self._times(cpayload, now)
                if bad is not None:
                    return bad
                self._cache.move_to_end(token)
                return cspec, cpayload
            del self._cache[token]
        parts = token.split(".")
        if len(parts) != 3 or not all(parts[:2]) or not all(set(p) <= _B64URL for p in parts):
            return self._fail(401, MSG_BAD_FORMAT)
        try:
            header = _b64json(parts[0])
            unverified = _b64json(parts[1])
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return self._fail(401, MSG_BAD_FORMAT)
        if not isinstance(header, dict) or not isinstance(unverified, dict):
            return self._fail(401, MSG_BAD_FORMAT)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            return self._fail(401, MSG_ALG)
        if "crit" in header or "b64" in header:
            return self._fail(401, MSG_VERIFY)
        iss = unverified.get("iss")
        cands = [r for r in rules if not r.rule.issuer or r.rule.issuer == iss]
        if not cands:
            return self._fail(401, MSG_UNKNOWN_ISSUER)
        kid = header.get("kid")
        last: AuthResult | None = None
        for spec in cands:
            ks = self.stores[spec.key].current
            if ks is None:
                last = self._fail(401, MSG_NO_JWKS)
                continue
            keys = [k for k in ks.keys if alg in k.algorithms and (kid is None or k.kid == kid)]
            if not keys:
                last = self._fail(401, MSG_KID)
                continue
            payload = None
            for k in keys:
                try:
                    got = pyjwt.PyJWS().decode_complete(token, key=k.key, algorithms=[alg])
                except PyJWTError:
                    continue
                try:
                    payload = json.loads(got["payload"])
                except ValueError:
                    payload = None
                break
            if not isinstance(payload, dict):
                last = self._fail(401, MSG_VERIFY)
                continue
            bad = self._times(payload, now)
            if bad is not None:
                return bad
            if spec.rule.audiences:
                aud = payload.get("aud")
                auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
                if not any(isinstance(a, str) and a in spec.rule.audiences for a in auds):
                    return self._fail(403, MSG_AUDIENCE)
            if not isinstance(payload.get("iss"), str) or not isinstance(payload.get("sub", ""), str):
                return self._fail(401, MSG_VERIFY)
            if self.cache_size > 0:
                self._cache[token] = (spec, ks, payload)
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return spec, payload
        assert last is not None
        return last

    def _times(self, p: Mapping[str, Any], now: float) -> AuthResult | None:
        skew = self.clock_skew
        for name in ("exp", "nbf", "iat"):
            if name in p and not _number(p[name]):
                return self._fail(401, f"Jwt {name} claim is not a number")
        if "exp" in p and now > p["exp"] + skew:
            return self._fail(401, MSG_EXPIRED)
        if "nbf" in p and now + skew < p["nbf"]:
            return self._fail(401, MSG_NOT_YET_VALID)
        if "iat" in p and now + skew < p["iat"]:
            return self._fail(401, MSG_NOT_YET_VALID)
        return None


def _claim_path(payload: Mapping[str, Any], claim: str) -> Any:
    if claim in payload:
        return payload[claim]
    cur: Any = payload
    for k in claim.split("."):
        if not isinstance(cur, Mapping) or k not in cur:
            return None
        cur = cur[k]
    return cur


def _normalize(payload: Mapping[str, Any], space_delimited: Sequence[str]) -> dict[str, Any]:
    out = dict(payload)
    for c in space_delimited:
        v = out.get(c)
        if isinstance(v, str):
            out[c] = [x for x in v.split(" ") if x]
    return out


__all__ = [
    "ALLOWED_ALGORITHMS",
    "CLOCK_SKEW_SECONDS",
    "MAX_TOKEN_BYTES",
    "AuthResult",
    "JwksError",
    "JwksStore",
    "JwtAuthenticator",
    "JwtRuleSpec",
    "KeySet",
    "VerifyKey",
    "parse_jwks",
    "parse_request_authentication",
    "rules_from_policy",
]
