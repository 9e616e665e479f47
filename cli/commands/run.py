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
from credentials.client import CaClient, CaClientError, TokenCaClient, TokenCredentials
from serving.logging import setup_logging
from sources.base import ConfigSource
from sources.kubernetes import KubernetesConfigSource
from sources.ztunnel_local import ZtunnelLocalSource

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
        "--config",
        help="mesh config file (MeshConfig + Istio policies); reloaded on change (--config-source file)",
    )
    p.add_argument(
        "--config-source",
        choices=("file", "kubernetes"),
        default="file",
        help="file: --config FILE (default); kubernetes: list+watch the API server (in-cluster "
        "credentials unless --kubeconfig)",
    )
    p.add_argument("--kubeconfig", default=None, help="kubeconfig for --config-source kubernetes")
    p.add_argument(
        "--trust-domain",
        default=None,
        help="(kubernetes) the mesh's trust domain; default: the --ca-root-cert's SPIFFE URI SAN",
    )
    p.add_argument(
        "--root-namespace",
        default="istio-system",
        help="(kubernetes) Istio's root namespace for mesh-wide policy",
    )
    p.add_argument(
        "--ca-auth",
        choices=("certificate", "token"),
        default="certificate",
        help="how to authenticate to the CA: --node-credentials DIR (default) or the projected "
        "service-account token at --token-path",
    )
    p.add_argument(
        "--token-path", default=None, help="(--ca-auth token) projected token file, re-read on every call"
    )
    p.add_argument(
        "--ca-root-cert",
        default=None,
        help="(--ca-auth token) trust bundle that verifies the CA's certificate",
    )
    p.add_argument("--node", required=True, help="this node's name in the config")
    p.add_argument(
        "-n",
        "--namespace",
        default=None,
        help="namespace for config documents that name none, as `kubectl apply -n` (default: the "
        "config's defaultNamespace, if any)",
    )
    p.add_argument("--ca", required=True, help="CA address: unix:/path or host:port")
    p.add_argument(
        "--node-credentials",
        default=None,
        help="(--ca-auth certificate) directory from `ztagent ca bootstrap-node`",
    )
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
    p.add_argument(
        "--cni-socket",
        default=None,
        metavar="PATH",
        help="serve the ztagent-cni plugin on this Unix socket (e.g. /var/run/ztagent/cni.sock): pods "
        "are enrolled when the container runtime creates them; off by default",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--ztunnel-nodes",
        default=None,
        metavar="NODES",
        help="read --config as ztunnel's local config (LOCAL_XDS_PATH: workloads, services, policies) "
        "with this node map (nodes, trustDomain, rootNamespace) beside it",
    )
    p.add_argument(
        "--cluster-id",
        default="Kubernetes",
        help="the cluster ID in source_cluster/destination_cluster and workload UIDs (ztunnel's CLUSTER_ID; "
        "default Kubernetes)",
    )
    p.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop (default uvloop)"
    )
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace) -> AgentOptions:
    if args.static_capture and args.capture != "none":
        raise ValueError("--static-capture is only for --capture none")
    if args.config_source == "file" and not args.config:
        raise ValueError("--config FILE is required with --config-source file")
    if args.config_source == "kubernetes" and args.config:
        raise ValueError("--config is for --config-source file; Kubernetes mode reads the API server")
    if args.ca_auth == "certificate":
        if not args.node_credentials:
            raise ValueError("--node-credentials DIR is required with --ca-auth certificate")
        if args.token_path or args.ca_root_cert:
            raise ValueError("--token-path and --ca-root-cert are for --ca-auth token")
    else:
        if not args.token_path or not args.ca_root_cert:
            raise ValueError("--ca-auth token needs --token-path and --ca-root-cert")
        if args.node_credentials:
            raise ValueError("--node-credentials is for --ca-auth certificate")
    return AgentOptions(
        config=args.config or "",
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
        namespace=args.namespace,
        cluster_id=_cluster_id(args.cluster_id),
        cni_socket=args.cni_socket,
    )


def _cluster_id(value: str) -> str:
    # A label value and a UID segment: no '/' (it would split the UID), not empty.
    if not value or "/" in value or value != value.strip():
        raise ValueError(f"--cluster-id {value!r}: expected a non-empty name without '/' or spaces")
    return value


def token_ca_client(args: argparse.Namespace) -> TokenCaClient:
    """The CA client of ``--ca-auth token``; CaClientError when the token or root is unusable."""
    creds = TokenCredentials.from_files(args.token_path, args.ca_root_cert, trust_domain=args.trust_domain)
    return TokenCaClient(args.ca, creds)


def kubernetes_source(args: argparse.Namespace, ca_client: CaClient | None) -> KubernetesConfigSource:
    """The API server as the agent's config source; the trust domain is ``--trust-domain`` or
    the one the CA's root names."""
    td = args.trust_domain
    if td is None and isinstance(ca_client, TokenCaClient):
        td = ca_client.token.trust_domain.name
    if td is None:
        raise ValueError("--trust-domain is required (the CA root names none)")
    return KubernetesConfigSource(args.kubeconfig, trust_domain=td, root_namespace=args.root_namespace)


async def serve(
    options: AgentOptions, *, source: ConfigSource | None = None, ca_client: CaClient | None = None
) -> int:
    agent = NodeAgent(options, source=source, ca_client=ca_client)
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
    ca_client: CaClient | None = None
    try:
        if args.ca_auth == "token":
            ca_client = token_ca_client(args)
    except (CaClientError, ValueError) as exc:
        print(f"error: ztagent run: {exc}", file=sys.stderr)
        return 1

    async def main() -> int:
        # Built inside the loop: the lightkube client binds to the running event loop.
        source: ConfigSource | None = None
        if args.config_source == "kubernetes":
            try:
                source = kubernetes_source(args, ca_client)
            except (OSError, ValueError) as exc:
                print(f"error: ztagent run: {exc}", file=sys.stderr)
                return 1
        elif args.ztunnel_nodes is not None:
            if options.namespace is not None:
                print("error: ztagent run: -n does not apply to ztunnel's local config", file=sys.stderr)
                return 2
            # ztunnel's local config, translated on every load (sources.ztunnel_local).
            source = ZtunnelLocalSource(options.config, args.ztunnel_nodes, interval=options.config_interval)
        return await serve(options, source=source, ca_client=ca_client)

    if args.loop == "uvloop":
        with contextlib.suppress(ImportError):
            import uvloop

            return int(uvloop.run(main()))
    return asyncio.run(main())
