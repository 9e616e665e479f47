"""The schemas behind the stand-in: OpenAPI v3 documents for `kubectl` (discovery of the
`fieldValidation` parameter, strategic-merge metadata for `kubectl apply`), the patch strategies
the server's own strategic merge patch follows, and server-side field validation.

Built-in schemas are Kubernetes' own, as the `kubernetes-validate` package ships them (generated
from the upstream OpenAPI spec, with x-kubernetes-patch-* extensions intact); we do not hand-write
them. The Istio and Gateway API kinds get the structural schemas of `crds.py`, as a real server
publishes a CRD's openAPIV3Schema."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import pathlib
from typing import Any

from . import crds
from .resources import RESOURCES, Resource

K8S_SCHEMA_VERSION = "v1.32.0"  # matches the kubectl Debian ships here (v1.32.x)

_REF_PREFIX = "#/$defs/"
_OAS_PREFIX = "#/components/schemas/"

_KIND_DEFS: dict[tuple[str, str], str] = {
    ("v1", "Namespace"): "io.k8s.api.core.v1.Namespace",
    ("v1", "Pod"): "io.k8s.api.core.v1.Pod",
    ("v1", "Node"): "io.k8s.api.core.v1.Node",
    ("v1", "Service"): "io.k8s.api.core.v1.Service",
    ("v1", "ServiceAccount"): "io.k8s.api.core.v1.ServiceAccount",
    ("v1", "ConfigMap"): "io.k8s.api.core.v1.ConfigMap",
    ("v1", "Secret"): "io.k8s.api.core.v1.Secret",
    ("discovery.k8s.io/v1", "EndpointSlice"): "io.k8s.api.discovery.v1.EndpointSlice",
    ("apps/v1", "DaemonSet"): "io.k8s.api.apps.v1.DaemonSet",
    ("apps/v1", "Deployment"): "io.k8s.api.apps.v1.Deployment",
    ("policy/v1", "PodDisruptionBudget"): "io.k8s.api.policy.v1.PodDisruptionBudget",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "io.k8s.api.rbac.v1.ClusterRole",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "io.k8s.api.rbac.v1.ClusterRoleBinding",
    ("rbac.authorization.k8s.io/v1", "Role"): "io.k8s.api.rbac.v1.Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "io.k8s.api.rbac.v1.RoleBinding",
    ("authentication.k8s.io/v1", "TokenReview"): "io.k8s.api.authentication.v1.TokenReview",
    ("authentication.k8s.io/v1", "TokenRequest"): "io.k8s.api.authentication.v1.TokenRequest",
}


@functools.cache
def k8s_definitions() -> dict[str, Any]:
    import kubernetes_validate  # the package's data directory is the source of the schemas

    base = pathlib.Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    data = json.loads((base / f"{K8S_SCHEMA_VERSION}-local" / "_definitions.json").read_text())
    defs: dict[str, Any] = data["$defs"]
    return defs


def definitions() -> dict[str, Any]:
    """Every schema by definition name: Kubernetes' plus the custom kinds'."""
    out = dict(k8s_definitions())
    out.update(crds.definitions())
    return out


def kind_definition(api_version: str, kind: str) -> str:
    key = (api_version, kind)
    if key in _KIND_DEFS:
        return _KIND_DEFS[key]
    return crds.definition_name(api_version, kind)


def resolve(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """Follows a $ref (possibly inside allOf, as OpenAPI v3 wraps refs that carry siblings)."""
    if schema is None:
        return None
    ref = schema.get("$ref")
    if ref is None and len(schema.get("allOf", ())) == 1:
        ref = schema["allOf"][0].get("$ref")
    if ref:
        name = ref.removeprefix(_REF_PREFIX).removeprefix(_OAS_PREFIX)
        target = definitions().get(name)
        if target is None:
            return None
        merged = dict(target)
        merged.update({k: v for k, v in schema.items() if k not in ("$ref", "allOf")})
        return merged
    return schema


def property_schema(schema: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    s = resolve(schema)
    if s is None:
        return None
    props = s.get("properties")
    if isinstance(props, dict) and name in props:
        return resolve(props[name])
    extra = s.get("additionalProperties")
    if isinstance(extra, dict):
        return resolve(extra)
    return None


def items_schema(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    s = resolve(schema)
    if s is None or not isinstance(s.get("items"), dict):
        return None
    return resolve(s["items"])


def _types(s: dict[str, Any]) -> set[str]:
    t = s.get("type")
    if t is None:
        return set()
    return {t} if isinstance(t, str) else set(t)


def unknown_fields(
    obj: Any, schema: dict[str, Any] | None, path: str = "", *, prune: bool = False
) -> list[str]:
    """The paths of fields the schema does not declare, as a real server's strict decoding and
    structural-schema pruning report them (`.spec.foo`); with `prune`, also removes them (a real
    server drops unknown fields of built-ins when decoding and prunes those of custom kinds)."""
    s = resolve(schema)
    if s is None or s.get("x-kubernetes-preserve-unknown-fields") or s.get("x-kubernetes-int-or-string"):
        return []
    out: list[str] = []
    if isinstance(obj, dict):
        props = s.get("properties")
        extra = s.get("additionalProperties")
        for k, v in list(obj.items()):
            p = f"{path}.{k}"
            if isinstance(props, dict) and k in props:
                out.extend(unknown_fields(v, props[k], p, prune=prune))
            elif isinstance(extra, dict):
                out.extend(unknown_fields(v, extra, p, prune=prune))
            elif extra is True:
                continue
            elif props is not None or "object" in _types(s):
                out.append(p)
                if prune:
                    del obj[k]
    elif isinstance(obj, list) and isinstance(s.get("items"), dict):
        for i, v in enumerate(obj):
            out.extend(unknown_fields(v, s["items"], f"{path}[{i}]", prune=prune))
    return out


def schema_for(api_version: str, kind: str) -> dict[str, Any] | None:
    return resolve({"$ref": _REF_PREFIX + kind_definition(api_version, kind)})


# --- OpenAPI v3 documents ---------------------------------------------------------------------


def _to_oas(node: Any) -> Any:
    """JSON-schema-2020 form (kubernetes-validate's) -> OpenAPI 3.0 form: refs into
    components/schemas, ["string","null"] -> "string" + nullable."""
    if isinstance(node, list):
        return [_to_oas(v) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k == "$ref" and isinstance(v, str):
            out[k] = _OAS_PREFIX + v.removeprefix(_REF_PREFIX)
        elif k == "type" and isinstance(v, list):
            non_null = [t for t in v if t != "null"]
            if len(non_null) == 1:
                out[k] = non_null[0]
            if "null" in v:
                out["nullable"] = True
        elif k in ("properties", "$defs", "patternProperties"):
            out[k] = {pk: _to_oas(pv) for pk, pv in v.items()}
        else:
            out[k] = _to_oas(v)
    return out


def _gvk(r: Resource, kind: str | None = None) -> dict[str, str]:
    return {"group": r.group, "version": r.version, "kind": kind or r.kind}


def _reachable(names: list[str]) -> set[str]:
    defs = definitions()
    seen: set[str] = set()
    stack = list(names)
    while stack:
        n = stack.pop()
        if n in seen or n not in defs:
            continue
        seen.add(n)
        blob = json.dumps(defs[n])
        for part in blob.split('"$ref": "')[1:]:
            stack.append(part.split('"', 1)[0].removeprefix(_REF_PREFIX))
    return seen


_QUERY_PARAMS = ("dryRun", "fieldManager", "fieldValidation", "pretty")


def _op(r: Resource, action: str, kind_def: str, *, body: bool) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": f"{action}{r.kind}",
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": _gvk(r),
        "responses": {
            "200": {
                "description": "OK",
                "content": {"application/json": {"schema": {"$ref": _OAS_PREFIX + kind_def}}},
            }
        },
    }
    if body:
        op["parameters"] = [{"name": n, "in": "query", "schema": {"type": "string"}} for n in _QUERY_PARAMS]
        ctypes = (["application/json-patch+json", "application/merge-patch+json",
                   "application/strategic-merge-patch+json", "application/apply-patch+yaml"]
                  if action == "patch" else ["application/json"])  # fmt: skip
        if action == "patch" and r.custom:
            ctypes.remove("application/strategic-merge-patch+json")
        op["requestBody"] = {"content": {ct: {"schema": {"$ref": _OAS_PREFIX + kind_def}} for ct in ctypes}}
    return op


@functools.cache
def gv_document(gv_path: str) -> dict[str, Any]:
    """The OpenAPI v3 document of one group/version, e.g. "api/v1" or "apis/discovery.k8s.io/v1"."""
    resources = [r for r in RESOURCES if r.gv_path.lstrip("/") == gv_path]
    if not resources:
        raise KeyError(gv_path)
    paths: dict[str, Any] = {}
    roots: list[str] = []
    for r in resources:
        kind_def = kind_definition(r.api_version, r.kind)
        roots.append(kind_def)
        prefix = "/" + gv_path + ("/namespaces/{namespace}" if r.namespaced else "")
        if r.virtual:
            paths[f"{prefix}/{r.plural}"] = {"post": _op(r, "post", kind_def, body=True)}
            continue
        paths[f"{prefix}/{r.plural}"] = {
            "get": _op(r, "list", kind_def, body=False),
            "post": _op(r, "post", kind_def, body=True),
        }
        item = {
            "get": _op(r, "get", kind_def, body=False),
            "put": _op(r, "put", kind_def, body=True),
            "patch": _op(r, "patch", kind_def, body=True),
            "delete": _op(r, "delete", kind_def, body=False),
        }
        paths[f"{prefix}/{r.plural}/{{name}}"] = item
        if "status" in r.subresources:
            paths[f"{prefix}/{r.plural}/{{name}}/status"] = {
                "get": _op(r, "get", kind_def, body=False),
                "put": _op(r, "put", kind_def, body=True),
                "patch": _op(r, "patch", kind_def, body=True),
            }
    defs = definitions()
    schemas: dict[str, Any] = {}
    for name in sorted(_reachable(roots)):
        s = _to_oas(copy.deepcopy(defs[name]))
        schemas[name] = s
    for r in resources:
        kd = kind_definition(r.api_version, r.kind)
        schemas[kd]["x-kubernetes-group-version-kind"] = [_gvk(r)]
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.4"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


@functools.cache
def gv_document_bytes(gv_path: str) -> bytes:
    return json.dumps(gv_document(gv_path), separators=(",", ":")).encode()


def gv_hash(gv_path: str) -> str:
    return hashlib.sha512(gv_document_bytes(gv_path)).hexdigest()[:64].upper()


def root_document() -> dict[str, Any]:
    gvs = sorted({r.gv_path.lstrip("/") for r in RESOURCES})
    return {"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash={gv_hash(gv)}"} for gv in gvs}}
