"""Run a real Envoy (.venv/bin/envoy) as an HBONE peer: configs for both roles, start/stop helpers.

Shared by the benchmarks (``bench.suite``, ``bench.hbone_bench``) and the interop tests in
tests/tunnel. Credentials go into the config inline (``inline_string``), so no key material is
written to disk; the config itself lives in a temp dir.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from identity.bundle import TrustBundleSet
from identity.svid import WorkloadCredential

ENVOY = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "envoy"
_ids = itertools.count()
_HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)


def _tls_common(cred: WorkloadCredential, bundles: TrustBundleSet) -> dict[str, Any]:
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "alpn_protocols": ["h2"],
        "tls_certificates": [
            {
                "certificate_chain": {"inline_string": cred.chain_pem().decode()},
                "private_key": {"inline_string": cred.key_pem().decode()},
            }
        ],
        "validation_context": {"trusted_ca": {"inline_string": bundles.all_roots_pem().decode()}},
    }


# Envoy's default circuit breakers allow 1024 connections / requests per cluster: the 1025th
# tunnel would be reset. Istio raises them to "unlimited" for its clusters; so do we.
_NO_LIMITS = {
    "thresholds": [
        {
            "max_connections": 4294967295,
            "max_pending_requests": 4294967295,
            "max_requests": 4294967295,
            "max_retries": 4294967295,
        }
    ]
}


def _static_cluster(name: str, host: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "circuit_breakers": _NO_LIMITS,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                    ]
                }
            ],
        },
    }


def _listener(
    name: str, filters: list[dict[str, Any]], transport: dict[str, Any] | None = None
) -> dict[str, Any]:
    chain: dict[str, Any] = {"filters": filters}
    if transport:
        chain["transport_socket"] = transport
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [chain],
    }


def hbone_client_config(
    *,
    target: str | list[str],
    server: tuple[str, int],
    cred: WorkloadCredential,
    bundles: TrustBundleSet,
    expect_san: str,
) -> dict[str, Any]:
    """Envoy as HBONE client: plaintext TCP in, tcp_proxy tunneling_config (CONNECT target) out
    over HTTP/2 + mTLS with an SVID, checking the server's URI SAN. A list of targets makes one
    listener per target (``outbound-<i>``), all sharing the one HBONE cluster (and its pool)."""
    cluster = _static_cluster("hbone", *server)
    common = _tls_common(cred, bundles)
    common["validation_context"]["match_typed_subject_alt_names"] = [
        {"san_type": "URI", "matcher": {"exact": expect_san}}
    ]
    cluster["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common,
        },
    }
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {
                "http2_protocol_options": {
                    "initial_stream_window_size": 4 * 1024 * 1024,
                    "initial_connection_window_size": 16 * 1024 * 1024,
                }
            },
        }
    }

    def tcp(hostname: str) -> dict[str, Any]:
        return {
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "stat_prefix": "hbone_out",
                "cluster": "hbone",
                "tunneling_config": {"hostname": hostname},
            },
        }

    if isinstance(target, str):
        listeners = [_listener("outbound", [tcp(target)])]
    else:
        listeners = [_listener(f"outbound-{i}", [tcp(t)]) for i, t in enumerate(target)]
    return {"static_resources": {"listeners": listeners, "clusters": [cluster]}}


def hbone_server_config(
    *,
    backend: tuple[str, int],
    cred: WorkloadCredential,
    bundles: TrustBundleSet,
    routes: dict[str, tuple[str, int]] | None = None,
) -> dict[str, Any]:
    """Envoy as HBONE terminator: mTLS (client cert required) + HTTP/2 CONNECT -> TCP backend.
    ``routes`` maps CONNECT authorities to backends (one cluster each, matched by :authority);
    without it every CONNECT goes to ``backend``."""
    routed = routes or {}
    names = {auth: f"backend-{i}" for i, auth in enumerate(routed)}

    def vhost(name: str, domains: list[str], cluster: str) -> dict[str, Any]:
        return {
            "name": name,
            "domains": domains,
            "routes": [
                {
                    "match": {"connect_matcher": {}},
                    "route": {
                        "cluster": cluster,
                        "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
                    },
                }
            ],
        }

    vhosts = [vhost(names[a], [a], names[a]) for a in routed] + [vhost("all", ["*"], "backend")]
    transport = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": _tls_common(cred, bundles),
        },
    }
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _HCM_TYPE,
            "stat_prefix": "hbone_in",
            "codec_type": "HTTP2",
            "http2_protocol_options": {
                "allow_connect": True,
                "initial_stream_window_size": 4 * 1024 * 1024,
                "initial_connection_window_size": 16 * 1024 * 1024,
            },
            "upgrade_configs": [{"upgrade_type": "CONNECT"}],
            "route_config": {"virtual_hosts": vhosts},
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                    },
                }
            ],
        },
    }
    return {
        "static_resources": {
            "listeners": [_listener("hbone_in", [hcm], transport)],
            "clusters": [_static_cluster("backend", *backend)]
            + [_static_cluster(names[a], *addr) for a, addr in routed.items()],
        }
    }


@dataclass
class EnvoyProcess:
    proc: subprocess.Popen[bytes]
    workdir: str
    admin: str
    listener_port: int
    listener_ports: dict[str, int] = dataclasses.field(default_factory=dict)  # by listener name
    netns: str | None = None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def admin_get(self, path: str) -> bytes:
        """GET ``path`` from the admin endpoint (from inside Envoy's network namespace)."""

        def get() -> bytes:
            with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=5) as r:
                return bytes(r.read())

        if self.netns is None:
            return get()
        from lab.runner import in_netns

        return in_netns(self.netns, get)

    def stats(self) -> dict[str, int]:
        doc = json.loads(self.admin_get("/stats?format=json"))
        return {s["name"]: s["value"] for s in doc["stats"] if isinstance(s.get("value"), int)}


