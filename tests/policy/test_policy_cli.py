"""`ztagent policy check|lint` run as real subprocesses against files on disk."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

MESH = """
apiVersion: ztagent.io/v1alpha1
kind: MeshConfig
trustDomain: cluster.local
nodes:
  - {name: node-a, address: 10.250.0.1, podCIDR: 10.244.1.0/24}
workloads:
  - {name: sleep, namespace: ns1, serviceAccount: sleep, node: node-a, ips: [10.244.1.2],
     labels: {app: sleep}, enrolled: true}
  - {name: httpbin, namespace: ns2, serviceAccount: httpbin, node: node-a, ips: [10.244.1.3],
     labels: {app: httpbin}, enrolled: true}
  - {name: other, namespace: ns2, serviceAccount: other, node: node-a, ips: [10.244.1.4],
     labels: {app: other}, enrolled: true}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: ns2}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/ns1/sa/sleep"], ipBlocks: ["10.244.1.0/24"]}}]
"""

STRICT_NS2 = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: ns2}
spec: {mtls: {mode: STRICT}}
"""

SLEEP = "spiffe://cluster.local/ns/ns1/sa/sleep"


def ztagent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for name, text in {"mesh": MESH, "strict": STRICT_NS2}.items():
        p = tmp_path / f"{name}.yaml"
        p.write_text(textwrap.dedent(text))
        out[name] = str(p)
    return out


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


# ---- check


def test_check_allow(files: dict[str, str]) -> None:
    r = ztagent(
        "policy",
        "check",
        "-f",
        files["mesh"],
        "--source-principal",
        SLEEP,
        "--destination",
        "ns2/httpbin",
        "--port",
        "8080",
    )
    assert r.returncode == 0, r.stderr
    first_line = r.stdout.splitlines()[0]
    assert first_line.split()[0] == "ALLOW" and "ns2/allow-sleep" in first_line
    # The source IP came from the sleep workload in the config (the ipBlocks field needs it).
    assert "10.244.1.2 taken from workload ns1/sleep" in r.stderr


def test_check_deny_other_principal(files: dict[str, str]) -> None:
    r = ztagent(
        "policy",
        "check",
        "-f",
        files["mesh"],
        "--source-principal",
        "cluster.local/ns/ns1/sa/other",
        "--source-ip",
        "10.244.1.9",
        "--destination",
        "ns2/httpbin",
        "--port",
        "8080",
    )
    assert r.returncode == 1, r.stderr
    assert r.stdout.split()[0] == "DENY"
    assert "no ALLOW policy matched" in r.stdout


def test_check_ip_block_with_explicit_source_ip(files: dict[str, str]) -> None:
    r = ztagent(
        "policy",
        "check",
        "-f",
        files["mesh"],
        "--source-principal",
        SLEEP,
        "--source-ip",
        "192.0.2.1",
        "--destination",
        "ns2/httpbin",
        "--port",
        "8080",
    )
    assert r.returncode == 1 and r.stdout.startswith("DENY")


