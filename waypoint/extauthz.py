"""CUSTOM authorization: a client for an external authorizer speaking Envoy's ext_authz HTTP contract.

Istio configures CUSTOM providers as ``meshConfig.extensionProviders[].envoyExtAuthzHttp`` and
turns each into Envoy's ``envoy.filters.http.ext_authz`` with an ``http_service``. This module
reproduces what that filter sends and how it reads the answer (Envoy's
``ext_authz_http_impl.cc``; shown equal to a real Envoy 1.40 in tests/waypoint/test_extauthz.py):

Check request
  * the original method, the original path with ``pathPrefix`` prepended (no normalization on
    top of what the waypoint already did), ``Host`` = the original ``:authority``;
  * headers: ``authorization`` always, plus every request header whose name matches
    ``includeRequestHeadersInCheck`` (exact, ``x-*`` prefix, ``*-x`` suffix, ``*`` any; names
    compared lower-case), repeated headers repeated, then ``includeAdditionalHeadersInCheck``
    (overwriting). Nothing else of the request goes: no body unless
    ``includeRequestBodyInCheck``, then up to ``maxRequestBytes`` (413 when bigger and
    ``allowPartialMessage`` is false) with ``x-envoy-auth-partial-body: true|false``;
  * ``content-length`` is the length of what is sent (``0`` without a body); and the two
    headers Envoy's router adds to anything it sends upstream, ``x-envoy-internal: true`` and
    ``x-envoy-expected-rq-timeout-ms`` (the provider's timeout).

Check response
  * ``200``: allowed. Headers named in ``headersToUpstreamOnAllow`` are set on the upstream
    request, names listed in ``x-envoy-auth-headers-to-remove`` are removed from it, and
    ``headersToDownstreamOnAllow`` go to the client's response;
  * ``5xx``, a timeout or a connection failure: an error, which denies with ``statusOnError``
    (default 403, empty body) unless ``failOpen``;
  * any other status: denied with the authorizer's status and body, and its headers
    (all but ``Host`` when ``headersToDownstreamOnDeny`` is empty, else those plus ``:status``,
    ``content-length``, ``www-authenticate`` and ``location``). Hop-by-hop headers and
    ``content-length`` are left to the waypoint's own framing.

The HTTP exchange is aiohttp's (the design card's choice for HTTP off the hot path): one
keep-alive connection pool per provider, ``timeout`` (Istio's default 600 s) as the total budget,
bounded response bodies. Building the request and reading the answer are pure functions
(:func:`build_check_request`, :func:`interpret_response`) so they are tested on their own.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import yarl

from policy.l7 import CustomOutcome

DEFAULT_TIMEOUT: Final = 600.0  # Istio's documented default for envoyExtAuthzHttp.timeout
MAX_RESPONSE_BODY: Final = 64 * 1024
AUTH_HEADERS_TO_REMOVE: Final = "x-envoy-auth-headers-to-remove"
_HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"}
)
_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


class ProviderConfigError(ValueError):
    """An ``envoyExtAuthzHttp`` provider that cannot be used; ``path`` names the field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


@dataclass(frozen=True, slots=True)
class HeaderPattern:
    """Istio's string match on a header name: exact, ``x*`` prefix, ``*x`` suffix, ``*`` any."""

    raw: str

    def matches(self, name: str) -> bool:
        p = self.raw.lower()
        if p == "*":
            return True
        if p.endswith("*"):
            return name.startswith(p[:-1])
        if p.startswith("*"):
            return name.endswith(p[1:])
        return name == p


@dataclass(frozen=True)
class BodyOptions:
    max_request_bytes: int
    allow_partial_message: bool = False
    pack_as_bytes: bool = False


