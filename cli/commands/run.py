"""`ztagent run`: the node agent (DESIGN §1), one per node, inside the node's network namespace.

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 1 when the agent cannot start (the message
says what is missing: config error with file/document/field, no certificate, capture failure,
port in use), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import resource
import signal
import sys

from agent.capture import StaticCapture, parse_address
from agent.supervisor import AgentOptions, NodeAgent, StartupError
from serving.logging import setup_logging

log = logging.getLogger("ztagent.run")


def _duration(text: str) -> dt.timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration like 30m, 1h, 2d")
    return dt.timedelta(seconds=int(text[:-1]) * units[text[-1]])


def _address(text: str) -> str:
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _static(text: str) -> StaticCapture:
    try:
        return StaticCapture.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the node agent (capture, HBONE, policy, metrics, admin)")
    p.add_argument(
        "--config", required=True, help="mesh config file (MeshConfig + Istio policies); reloaded on change"
    )
    p.add_argument("--node", required=True, help="this node's name in the config")
    p.add_argument("--ca", required=True, help="CA address: unix:/path or host:port")
    p.add_argument("--node-credentials", required=True, help="directory from `ztagent ca bootstrap-node`")
    p.add_argument(
        "--capture",
        choices=("bpf", "none"),
        default="bpf",
        help="bpf: eBPF capture of enrolled pods (default); none: no capture (tests, development)",
    )
    p.add_argument(
        "--listen-host", default="0.0.0.0", help="address of the 15001/15006/15008 listeners (bpf)"
    )
    p.add_argument("--hbone-port", type=int, default=15008, help="HBONE port on pod IPs (default 15008)")
    p.add_argument("--admin", type=_address, default="127.0.0.1:15000", help="admin address (localhost only)")
    p.add_argument("--metrics", type=_address, default="0.0.0.0:15020", help="Prometheus /metrics address")
    p.add_argument("--readiness", type=_address, default="0.0.0.0:15021", help="/healthz/ready address")
    p.add_argument(
        "--static-capture",
        type=_static,
        action="append",
        default=[],
        metavar="[in:|out:]LISTEN=ORIG",
        help="(--capture none, tests) treat connections accepted on LISTEN ip:port as captured with "
        "original destination ORIG ip:port by the outbound (default) or inbound listener; repeatable",
    )
    p.add_argument("--access-log", default=None, help="access log file (JSON lines); default stdout")
    p.add_argument("--cert-ttl", type=_duration, default=None, help="requested workload certificate lifetime")
    p.add_argument("--config-interval", type=float, default=1.0, help="seconds between config file checks")
    p.add_argument("--drain-timeout", type=float, default=5.0, help="seconds to let tunnels finish on stop")
    p.add_argument("--state-file", default=None, help="write bound addresses here (JSON) once serving")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop (default uvloop)"
    )
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace) -> AgentOptions:
    if args.static_capture and args.capture != "none":
        raise ValueError("--static-capture is only for --capture none")
    return AgentOptions(
        config=args.config,
        node=args.node,
        ca=args.ca,
        node_credentials=args.node_credentials,
        capture=args.capture,
        listen_host=args.listen_host,
        hbone_port=args.hbone_port,
        admin=args.admin,
        metrics=args.metrics,
        readiness=args.readiness,
        static_captures=tuple(args.static_capture),
        access_log=args.access_log,
        config_interval=args.config_interval,
        cert_ttl=args.cert_ttl,
        drain_timeout=args.drain_timeout,
        state_file=args.state_file,
    )


async def serve(options: AgentOptions) -> int:
    agent = NodeAgent(options)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
    except StartupError as exc:
        log.error(f"cannot start: {exc}", extra={"event": "start_failed"})
        print(f"error: ztagent run: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        log.error(f"cannot start: {exc}", extra={"event": "start_failed"})
        print(f"error: ztagent run: {exc}", file=sys.stderr)
        return 1
    await stop.wait()
    log.info("stopping (signal)", extra={"event": "agent_stopping"})
    await agent.stop()
    return 0


# Every proxied connection holds two descriptors (the app's and the upstream's or the tunnel's
# share); distributions start services with a soft limit of 1024, which a busy node passes.
WANTED_NOFILE = 1 << 20


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard limit (as Envoy and ztunnel do); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = WANTED_NOFILE if hard == resource.RLIM_INFINITY else min(hard, WANTED_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:
            log.warning(f"cannot raise the open-files limit from {soft}: {exc}", extra={"event": "nofile"})
    if soft < 16384:
        log.warning(
            f"open-files limit is {soft}: at about {soft // 2} proxied connections new ones will fail "
            "(raise the hard limit, e.g. LimitNOFILE= or the container runtime's ulimit)",
            extra={"event": "nofile"},
        )
    return soft


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        options = options_from_args(args)
    except ValueError as exc:
        print(f"error: ztagent run: {exc}", file=sys.stderr)
        return 2
    raise_nofile_limit()
    if args.loop == "uvloop":
        with contextlib.suppress(ImportError):
            import uvloop

            return int(uvloop.run(serve(options)))
    return asyncio.run(serve(options))
