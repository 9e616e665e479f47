"""policy/: ``parse_policies`` on mutated YAML documents, then ``PolicyIndex`` and one decision.

The bytes are YAML (``yaml.safe_load_all``'s loader first, as an operator's file would be read; text that
is not YAML is PyYAML's business and is skipped here; the mesh_config target covers the loader
the agent really uses). ``parse_policies`` never raises: every problem is an error naming a
field, on a policy kept "poisoned". Then the index is built and one mTLS and one plaintext
connection to the first policy's workload are decided, and the fail-closed rule is checked:
a poisoned policy may only ever take permissions away, so whatever the full set allows, the set
without its poisoned policies allows too.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from typing import Any

import yaml

from policy import Connection, Decision, PolicyIndex, parse_policies

MAX_LEN = 4096

SEEDS = [
    s.encode()
    for s in (
        """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-allow-sleep, namespace: backend}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/frontend/sa/sleep"]}
    to:
    - operation: {ports: ["8080"]}
""",
        """apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: deny-some
  namespace: foo
  annotations: {istio.io/dry-run: "true"}
  creationTimestamp: "2024-05-01T10:00:00Z"
spec:
  action: DENY
  rules:
  - from:
    - source: {notNamespaces: [foo], ipBlocks: [10.0.0.0/8, "fd00::/8"], notIpBlocks: [10.1.2.3]}
    to:
    - operation: {notPorts: ["22"], methods: [GET], paths: ["/admin*"], hosts: ["*.example.com"]}
    when:
    - {key: source.ip, values: [10.0.0.1]}
    - {key: destination.port, notValues: ["9090"]}
    - {key: request.auth.claims[iss], values: ["https://accounts.google.com"]}
""",
        """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: istio-system}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: default}
spec: {rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: default}
spec: {action: ALOW, rules: [{}]}
""",
        """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: default}
spec:
  action: CUSTOM
  provider: {name: my-ext-authz}
  rules: [{to: [{operation: {paths: ["/x"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: default}
spec:
  action: AUDIT
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules: [{from: [{source: {serviceAccounts: [default/sleep], requestPrincipals: ["*"]}}]}]
""",
        """apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: httpbin, namespace: backend}
spec:
  selector: {matchLabels: {app: httpbin}}
  mtls: {mode: UNSET}
  portLevelMtls: {"8080": {mode: PERMISSIVE}, "9000": {mode: DISABLE}}
""",
        """apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  jwtRules:
  - issuer: https://example.com
    jwksUri: https://example.com/.well-known/jwks.json
    audiences: [a, b]
    fromHeaders: [{name: x-jwt, prefix: "Bearer "}]
    fromParams: [token]
    outputPayloadToHeader: x-payload
    forwardOriginalToken: true
    timeout: 5s
""",
        "kind: AuthorizationPolicy\n",
        "- 1\n- 2\n",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x}\n"
        "spec: {mtls: {mode: STRICTT}}\n",
    )
]

_SOURCE_IP = ipaddress.ip_address("10.0.0.1")
# safe_load's semantics with libyaml's parser: the YAML scanner is not what is under test here,
# and the pure-Python one held this target at ~640 inputs/s.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _target(docs: list[Any]) -> tuple[str, Mapping[str, str], int]:
    """The workload the first document seems to be about (namespace, labels, port)."""
    ns, labels, port = "default", {}, 8080
    for d in docs:
        if not isinstance(d, Mapping):
            continue
        meta = d.get("metadata")
        if isinstance(meta, Mapping) and isinstance(meta.get("namespace"), str):
            ns = meta["namespace"]
        spec = d.get("spec")
        sel = spec.get("selector") if isinstance(spec, Mapping) else None
        ml = sel.get("matchLabels") if isinstance(sel, Mapping) else None
        if isinstance(ml, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in ml.items()):
            labels = dict(ml)
        break
    return ns, labels, port


def _check(decision: Decision) -> None:
    json.dumps(decision.to_dict(), default=str)  # what /policies and the access log print


def fuzz_one(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        docs = list(yaml.load_all(text, Loader=_LOADER))
    except Exception:  # not YAML (PyYAML's own errors): not this target's parser
        return
    pset = parse_policies(docs)
    for issue in (*pset.errors, *pset.warnings):
        if not isinstance(issue.path, str) or not issue.message:
            raise AssertionError(f"an issue without a path or message: {issue!r}")
        str(issue)
    root = "istio-system"
    index = PolicyIndex(pset, root_namespace=root)
    clean = PolicyIndex([p for p in pset if not p.errors], root_namespace=root)
    ns, labels, port = _target(docs)
    for principal in ("cluster.local/ns/frontend/sa/sleep", None):
        conn = Connection(
            source_principal=principal,
            source_ip=_SOURCE_IP,
            destination_namespace=ns,
            destination_port=port,
            destination_labels=labels,
        )
        full, without_poisoned = index.check(conn), clean.check(conn)
        _check(full)
        _check(without_poisoned)
        if full.allowed and not without_poisoned.allowed:
            raise AssertionError(
                f"a poisoned policy granted access: with it {full}, without it {without_poisoned}"
            )