@dataclass(frozen=True)
class ExtAuthzHttpProvider:
    """One ``envoyExtAuthzHttp`` extension provider (Istio MeshConfig field names)."""

    name: str
    service: str
    port: int
    timeout: float = DEFAULT_TIMEOUT
    path_prefix: str = ""
    fail_open: bool = False
    status_on_error: int = 403
    include_request_headers_in_check: tuple[HeaderPattern, ...] = ()
    include_additional_headers_in_check: tuple[tuple[str, str], ...] = ()
    include_request_body_in_check: BodyOptions | None = None
    headers_to_upstream_on_allow: tuple[HeaderPattern, ...] = ()
    headers_to_downstream_on_deny: tuple[HeaderPattern, ...] = ()
    headers_to_downstream_on_allow: tuple[HeaderPattern, ...] = ()

    @classmethod
    def from_mesh_config(
        cls, provider: Mapping[str, Any], path: str = "extensionProviders[]"
    ) -> ExtAuthzHttpProvider:
        """Parse ``{name: ..., envoyExtAuthzHttp: {...}}``; raises :class:`ProviderConfigError`."""
        name = provider.get("name")
        if not isinstance(name, str) or not name:
            raise ProviderConfigError(f"{path}.name", "required non-empty string")
        spec = provider.get("envoyExtAuthzHttp")
        sp = f"{path}.envoyExtAuthzHttp"
        if not isinstance(spec, Mapping):
            raise ProviderConfigError(sp, "required mapping (only the HTTP ext_authz provider is supported)")
        known = {
            "service", "port", "timeout", "pathPrefix", "failOpen", "statusOnError",
            "includeHeadersInCheck", "includeRequestHeadersInCheck", "includeAdditionalHeadersInCheck",
            "includeRequestBodyInCheck", "headersToUpstreamOnAllow", "headersToDownstreamOnDeny",
            "headersToDownstreamOnAllow",
        }  # fmt: skip
        for k in spec:
            if k not in known:
                raise ProviderConfigError(f"{sp}.{k}", f"unknown field (allowed: {', '.join(sorted(known))})")
        service = spec.get("service")
        if not isinstance(service, str) or not service:
            raise ProviderConfigError(f"{sp}.service", "required non-empty string")
        port = spec.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ProviderConfigError(f"{sp}.port", f"expected a port 1-65535, got {port!r}")
        timeout = DEFAULT_TIMEOUT
        if spec.get("timeout") is not None:
            t = spec["timeout"]
            m = _DURATION.fullmatch(t) if isinstance(t, str) else None
            if m is None:
                raise ProviderConfigError(f"{sp}.timeout", f'invalid duration {t!r} (e.g. "0.5s")')
            timeout = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2)]
            if timeout <= 0:
                raise ProviderConfigError(f"{sp}.timeout", "must be positive")
        prefix = spec.get("pathPrefix", "") or ""
        if not isinstance(prefix, str) or (prefix and not prefix.startswith("/")):
            raise ProviderConfigError(f"{sp}.pathPrefix", f"must start with '/', got {prefix!r}")
        fail_open = spec.get("failOpen", False)
        if not isinstance(fail_open, bool):
            raise ProviderConfigError(f"{sp}.failOpen", "expected a boolean")
        soe = spec.get("statusOnError", "403")
        try:
            status_on_error = int(str(soe))
        except ValueError:
            raise ProviderConfigError(
                f"{sp}.statusOnError", f"expected an HTTP status, got {soe!r}"
            ) from None
        if not 200 <= status_on_error <= 599:
            raise ProviderConfigError(f"{sp}.statusOnError", f"expected an HTTP status, got {soe!r}")

        def patterns(key: str) -> tuple[HeaderPattern, ...]:
            v = spec.get(key)
            if v is None:
                return ()
            if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
                raise ProviderConfigError(f"{sp}.{key}", "expected a list of non-empty strings")
            return tuple(HeaderPattern(x) for x in v)

        if (
            spec.get("includeHeadersInCheck") is not None
            and spec.get("includeRequestHeadersInCheck") is not None
        ):
            raise ProviderConfigError(
                f"{sp}.includeHeadersInCheck", "deprecated; use includeRequestHeadersInCheck alone"
            )
        inc = patterns("includeRequestHeadersInCheck") or patterns("includeHeadersInCheck")
        extra = spec.get("includeAdditionalHeadersInCheck") or {}
        if not isinstance(extra, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in extra.items()
        ):
            raise ProviderConfigError(f"{sp}.includeAdditionalHeadersInCheck", "expected a map of strings")
        body = None
        if spec.get("includeRequestBodyInCheck") is not None:
            b = spec["includeRequestBodyInCheck"]
            bp = f"{sp}.includeRequestBodyInCheck"
            if not isinstance(b, Mapping):
                raise ProviderConfigError(bp, "expected a mapping")
            mx = b.get("maxRequestBytes")
            if not isinstance(mx, int) or isinstance(mx, bool) or mx <= 0:
                raise ProviderConfigError(f"{bp}.maxRequestBytes", "required positive integer")
            body = BodyOptions(
                mx, bool(b.get("allowPartialMessage", False)), bool(b.get("packAsBytes", False))
            )
        return cls(
            name=name,
            service=service,
            port=port,
            timeout=timeout,
            path_prefix=prefix,
            fail_open=fail_open,
            status_on_error=status_on_error,
            include_request_headers_in_check=inc,
            include_additional_headers_in_check=tuple((k.lower(), v) for k, v in extra.items()),
            include_request_body_in_check=body,
            headers_to_upstream_on_allow=patterns("headersToUpstreamOnAllow"),
            headers_to_downstream_on_deny=patterns("headersToDownstreamOnDeny"),
            headers_to_downstream_on_allow=patterns("headersToDownstreamOnAllow"),
        )


