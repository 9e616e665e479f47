"""`ztagent ca serve` as a real process on a unix socket, with the agent's real client over mTLS.

Proves: a node obtains, renews and validates workload certificates over the network; a node
asking for a workload placed elsewhere is refused with a message naming node and identity; a
client without a credential from this CA is refused at TLS; a workload credential cannot act as
a node; bad input is INVALID_ARGUMENT and changes nothing; config reloads keep the last good one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import socket
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import h2.connection
import h2.events
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from caserver import store as ca_store
from caserver.server import CaServer
from credentials.client import CaClient, CaClientError, NodeCredentials
from credentials.identities import CA_SERVER_NAME
from credentials.manager import CertificateManager
from credentials.proto import ca_pb2
from identity.bundle import TrustBundle, TrustBundleSet
from identity.ca import CertificateAuthority
from identity.keys import build_csr, generate_key
from identity.spiffe import SpiffeId
from identity.svid import verify_svid
from mesh.config import parse_config
from tests.agent.test_ca_helpers import (
    TD,
    ZTAGENT,
    CaEnv,
    ServeProcess,
    cli,
    config_text,
    dir_digest,
    make_env,
    now,
    raw_channel,
    raw_stub,
    short_tmpdir,
    write_config,
)

SLEEP = SpiffeId.parse(f"spiffe://{TD}/ns/ns1/sa/sleep")
HTTPBIN = SpiffeId.parse(f"spiffe://{TD}/ns/ns2/sa/httpbin")
LEGACY = SpiffeId.parse(f"spiffe://{TD}/ns/ns3/sa/legacy")
NODE_A = SpiffeId.parse(f"spiffe://{TD}/ns/ztagent-system/sa/ztagent/node/node-a")
NODE_B = SpiffeId.parse(f"spiffe://{TD}/ns/ztagent-system/sa/ztagent/node/node-b")


@pytest.fixture(scope="module")
def env() -> Iterator[CaEnv]:
    with short_tmpdir() as base:
        yield make_env(base)


@pytest.fixture(scope="module")
def server(env: CaEnv) -> Iterator[ServeProcess]:
    with ServeProcess(env) as s:
        yield s


def published_bundle(env: CaEnv) -> TrustBundleSet:
    """The bundle as an operator gets it: `ztagent ca bundle` output."""
    out = subprocess.run(
        [ZTAGENT, "ca", "bundle", "--dir", str(env.ca_dir)], check=True, capture_output=True, timeout=30
    ).stdout
    return TrustBundleSet.of(TrustBundle.from_pem(TD, out))


def client(server: ServeProcess, cred_dir: Path, **kw: object) -> CaClient:
    return CaClient(server.address, NodeCredentials.from_dir(cred_dir), **kw)  # type: ignore[arg-type]


async def test_node_obtains_renews_and_validates_workload_certificates(
    env: CaEnv, server: ServeProcess
) -> None:
    bundles = published_bundle(env)
    async with client(server, env.node_a) as c:
        first = await c.create_certificate(SLEEP)
        second = await c.create_certificate(SLEEP, dt.timedelta(seconds=90))
    t = now()
    for cred in (first, second):
        assert verify_svid(cred.chain, bundles, t) == SLEEP
        assert cred.spiffe_id == SLEEP
    # Default TTL 1 h; the requested 90 s is honoured.
    assert dt.timedelta(minutes=59) < first.not_after - t <= dt.timedelta(hours=1)
    assert dt.timedelta(seconds=80) < second.not_after - t <= dt.timedelta(seconds=90)
    # A renewal is a new key and a new certificate, not the same one again.
    assert second.leaf.serial_number != first.leaf.serial_number
    assert second.key_pem() != first.key_pem()
    issued = [r for r in server.logs() if r.get("event") == "ca_issued" and r.get("identity") == str(SLEEP)]
    assert len(issued) >= 2 and all(r["node"] == "node-a" for r in issued)


async def test_response_has_istiod_shape(server: ServeProcess, env: CaEnv) -> None:
    key = generate_key()
    ch = raw_channel(server.address, env.node_a)
    try:
        resp = await raw_stub(ch).CreateCertificate(
            ca_pb2.IstioCertificateRequest(csr=build_csr(key, SLEEP).decode()), timeout=10
        )
    finally:
        await ch.close()
    # leaf first, root last, one PEM certificate per entry, newline-terminated (istiod's form).
    assert len(resp.cert_chain) == 2
    assert all(e.count("BEGIN CERTIFICATE") == 1 and e.endswith("\n") for e in resp.cert_chain)
    root_pem = (env.ca_dir / "root-cert.pem").read_text()
    assert resp.cert_chain[-1] == root_pem
    assert list(resp.root_cert.ca_cert) == [root_pem]


@pytest.mark.parametrize(
    ("cred", "identity", "allowed", "needles"),
    [
        ("node_a", SLEEP, True, []),
        ("node_b", HTTPBIN, True, []),
        ("node_a", NODE_A, True, []),  # a node may renew its own credential
        (
            "node_a",
            HTTPBIN,
            False,
            ["node 'node-a'", str(HTTPBIN), "placed on node 'node-a'", "runs on node-b"],
        ),
        ("node_b", SLEEP, False, ["node 'node-b'", str(SLEEP), "runs on node-a"]),
        ("node_a", LEGACY, False, ["node 'node-a'", str(LEGACY), "no enrolled workload"]),
        ("node_a", NODE_B, False, ["another node's identity"]),
        (
            "node_a",
            SpiffeId.parse(f"spiffe://{TD}/ns/ns1/sa/other"),
            False,
            ["'other'", "no enrolled workload"],
        ),
    ],
)
async def test_authorization_by_node_placement(
    env: CaEnv, server: ServeProcess, cred: str, identity: SpiffeId, allowed: bool, needles: list[str]
) -> None:
    async with client(server, getattr(env, cred)) as c:
        if allowed:
            got = await c.create_certificate(identity)
            assert got.spiffe_id == identity
            return
        with pytest.raises(CaClientError) as ei:
            await c.create_certificate(identity)
    assert ei.value.kind == "denied"
    assert "PERMISSION_DENIED" in str(ei.value)
    for n in needles:
        assert n in str(ei.value)


async def test_istio_agent_style_request_without_impersonation_metadata(
    env: CaEnv, server: ServeProcess
) -> None:
    async with client(server, env.node_a, impersonate=False) as c:
        assert (await c.create_certificate(SLEEP)).spiffe_id == SLEEP
        with pytest.raises(CaClientError, match="PERMISSION_DENIED"):
            await c.create_certificate(HTTPBIN)


async def test_credential_from_another_ca_is_refused_at_tls(env: CaEnv, server: ServeProcess) -> None:
    before = len([r for r in server.logs() if r.get("event") == "ca_issued"])
    async with client(server, env.foreign_node_a) as c:
        with pytest.raises(CaClientError) as ei:
            await c.create_certificate(SLEEP)
    assert ei.value.kind == "unreachable"
    assert "UNAVAILABLE" in str(ei.value) and server.address in str(ei.value)
    # Never reached the service: nothing issued, nothing even logged as a request.
    assert len([r for r in server.logs() if r.get("event") == "ca_issued"]) == before


async def test_connection_without_client_certificate_is_refused_at_tls(
    env: CaEnv, server: ServeProcess
) -> None:
    roots = (env.ca_dir / "root-cert.pem").read_bytes()
    ch = grpc.aio.secure_channel(
        server.address,
        grpc.ssl_channel_credentials(roots),
        options=[("grpc.ssl_target_name_override", "ztagent-ca.ztagent-system.svc")],
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await raw_stub(ch).CreateCertificate(
                ca_pb2.IstioCertificateRequest(csr=build_csr(generate_key(), SLEEP).decode()), timeout=10
            )
    finally:
        await ch.close()
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_workload_credential_cannot_act_as_a_node(env: CaEnv, server: ServeProcess) -> None:
    async with client(server, env.workload_cred) as c:
        with pytest.raises(CaClientError) as ei:
            await c.create_certificate(SLEEP)
    assert ei.value.kind == "unauthenticated"
    assert f"caller {SLEEP} is not a node identity" in str(ei.value)


def _csr(
    sans: list[x509.GeneralName] | None,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
) -> str:
    key = key if key is not None else generate_key()
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def _uri(s: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(s)


GOOD = f"spiffe://{TD}/ns/ns1/sa/sleep"
_good_csr = _csr([_uri(GOOD)])


def _meta(value: struct_pb2.Value) -> struct_pb2.Struct:
    return struct_pb2.Struct(fields={"ImpersonatedIdentity": value})


BAD_REQUESTS = [
    # id, request, expected code, message fragments
    (
        "garbage",
        ca_pb2.IstioCertificateRequest(csr="hello"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["csr-malformed"],
    ),
    ("empty", ca_pb2.IstioCertificateRequest(), grpc.StatusCode.INVALID_ARGUMENT, ["csr-malformed"]),
    (
        "truncated-pem",
        ca_pb2.IstioCertificateRequest(csr=_good_csr[: len(_good_csr) // 2]),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["truncated"],
    ),
    (
        "two-uri-sans",
        ca_pb2.IstioCertificateRequest(csr=_csr([_uri(GOOD), _uri(f"spiffe://{TD}/ns/ns2/sa/httpbin")])),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["csr-san-count", "2 URI SANs"],
    ),
    (
        "dns-san",
        ca_pb2.IstioCertificateRequest(csr=_csr([_uri(GOOD), x509.DNSName("sleep.ns1.svc")])),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["csr-non-uri-san", "DNS"],
    ),
    (
        "no-san",
        ca_pb2.IstioCertificateRequest(csr=_csr(None)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["csr-no-san"],
    ),
    (
        "rsa-key",
        ca_pb2.IstioCertificateRequest(csr=_csr([_uri(GOOD)], rsa.generate_private_key(65537, 2048))),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["csr-key-type", "RSA"],
    ),
    (
        "p384-key",
        ca_pb2.IstioCertificateRequest(csr=_csr([_uri(GOOD)], ec.generate_private_key(ec.SECP384R1()))),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["csr-key-type", "secp384r1"],
    ),
    (
        "oversized-id",
        ca_pb2.IstioCertificateRequest(csr=_csr([_uri(f"spiffe://{TD}/ns/ns1/sa/" + "a" * 2100)])),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["csr-invalid-spiffe-id", "too-long"],
    ),
    (
        "not-spiffe",
        ca_pb2.IstioCertificateRequest(csr=_csr([_uri("https://example.com/x")])),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["csr-invalid-spiffe-id"],
    ),
    (
        "wrong-trust-domain",
        ca_pb2.IstioCertificateRequest(csr=_csr([_uri("spiffe://other.example/ns/ns1/sa/sleep")])),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["wrong-trust-domain"],
    ),
    (
        "negative-ttl",
        ca_pb2.IstioCertificateRequest(csr=_good_csr, validity_duration=-5),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["validity_duration -5 is negative"],
    ),
    (
        "ttl-over-max",
        ca_pb2.IstioCertificateRequest(csr=_good_csr, validity_duration=7 * 86400),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["exceeds this CA's maximum 86400s"],
    ),
    (
        # fuzz/targets/ca_request.py: an int64 near its maximum overflowed timedelta (UNKNOWN)
        "ttl-int64-max",
        ca_pb2.IstioCertificateRequest(csr=_good_csr, validity_duration=2**63 - 1),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["exceeds this CA's maximum 86400s"],
    ),
    (
        "impersonation-mismatch",
        ca_pb2.IstioCertificateRequest(
            csr=_good_csr, metadata=_meta(struct_pb2.Value(string_value=f"spiffe://{TD}/ns/ns2/sa/httpbin"))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["the CSR is for", "ImpersonatedIdentity names spiffe://cluster.local/ns/ns2/sa/httpbin"],
    ),
    (
        "impersonation-not-string",
        ca_pb2.IstioCertificateRequest(csr=_good_csr, metadata=_meta(struct_pb2.Value(number_value=3))),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["ImpersonatedIdentity must be a string"],
    ),
    (
        "impersonation-not-spiffe",
        ca_pb2.IstioCertificateRequest(csr=_good_csr, metadata=_meta(struct_pb2.Value(string_value="sleep"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["ImpersonatedIdentity is not a SPIFFE ID"],
    ),
    (
        "huge-message",
        ca_pb2.IstioCertificateRequest(csr="A" * 100_000),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        [],
    ),
]


async def test_bad_input_is_refused_clearly_and_changes_nothing(env: CaEnv, server: ServeProcess) -> None:
    before = dir_digest(env.ca_dir)
    ch = raw_channel(server.address, env.node_a)
    stub = raw_stub(ch)
    try:
        for name, req, code, needles in BAD_REQUESTS:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.CreateCertificate(req, timeout=10)
            assert ei.value.code() == code, (name, ei.value.details())
            for n in needles:
                assert n in (ei.value.details() or ""), (name, ei.value.details())
        # The CA is unchanged and still serves good requests.
        ok = await stub.CreateCertificate(ca_pb2.IstioCertificateRequest(csr=_good_csr), timeout=10)
        assert len(ok.cert_chain) == 2
    finally:
        await ch.close()
    assert dir_digest(env.ca_dir) == before


async def test_manager_renews_short_lived_certificates_over_the_network(
    env: CaEnv, server: ServeProcess
) -> None:
    """Real clock, 4 s TTL: the manager renews at ~2 s and every credential verifies."""
    bundles = published_bundle(env)
    registry = CollectorRegistry()
    c = client(server, env.node_a)
    mgr = CertificateManager(c, c.bundles(), registry=registry, ttl=dt.timedelta(seconds=4))
    rotations: list[int] = []
    got_two = asyncio.Event()

    def on_rotate(sid: SpiffeId, cred: object) -> None:
        assert sid == SLEEP and cred is not None
        cur = mgr.current(SLEEP)
        assert verify_svid(cur.chain, bundles, now()) == SLEEP
        rotations.append(cur.leaf.serial_number)
        if len(rotations) >= 3:
            got_two.set()

    mgr.on_rotate(on_rotate)
    try:
        await mgr.start([SLEEP])
        first = mgr.current(SLEEP)
        await asyncio.wait_for(got_two.wait(), timeout=15)
    finally:
        await mgr.stop()
        await c.close()
    assert len(set(rotations)) == len(rotations) >= 3  # initial + two renewals, all distinct
    assert mgr.current(SLEEP).not_after > first.not_after
    expiry = registry.get_sample_value("ztagent_cert_expiry_timestamp_seconds", {"identity": str(SLEEP)})
    assert expiry is not None and expiry > first.not_after.timestamp()
    assert registry.get_sample_value("ztagent_cert_rotation_failures_total", {"identity": str(SLEEP)}) is None


async def test_config_reload_changes_authorization_and_keeps_last_good(env: CaEnv) -> None:
    with short_tmpdir() as base:
        own = CaEnv(
            base,
            env.ca_dir,
            base / "mesh.yaml",
            env.node_a,
            env.node_b,
            env.foreign_node_a,
            env.workload_cred,
        )
        write_config(own.config, config_text())
        with ServeProcess(own, "--config-poll", "0.1") as srv:
            async with client(srv, env.node_a) as c:
                with pytest.raises(CaClientError, match="PERMISSION_DENIED"):
                    await c.create_certificate(HTTPBIN)
                # Move httpbin to node-a: the CA picks it up without a restart.
                write_config(
                    own.config,
                    config_text(
                        [("sleep", "ns1", "sleep", "node-a"), ("httpbin", "ns2", "httpbin", "node-a")]
                    ),
                )
                await _eventually(lambda: _allowed(c, HTTPBIN))
                # A broken file and a file for another trust domain are refused; the last good stays.
                write_config(own.config, "kind: MeshConfig\n  bad: [\n")
                await _eventually(lambda: _logged(srv, "config_refused"))
                assert await _allowed(c, HTTPBIN)
                write_config(own.config, config_text(trust_domain="other.example"))
                await _eventually(lambda: _logged(srv, "ca_config_refused", "other.example"))
                assert await _allowed(c, HTTPBIN)


async def _allowed(c: CaClient, sid: SpiffeId) -> bool:
    try:
        await c.create_certificate(sid)
    except CaClientError as exc:
        if exc.kind == "denied":
            return False
        raise
    return True


async def _logged(srv: ServeProcess, event: str, needle: str = "") -> bool:
    return any(r.get("event") == event and needle in r.get("msg", "") for r in srv.logs())


async def _eventually(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met within timeout")


def test_serve_refuses_a_config_for_another_trust_domain(env: CaEnv) -> None:
    with short_tmpdir() as base:
        cfg = base / "mesh.yaml"
        write_config(cfg, config_text(trust_domain="other.example"))
        r = subprocess.run(
            [
                ZTAGENT,
                "ca",
                "serve",
                "--dir",
                str(env.ca_dir),
                "--config",
                str(cfg),
                "--listen",
                f"unix:{base}/s",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert r.returncode == 1
    assert "trust domain other.example" in r.stderr and "cluster.local" in r.stderr


async def test_plugin_ca_over_tcp_issues_chains_that_verify_against_the_offline_root() -> None:
    with short_tmpdir() as base:
        # The operator's root: its key lives only in this test's memory, never in the CA dir.
        t = now()
        root = CertificateAuthority.create_root(TD, t)
        inter = root.create_intermediate(t, dt.timedelta(days=30))
        (base / "chain.pem").write_bytes(inter.certificate.public_bytes(serialization.Encoding.PEM))
        (base / "key.pem").write_bytes(inter.key_pem())
        (base / "root.pem").write_bytes(root.bundle.to_pem())
        ca_dir = base / "ca"
        assert (
            cli(
                "ca", "init", "--dir", str(ca_dir), "--cert-chain", str(base / "chain.pem"),
                "--key", str(base / "key.pem"), "--root", str(base / "root.pem"),
            )
            == 0
        )  # fmt: skip
        assert root.key_pem() not in b"".join(p.read_bytes() for p in ca_dir.iterdir())
        cfg = base / "mesh.yaml"
        write_config(cfg, config_text())
        assert (
            cli("ca", "bootstrap-node", "--dir", str(ca_dir), "--node", "node-a", "--out", str(base / "na"))
            == 0
        )
        env = CaEnv(base, ca_dir, cfg, base / "na", base / "na", base / "na", base / "na")
        # Over TCP this time (loopback, ephemeral port).
        with ServeProcess(env, listen="127.0.0.1:0") as srv:
            assert srv.address.startswith("127.0.0.1:") and not srv.address.endswith(":0")
            async with client(srv, env.node_a) as c:
                cred = await c.create_certificate(SLEEP)
        assert len(cred.chain) == 2 and cred.chain[1] == inter.certificate
        assert verify_svid(cred.chain, TrustBundleSet.of(root.bundle), now()) == SLEEP


def _grpc_by_hand(
    socket_path: str, cred_dir: Path, tls_max: ssl.TLSVersion, request: bytes
) -> dict[str, str]:
    """One CreateCertificate call over a Python TLS connection we control (gRPC's own client
    cannot be held to TLS 1.2), speaking HTTP/2 with h2; returns the response's headers+trailers."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = tls_max
    ctx.load_verify_locations(cred_dir / "root-cert.pem")
    ctx.load_cert_chain(cred_dir / "cert-chain.pem", cred_dir / "key.pem")
    ctx.set_alpn_protocols(["h2"])
    raw = socket.socket(socket.AF_UNIX)
    raw.settimeout(10)
    raw.connect(socket_path)
    with ctx.wrap_socket(raw, server_hostname=CA_SERVER_NAME) as tls:
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":path", "/istio.v1.auth.IstioCertificateService/CreateCertificate"),
                (":authority", CA_SERVER_NAME),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        conn.send_data(sid, b"\x00" + len(request).to_bytes(4, "big") + request, end_stream=True)
        tls.sendall(conn.data_to_send())
        fields: dict[str, str] = {}
        for _ in range(100):  # bounded: a handful of frames make up the answer
            data = tls.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    fields.update({k.decode(): v.decode() for k, v in ev.headers})
                if isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            tls.sendall(conn.data_to_send())
            if "grpc-status" in fields:
                break
    return fields


