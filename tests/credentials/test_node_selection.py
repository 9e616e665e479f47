"""Which node credential the CA client presents, at injected instants (credentials.node), and how
the renewed one is persisted beside the bootstrap one and read back (credentials.client).

Real certificates from a real CertificateAuthority signed at chosen instants; no I/O in the
selection tests, real files in the persistence ones.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

import pytest

from credentials import causes
from credentials.client import CaClient, CaClientError, NodeCredentials
from credentials.files import RENEWED_FILE, CredentialFiles, read_renewed, write_credentials, write_renewed
from credentials.identities import node_identity
from credentials.node import BOOTSTRAP, RENEWED, NoValidNodeCredential, select_node_credential
from identity.ca import CertificateAuthority
from identity.keys import build_csr, generate_key
from identity.spiffe import SpiffeId, TrustDomain
from identity.svid import WorkloadCredential

TD = TrustDomain("cluster.local")
T0 = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
NODE = node_identity(TD, "node-a")
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create_root(TD, T0 - DAY, max_ttl=dt.timedelta(days=400))


def issue(
    ca: CertificateAuthority, at: dt.datetime, ttl: dt.timedelta, sid: SpiffeId = NODE
) -> WorkloadCredential:
    key = generate_key()
    issued = ca.sign_csr(build_csr(key, sid), allowed=lambda s: True, ttl=ttl, now=at)
    return WorkloadCredential.from_chain(key, issued.chain)


# --- selection (pure) ------------------------------------------------------------------------


def test_renewed_is_presented_while_valid_then_the_bootstrap_one(ca: CertificateAuthority) -> None:
    boot = issue(ca, T0, 30 * DAY)
    renewed = issue(ca, T0 + 5 * HOUR, HOUR)
    assert select_node_credential(boot, None, T0 + HOUR).which == BOOTSTRAP
    during = select_node_credential(boot, renewed, T0 + 5 * HOUR + dt.timedelta(minutes=30))
    assert during.which == RENEWED and during.credential is renewed
    # NotAfter itself is still valid (RFC 5280); one microsecond later the bootstrap one is used.
    assert select_node_credential(boot, renewed, renewed.not_after).which == RENEWED
    after = select_node_credential(boot, renewed, renewed.not_after + dt.timedelta(microseconds=1))
    assert after.which == BOOTSTRAP and after.credential is boot


def test_a_reissued_bootstrap_credential_wins_over_an_older_renewed_one(ca: CertificateAuthority) -> None:
    old_renewed = issue(ca, T0 + HOUR, 2 * HOUR)
    new_boot = issue(ca, T0 + 2 * HOUR, 30 * DAY)  # the operator ran bootstrap-node again
    assert select_node_credential(new_boot, old_renewed, T0 + 2 * HOUR).which == BOOTSTRAP


def test_both_expired_names_each_and_the_fix(ca: CertificateAuthority) -> None:
    boot = issue(ca, T0, DAY)
    renewed = issue(ca, T0 + 20 * HOUR, HOUR)
    late = T0 + 2 * DAY
    with pytest.raises(NoValidNodeCredential) as ei:
        select_node_credential(boot, renewed, late)
    msg = str(ei.value)
    assert ei.value.reason == causes.NODE_CREDENTIAL_EXPIRED
    assert f"renewed credential expired at {renewed.not_after.isoformat()}" in msg
    assert f"bootstrap credential expired at {boot.not_after.isoformat()}" in msg
    assert "ztagent ca bootstrap-node" in msg and str(NODE) in msg


def test_not_yet_valid_is_named_as_clock_skew(ca: CertificateAuthority) -> None:
    boot = issue(ca, T0 + DAY, 30 * DAY)  # issued on a CA host whose clock runs a day ahead
    with pytest.raises(NoValidNodeCredential) as ei:
        select_node_credential(boot, None, T0)
    assert ei.value.reason == causes.NODE_CREDENTIAL_NOT_YET_VALID
    assert "is not valid before" in str(ei.value) and "clocks" in str(ei.value)
    # Expired renewed + future bootstrap: still the skew, since it heals by itself.
    renewed = issue(ca, T0 - 3 * HOUR, HOUR)
    with pytest.raises(NoValidNodeCredential) as ei:
        select_node_credential(boot, renewed, T0)
    assert ei.value.reason == causes.NODE_CREDENTIAL_NOT_YET_VALID


def test_renewed_must_be_the_same_identity(ca: CertificateAuthority) -> None:
    boot = issue(ca, T0, DAY)
    other = issue(ca, T0, HOUR, node_identity(TD, "node-b"))
    with pytest.raises(ValueError, match=re.escape(f"not {NODE}")):
        select_node_credential(boot, other, T0)
    with pytest.raises(ValueError, match="timezone-aware"):
        select_node_credential(boot, None, T0.replace(tzinfo=None))


# --- persistence beside the bootstrap files --------------------------------------------------


def _bootstrap_dir(ca: CertificateAuthority, d: Path, boot: WorkloadCredential) -> Path:
    write_credentials(d, CredentialFiles(boot.key_pem(), boot.chain_pem(), ca.bundle.to_pem()))
    return d


def _digest(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != RENEWED_FILE}


async def test_renewal_is_persisted_beside_never_over_the_bootstrap(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    now = dt.datetime.now(dt.UTC)
    boot = issue(ca, now, 30 * DAY)
    d = _bootstrap_dir(ca, tmp_path / "node", boot)
    before = _digest(d)
    client = CaClient("unix:/nonexistent.sock", NodeCredentials.from_dir(d, now=now))
    renewed = issue(ca, now + dt.timedelta(seconds=1), HOUR)  # a renewal is issued later
    client.set_node_credential(renewed)
    assert _digest(d) == before  # bootstrap key, chain and roots untouched
    assert os.stat(d / RENEWED_FILE).st_mode & 0o777 == 0o600
    assert not [p for p in d.iterdir() if ".tmp" in p.name]  # one rename, nothing left over
    key_pem, chain_pem = read_renewed(d) or (b"", b"")
    assert WorkloadCredential.from_pem(chain_pem, key_pem).leaf == renewed.leaf
    # A restart reads both and presents the renewed one while it is valid ...
    again = NodeCredentials.from_dir(d, now=now)
    assert again.bootstrap.leaf == boot.leaf and again.renewed is not None
    assert again.select(now).which == RENEWED
    # ... and starts on the bootstrap one once it has expired (the outage case).
    later = renewed.not_after + dt.timedelta(seconds=1)
    assert NodeCredentials.from_dir(d, now=later).select(later).which == BOOTSTRAP
    await client.close()


def test_a_bad_renewed_file_is_ignored_not_trusted(ca: CertificateAuthority, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    boot = issue(ca, now, 30 * DAY)
    d = _bootstrap_dir(ca, tmp_path / "node", boot)
    foreign = CertificateAuthority.create_root(TD, now - DAY)
    cases = {
        "another CA": issue(foreign, now, HOUR),
        "another node": issue(ca, now, HOUR, node_identity(TD, "node-b")),
    }
    for why, cred in cases.items():
        write_renewed(d, cred.key_pem(), cred.chain_pem())
        node = NodeCredentials.from_dir(d, now=now)
        assert node.renewed is None, why
        assert node.select(now).which == BOOTSTRAP, why
    (d / RENEWED_FILE).write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    assert NodeCredentials.from_dir(d, now=now).renewed is None
    # Both gone: the start fails, naming both and the fix.
    short = issue(ca, now - 3 * HOUR, HOUR)
    d2 = _bootstrap_dir(ca, tmp_path / "expired", short)
    with pytest.raises(CaClientError) as ei:
        NodeCredentials.from_dir(d2, now=now)
    assert ei.value.reason == causes.NODE_CREDENTIAL_EXPIRED
    assert "bootstrap credential expired at" in str(ei.value)


async def test_status_and_metrics_follow_the_fallback(ca: CertificateAuthority, tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    now = dt.datetime.now(dt.UTC)
    clock_t = [now]
    boot = issue(ca, now, 30 * DAY)
    d = _bootstrap_dir(ca, tmp_path / "node", boot)
    client = CaClient("unix:/nonexistent.sock", NodeCredentials.from_dir(d), clock=lambda: clock_t[0])
    reg = CollectorRegistry()
    client.register_metrics(reg)

    def gauge(name: str, which: str) -> float | None:
        return reg.get_sample_value(name, {"credential": which})

    assert client.node_credential_status().problem == ""
    renewed = issue(ca, now + dt.timedelta(seconds=1), HOUR)
    client.set_node_credential(renewed, persist=False)
    st = client.node_credential_status()
    assert st.in_use == RENEWED and st.problem == ""
    assert gauge("ztagent_node_credential_in_use", RENEWED) == 1
    clock_t[0] = renewed.not_after + dt.timedelta(seconds=1)
    st = client.node_credential_status()
    assert st.in_use == BOOTSTRAP and st.reason == causes.NODE_CREDENTIAL_EXPIRED
    assert st.problem.startswith("node credential expired: renewable node credential")
    assert "authenticating to the CA with the bootstrap credential" in st.problem
    assert gauge("ztagent_node_credential_valid", RENEWED) == 0
    assert gauge("ztagent_node_credential_in_use", BOOTSTRAP) == 1
    assert gauge("ztagent_node_credential_expiry_timestamp_seconds", RENEWED) == renewed.not_after.timestamp()
    clock_t[0] = boot.not_after + dt.timedelta(seconds=1)
    st = client.node_credential_status()
    assert st.in_use is None and st.reason == causes.NODE_CREDENTIAL_EXPIRED
    assert gauge("ztagent_node_credential_in_use", BOOTSTRAP) == 0
    await client.close()