# --------------------------------------------------------------------------------------------
# Pure: the check request and the verdict


@dataclass(frozen=True)
class CheckRequest:
    method: str
    path: str
    host: str
    headers: tuple[tuple[str, str], ...]  # lower-case names, content-length included
    body: bytes = b""


class BodyTooLarge(Exception):
    """The request body is larger than ``maxRequestBytes`` and partial messages are not allowed:
    answer 413 without calling the authorizer (Envoy does the same)."""

    status = 413


def build_check_request(
    p: ExtAuthzHttpProvider,
    method: str,
    path: str,
    authority: str,
    headers: Iterable[tuple[str, str]],
    body: bytes | None = None,
) -> CheckRequest:
    """What Envoy's ext_authz ``http_service`` sends for this downstream request."""
    send_body = b""
    partial: str | None = None
    if p.include_request_body_in_check is not None and body:
        opts = p.include_request_body_in_check
        partial = "false"
        if len(body) > opts.max_request_bytes:
            if not opts.allow_partial_message:
                raise BodyTooLarge(
                    f"request body {len(body)} bytes > maxRequestBytes {opts.max_request_bytes}"
                )
            body = body[: opts.max_request_bytes]
            partial = "true"
        send_body = body
    # Envoy first copies the request headers into the CheckRequest's header *map*, which joins
    # repeated headers with "," (one x-b3-flags: 1,0, not two): the same here.
    joined: dict[str, list[str]] = {}
    pats = p.include_request_headers_in_check
    for name, value in headers:
        n = name.lower()
        if n.startswith(":") or n in ("content-length", "host"):
            continue  # pseudo headers and Host travel as the request line; length is ours
        if n == "authorization" or any(m.matches(n) for m in pats):
            joined.setdefault(n, []).append(value)
    if partial is not None:
        joined["x-envoy-auth-partial-body"] = [partial]  # Envoy's marker of a truncated body
    for n, v in p.include_additional_headers_in_check:
        joined[n] = [v]  # OVERWRITE_IF_EXISTS_OR_ADD
    out = [(n, ",".join(vs)) for n, vs in joined.items()]
    # Envoy's router stamps every request it sends to a cluster, the authorizer's included; some
    # authorizers read the deadline. Sent the same so an authorizer cannot tell the two apart.
    out.append(("x-envoy-internal", "true"))
    out.append(("x-envoy-expected-rq-timeout-ms", str(round(p.timeout * 1000))))
    out.insert(0, ("content-length", str(len(send_body))))
    return CheckRequest(method, p.path_prefix + path, authority, tuple(out), send_body)


@dataclass(frozen=True)
class ExtAuthzResult:
    allowed: bool
    status: int  # 200 when allowed; otherwise the status to answer downstream
    body: bytes = b""
    upstream_set: tuple[tuple[str, str], ...] = ()  # set (replace) on the upstream request
    upstream_remove: tuple[str, ...] = ()  # remove from the upstream request
    downstream_headers: tuple[tuple[str, str], ...] = ()  # add to the response to the client
    error: str | None = None  # the authorizer failed (timeout, connection, 5xx)

    def outcome(self, provider: str) -> CustomOutcome:
        """The answer in the form ``policy.l7.decide_l7`` takes for its CUSTOM step."""
        return CustomOutcome(provider, self.allowed, self.reason)

    @property
    def reason(self) -> str:
        if self.error:
            return f"ext_authz error: {self.error}" + (" (failOpen)" if self.allowed else "")
        return "ext_authz allowed" if self.allowed else f"ext_authz denied with {self.status}"