def test_tls_below_1_3_is_refused(env: CaEnv, server: ServeProcess) -> None:
    """gRPC's Python server cannot be told a minimum TLS version, so it completes a TLS 1.2
    handshake; the service then refuses every call on such a connection (UNAUTHENTICATED)."""
    req = ca_pb2.IstioCertificateRequest(csr=_good_csr).SerializeToString()
    path = server.address.removeprefix("unix:")
    ok = _grpc_by_hand(path, env.node_a, ssl.TLSVersion.TLSv1_3, req)
    assert ok["grpc-status"] == "0"
    old = _grpc_by_hand(path, env.node_a, ssl.TLSVersion.TLSv1_2, req)
    assert old["grpc-status"] == str(grpc.StatusCode.UNAUTHENTICATED.value[0])
    assert "TLS 1.3 is required, this connection uses TLSv1.2" in urllib.parse.unquote(old["grpc-message"])


async def test_node_renews_its_own_credential_and_keeps_working_after_the_first_expires(
    env: CaEnv, server: ServeProcess
) -> None:
    """Real clock: a node credential valid for 6 s, managed like a workload identity with a 4 s
    TTL. After the bootstrap certificate has expired the node still gets certificates over a
    fresh connection, and the renewal was written back to the credential directory."""
    node_dir = env.base / "short-node-a"
    original = env.base / "short-node-a-original"
    assert cli("ca", "bootstrap-node", "--dir", str(env.ca_dir), "--node", "node-a", "--ttl", "6s",
               "--out", str(node_dir)) == 0  # fmt: skip
    shutil.copytree(node_dir, original)
    c = client(server, node_dir)
    first_not_after = c.node.credential.not_after
    mgr = CertificateManager(c, c.bundles(), registry=CollectorRegistry(), ttl=dt.timedelta(seconds=4))
    mgr.on_rotate(c.on_rotate)
    try:
        await mgr.start([c.node.spiffe_id, SLEEP])
        deadline = time.monotonic() + 20
        while now() <= first_not_after + dt.timedelta(seconds=0.5):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        await c.close()  # force a new TLS handshake: the bootstrap certificate is expired now
        assert (await c.create_certificate(SLEEP)).spiffe_id == SLEEP
        assert c.node.credential.not_after > first_not_after
        saved = NodeCredentials.from_dir(node_dir, now=now())
        assert saved.credential.not_after > first_not_after
    finally:
        await mgr.stop()
        await c.close()
    # Control: the bootstrap credential alone is refused now (at TLS).
    async with client(server, original) as stale:
        with pytest.raises(CaClientError) as ei:
            await stale.create_certificate(SLEEP)
    assert ei.value.kind == "unreachable"