def test_check_json(files: dict[str, str]) -> None:
    r = ztagent(
        "policy",
        "check",
        "-f",
        files["mesh"],
        "--source-principal",
        SLEEP,
        "--destination",
        "ns2/httpbin",
        "--port",
        "8080",
        "-o",
        "json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["decision"] == "ALLOW"
    assert out["policies"] == ["ns2/allow-sleep"]
    assert out["reason"] == "ALLOW policy ns2/allow-sleep matched"


def test_check_strict_refuses_plaintext(files: dict[str, str]) -> None:
    # "-f FILE FILE..." (several files after one -f) is accepted too.
    r = ztagent(
        "policy",
        "check",
        "-f",
        files["mesh"],
        files["strict"],
        "--plaintext",
        "--destination",
        "ns2/other",
        "--port",
        "8080",
        "-o",
        "json",
    )
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert (out["decision"], out["policies"], out["code"]) == ("DENY", ["ns2/default"], "mtls-required")
    # The same connection with an identity passes (ns2/other has no ALLOW policy).
    ok = ztagent(
        "policy",
        "check",
        "-f",
        files["mesh"],
        "-f",
        files["strict"],
        "--source-principal",
        SLEEP,
        "--destination",
        "ns2/other",
        "--port",
        "8080",
    )
    assert ok.returncode == 0 and ok.stdout.startswith("ALLOW")


def test_check_permissive_plaintext_reaches_authz(files: dict[str, str], tmp_path: Path) -> None:
    allow_all = write(
        tmp_path,
        "all.yaml",
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: all, namespace: ns2}
        spec: {selector: {matchLabels: {app: other}}, rules: [{}]}
    """,
    )
    r = ztagent(
        "policy",
        "check",
        "-f",
        files["mesh"],
        "-f",
        allow_all,
        "--plaintext",
        "--destination",
        "ns2/other",
        "--port",
        "8080",
    )
    assert r.returncode == 0 and r.stdout.startswith("ALLOW ns2/all")


def test_check_plain_policy_file_with_labels(tmp_path: Path) -> None:
    pol = write(
        tmp_path,
        "p.yaml",
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-9090, namespace: ns2}
        spec:
          selector: {matchLabels: {app: web}}
          action: DENY
          rules: [{to: [{operation: {ports: ["9090"]}}]}]
    """,
    )
    args = ["policy", "check", "-f", pol, "--source-principal", SLEEP, "--destination", "ns2/web"]
    deny = ztagent(*args, "--destination-labels", "app=web,tier=front", "--port", "9090")
    assert deny.returncode == 1 and deny.stdout.startswith("DENY ns2/deny-9090")
    other_labels = ztagent(*args, "--destination-labels", "app=api", "--port", "9090")
    assert other_labels.returncode == 0 and other_labels.stdout.startswith("ALLOW")
    # Without MeshConfig or labels the destination is unknown: bad input, not a guess.
    r = ztagent(*args, "--port", "9090")
    assert r.returncode == 2 and "--destination-labels" in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [
                "--source-principal",
                "spiffe://Bad_TD/ns/a/sa/b",
                "--destination",
                "ns2/httpbin",
                "--port",
                "80",
            ],
            "is not a SPIFFE ID",
        ),
        (
            ["--plaintext", "--source-ip", "10.1.1.300", "--destination", "ns2/httpbin", "--port", "80"],
            "is not an IP address",
        ),
        (["--plaintext", "--destination", "ns2/httpbin", "--port", "70000"], "not in 1..65535"),
        (["--plaintext", "--destination", "nonamespace", "--port", "80"], "is not NAMESPACE/WORKLOAD"),
        (["--plaintext", "--destination", "ns2/ghost", "--port", "80"], "the config has no such workload"),
        (
            ["--plaintext", "--source-principal", SLEEP, "--destination", "ns2/httpbin", "--port", "80"],
            "not allowed with argument",
        ),
        (
            [
                "--plaintext",
                "--destination",
                "ns2/httpbin",
                "--port",
                "80",
                "--destination-labels",
                "novalue",
            ],
            "is not key=value",
        ),
    ],
)
def test_check_bad_arguments_exit_2(files: dict[str, str], args: list[str], message: str) -> None:
    r = ztagent("policy", "check", "-f", files["mesh"], *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert r.stdout == ""


def test_check_invalid_policy_is_bad_input(tmp_path: Path) -> None:
    pol = write(
        tmp_path,
        "bad.yaml",
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: bad, namespace: ns2}
        spec:
          action: DENY
          rules: [{from: [{source: {ipBlocks: [10.0.0.1, 10.0.0/33]}}]}]
    """,
    )
    r = ztagent(
        "policy",
        "check",
        "-f",
        pol,
        "--plaintext",
        "--destination",
        "ns2/x",
        "--destination-labels",
        "a=b",
        "--port",
        "80",
    )
    assert r.returncode == 2
    assert 'spec.rules[0].from[0].source.ipBlocks[1]: invalid CIDR "10.0.0/33"' in r.stderr
    assert "bad.yaml: document 0 (AuthorizationPolicy ns2/bad)" in r.stderr


def test_check_invalid_policy_inside_meshconfig_is_bad_input(tmp_path: Path) -> None:
    cfg = write(tmp_path, "mesh.yaml", MESH.replace('ipBlocks: ["10.244.1.0/24"]', 'ipBlocks: ["nope"]'))
    r = ztagent("policy", "check", "-f", cfg, "--plaintext", "--destination", "ns2/httpbin", "--port", "80")
    # The agent now accepts such a config with the policy poisoned (fail-closed), but `check`
    # still treats an invalid policy as bad input, naming file, policy and field. (The document
    # number it prints for policies inside a MeshConfig is policy/'s index, not the file's.)
    assert r.returncode == 2
    assert "mesh.yaml: document " in r.stderr
    assert "(AuthorizationPolicy ns2/allow-sleep): spec.rules[0].from[0].source.ipBlocks[0]" in r.stderr
    assert "fail-closed" in r.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("kind: [unclosed", "invalid YAML"),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nkind: AuthorizationPolicy\n",
            "duplicate key",
        ),
    ],
)
def test_check_unreadable_yaml_exit_2(tmp_path: Path, content: str, message: str) -> None:
    p = tmp_path / "x.yaml"
    p.write_text(content)
    r = ztagent(
        "policy",
        "check",
        "-f",
        str(p),
        "--plaintext",
        "--destination",
        "a/b",
        "--destination-labels",
        "",
        "--port",
        "1",
    )
    assert r.returncode == 2 and message in r.stderr


def test_check_missing_file_exit_2(tmp_path: Path) -> None:
    r = ztagent(
        "policy",
        "check",
        "-f",
        str(tmp_path / "nope.yaml"),
        "--plaintext",
        "--destination",
        "a/b",
        "--destination-labels",
        "x=y",
        "--port",
        "1",
    )
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_check_duplicate_across_files_exit_2(files: dict[str, str], tmp_path: Path) -> None:
    again = write(tmp_path, "again.yaml", STRICT_NS2)
    r = ztagent(
        "policy",
        "check",
        "-f",
        files["strict"],
        "-f",
        again,
        "--plaintext",
        "--destination",
        "ns2/x",
        "--destination-labels",
        "a=b",
        "--port",
        "1",
    )
    assert r.returncode == 2 and "duplicate PeerAuthentication ns2/default" in r.stderr


# ---- lint

FOOTGUNS = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: nothing, namespace: ns3}
spec: {selector: {matchLabels: {app: db}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: principals, namespace: ns2}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - from:
    - source:
        principals:
        - spiffe://cluster.local/ns/ns1/sa/sleep
        - "*/ns/ns1/sa/sleep"
        - other.td/ns/ns1/sa/sleep
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: http, namespace: ns2}
spec:
  action: DENY
  selector: {matchLabels: {app: httpbin}}
  rules: [{to: [{operation: {methods: [DELETE]}}]}]
"""


def test_lint_flags_each_footgun(files: dict[str, str], tmp_path: Path) -> None:
    pol = write(tmp_path, "footguns.yaml", FOOTGUNS)
    # Issue 17: warnings alone no longer fail lint (default --failure-threshold error).
    r = ztagent("policy", "lint", "-f", files["mesh"], "-f", pol, "-o", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["failing"] == 0
    r = ztagent(
        "policy", "lint", "-f", files["mesh"], "-f", pol, "-o", "json", "--failure-threshold", "warning"
    )
    assert r.returncode == 1, r.stderr
    findings = json.loads(r.stdout)["findings"]
    codes = {(f["code"], f["policy"]) for f in findings}
    assert ("empty-allow", "AuthorizationPolicy ns3/nothing") in codes
    assert ("spiffe-prefix", "AuthorizationPolicy ns2/principals") in codes
    assert ("wildcard-trust-domain", "AuthorizationPolicy ns2/principals") in codes
    assert ("trust-domain-mismatch", "AuthorizationPolicy ns2/principals") in codes
    # Issue 17: a DENY rule of HTTP fields only has its own code (it denies everything selected).
    assert ("deny-http-only", "AuthorizationPolicy ns2/http") in codes
    assert ("allow-without-default-deny", None) in codes
    assert ("permissive", None) in codes
    paths = {f["path"] for f in findings if f["code"] == "spiffe-prefix"}
    assert paths == {"spec.rules[0].from[0].source.principals[0]"}
    dd = next(f for f in findings if f["code"] == "allow-without-default-deny")
    assert "ns2/other" in dd["message"]  # the workload left open, from the MeshConfig


def test_lint_clean_config_exit_0(tmp_path: Path) -> None:
    clean = write(
        tmp_path,
        "clean.yaml",
        """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: default, namespace: istio-system}
        spec: {mtls: {mode: STRICT}}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-nothing, namespace: istio-system}
        spec: {action: ALLOW}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-sleep, namespace: ns2}
        spec:
          selector: {matchLabels: {app: httpbin}}
          rules: [{from: [{source: {principals: [cluster.local/ns/ns1/sa/sleep]}}]}]
    """,
    )
    r = ztagent("policy", "lint", "-f", clean)
    # The mesh-wide allow-nothing is itself reported (it is the default-deny pattern, on purpose here).
    codes = [line.split()[1] for line in r.stdout.splitlines()]
    assert codes == ["empty-allow"], r.stdout
    assert r.returncode == 0  # a warning is below the default threshold (issue 17)
    assert ztagent("policy", "lint", "-f", clean, "--failure-threshold", "warning").returncode == 1
    assert (
        ztagent(
            "policy",
            "lint",
            "-f",
            clean,
            "--failure-threshold",
            "warning",
            "--suppress",
            "empty-allow=istio-system/*",
        ).returncode
        == 0
    )
    only_strict = write(
        tmp_path,
        "strict.yaml",
        """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: default, namespace: istio-system}
        spec: {mtls: {mode: STRICT}}
    """,
    )
    ok = ztagent("policy", "lint", "-f", only_strict)
    assert ok.returncode == 0 and ok.stdout.strip() == "OK: no findings"


def test_lint_reports_invalid_documents_with_file(tmp_path: Path) -> None:
    bad = write(
        tmp_path,
        "bad.yaml",
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: bad, namespace: ns2}
        spec: {rules: [{from: [{source: {principal: [x]}}]}]}
    """,
    )
    r = ztagent("policy", "lint", "-f", bad)
    assert r.returncode == 1
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("ERROR invalid"))
    assert "AuthorizationPolicy ns2/bad spec.rules[0].from[0].source.principal: unknown field" in line
    assert "bad.yaml, document 0" in line


def test_lint_trust_domain_flag(tmp_path: Path) -> None:
    pol = write(
        tmp_path,
        "p.yaml",
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: istio-system}
        spec: {rules: [{from: [{source: {principals: [prod.example/ns/a/sa/b]}}]}]}
        ---
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: default, namespace: istio-system}
        spec: {mtls: {mode: STRICT}}
    """,
    )
    strict = ("--failure-threshold", "warning")
    assert ztagent("policy", "lint", "-f", pol, "--trust-domain", "prod.example", *strict).returncode == 0
    r = ztagent("policy", "lint", "-f", pol, *strict)
    assert r.returncode == 1 and "trust-domain-mismatch" in r.stdout


def test_lint_unreadable_exit_2(tmp_path: Path) -> None:
    r = ztagent("policy", "lint", "-f", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "cannot read" in r.stderr


NO_NAMESPACE = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules: [{from: [{source: {principals: ["cluster.local/ns/ns1/sa/sleep"]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"""


def test_namespace_flag_defaults_documents_without_one(tmp_path: Path) -> None:
    pol = write(tmp_path, "p.yaml", NO_NAMESPACE)
    lint_no_ns = ztagent("policy", "lint", "-f", pol)
    assert lint_no_ns.returncode == 1
    assert (
        "ERROR invalid AuthorizationPolicy allow-sleep (no namespace) metadata.namespace: no namespace: set "
        "metadata.namespace or pass -n / a default namespace" in lint_no_ns.stdout
    )
    check = (
        "policy",
        "check",
        "-f",
        pol,
        "--source-principal",
        SLEEP,
        "--destination",
        "ns2/httpbin",
        "--destination-labels",
        "app=httpbin",
        "--port",
        "80",
    )
    r = ztagent(*check)
    assert r.returncode == 2 and "metadata.namespace: no namespace" in r.stderr  # check and lint agree
    ok = ztagent(*check, "-n", "ns2")
    assert ok.returncode == 0 and ok.stdout.startswith("ALLOW ns2/allow-sleep"), ok.stdout + ok.stderr
    # The default namespace is only a default: ns3's workloads are not selected by it.
    other = ztagent(*check[:6], "--destination", "ns3/httpbin", *check[8:], "-n", "ns2")
    assert other.returncode == 0 and other.stdout.startswith("ALLOW (no policy)")
    lint_ns = ztagent("policy", "lint", "-f", pol, "-n", "ns2")
    assert lint_ns.returncode == 0 and "invalid" not in lint_ns.stdout, lint_ns.stdout
    assert "ALLOW policies ns2/allow-sleep select only some workloads" in lint_ns.stdout
    bad = ztagent("policy", "lint", "-f", pol, "-n", "Not_A_Namespace")
    assert bad.returncode == 2 and "-n/--namespace" in bad.stderr


def test_lint_exit_status_and_suppress_flags(tmp_path: Path) -> None:
    pol = write(
        tmp_path,
        "p.yaml",
        """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: httpbin}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-nothing, namespace: ns2}
        spec: {action: DENY}
    """,
    )
    r = ztagent("policy", "lint", "-f", pol)
    lines = r.stdout.splitlines()
    assert r.returncode == 0, r.stdout
    assert any(ln.startswith("INFO not-a-policy document 0 (Deployment):") for ln in lines), lines
    assert any(
        ln.startswith("WARNING deny-without-rules AuthorizationPolicy ns2/deny-nothing") for ln in lines
    )
    assert any(ln.startswith("INFO permissive mesh:") for ln in lines)
    assert "0 error, 1 warning, 2 info; none at or above --failure-threshold error" in r.stderr
    assert ztagent("policy", "lint", "-f", pol, "--failure-threshold", "warning").returncode == 1
    assert ztagent("policy", "lint", "-f", pol, "--failure-threshold", "info").returncode == 1
    quiet = ztagent(
        "policy",
        "lint",
        "-f",
        pol,
        "--failure-threshold",
        "info",
        "--suppress",
        "not-a-policy",
        "--suppress",
        "permissive",
        "--suppress",
        "deny-without-rules=AuthorizationPolicy ns2/deny-*",
    )
    assert quiet.returncode == 0 and quiet.stdout.strip() == "OK: no findings", quiet.stdout
    typo = ztagent("policy", "lint", "-f", pol, "--suppress", "deny-without-rule")
    assert typo.returncode == 2 and "unknown lint code 'deny-without-rule'" in typo.stderr
    help_text = ztagent("policy", "lint", "--help").stdout
    assert "plaintext-bypass" in help_text and "--failure-threshold" in help_text
