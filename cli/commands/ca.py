"""`ztagent ca`: the certificate authority's operator commands and its server.

    ztagent ca init   --dir D --trust-domain TD [--force]                 self-signed root
    ztagent ca init   --dir D --cert-chain C --key K [--root R] [--trust-domain TD] [--force]
                                                                          plug-in CA (root stays offline)
    ztagent ca issue  --dir D --id SPIFFE_ID [--ttl 1h] [--max-ttl 24h] --out DIR [-o json]
                                                                          local issuance
    ztagent ca bootstrap-node --dir D --node NAME [--ttl 30d] --out DIR [-o json]
    ztagent ca bundle --dir D [--format pem|jwks]
    ztagent ca serve  --dir D --config F --listen unix:/path|host:port [--default-ttl 1h] [--max-ttl 24h]
                      [--metrics HOST:PORT] [--readiness HOST:PORT]
    ztagent ca serve  --dir D --config-source kubernetes [--kubeconfig K] --node-auth token
                      [--token-audience ztagent-ca] [--agent-service-account NS/SA] --listen ...

Output is stable: ``issue`` and ``bootstrap-node`` print ``key: value`` lines in a fixed order
(RFC 3339 UTC times), or one JSON object with ``-o json``. Errors go to stderr as ``error: ...``
with exit status 1 (2 for usage errors) and leave every file as it was.

Bootstrap. ``bootstrap-node`` is the file-based way to give a node agent its first credential:
run it where the CA directory is, copy the output directory to the node (``ztagent run
--node-credentials DIR``). In Kubernetes the agent would instead present its projected
service-account token (audience ``ztagent-ca``) on every CreateCertificate call; the CA checks it
with a TokenReview, takes the node from the review (or the bound pod's ``spec.nodeName``) and
issues only identities of pods on that node (``--node-auth token``, caserver.tokenauth), the way
istiod authenticates ztunnel by token.

Lifetimes. ``issue --ttl`` is held to the CA's maximum workload TTL (``--max-ttl``, default the
same 24 h as ``ca serve --max-ttl``): the offline path must not mint what the online one refuses.
``bootstrap-node --ttl`` defaults to 30 days, at most 365, and never past the CA certificate. The
bootstrap credential is long-lived on purpose: the agent never overwrites it (its renewals of
the node identity have the workload TTL and live beside it), so it is how a node gets back to
the CA after an outage longer than the workload TTL; its lifetime is the longest CA outage
the mesh heals from without an operator. It can only obtain certificates for workloads the mesh
config places on that node, and removing the node from the config stops it at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import re
import signal
import sys
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from caserver import store as ca_store
from caserver.server import CaServer, ConfigMismatch
from caserver.tokenauth import DEFAULT_AGENT_SERVICE_ACCOUNTS, DEFAULT_AUDIENCE, KubernetesTokenReviewer
from credentials.identities import NodeNameError, node_identity
from identity.ca import DEFAULT_MAX_TTL, DEFAULT_WORKLOAD_TTL, CaError
from identity.keys import build_csr, generate_key, key_to_pem
from identity.spiffe import SpiffeId, SpiffeIdError
from mesh.config import ConfigError
from serving.http import RunningSite, build_readiness_app
from serving.http import serve as serve_http
from serving.logging import setup_logging
from sources.file import FileConfigSource
from sources.kubernetes import CA_RESOURCES, KubernetesConfigSource, client_factory

_DURATION = re.compile(r"(\d+)([smhd])")
# See "Lifetimes" above.
DEFAULT_BOOTSTRAP_TTL = dt.timedelta(days=30)
MAX_BOOTSTRAP_TTL = dt.timedelta(days=365)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> dt.timedelta:
    """``90s``, ``30m``, ``1h``, ``7d``, ``1h30m``; positive only."""
    pos = 0
    seconds = 0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        seconds += int(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text or seconds <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive duration like 90s, 30m, 1h, 7d or 1h30m"
        )
    return dt.timedelta(seconds=seconds)


def _rfc3339(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ca", help="certificate authority: init, issue, bundle, bootstrap-node, serve")
    csub = p.add_subparsers(dest="ca_command", metavar="ACTION", required=True)

    i = csub.add_parser("init", help="create a CA directory (self-signed root or plug-in intermediate)")
    i.add_argument("--dir", required=True, help="CA directory to create")
    i.add_argument("--trust-domain", help="trust domain (required for a self-signed root)")
    i.add_argument("--cert-chain", help="plug-in CA: PEM file with the intermediate (and more) certificates")
    i.add_argument("--key", help="plug-in CA: PEM private key of the intermediate")
    i.add_argument("--root", help="plug-in CA: PEM root certificate, if not at the end of --cert-chain")
    i.add_argument(
        "--force", action="store_true", help="replace an existing CA (invalidates its certificates)"
    )
    i.set_defaults(func=cmd_init)

    s = csub.add_parser("issue", help="issue a workload certificate locally from the CA's files")
    s.add_argument("--dir", required=True, help="CA directory")
    s.add_argument("--id", required=True, dest="spiffe_id", help="SPIFFE ID, e.g. spiffe://td/ns/a/sa/b")
    s.add_argument("--ttl", type=parse_duration, default=DEFAULT_WORKLOAD_TTL, help="lifetime (default 1h)")
    s.add_argument(
        "--max-ttl",
        type=parse_duration,
        default=DEFAULT_MAX_TTL,
        help="the CA's maximum workload TTL, as given to `ca serve --max-ttl` (default 24h)",
    )
    s.add_argument("--out", required=True, help="directory for key.pem, cert-chain.pem, root-cert.pem")
    s.add_argument("-o", "--output", choices=["text", "json"], default="text")
    s.set_defaults(func=cmd_issue)

    b = csub.add_parser("bootstrap-node", help="issue a node agent's credential for talking to the CA")
    b.add_argument("--dir", required=True, help="CA directory")
    b.add_argument("--node", required=True, help="node name (as in the mesh config)")
    b.add_argument(
        "--ttl",
        type=parse_duration,
        default=None,
        help="lifetime: the longest CA outage the node recovers from by itself (default 30d, at most "
        "365d; the default is cut to the CA certificate's lifetime, an explicit value is not)",
    )
    b.add_argument("--out", required=True, help="directory for key.pem, cert-chain.pem, root-cert.pem")
    b.add_argument("-o", "--output", choices=["text", "json"], default="text")
    b.set_defaults(func=cmd_bootstrap_node)

    u = csub.add_parser("bundle", help="print the trust bundle")
    u.add_argument("--dir", required=True, help="CA directory")
    u.add_argument("--format", choices=["pem", "jwks"], default="pem")
    u.set_defaults(func=cmd_bundle)

    v = csub.add_parser("serve", help="serve istio.v1.auth.IstioCertificateService to node agents")
    v.add_argument("--dir", required=True, help="CA directory")
    v.add_argument("--config", help="mesh config file (workload placement); --config-source file")
    v.add_argument(
        "--config-source",
        choices=("file", "kubernetes"),
        default="file",
        help="where workload placement comes from: --config FILE (default), or a watch of the API "
        "server's Pods and Namespaces (in-cluster credentials unless --kubeconfig)",
    )
    v.add_argument("--kubeconfig", help="kubeconfig for --config-source kubernetes (default: in-cluster)")
    v.add_argument(
        "--node-auth",
        choices=("certificate", "token"),
        default="certificate",
        help="how node agents authenticate: a node credential (mTLS, default) or their projected "
        "service-account token, checked by TokenReview (--config-source kubernetes)",
    )
    v.add_argument("--token-audience", default=DEFAULT_AUDIENCE, help="audience the token must carry")
    v.add_argument(
        "--agent-service-account",
        action="append",
        default=None,
        metavar="NS/SA",
        help="service account node agents run as (repeatable; default ztagent-system/ztagent)",
    )
    v.add_argument("--readiness", metavar="HOST:PORT", help="serve /healthz/ready here (port 0: any)")
    v.add_argument("--listen", required=True, help="unix:/absolute/path or host:port (port 0: any)")
    v.add_argument("--default-ttl", type=parse_duration, default=DEFAULT_WORKLOAD_TTL)
    v.add_argument("--max-ttl", type=parse_duration, default=DEFAULT_MAX_TTL)
    v.add_argument("--config-poll", type=float, default=1.0, help="seconds between config file checks")
    v.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus /metrics here (port 0: any)")
    v.add_argument("-o", "--output", choices=["text", "json"], default="text")
    v.set_defaults(func=cmd_serve)


# --------------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    now = _now()
    try:
        if args.cert_chain or args.key or args.root:
            if not (args.cert_chain and args.key):
                return _err("a plug-in CA needs both --cert-chain and --key")
            chain = Path(args.cert_chain).read_bytes()
            key = Path(args.key).read_bytes()
            root = Path(args.root).read_bytes() if args.root else None
            st = ca_store.init_plugin(
                args.dir,
                chain_pem=chain,
                key_pem=key,
                root_pem=root,
                trust_domain=args.trust_domain,
                now=now,
                force=args.force,
            )
        else:
            if not args.trust_domain:
                return _err(
                    "--trust-domain is required for a self-signed root (or give --cert-chain and --key)"
                )
            st = ca_store.init_self_signed(args.dir, args.trust_domain, now=now, force=args.force)
    except OSError as exc:
        return _err(f"cannot read {exc.filename}: {exc.strerror}")
    except ca_store.CaStoreError as exc:
        return _err(str(exc))
    print(f"trust_domain: {st.trust_domain}")
    print(f"kind: {st.kind}")
    print(f"not_after: {_rfc3339(st.ca.not_after)}")
    print(f"dir: {st.directory}")
    return 0


def _human(d: dt.timedelta) -> str:
    secs = int(d.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs % size == 0:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def _issue(
    args: argparse.Namespace,
    spiffe_id: SpiffeId,
    ttl: dt.timedelta,
    extra: dict[str, str],
    *,
    max_ttl: dt.timedelta,
    whole_lifetime: bool = False,
) -> int:
    """Sign locally; ``max_ttl`` is checked here before any file is touched. With
    ``whole_lifetime`` a TTL past the CA certificate's NotAfter is refused (else it is cut short
    to the CA's NotAfter, as the CA does for every certificate)."""
    if ttl > max_ttl:
        return _err(f"--ttl {_human(ttl)} exceeds the maximum {_human(max_ttl)}")
    try:
        st = ca_store.load(args.dir, max_ttl=max_ttl)
        if spiffe_id.trust_domain != st.trust_domain:
            return _err(f"{spiffe_id} is not in this CA's trust domain {st.trust_domain}")
        key = generate_key()
        now = _now()
        if whole_lifetime and now + ttl > st.ca.not_after:
            return _err(
                f"--ttl {_human(ttl)} would outlive the CA certificate (valid until "
                f"{_rfc3339(st.ca.not_after)}); give a shorter --ttl or renew the CA first"
            )
        issued = st.ca.sign_csr(build_csr(key, spiffe_id), allowed=lambda s: s == spiffe_id, ttl=ttl, now=now)
        files = ca_store.write_credentials(
            args.out, ca_store.CredentialFiles(key_to_pem(key), issued.chain_pem, st.bundle.to_pem())
        )
    except (ca_store.CaStoreError, CaError) as exc:
        return _err(str(exc))
    out: dict[str, Any] = {
        **extra,
        "spiffe_id": str(issued.spiffe_id),
        "serial": format(issued.certificate.serial_number, "x"),
        "not_before": _rfc3339(issued.not_before),
        "not_after": _rfc3339(issued.not_after),
        **files,
    }
    if args.output == "json":
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    try:
        sid = SpiffeId.parse(args.spiffe_id)
    except SpiffeIdError as exc:
        return _err(f"--id {args.spiffe_id!r}: {exc}")
    if args.ttl > args.max_ttl:
        return _err(
            f"--ttl {_human(args.ttl)} exceeds the CA's maximum workload TTL {_human(args.max_ttl)} "
            "(`ca serve --max-ttl`; pass the same --max-ttl here if your CA allows more)"
        )
    return _issue(args, sid, args.ttl, {}, max_ttl=args.max_ttl)


