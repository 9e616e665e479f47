"""CA directory and operator commands: init (self-signed and plug-in), issue, bundle, bootstrap-node.

Every refusal says what is wrong, exits 1 and leaves the files as they were.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from caserver import store as ca_store
from cli.commands.ca import parse_duration
from identity.bundle import TrustBundle, TrustBundleSet
from identity.ca import CertificateAuthority
from identity.keys import generate_key, key_to_pem
from identity.spiffe import SpiffeId
from identity.svid import WorkloadCredential, verify_svid
from tests.agent.test_ca_helpers import TD, ZTAGENT, dir_digest, now

ISSUE_KEYS = ["spiffe_id", "serial", "not_before", "not_after", "key", "cert_chain", "root_cert"]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ZTAGENT, *argv], capture_output=True, text=True, timeout=60)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_init_creates_a_root_ca_with_private_key_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    r = run("ca", "init", "--dir", str(d), "--trust-domain", TD)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:2] == [f"trust_domain: {TD}", "kind: self-signed"]
    assert mode(d / "ca-key.pem") == 0o600
    assert mode(d) == 0o700
    assert json.loads((d / "ca.json").read_text())["trustDomain"] == TD
    before = dir_digest(d)
    r = run("ca", "init", "--dir", str(d), "--trust-domain", TD)
    assert r.returncode == 1
    assert "a CA already exists" in r.stderr and "--force" in r.stderr
    assert dir_digest(d) == before
    r = run("ca", "init", "--dir", str(d), "--trust-domain", TD, "--force")
    assert r.returncode == 0
    assert (d / "ca-key.pem").read_bytes() != b"" and dir_digest(d) != before
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_init_refuses_bad_trust_domain_and_writes_nothing(tmp_path: Path) -> None:
    r = run("ca", "init", "--dir", str(tmp_path / "ca"), "--trust-domain", "Bad_Domain")
    assert r.returncode == 1 and "trust-domain" in r.stderr
    assert not (tmp_path / "ca" / "ca-key.pem").exists()


def test_load_refuses_a_key_readable_by_others(tmp_path: Path) -> None:
    ca_store.init_self_signed(tmp_path, TD, now=now())
    os.chmod(tmp_path / "ca-key.pem", 0o644)
    with pytest.raises(ca_store.CaStoreError, match="chmod 600"):
        ca_store.load(tmp_path)


def test_issue_output_is_stable_and_the_credential_verifies(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    ca_store.init_self_signed(ca, TD, now=now())
    sid = f"spiffe://{TD}/ns/ns1/sa/sleep"
    r = run("ca", "issue", "--dir", str(ca), "--id", sid, "--ttl", "90s", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split(": ", 1)[0] for ln in lines] == ISSUE_KEYS
    text = dict(ln.split(": ", 1) for ln in lines)
    assert text["spiffe_id"] == sid
    assert text["not_after"].endswith("Z")
    out = tmp_path / "out"
    assert mode(out / "key.pem") == 0o600
    cred = WorkloadCredential.from_pem((out / "cert-chain.pem").read_bytes(), (out / "key.pem").read_bytes())
    bundles = TrustBundleSet.of(TrustBundle.from_pem(TD, (out / "root-cert.pem").read_bytes()))
    assert verify_svid(cred.chain, bundles, now()) == SpiffeId.parse(sid)
    assert dt.timedelta(seconds=80) < cred.not_after - now() <= dt.timedelta(seconds=90)
    r = run("ca", "issue", "--dir", str(ca), "--id", sid, "--out", str(tmp_path / "out2"), "-o", "json")
    doc = json.loads(r.stdout)
    assert list(doc) == ISSUE_KEYS and doc["spiffe_id"] == sid


@pytest.mark.parametrize(
    ("spiffe_id", "needle"),
    [
        ("spiffe://Cluster.local/ns/a/sa/b", "trust-domain"),
        ("https://cluster.local/ns/a/sa/b", "scheme"),
        ("spiffe://cluster.local/ns/a/sa/" + "b" * 2100, "too-long"),
        ("spiffe://other.example/ns/a/sa/b", "not in this CA's trust domain"),
        ("spiffe://cluster.local/ns/../sa/b", "path"),
    ],
)
def test_issue_refuses_bad_ids_and_writes_nothing(tmp_path: Path, spiffe_id: str, needle: str) -> None:
    ca = tmp_path / "ca"
    ca_store.init_self_signed(ca, TD, now=now())
    before = dir_digest(ca)
    r = run("ca", "issue", "--dir", str(ca), "--id", spiffe_id, "--out", str(tmp_path / "out"))
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and needle in r.stderr
    assert not (tmp_path / "out").exists()
    assert dir_digest(ca) == before


def test_issue_from_a_missing_ca_says_so(tmp_path: Path) -> None:
    r = run(
        "ca",
        "issue",
        "--dir",
        str(tmp_path / "nope"),
        "--id",
        f"spiffe://{TD}/ns/a/sa/b",
        "--out",
        str(tmp_path),
    )
    assert r.returncode == 1 and "is not a CA directory" in r.stderr and "ztagent ca init" in r.stderr


def test_bundle_pem_and_jwks(tmp_path: Path) -> None:
    st = ca_store.init_self_signed(tmp_path, TD, now=now())
    pem = run("ca", "bundle", "--dir", str(tmp_path))
    assert pem.stdout.encode() == (tmp_path / "root-cert.pem").read_bytes()
    jwks = json.loads(run("ca", "bundle", "--dir", str(tmp_path), "--format", "jwks").stdout)
    assert jwks["keys"][0]["use"] == "x509-svid"
    assert TrustBundle.from_jwks(TD, jwks).roots == st.ca.roots


def test_bootstrap_node_writes_a_node_credential(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    ca_store.init_self_signed(ca, TD, now=now())
    r = run(
        "ca",
        "bootstrap-node",
        "--dir",
        str(ca),
        "--node",
        "node-a",
        "--out",
        str(tmp_path / "n"),
        "-o",
        "json",
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["node"] == "node-a"
    assert doc["spiffe_id"] == f"spiffe://{TD}/ns/ztagent-system/sa/ztagent/node/node-a"
    r = run("ca", "bootstrap-node", "--dir", str(ca), "--node", "Node_A", "--out", str(tmp_path / "m"))
    assert r.returncode == 1 and "DNS-1123" in r.stderr and not (tmp_path / "m").exists()


def _operator_pki(tmp_path: Path) -> tuple[CertificateAuthority, CertificateAuthority]:
    t = now()
    root = CertificateAuthority.create_root(TD, t)
    inter = root.create_intermediate(t, dt.timedelta(days=30))
    (tmp_path / "inter.pem").write_bytes(inter.certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "inter-key.pem").write_bytes(inter.key_pem())
    (tmp_path / "root.pem").write_bytes(root.bundle.to_pem())
    (tmp_path / "root-key.pem").write_bytes(root.key_pem())
    (tmp_path / "full.pem").write_bytes(inter.chain_pem())
    (tmp_path / "stranger-key.pem").write_bytes(key_to_pem(generate_key()))
    return root, inter


def test_plugin_ca_installs_the_intermediate_and_never_the_root_key(tmp_path: Path) -> None:
    root, inter = _operator_pki(tmp_path)
    d = tmp_path / "ca"
    r = run(
        "ca", "init", "--dir", str(d), "--cert-chain", str(tmp_path / "inter.pem"),
        "--key", str(tmp_path / "inter-key.pem"), "--root", str(tmp_path / "root.pem"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "kind: plug-in" in r.stdout
    assert (d / "root-cert.pem").read_bytes() == root.bundle.to_pem()
    assert (d / "ca-cert.pem").read_bytes() == inter.certificate.public_bytes(serialization.Encoding.PEM)
    assert all(root.key_pem() not in p.read_bytes() for p in d.iterdir())
    st = ca_store.load(d)
    assert st.kind == "plug-in" and st.ca.issuer_chain == (inter.certificate,)
    # The root may also come at the end of --cert-chain.
    r = run(
        "ca", "init", "--dir", str(tmp_path / "ca2"), "--cert-chain", str(tmp_path / "full.pem"),
        "--key", str(tmp_path / "inter-key.pem"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("chain", "key", "root", "needle"),
    [
        ("root.pem", "root-key.pem", None, "root's own key"),
        ("inter.pem", "inter-key.pem", None, "ca-chain-incomplete"),
        ("inter.pem", "root-key.pem", "root.pem", "root's own key"),
        ("inter.pem", "stranger-key.pem", "root.pem", "ca-key-mismatch"),
        ("inter.pem", "inter.pem", "root.pem", "ca-key-pem"),
        ("inter-key.pem", "inter-key.pem", None, "ca-chain-pem"),
        ("inter.pem", None, None, "needs both --cert-chain and --key"),
        ("inter.pem", "missing.pem", None, "cannot read"),
    ],
)
def test_plugin_ca_refusals(
    tmp_path: Path, chain: str, key: str | None, root: str | None, needle: str
) -> None:
    _operator_pki(tmp_path)
    d = tmp_path / "ca"
    argv = ["ca", "init", "--dir", str(d), "--cert-chain", str(tmp_path / chain)]
    if key:
        argv += ["--key", str(tmp_path / key)]
    if root:
        argv += ["--root", str(tmp_path / root)]
    r = run(*argv)
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and needle in r.stderr, r.stderr
    assert not d.exists() or not any(d.iterdir())


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("30m", 1800), ("1h", 3600), ("7d", 604800), ("1h30m", 5400)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0s", "1", "h", "1x", "-1h", "1h 2m", "1.5h"])
def test_bad_durations(text: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="positive duration"):
        parse_duration(text)
