"""`ztagent waypoint`: the L7 proxy for the services and workloads bound to one waypoint.

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 1 when it cannot start (the message says
what is missing), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from agent.capture import parse_address
from serving.logging import setup_logging

log = logging.getLogger("ztagent.waypoint")


def _address(text: str) -> tuple[str, int]:
    try:
        host, port = parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return str(host), int(port)


def _key(text: str) -> str:
    ns, sep, name = text.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected namespace/name of the waypoint's Gateway")
    return text


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "waypoint", help="run a waypoint: L7 policy and RequestAuthentication in the HBONE path"
    )
    p.add_argument("--config", required=True, help="mesh config file (the agents' file); reloaded on change")
    p.add_argument("--name", required=True, type=_key, help="namespace/name of this waypoint's Gateway")
    p.add_argument(
        "--credentials",
        required=True,
        help="credential directory for the waypoint's identity (`ztagent ca issue` output)",
    )
    p.add_argument("-n", "--namespace", default=None, help="namespace for documents that name none")
    p.add_argument("--listen-host", default="0.0.0.0", help="address of the HBONE listener")
    p.add_argument("--hbone-port", type=int, default=None, help="HBONE port (default: the Gateway's, 15008)")
    p.add_argument("--admin", type=_address, default=("127.0.0.1", 15000), help="admin address (/status)")
    p.add_argument("--metrics", type=_address, default=("0.0.0.0", 15020), help="Prometheus /metrics address")
    p.add_argument("--readiness", type=_address, default=("0.0.0.0", 15021), help="/healthz/ready address")
    p.add_argument("--access-log", default=None, help="access log file (JSON lines); default stdout")
    p.add_argument(
        "--ext-authz",
        default=None,
        help="YAML file with Istio MeshConfig extensionProviders (envoyExtAuthzHttp) for CUSTOM",
    )
    p.add_argument("--jwks-refresh", type=float, default=300.0, help="seconds between JWKS refreshes")
    p.add_argument("--config-interval", type=float, default=1.0, help="seconds between config file checks")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=run)


async def serve(args: argparse.Namespace) -> int:
    from waypoint.role import StartupError, WaypointOptions, WaypointRole

    role = WaypointRole(
        WaypointOptions(
            config=args.config,
            name=args.name,
            credentials=args.credentials,
            listen_host=args.listen_host,
            hbone_port=args.hbone_port,
            admin=args.admin,
            metrics=args.metrics,
            readiness=args.readiness,
            access_log=args.access_log,
            ext_authz=args.ext_authz,
            jwks_refresh=args.jwks_refresh,
            config_interval=args.config_interval,
            namespace=args.namespace,
        )
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await role.start()
    except (StartupError, OSError) as exc:
        log.error(f"cannot start: {exc}", extra={"event": "start_failed"})
        print(f"error: ztagent waypoint: {exc}", file=sys.stderr)
        await role.stop()
        return 1
    await stop.wait()
    log.info("stopping (signal)", extra={"event": "waypoint_stopping"})
    await role.stop()
    return 0


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    with contextlib.suppress(ImportError):
        import uvloop

        return int(uvloop.run(serve(args)))
    return asyncio.run(serve(args))