def start_envoy(
    config: dict[str, Any], *, concurrency: int = 1, timeout: float = 20.0, netns: str | None = None
) -> EnvoyProcess:
    """Start Envoy with ``config`` (admin on 127.0.0.1:0), wait until all its listeners are bound,
    return it (``listener_port``: the first listener's port; ``listener_ports``: all, by name).
    ``netns``: run it in that network namespace (a name under /run/netns; root), e.g. a lab node;
    its admin endpoint is then only reachable from there (:meth:`EnvoyProcess.admin_get`)."""
    workdir = tempfile.mkdtemp(prefix="ztagent-envoy-")
    config = dict(config)
    config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
    cfg_path = os.path.join(workdir, "envoy.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(config, f)
    admin_path = os.path.join(workdir, "admin.txt")
    base_id = 100000 + (os.getpid() % 10000) * 10 + next(_ids) % 10
    log = open(os.path.join(workdir, "envoy.log"), "wb")  # noqa: SIM115 - lives as long as envoy
    enter = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []  # execs: the pid is Envoy's
    proc = subprocess.Popen(
        [
            *enter,
            str(ENVOY),
            "-c",
            cfg_path,
            "--base-id",
            str(base_id),
            "--admin-address-path",
            admin_path,
            "--concurrency",
            str(concurrency),
            "-l",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    env = EnvoyProcess(proc, workdir, "", 0, netns=netns)
    wanted = [ls["name"] for ls in config.get("static_resources", {}).get("listeners", [])]
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("envoy exited: " + Path(workdir, "envoy.log").read_text()[-3000:])
            if os.path.exists(admin_path) and (admin := Path(admin_path).read_text().strip()):
                env.admin = admin
                try:
                    doc = json.loads(env.admin_get("/listeners?format=json"))
                except OSError:
                    doc = {}
                ports = {
                    ls.get("name", ""): int(port)
                    for ls in doc.get("listener_statuses", [])
                    if (port := ls.get("local_address", {}).get("socket_address", {}).get("port_value"))
                }
                if ports and len(ports) == len(wanted):
                    env.admin, env.listener_ports = admin, ports
                    env.listener_port = ports.get(wanted[0], next(iter(ports.values())))
                    return env
            time.sleep(0.05)
        raise RuntimeError("envoy did not come up: " + Path(workdir, "envoy.log").read_text()[-3000:])
    except BaseException:
        env.stop()
        raise


def start_hbone_pair(
    stack: ExitStack,
    backends: dict[str, tuple[str, int]],
    *,
    client_cred: WorkloadCredential,
    server_cred: WorkloadCredential,
    bundles: TrustBundleSet,
) -> tuple[EnvoyProcess, EnvoyProcess, dict[str, int]]:
    """The benchmark's Envoy HBONE pair in front of ``backends`` (kind -> (host, port)): a server
    Envoy routing each CONNECT by its authority, and a client Envoy with one plaintext listener
    per backend, all over one HBONE cluster. ``stack`` stops both. Returns the client, the server
    and the client's listener port by kind."""
    kinds = list(backends)
    server = start_envoy(
        hbone_server_config(
            backend=backends[kinds[0]],
            cred=server_cred,
            bundles=bundles,
            routes={f"{host}:{port}": (host, port) for host, port in backends.values()},
        )
    )
    stack.callback(server.stop)
    client = start_envoy(
        hbone_client_config(
            target=[f"{host}:{port}" for host, port in backends.values()],
            server=("127.0.0.1", server.listener_port),
            cred=client_cred,
            bundles=bundles,
            expect_san=str(server_cred.spiffe_id),
        )
    )
    stack.callback(client.stop)
    return client, server, {k: client.listener_ports[f"outbound-{i}"] for i, k in enumerate(kinds)}
