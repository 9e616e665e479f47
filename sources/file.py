"""The local config file as a :class:`~sources.base.ConfigSource`: read, poll, parse, diff.

Polling rather than inotify: it also sees a file replaced by rename (editors, ConfigMap
symlink swaps) and needs no extra dependency; the cost is one stat per interval. Each good new
version is parsed whole (mesh/parse.py) and diffed against the serving one (mesh/diff.py), so
consumers get only what changed; a bad version is refused with every issue (file, document,
field) and the last good snapshot stays current.

Besides the interface, :class:`FileConfigSource` keeps the snapshot-callback API the CA server
and today's agent use (``run(on_update, on_error)`` and ``poll_once()`` delivering whole
snapshots); it is built on the same poll.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from mesh.diff import diff, summarize
from mesh.errors import ConfigError, ConfigIssue
from mesh.model import Snapshot
from mesh.parse import PolicyParser, parse_config
from sources.base import ChangeSet, ConfigRefused, SourceEvent

log = logging.getLogger("ztagent.config")

UpdateCallback = Callable[[Snapshot], Awaitable[None] | None]
ErrorCallback = Callable[[ConfigError], Awaitable[None] | None]

# A file modified this recently is compared by content even when (mtime, size, inode) did not
# change: two writes in one coarse clock tick leave the stamp as it was.
_RECENT_NS = 2_000_000_000


def load_config(
    path: str | os.PathLike[str],
    *,
    policy_parser: PolicyParser | None = None,
    default_namespace: str | None = None,
) -> Snapshot:
    """Read and parse a config file; unreadable files are a :class:`ConfigError` too."""
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue(p, None, None, "", f"cannot read: {exc}")]) from None
    return parse_config(text, file=p, policy_parser=policy_parser, default_namespace=default_namespace)


def log_policy_errors(cfg: Snapshot) -> None:
    """Log, as errors, every poisoned policy a just-loaded config puts in force.

    Accepted is not fine: such a policy denies (DENY) or stops allowing (ALLOW) traffic until it
    is fixed, so each load of a config that still has them says so, with file, document and field.
    """
    if not cfg.policy_errors:
        return
    lines = [str(i) for i in cfg.policy_errors]
    log.error(
        f"config loaded with {len(lines)} policy error(s); the invalid policies are enforced "
        "fail-closed (ALLOW allows nothing, DENY denies everything it selects): " + "; ".join(lines),
        extra={"event": "config_policy_errors", "errors": [i.to_dict() for i in cfg.policy_errors]},
    )


async def _call(cb: Callable[[Any], Awaitable[None] | None], arg: Any) -> None:
    r = cb(arg)
    if r is not None:
        await r


class FileConfigSource:
    """Watches one file by polling (mtime, size, inode, content hash); a ConfigSource."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        interval: float = 1.0,
        policy_parser: PolicyParser | None = None,
        default_namespace: str | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.interval = interval
        self._policy_parser = policy_parser
        self._default_namespace = default_namespace
        self._last_error: ConfigError | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._raw: str | None = None  # sha256 of the bytes last looked at
        self._current: Snapshot | None = None

    @property
    def name(self) -> str:
        return f"file:{self.path}"

    @property
    def last_error(self) -> ConfigError | None:
        """The error of the most recent refused update, cleared by the next good one."""
        return self._last_error

    @property
    def current(self) -> Snapshot:
        """The last good snapshot (after :meth:`initial`)."""
        if self._current is None:
            raise RuntimeError(f"{self.name}: initial() has not succeeded yet")
        return self._current

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> Snapshot:
        return load_config(
            self.path, policy_parser=self._policy_parser, default_namespace=self._default_namespace
        )

    async def initial(self) -> Snapshot:
        # A local file of a few hundred KB at most: read on the loop like every poll, not in a
        # thread (a thread hop per poll would cost more than the read).
        self._stamp = self._stat()
        cfg = self._load()
        self._current = cfg
        self._raw = cfg.digest
        log_policy_errors(cfg)
        return cfg

    def poll(self) -> SourceEvent | None:
        """One check: the changes of a new good version (empty: good again at the serving
        version after a refusal), a refusal, or None when nothing changed."""
        # Without initial() (a consumer that loaded the file itself), the first good version
        # is delivered whole: every object an Upsert.
        current = self._current
        stamp = self._stat()
        if stamp == self._stamp and (stamp is None or time.time_ns() - stamp[0] > _RECENT_NS):
            return None
        self._stamp = stamp
        try:
            with open(self.path, "rb") as f:
                raw: str | None = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            raw = None
        if raw is not None and raw == self._raw and self._last_error is None:
            return None
        self._raw = raw
        try:
            cfg = self._load()
        except ConfigError as exc:
            # The stamp is remembered, so one bad version is reported once, not every interval.
            self._last_error = exc
            return ConfigRefused(exc, self.path)
        recovered = self._last_error is not None
        self._last_error = None
        if current is not None and cfg.digest == current.digest and not recovered:
            return None  # touched but unchanged
        # Back to the serving version after a refused one is delivered too (as an empty change
        # set): consumers showing "last update refused" must learn that the file is good again.
        self._current = cfg
        return ChangeSet(tuple(diff(current, cfg)), self.path, cfg.digest)

    def poll_once(self) -> Snapshot | ConfigError | None:
        """:meth:`poll` for snapshot consumers: the new good snapshot, the error, or None."""
        ev = self.poll()
        if ev is None:
            return None
        if isinstance(ev, ConfigRefused):
            return ev.error
        return self.current

    async def changes(self) -> AsyncIterator[SourceEvent]:
        while True:
            await asyncio.sleep(self.interval)
            ev = self.poll()
            if ev is None:
                continue
            if isinstance(ev, ConfigRefused):
                log.error(
                    f"config update refused, keeping the last good config: {ev.error}",
                    extra={"event": "config_refused", "errors": [i.to_dict() for i in ev.issues]},
                )
            else:
                log.info(
                    f"config reloaded: {summarize(ev.changes)}",
                    extra={
                        "event": "config_reloaded",
                        "file": self.path,
                        "digest": ev.digest,
                        "changes": len(ev.changes),
                    },
                )
                log_policy_errors(self.current)
            yield ev

    async def run(self, on_update: UpdateCallback, on_error: ErrorCallback) -> None:
        """Snapshot callbacks until cancelled: ``on_update(snapshot)`` for each good version,
        ``on_error(ConfigError)`` for each refused one (for consumers that rebuild whole)."""
        async for ev in self.changes():
            try:
                if isinstance(ev, ConfigRefused):
                    await _call(on_error, ev.error)
                else:
                    await _call(on_update, self.current)
            except Exception:
                # A consumer's bug must not stop the watch: later updates still get through.
                log.exception("config consumer failed", extra={"event": "config_consumer_error"})