def cmd_bootstrap_node(args: argparse.Namespace) -> int:
    try:
        st = ca_store.load(args.dir)
        sid = node_identity(st.trust_domain, args.node)
    except ca_store.CaStoreError as exc:
        return _err(str(exc))
    except NodeNameError as exc:
        return _err(f"--node: {exc}")
    explicit = args.ttl is not None
    ttl = args.ttl if explicit else DEFAULT_BOOTSTRAP_TTL
    if not explicit and _now() + ttl > st.ca.not_after:
        print(
            f"warning: the default bootstrap lifetime {_human(ttl)} is cut to the CA certificate's "
            f"NotAfter {_rfc3339(st.ca.not_after)}",
            file=sys.stderr,
        )
    return _issue(args, sid, ttl, {"node": args.node}, max_ttl=MAX_BOOTSTRAP_TTL, whole_lifetime=explicit)


def cmd_bundle(args: argparse.Namespace) -> int:
    try:
        st = ca_store.load(args.dir)
    except ca_store.CaStoreError as exc:
        return _err(str(exc))
    if args.format == "jwks":
        print(json.dumps(st.bundle.to_jwks(), indent=2, sort_keys=True))
    else:
        sys.stdout.write(st.bundle.to_pem().decode("ascii"))
    return 0


# --------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    setup_logging()
    return asyncio.run(_serve(args))


