"""HTTP endpoints of the agent: admin (localhost:15000), Prometheus (15020), readiness (15021).

Admin is JSON only and bound to localhost: it reveals workload identities and config, so it is
not for the network. The handlers only read from an :class:`AdminView` (the node agent), so the
admin server holds no state of its own.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from agent.config import ConfigIssue
from agent.metrics import AgentMetrics

CONTENT_TYPE_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


class AdminView(Protocol):
    def status(self) -> dict[str, Any]: ...
    def config_dump(self) -> dict[str, Any]: ...
    def certs(self) -> list[dict[str, Any]]: ...
    def workloads(self) -> list[dict[str, Any]]: ...
    def policies(self) -> list[dict[str, Any]]: ...


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, indent=2, default=str) + "\n", status=status, content_type="application/json"
    )


def _policy_errors(view: AdminView) -> tuple[ConfigIssue, ...]:
    # The serving MeshConfig's poisoned policies (see agent.config.MeshConfig.policy_errors).
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


def build_admin_app(view: AdminView) -> web.Application:
    app = web.Application()

    def handler(fn: Callable[[], Any]) -> Callable[[web.Request], Any]:
        async def h(request: web.Request) -> web.Response:
            return _json(fn())

        return h

    app.router.add_get("/status", handler(lambda: status_with_policy_errors(view)))
    app.router.add_get("/config_dump", handler(lambda: config_dump_with_policy_errors(view)))
    app.router.add_get("/certs", handler(view.certs))
    app.router.add_get("/workloads", handler(view.workloads))
    app.router.add_get("/policies", handler(view.policies))

    async def index(request: web.Request) -> web.Response:
        return _json({"endpoints": ["/status", "/config_dump", "/certs", "/workloads", "/policies"]})

    app.router.add_get("/", index)
    return app


def build_metrics_app(
    metrics: AgentMetrics, *, before_scrape: Callable[[], None] | None = None
) -> web.Application:
    app = web.Application()

    async def scrape(request: web.Request) -> web.Response:
        if before_scrape is not None:
            before_scrape()
        # prometheus_client renders synchronously; with a few hundred series this is sub-ms.
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_PROMETHEUS})

    app.router.add_get("/metrics", scrape)
    # Istio's path for the merged Prometheus endpoint, so existing scrape configs work.
    app.router.add_get("/stats/prometheus", scrape)
    return app


def build_readiness_app(ready: Callable[[], tuple[bool, list[str]]]) -> web.Application:
    """``/healthz/ready``: 200 when ready, else 503 with the reasons (what is not in place yet)."""
    app = web.Application()

    async def check(request: web.Request) -> web.Response:
        ok, reasons = ready()
        if ok:
            return web.Response(text="ready\n")
        return web.Response(text="not ready: " + "; ".join(reasons) + "\n", status=503)

    app.router.add_get("/healthz/ready", check)
    return app


@dataclass
class RunningSite:
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve(app: web.Application, host: str, port: int) -> RunningSite:
    """Start ``app`` on (host, port); port 0 picks a free one, reported in the result."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    return RunningSite(runner, host, sock.getsockname()[1])
