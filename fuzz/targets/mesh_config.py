"""mesh.config.parse_config: the local config file (YAML stream: MeshConfig + Istio policies).

Whatever the text, the result is a MeshConfig or a ConfigError whose issues each name file,
document and field; nothing else may escape (a reload that raised anything else would not keep
the last good state as documented). An accepted config must be self-consistent: parsing the
same text again gives the same digest, and its policies were handed to the policy parser.
(Only ``parse_config`` and ``ConfigError`` are imported: the module is being split.)
"""

from __future__ import annotations

from pathlib import Path

from mesh.config import ConfigError, parse_config

MAX_LEN = 4096  # the lab example (~2 KB) with room to grow; longer inputs mostly cost time
_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lab.yaml"

_MINIMAL = """apiVersion: ztagent.io/v1alpha1
kind: MeshConfig
trustDomain: cluster.local
nodes:
- {name: node-a, address: 10.250.0.1, podCIDR: 10.244.1.0/24}
workloads:
- name: sleep
  namespace: default
  serviceAccount: sleep
  node: node-a
  ips: [10.244.1.2]
  labels: {app: sleep}
services:
- name: svc
  namespace: default
  vips: [10.96.0.1, "fd00::1"]
  ports: [{port: 80, targetPort: 8080}]
  selector: {app: sleep}
"""

SEEDS = [
    _EXAMPLE.read_bytes(),
    _MINIMAL.encode(),
    (
        _MINIMAL + "policies:\n- {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, "
        "metadata: {name: p}, spec: {action: DENY}}\n"
    ).encode(),
    (
        _MINIMAL + "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n"
    ).encode(),
    (
        _MINIMAL + "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: bad}\nspec: {action: ALOW}\n"
    ).encode(),
    (_MINIMAL + "rootNamespace: Bad_NS\n").encode(),
    (_MINIMAL + "trustDomain: dup\n").encode(),
    b"kind: MeshConfig\n---\nkind: MeshConfig\n",
    b"a: &x [1, 2]\nb: *x\n",
    # Regression seeds (tests/agent/test_config_yaml_errors.py): PyYAML's non-YAMLError refusals.
    (_MINIMAL + "---\nmetadata: {creationTimestamp: 2024-02-30}\n").encode(),
    (
        _MINIMAL + "---\nv: [!!int x, !!float y, !!binary AAAA, !!timestamp 2001-12-14t21:59:43.1-05:00]\n"
    ).encode(),
    b"v: " + b"[" * 400 + b"]" * 400 + b"\n",
    b"",
]


def fuzz_one(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        cfg = parse_config(text, file="fuzz.yaml")
    except ConfigError as exc:
        if not exc.issues:
            raise AssertionError("ConfigError without issues") from exc
        for issue in exc.issues:
            if issue.file != "fuzz.yaml" or not str(issue):
                raise AssertionError(f"issue does not name the file: {issue!r}") from exc
        return
    again = parse_config(text, file="fuzz.yaml")
    if again.digest != cfg.digest or again.trust_domain != cfg.trust_domain:
        raise AssertionError("the same text parsed twice differs")
    if len(cfg.policies) and cfg.parsed_policies is None:
        raise AssertionError("policies were not handed to the policy parser")
    names = [n.name for n in cfg.nodes]
    if len(set(names)) != len(names):
        raise AssertionError(f"duplicate node names accepted: {names}")
    for w in cfg.workloads:
        if w.node not in names:
            raise AssertionError(f"workload {w.key} on unknown node {w.node!r}")
        if w.spiffe_id.trust_domain != cfg.trust_domain:
            raise AssertionError(f"workload {w.key} identity {w.spiffe_id} outside {cfg.trust_domain}")