def error_result(p: ExtAuthzHttpProvider, error: str) -> ExtAuthzResult:
    if p.fail_open:
        return ExtAuthzResult(True, 200, error=error)
    return ExtAuthzResult(False, p.status_on_error, error=error)


def interpret_response(
    p: ExtAuthzHttpProvider, status: int, headers: Sequence[tuple[str, str]], body: bytes
) -> ExtAuthzResult:
    """Envoy's reading of the authorizer's answer (RawHttpClientImpl::toResponse)."""
    if 500 <= status <= 599:
        return error_result(p, f"authorizer answered {status}")
    hs = [(n.lower(), v) for n, v in headers]
    if status == 200:
        remove: list[str] = []
        for n, v in hs:
            if n == AUTH_HEADERS_TO_REMOVE:
                remove.extend(x.strip().lower() for x in v.split(",") if x.strip())
        hs = [(n, v) for n, v in hs if n != AUTH_HEADERS_TO_REMOVE]
        up = tuple((n, v) for n, v in hs if any(m.matches(n) for m in p.headers_to_upstream_on_allow))
        down = tuple(
            (n, v)
            for n, v in hs
            if any(m.matches(n) for m in p.headers_to_downstream_on_allow) and n not in _HOP_BY_HOP
        )
        return ExtAuthzResult(
            True, 200, upstream_set=up, upstream_remove=tuple(dict.fromkeys(remove)), downstream_headers=down
        )
    hs = [(n, v) for n, v in hs if n != AUTH_HEADERS_TO_REMOVE]
    if p.headers_to_downstream_on_deny:
        always = ("www-authenticate", "location")
        keep = [
            (n, v) for n, v in hs if n in always or any(m.matches(n) for m in p.headers_to_downstream_on_deny)
        ]
    else:
        keep = [(n, v) for n, v in hs if n != "host"]
    keep = [(n, v) for n, v in keep if n not in _HOP_BY_HOP and n != "content-length"]
    return ExtAuthzResult(False, status, body, downstream_headers=tuple(keep))


# --------------------------------------------------------------------------------------------
# asyncio: the HTTP exchange


@dataclass
class ExtAuthzHttpClient:
    """One provider's client. ``address`` overrides where to connect (default service:port)."""

    provider: ExtAuthzHttpProvider
    address: tuple[str, int] | None = None
    max_connections: int = 64
    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)
    checks: int = field(default=0, init=False)
    errors: int = field(default=0, init=False)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections),
                # aiohttp's own defaults (Accept, Accept-Encoding, User-Agent) are not part of
                # what Envoy sends; the authorizer sees only the contract's headers.
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
                auto_decompress=False,
            )
        return self._session

    async def check(
        self,
        method: str,
        path: str,
        authority: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | None = None,
    ) -> ExtAuthzResult:
        """Ask the authorizer about one request. Never raises for authorizer trouble (that is an
        ``error`` result, fail closed unless ``failOpen``); :class:`BodyTooLarge` means 413."""
        p = self.provider
        req = build_check_request(p, method, path, authority, headers, body)
        host, port = self.address or (p.service, p.port)
        h = f"[{host}]" if ":" in host else host
        url = yarl.URL(f"http://{h}:{port}{req.path}", encoded=True)  # the path goes as is
        self.checks += 1
        try:
            async with asyncio.timeout(p.timeout):
                async with self._get_session().request(
                    req.method,
                    url,
                    headers=[("Host", req.host), *req.headers],
                    data=req.body if req.body else None,
                    allow_redirects=False,
                    compress=None,
                ) as resp:
                    data = await resp.content.read(MAX_RESPONSE_BODY + 1)
                    if len(data) > MAX_RESPONSE_BODY:
                        self.errors += 1
                        return error_result(p, f"authorizer response body over {MAX_RESPONSE_BODY} bytes")
                    return interpret_response(
                        p,
                        resp.status,
                        [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers],
                        data,
                    )
        except TimeoutError:
            self.errors += 1
            return error_result(p, f"no answer within {p.timeout:g}s")
        except (aiohttp.ClientError, OSError) as e:
            self.errors += 1
            return error_result(p, f"{type(e).__name__}: {e}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
