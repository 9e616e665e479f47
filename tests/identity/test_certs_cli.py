"""`ztagent certs verify` run as a real process (the installed console script)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from identity.ca import CertificateAuthority
from identity.keys import build_csr
from identity.spiffe import SpiffeId
from tests.identity.certgen import NOW, TD, WORKLOAD_ID, Spec, build, ca_spec, key

ZTAGENT = Path(sys.executable).parent / "ztagent"
AT = "2026-06-01T12:00:00Z"  # == NOW
assert dt.datetime.fromisoformat(AT) == NOW


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ZTAGENT), "certs", "verify", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    root = CertificateAuthority.create_root(TD, NOW - dt.timedelta(days=1), key=key(50))
    ca = root.create_intermediate(NOW - dt.timedelta(days=1), dt.timedelta(days=30), key=key(51))
    issued = ca.sign_csr(
        build_csr(key(52), SpiffeId.parse(WORKLOAD_ID)),
        allowed=lambda _: True,
        ttl=dt.timedelta(hours=1),
        now=NOW,
    )
    other = CertificateAuthority.create_root("other.example", NOW - dt.timedelta(days=1), key=key(53))
    other_issued = other.sign_csr(
        build_csr(key(52), SpiffeId.parse("spiffe://other.example/ns/x/sa/y")),
        allowed=lambda _: True,
        now=NOW,
    )
    (d / "root.pem").write_bytes(root.bundle.to_pem())
    (d / "root.json").write_text(json.dumps(root.bundle.to_jwks()))
    (d / "other-root.pem").write_bytes(other.bundle.to_pem())
    (d / "chain.pem").write_bytes(issued.chain_pem)
    (d / "leaf-only.pem").write_bytes(issued.cert_pem)
    (d / "other-chain.pem").write_bytes(other_issued.chain_pem)
    anon_root = build(ca_spec("anonymous root", uris=()), key(54))
    (d / "anon-root.pem").write_bytes(anon_root.public_bytes(serialization.Encoding.PEM))
    bad_leaf = build(Spec(ca=True), key(52), key(54), anon_root)
    (d / "ca-leaf.pem").write_bytes(bad_leaf.public_bytes(serialization.Encoding.PEM))
    (d / "garbage.pem").write_bytes(b"not a certificate\n")
    (d / "truncated.pem").write_bytes(issued.chain_pem[:300])
    return d


def test_valid_chain_prints_the_id(files: Path) -> None:
    r = run("--bundle", "root.pem", "--at", AT, "chain.pem", cwd=files)
    assert (r.returncode, r.stdout, r.stderr) == (0, WORKLOAD_ID + "\n", "")


def test_valid_chain_json(files: Path) -> None:
    r = run("--bundle", "root.pem", "--at", AT, "-o", "json", "chain.pem", cwd=files)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc == {
        "at": AT,
        "chain": "chain.pem",
        "valid": True,
        "spiffe_id": WORKLOAD_ID,
        "trust_domain": TD,
        "principal": WORKLOAD_ID.removeprefix("spiffe://"),
        "namespace": "default",
        "service_account": "sleep",
        "not_before": "2026-06-01T11:58:00Z",
        "not_after": "2026-06-01T13:00:00Z",
        "serial": doc["serial"],
    }
    assert r.stdout == json.dumps(doc, sort_keys=True) + "\n"


@pytest.mark.parametrize(
    ("args", "rule"),
    [
        (["--bundle", "root.pem", "--at", "2026-06-01T13:00:01Z", "chain.pem"], "expired"),
        (["--bundle", "root.pem", "--at", "2026-06-01T11:57:59Z", "chain.pem"], "not-yet-valid"),
        (["--bundle", "root.pem", "--at", AT, "leaf-only.pem"], "foreign-signer"),
        (["--bundle", "root.pem", "--at", AT, "other-chain.pem"], "untrusted-domain"),
        (["--bundle", "other-root.pem", "--at", AT, "chain.pem"], "untrusted-domain"),
        (["--bundle", f"{TD}=other-root.pem", "--at", AT, "chain.pem"], "foreign-signer"),
        (["--bundle", f"{TD}=anon-root.pem", "--at", AT, "ca-leaf.pem"], "leaf-is-ca"),
    ],
)
def test_invalid_chain_prints_the_rule_and_exits_1(files: Path, args: list[str], rule: str) -> None:
    r = run(*args, cwd=files)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.startswith(f"{rule}: ") and r.stdout.count("\n") == 1
    j = run(*args[:-1], "-o", "json", args[-1], cwd=files)
    assert j.returncode == 1
    doc = json.loads(j.stdout)
    assert doc["valid"] is False and doc["rule"] == rule and doc["message"]


def test_several_bundles_and_jwks(files: Path) -> None:
    args = ["--bundle", "root.pem", "--bundle", "other.example=other-root.pem", "--at", AT]
    assert run(*args, "other-chain.pem", cwd=files).stdout == "spiffe://other.example/ns/x/sa/y\n"
    assert run(*args, "chain.pem", cwd=files).stdout == WORKLOAD_ID + "\n"
    r = run("--bundle", f"{TD}=root.json", "--at", AT, "chain.pem", cwd=files)
    assert (r.returncode, r.stdout) == (0, WORKLOAD_ID + "\n")


@pytest.mark.parametrize(
    ("args", "rule"),
    [
        (["--bundle", "missing.pem", "chain.pem"], "input-unreadable"),
        (["--bundle", "root.pem", "missing.pem"], "input-unreadable"),
        (["--bundle", "garbage.pem", "chain.pem"], "bundle-unreadable"),
        (["--bundle", "root.pem", "garbage.pem"], "chain-unreadable"),
        (["--bundle", "root.pem", "truncated.pem"], "chain-unreadable"),
        (["--bundle", "chain.pem", "chain.pem"], "bundle-unreadable"),  # a leaf is not a root
        (["--bundle", "anon-root.pem", "chain.pem"], "bundle-trust-domain"),
        (["--bundle", "root.json", "chain.pem"], "bundle-trust-domain"),
        (["--bundle", "Bad_TD=root.pem", "chain.pem"], "bad-bundle-argument"),
        (["--bundle", "root.pem", "--at", "yesterday", "chain.pem"], "bad-time"),
        (["--bundle", "root.pem", "--at", "2026-06-01T12:00:00", "chain.pem"], "bad-time"),
    ],
)
def test_unusable_input_exits_2(files: Path, args: list[str], rule: str) -> None:
    r = run(*args, cwd=files)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == ""
    assert r.stderr.startswith(f"ztagent certs verify: {rule}: ")
    j = run(*args[:-1], "-o", "json", args[-1], cwd=files)
    assert j.returncode == 2
    assert json.loads(j.stdout)["rule"] == rule


def test_missing_bundle_argument_is_a_usage_error(files: Path) -> None:
    r = run("chain.pem", cwd=files)
    assert r.returncode == 2 and "--bundle" in r.stderr
