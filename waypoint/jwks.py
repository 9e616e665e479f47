"""JWKS fetching for RequestAuthentication: ``jwksUri`` over HTTPS (aiohttp) or ``file://``.

Each source is fetched at start and then every ``refresh`` seconds (Envoy's jwt_authn
``cache_duration`` default is 5 min; Istio's ``PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`` 20 min, we
pick the shorter). A failed fetch or a bad document keeps the last good key set
(``policy.jwt.JwksStore`` keeps it); before the first good one every token for that rule is
refused (fail closed) and the waypoint is not ready. Retries after a failure back off from 1 s
to the refresh interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Final

import aiohttp

from policy.jwt import JwksError, JwksStore

log = logging.getLogger("ztagent.waypoint.jwks")

DEFAULT_REFRESH: Final = 300.0
FETCH_TIMEOUT: Final = 5.0
MAX_JWKS_BYTES: Final = 1 << 20


async def fetch_once(
    uri: str, *, ssl_context: ssl.SSLContext | None = None, timeout: float = FETCH_TIMEOUT
) -> bytes:
    """The JWKS document at ``uri`` (https://, http:// for tests on loopback, file://)."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme == "file":
        path = urllib.parse.unquote(parsed.path)
        with open(path, "rb") as f:
            data = f.read(MAX_JWKS_BYTES + 1)
    elif parsed.scheme in ("https", "http"):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s, s.get(
            uri, ssl=ssl_context if ssl_context is not None else True, allow_redirects=False
        ) as resp:
            if resp.status != 200:
                raise OSError(f"{uri}: HTTP {resp.status}")
            data = await resp.content.read(MAX_JWKS_BYTES + 1)
    else:
        raise OSError(f"{uri}: unsupported scheme {parsed.scheme!r} (https, http or file)")
    if len(data) > MAX_JWKS_BYTES:
        raise OSError(f"{uri}: JWKS larger than {MAX_JWKS_BYTES} bytes")
    return data


class JwksFetcher:
    """Keeps every remote JWKS store fresh. ``sources()`` is read each round (config reloads)."""

    def __init__(
        self,
        sources: Callable[[], Iterable[tuple[str, JwksStore]]],
        *,
        refresh: float = DEFAULT_REFRESH,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
        on_result: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.sources = sources
        self.refresh = refresh
        self.ssl_context = ssl_context
        self.clock = clock
        self.on_result = on_result
        self._next: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def refresh_now(self) -> None:
        """Fetch every source whose turn it is (all of them the first time)."""
        now = time.monotonic()
        due = [(k, s) for k, s in self.sources() if self._next.get(k, 0.0) <= now]
        await asyncio.gather(*(self._one(k, s) for k, s in due))

    async def _one(self, uri: str, store: JwksStore) -> None:
        try:
            doc = await fetch_once(uri, ssl_context=self.ssl_context)
            store.update(doc, self.clock())
        except (OSError, TimeoutError, aiohttp.ClientError, JwksError) as exc:
            if not isinstance(exc, JwksError):
                store.failed(f"fetch failed: {exc}", self.clock())
            back = min(self.refresh, max(1.0, self._backoff.get(uri, 0.5) * 2))
            self._backoff[uri] = back
            self._next[uri] = time.monotonic() + back
            kept = (
                "keeping the last good key set"
                if store.current is not None
                else "no key set yet: tokens for it are refused"
            )
            log.warning(f"JWKS {uri}: {exc}; {kept}", extra={"event": "jwks_fetch_failed", "source": uri})
            if self.on_result:
                self.on_result(uri, False)
            return
        self._backoff.pop(uri, None)
        self._next[uri] = time.monotonic() + self.refresh
        if self.on_result:
            self.on_result(uri, True)

    def start(self) -> None:
        async def loop() -> None:
            while True:
                await self.refresh_now()
                await asyncio.sleep(1.0)

        self._task = asyncio.get_running_loop().create_task(loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


__all__ = ["JwksFetcher", "fetch_once"]
