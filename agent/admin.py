"""The node agent's admin endpoint (localhost:15000): JSON views of status, config, certificates,
workloads and policies.

Admin is JSON only and bound to localhost: it reveals workload identities and config, so it is
not for the network. The handlers only read from an :class:`AdminView` (the node agent).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from mesh.config import ConfigIssue
from serving.http import Handler, HttpApp, json_response


class AdminView(Protocol):
    def status(self) -> dict[str, Any]: ...
    def config_dump(self) -> dict[str, Any]: ...
    def certs(self) -> list[dict[str, Any]]: ...
    def workloads(self) -> list[dict[str, Any]]: ...
    def policies(self) -> list[dict[str, Any]]: ...


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


def build_admin_app(view: AdminView) -> HttpApp:
    app = HttpApp()
    endpoints: dict[str, Callable[[], Any]] = {
        "/status": lambda: status_with_policy_errors(view),
        "/config_dump": lambda: config_dump_with_policy_errors(view),
        "/certs": view.certs,
        "/workloads": view.workloads,
        "/policies": view.policies,
    }
    for path, fn in endpoints.items():
        app.add_get(path, _json_handler(fn))
    app.add_get("/", lambda: json_response({"endpoints": list(endpoints)}))
    return app
