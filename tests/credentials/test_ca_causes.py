"""Every certificate-fetch failure names its real cause, and the CA's two small fixes
(issue 12, item 4): an undecodable request is INVALID_ARGUMENT with a one-line warning, and
``ca issue --ttl`` / ``ca bootstrap-node --ttl`` are bounded.

Against a real `ztagent ca serve` process over real mTLS (tests/agent/test_ca_helpers).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry

from caserver import store as ca_store
from credentials import causes
from credentials.client import CREATE_CERTIFICATE, CaClient, CaClientError, NodeCredentials
from credentials.identities import CA_SERVER_NAME
from credentials.manager import CertificateManager
from identity.spiffe import SpiffeId
from tests.agent.test_ca_helpers import TD, CaEnv, ServeProcess, cli, make_env, now, short_tmpdir

SLEEP = SpiffeId.parse(f"spiffe://{TD}/ns/ns1/sa/sleep")
HTTPBIN = SpiffeId.parse(f"spiffe://{TD}/ns/ns2/sa/httpbin")


@pytest.fixture(scope="module")
def env() -> Iterator[CaEnv]:
    with short_tmpdir() as base:
        yield make_env(base)


@pytest.fixture(scope="module")
def server(env: CaEnv) -> Iterator[ServeProcess]:
    with ServeProcess(env) as s:
        yield s


async def fetch_error(address: str, node: NodeCredentials, sid: SpiffeId = SLEEP) -> CaClientError:
    async with CaClient(address, node, timeout=5) as c:
        with pytest.raises(CaClientError) as ei:
            await c.create_certificate(sid)
    return ei.value


async def test_ca_not_listening_is_ca_unreachable(env: CaEnv) -> None:
    err = await fetch_error(f"unix:{env.base}/nobody.sock", NodeCredentials.from_dir(env.node_a))
    assert err.kind == "unreachable" and err.reason == causes.CA_UNREACHABLE
    assert str(err).startswith("CA unreachable: ") and "cannot connect" in str(err)
    assert "is the CA running there" not in str(err)  # the old guess that hid the real cause


async def test_refusals_carry_the_cas_reason(env: CaEnv, server: ServeProcess) -> None:
    err = await fetch_error(server.address, NodeCredentials.from_dir(env.node_a), HTTPBIN)
    assert err.kind == "denied" and err.reason == causes.CA_REFUSED
    assert str(err).startswith("refused by the CA: ") and "PERMISSION_DENIED" in str(err)
    assert "may not obtain a certificate for" in str(err)  # the CA's own words
    err = await fetch_error(server.address, NodeCredentials.from_dir(env.workload_cred))
    assert err.kind == "unauthenticated" and err.reason == causes.CA_REFUSED
    assert "is not a node identity" in str(err)


async def test_expired_node_credential_is_named_not_called_unreachable(
    env: CaEnv, server: ServeProcess
) -> None:
    d = env.base / "short-lived"
    assert cli("ca", "bootstrap-node", "--dir", str(env.ca_dir), "--node", "node-a", "--ttl", "1s",
               "--out", str(d)) == 0  # fmt: skip
    await asyncio.sleep(1.2)
    node = NodeCredentials.from_dir(d)  # no `now`: loads, the client decides per connection
    for address in (server.address, f"unix:{env.base}/nobody.sock"):  # CA up, CA down: same cause
        err = await fetch_error(address, node)
        assert err.reason == causes.NODE_CREDENTIAL_EXPIRED, (address, str(err))
        assert err.kind == "unreachable"  # what the transport saw (the CA refused it at TLS)
        assert str(err).startswith("node credential expired: ")
        assert "bootstrap credential expired at" in str(err) and "ztagent ca bootstrap-node" in str(err)


async def test_certificate_refused_at_tls_while_valid_by_our_clock_is_a_refusal(
    env: CaEnv, server: ServeProcess
) -> None:
    """A node-a credential from another CA, with our CA's roots: we trust the CA, it does not
    trust us, and refuses after the TLS 1.3 handshake (no HTTP/2 frame ever comes)."""
    d = env.base / "mixed"
    shutil.copytree(env.foreign_node_a, d)
    shutil.copy(env.node_a / "root-cert.pem", d / "root-cert.pem")
    err = await fetch_error(server.address, NodeCredentials.from_dir(d))
    assert err.reason == causes.CA_REFUSED, str(err)
    assert "refused the TLS handshake of node credential" in str(err)
    assert "before any HTTP/2 frame" in str(err)


async def test_manager_status_and_metric_carry_the_reason(env: CaEnv) -> None:
    reg = CollectorRegistry()
    client = CaClient(f"unix:{env.base}/nobody.sock", NodeCredentials.from_dir(env.node_a), timeout=2)
    mgr = CertificateManager(client, client.bundles(), registry=reg)
    try:
        assert not await mgr.add_identity(SLEEP)
        (st,) = mgr.status()
        assert st.last_error_reason == causes.CA_UNREACHABLE and st.failing_since is not None
        assert st.last_error.startswith("CA unreachable: ")
        assert reg.get_sample_value("ztagent_cert_fetch_failures_total", {"reason": "ca_unreachable"}) == 1
        # The old per-identity series is kept as it was.
        assert reg.get_sample_value("ztagent_cert_rotation_failures_total", {"identity": str(SLEEP)}) == 1
        # Retries are capped at 30 s, so a returning CA is noticed within half a minute.
        assert st.next_action - now() <= dt.timedelta(seconds=30)
    finally:
        await client.close()


# --- the CA's handling of an undecodable request -----------------------------------------------


def _raw_call(env: CaEnv, server: ServeProcess, cred: Path, body: bytes) -> grpc.RpcError:
    creds = grpc.ssl_channel_credentials(
        (cred / "root-cert.pem").read_bytes(),
        (cred / "key.pem").read_bytes(),
        (cred / "cert-chain.pem").read_bytes(),
    )
    with grpc.secure_channel(
        server.address, creds, options=[("grpc.ssl_target_name_override", CA_SERVER_NAME)]
    ) as ch:
        call = ch.unary_unary(CREATE_CERTIFICATE, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as ei:
            call(body, timeout=10)
    return ei.value


def test_undecodable_request_is_invalid_argument_with_a_one_line_warning(
    env: CaEnv, server: ServeProcess
) -> None:
    garbage = b"\xff\xff\xff\xff\x0f"  # field 0x1fffffff..., truncated varint: not a protobuf
    err = _raw_call(env, server, env.node_a, garbage)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "not a protobuf IstioCertificateRequest" in (err.details() or "")
    lines = [r for r in server.logs() if "undecodable" in r.get("message", r.get("msg", ""))]
    assert len(lines) == 1 and lines[0].get("level", "").lower().startswith("warn"), lines
    assert "Traceback" not in server.stderr() and "Exception deserializing" not in server.stderr()
    # A caller that is no node learns only that.
    err = _raw_call(env, server, env.workload_cred, garbage)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


# --- lifetimes of locally issued credentials ---------------------------------------------------


def _not_after(d: Path) -> dt.datetime:
    return x509.load_pem_x509_certificate((d / "cert-chain.pem").read_bytes()).not_valid_after_utc


def test_issue_ttl_is_bounded_by_the_cas_max(env: CaEnv, capsys: pytest.CaptureFixture[str]) -> None:
    out = env.base / "too-long"
    assert (
        cli("ca", "issue", "--dir", str(env.ca_dir), "--id", str(SLEEP), "--ttl", "48h", "--out", str(out))
        == 1
    )
    err = capsys.readouterr().err
    assert "--ttl 2d exceeds the CA's maximum workload TTL 1d" in err and "--max-ttl" in err
    assert not out.exists()  # nothing written
    args = ("--ttl", "48h", "--max-ttl", "72h", "--out", str(out))
    assert cli("ca", "issue", "--dir", str(env.ca_dir), "--id", str(SLEEP), *args) == 0
    assert _not_after(out) - now() > dt.timedelta(hours=47)


def test_bootstrap_credential_is_long_lived_and_bounded(
    env: CaEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    d = env.base / "boot-default"
    assert cli("ca", "bootstrap-node", "--dir", str(env.ca_dir), "--node", "node-a", "--out", str(d)) == 0
    assert dt.timedelta(days=29, hours=23) < _not_after(d) - now() <= dt.timedelta(days=30, minutes=1)
    capsys.readouterr()
    too = env.base / "boot-too-long"
    args = ("--node", "node-a", "--ttl", "400d", "--out", str(too))
    assert cli("ca", "bootstrap-node", "--dir", str(env.ca_dir), *args) == 1
    assert "--ttl 400d exceeds the maximum 365d" in capsys.readouterr().err and not too.exists()
    # A plug-in CA that ends sooner: an explicit --ttl past it is refused, the default is cut.
    root = ca_store.init_self_signed(env.base / "plug-root", TD, now=now())
    inter = root.ca.create_intermediate(now(), dt.timedelta(days=10))
    plug = env.base / "plug"
    ca_store.init_plugin(
        plug, chain_pem=inter.chain_pem(), key_pem=inter.key_pem(), root_pem=None, trust_domain=TD, now=now()
    )
    out = env.base / "boot-plug"
    assert (
        cli("ca", "bootstrap-node", "--dir", str(plug), "--node", "node-a", "--ttl", "20d", "--out", str(out))
        == 1
    )
    assert "would outlive the CA certificate" in capsys.readouterr().err and not out.exists()
    assert cli("ca", "bootstrap-node", "--dir", str(plug), "--node", "node-a", "--out", str(out)) == 0
    assert "cut to the CA certificate's NotAfter" in capsys.readouterr().err
    assert _not_after(out) == inter.not_after
