"""The node agent's admin endpoint (localhost:15000): JSON views of status, config, certificates,
workloads, policies and open connections, and ztunnel's runtime log-level switch.

Admin is bound to localhost: it reveals workload identities and config, so it is not for the
network. The handlers only read from an :class:`AdminView` (the node agent); ``/logging`` is the
one writer, and it changes only this process's log levels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from mesh.config import ConfigIssue
from serving.http import CONTENT_TYPE_TEXT, Handler, HttpApp, Response, json_response


class AdminView(Protocol):
    def status(self) -> dict[str, Any]: ...
    def config_dump(self) -> dict[str, Any]: ...
    def certs(self) -> list[dict[str, Any]]: ...
    def workloads(self) -> list[dict[str, Any]]: ...
    def policies(self) -> list[dict[str, Any]]: ...
    def connections(self) -> list[dict[str, Any]]: ...


def _policy_errors(view: AdminView) -> tuple[ConfigIssue, ...]:
    # The serving MeshConfig's poisoned policies (see mesh.config.MeshConfig.policy_errors).
    # Read through getattr: a view without a loaded config simply has none.
    cfg = getattr(view, "config", None)
    return tuple(getattr(cfg, "policy_errors", ()) or ())


def status_with_policy_errors(view: AdminView) -> dict[str, Any]:
    """``view.status()`` plus the serving config's policy errors, which make the node unhealthy.

    A poisoned policy is in force, failing closed: traffic it selects is being denied (or no
    longer allowed) until someone fixes the document, so ``ztagent status`` must not say healthy.
    """
    st = view.status()
    errs = _policy_errors(view)
    cfg = st.setdefault("config", {})
    if isinstance(cfg, dict):
        cfg["policyErrors"] = [str(e) for e in errs]
    if errs:
        st.setdefault("problems", []).append(
            f"{len(errs)} policy error(s) in the serving config: the invalid policies are enforced "
            "fail-closed (ALLOW allows nothing, DENY denies everything it selects)"
        )
        st["healthy"] = False
    return st


def config_dump_with_policy_errors(view: AdminView) -> dict[str, Any]:
    dump = view.config_dump()
    if dump:
        dump["policyErrors"] = [e.to_dict() for e in _policy_errors(view)]
    return dump


def _json_handler(fn: Callable[[], Any]) -> Handler:
    return lambda: json_response(fn())


# ztunnel's level names (Rust tracing's) -> Python's. "trace" is finer than debug in tracing;
# Python has nothing finer, so it means debug here.
LEVELS: dict[str, int] = {
    "off": logging.CRITICAL + 10,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
}
_NAMES = {logging.CRITICAL + 10: "off", logging.ERROR: "error", logging.WARNING: "warn",
          logging.INFO: "info", logging.DEBUG: "debug"}  # fmt: skip
ROOT_LOGGER = "ztagent"


class LogLevelError(ValueError):
    """A ``level=`` spec that names no known level; nothing was changed."""


def parse_level_spec(spec: str) -> list[tuple[str | None, int]]:
    """ztunnel's ``level`` syntax: ``info`` or ``target:level,...,default`` (a target is a
    logger below ``ztagent``: ``access``, ``connections``, ``agent``...). ``None`` is the default.
    Raises LogLevelError naming the bad part; parses everything before anything is applied."""
    out: list[tuple[str | None, int]] = []
    parts = [p.strip() for p in spec.split(",")]
    if not spec.strip() or any(not p for p in parts):
        raise LogLevelError(f"level: expected LEVEL or TARGET:LEVEL[,...], got {spec!r}")
    for part in parts:
        target, _, level = part.rpartition(":")
        code = LEVELS.get(level.lower())
        if code is None:
            raise LogLevelError(f"level: unknown level {level!r} in {part!r}; one of {', '.join(LEVELS)}")
        out.append((target or None, code))
    return out


def _logger_for(target: str | None) -> logging.Logger:
    if target is None:
        return logging.getLogger(ROOT_LOGGER)
    name = (
        target if target == ROOT_LOGGER or target.startswith(ROOT_LOGGER + ".") else f"{ROOT_LOGGER}.{target}"
    )
    return logging.getLogger(name)


def current_levels() -> str:
    """The levels in force, in the syntax ``level=`` takes (targets first, then the default)."""
    root = logging.getLogger(ROOT_LOGGER)
    default = _NAMES.get(root.getEffectiveLevel(), logging.getLevelName(root.getEffectiveLevel()).lower())
    targets = []
    for name, lg in sorted(logging.Logger.manager.loggerDict.items()):
        if (
            isinstance(lg, logging.Logger)
            and name.startswith(ROOT_LOGGER + ".")
            and lg.level != logging.NOTSET
        ):
            targets.append(f"{name.removeprefix(ROOT_LOGGER + '.')}:{_NAMES.get(lg.level, str(lg.level))}")
    return ",".join([*targets, default])


def set_levels(spec: str) -> str:
    """Apply a ``level=`` spec; a bare level also resets every target to follow it."""
    parsed = parse_level_spec(spec)
    # The default first (it resets the targets), then the targets it names.
    for target, code in sorted(parsed, key=lambda tc: tc[0] is not None):
        if target is None:
            for name, lg in logging.Logger.manager.loggerDict.items():
                if isinstance(lg, logging.Logger) and name.startswith(ROOT_LOGGER + "."):
                    lg.setLevel(logging.NOTSET)
        _logger_for(target).setLevel(code)
    return current_levels()


def _text(body: str, status: int = 200) -> Response:
    return Response(body.encode(), status, CONTENT_TYPE_TEXT)


def _logging_get() -> Response:
    return _text(f"current log level is {current_levels()}\n")


def _logging_post(params: Mapping[str, str]) -> Response:
    spec = params.get("level")
    if spec is None:
        return _text(f"current log level is {current_levels()}\n")
    try:
        now = set_levels(spec)
    except LogLevelError as exc:
        return _text(f"{exc}\n", 400)
    logging.getLogger("ztagent.admin").warning(
        f"log level set to {now}", extra={"event": "log_level_changed", "level": now}
    )
    return _text(f"current log level is {now}\n")


def build_admin_app(view: AdminView) -> HttpApp:
    app = HttpApp()
    endpoints: dict[str, Callable[[], Any]] = {
        "/status": lambda: status_with_policy_errors(view),
        "/config_dump": lambda: config_dump_with_policy_errors(view),
        "/certs": view.certs,
        "/workloads": view.workloads,
        "/policies": view.policies,
        "/connections": lambda: view.connections(),
    }
    for path, fn in endpoints.items():
        app.add_get(path, _json_handler(fn))
    # ztunnel's runtime log-level switch: GET shows, POST /logging?level=... sets.
    app.add_get("/logging", _logging_get)
    app.add_post("/logging", _logging_post)
    app.add_get("/", lambda: json_response({"endpoints": [*endpoints, "/logging"]}))
    return app