def _host_port(flag: str, value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{flag} {value!r}: expected host:port")
    return host.strip("[]"), int(port)


async def _serve(args: argparse.Namespace) -> int:
    kube: KubernetesConfigSource | None = None
    reviewer: KubernetesTokenReviewer | None = None
    source: FileConfigSource | KubernetesConfigSource
    if args.config_source == "file" and not args.config:
        return _err("--config FILE is required with --config-source file")
    if args.config_source == "kubernetes" and args.config:
        return _err("--config is for --config-source file; Kubernetes mode reads the API server")
    if args.node_auth == "token" and args.config_source != "kubernetes":
        return _err("--node-auth token needs --config-source kubernetes (the TokenReview and the pod watch)")
    try:
        st = ca_store.load(args.dir, max_ttl=args.max_ttl)
        if args.config_source == "kubernetes":
            # Pods and Namespaces only: what the CA's ClusterRole grants (deploy/rbac.yaml).
            kube = KubernetesConfigSource(
                args.kubeconfig, trust_domain=st.trust_domain, resources=CA_RESOURCES, cluster_id="Kubernetes"
            )
            source = kube
        else:
            source = FileConfigSource(args.config, interval=args.config_poll)
        cfg = await source.initial()
        if args.node_auth == "token":
            assert kube is not None
            watched = kube

            def pod_node(ns: str, name: str) -> str | None:
                node = ((watched.raw("pods", ns, name) or {}).get("spec") or {}).get("nodeName")
                return str(node) if node else None

            reviewer = KubernetesTokenReviewer(
                client_factory(args.kubeconfig),
                audience=args.token_audience,
                agent_service_accounts=args.agent_service_account or DEFAULT_AGENT_SERVICE_ACCOUNTS,
                pod_node=pod_node,
            )
        registry = CollectorRegistry()
        server = CaServer(
            st,
            cfg,
            default_ttl=args.default_ttl,
            registry=registry,
            node_auth=args.node_auth,
            token_reviewer=reviewer,
        )
    except ca_store.CaStoreError as exc:
        return _err(str(exc))
    except ConfigError as exc:
        return _err(f"config refused: {exc}")
    except (ConfigMismatch, ValueError) as exc:
        return _err(str(exc))
    metrics_server = None
    readiness: RunningSite | None = None
    try:
        if args.metrics:
            host, port = _host_port("--metrics", args.metrics)
            metrics_server, _ = start_http_server(port, host, registry)
        address = await server.start(args.listen)
        if args.readiness:
            # Ready once the signing key is loaded, the placement synced (initial LIST or file)
            # and the gRPC port bound: all true by now, and a replica that lost them exits.
            readiness = await serve_http(
                build_readiness_app(lambda: (True, [])), *_host_port("--readiness", args.readiness)
            )
    except (OSError, ValueError) as exc:
        if metrics_server is not None:
            metrics_server.shutdown()
        await server.stop()
        return _err(str(exc))
    info = {
        "event": "serving",
        "service": "istio.v1.auth.IstioCertificateService",
        "address": address,
        "trust_domain": str(st.trust_domain),
        "config": cfg.source,
        "config_sha256": cfg.digest,
    }
    if metrics_server is not None:
        info["metrics"] = f"{args.metrics.rpartition(':')[0]}:{metrics_server.server_port}"
    if readiness is not None:
        info["readiness"] = f"{readiness.host}:{readiness.port}"
    info["node_auth"] = args.node_auth
    if args.output == "json":
        print(json.dumps(info), flush=True)
    else:
        print(
            f"serving {info['service']} on {address} (trust domain {st.trust_domain}, "
            f"config {cfg.source} sha256 {cfg.digest[:12]})",
            flush=True,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if kube is not None:
        watcher = asyncio.create_task(server.follow(kube, cfg), name="ca-config-watch")
    else:
        assert isinstance(source, FileConfigSource)
        watcher = asyncio.create_task(server.watch_config(source), name="ca-config-watch")
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await server.stop(grace=2.0)
        if metrics_server is not None:
            metrics_server.shutdown()
        if readiness is not None:
            await readiness.close()
        if reviewer is not None:
            await reviewer.close()
        if kube is not None:
            await kube.close()
    return 0