def _server_cert(socket_path: str, cred_dir: Path) -> x509.Certificate:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cred_dir / "root-cert.pem")
    ctx.load_cert_chain(cred_dir / "cert-chain.pem", cred_dir / "key.pem")
    ctx.set_alpn_protocols(["h2"])
    raw = socket.socket(socket.AF_UNIX)
    raw.settimeout(10)
    raw.connect(socket_path)
    with ctx.wrap_socket(raw, server_hostname=CA_SERVER_NAME) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def test_serving_certificate_rotates_at_half_life(env: CaEnv) -> None:
    """The CA's own TLS certificate (DNS name checked by clients) is replaced at half-life for
    new handshakes, so a long-running CA never serves an expired one."""
    srv = CaServer(
        ca_store.load(env.ca_dir), parse_config(config_text()), server_cert_ttl=dt.timedelta(seconds=6)
    )
    address = await srv.start(f"unix:{env.base}/rot.sock")
    path = address.removeprefix("unix:")
    try:
        first = await asyncio.to_thread(_server_cert, path, env.node_a)
        san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [CA_SERVER_NAME]
        assert await asyncio.to_thread(_server_cert, path, env.node_a) == first  # not yet half-life
        await asyncio.sleep(3.2)  # past half of the 6 s lifetime
        second = await asyncio.to_thread(_server_cert, path, env.node_a)
        assert second.serial_number != first.serial_number
        assert second.not_valid_after_utc > first.not_valid_after_utc
        async with client_at(address, env.node_a) as c:
            assert (await c.create_certificate(SLEEP)).spiffe_id == SLEEP
    finally:
        await srv.stop()


def client_at(address: str, cred_dir: Path) -> CaClient:
    return CaClient(address, NodeCredentials.from_dir(cred_dir))


async def test_serve_exports_prometheus_metrics(env: CaEnv) -> None:
    with ServeProcess(env, "--metrics", "127.0.0.1:0") as srv:
        async with client(srv, env.node_a) as c:
            await c.create_certificate(SLEEP)
            with pytest.raises(CaClientError):
                await c.create_certificate(HTTPBIN)
        url = f"http://{srv.info['metrics']}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
    }
    assert samples[("ztagent_ca_requests_total", (("code", "OK"),))] == 1
    assert samples[("ztagent_ca_requests_total", (("code", "PERMISSION_DENIED"),))] == 1
    root = x509.load_pem_x509_certificate((env.ca_dir / "root-cert.pem").read_bytes())
    root_expiry = root.not_valid_after_utc.timestamp()
    assert samples[("ztagent_ca_root_cert_expiry_timestamp_seconds", ())] == root_expiry
