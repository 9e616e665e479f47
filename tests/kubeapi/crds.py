"""Structural schemas of the custom kinds the stand-in serves as built-ins: Istio's
security.istio.io/v1 AuthorizationPolicy, PeerAuthentication, RequestAuthentication and Gateway
API's gateway.networking.k8s.io/v1 Gateway.

They carry the fields of the published CRDs' `spec` (Istio's security.istio.io API reference,
Gateway API v1 standard channel), so a typo in a manifest is caught the way a real API server with
those CRDs installed catches it (strict field validation), while `status` keeps unknown fields as
Istio's CRDs do. A real cluster gets the real CRDs (deploy/README.md says how)."""

from __future__ import annotations

from typing import Any

_META = {"$ref": "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
_STR = {"type": "string"}
_STRS = {"type": "array", "items": {"type": "string"}}
_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
}
_TARGET_REF = {
    "type": "object",
    "required": ["kind", "name"],
    "properties": {"group": _STR, "kind": _STR, "name": _STR, "namespace": _STR},
}


def _kind(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "apiVersion": _STR,
            "kind": _STR,
            "metadata": _META,
            "spec": spec,
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }


_SOURCE = {"type": "object", "properties": {k: _STRS for k in (
    "principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces",
    "notNamespaces", "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks",
    "serviceAccounts", "notServiceAccounts")}}  # fmt: skip
_OPERATION = {"type": "object", "properties": {k: _STRS for k in (
    "hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths")}}  # fmt: skip

AUTHORIZATION_POLICY_SPEC = {"type": "object", "properties": {
    "action": {"type": "string", "enum": ["ALLOW", "DENY", "AUDIT", "CUSTOM"]},
    "provider": {"type": "object", "properties": {"name": _STR}},
    "rules": {"type": "array", "items": {"type": "object", "properties": {
        "from": {"type": "array", "items": {"type": "object", "properties": {"source": _SOURCE}}},
        "to": {"type": "array", "items": {"type": "object", "properties": {"operation": _OPERATION}}},
        "when": {"type": "array", "items": {"type": "object", "required": ["key"], "properties": {
            "key": _STR, "values": _STRS, "notValues": _STRS}}},
    }}},
    "selector": _SELECTOR,
    "targetRef": _TARGET_REF,
    "targetRefs": {"type": "array", "items": _TARGET_REF},
}}  # fmt: skip

_MTLS = {
    "type": "object",
    "properties": {"mode": {"type": "string", "enum": ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]}},
}
PEER_AUTHENTICATION_SPEC = {"type": "object", "properties": {
    "selector": _SELECTOR, "mtls": _MTLS,
    "portLevelMtls": {"type": "object", "additionalProperties": _MTLS},
}}  # fmt: skip

REQUEST_AUTHENTICATION_SPEC = {"type": "object", "properties": {
    "selector": _SELECTOR, "targetRef": _TARGET_REF, "targetRefs": {"type": "array", "items": _TARGET_REF},
    "jwtRules": {"type": "array", "items": {"type": "object", "required": ["issuer"], "properties": {
        "issuer": _STR, "audiences": _STRS, "jwksUri": _STR, "jwks": _STR,
        "fromHeaders": {"type": "array", "items": {"type": "object", "required": ["name"],
                                                   "properties": {"name": _STR, "prefix": _STR}}},
        "fromParams": _STRS, "fromCookies": _STRS, "outputPayloadToHeader": _STR,
        "forwardOriginalToken": {"type": "boolean"},
        "outputClaimToHeaders": {"type": "array", "items": {"type": "object", "properties": {
            "header": _STR, "claim": _STR}}},
        "timeout": _STR,
    }}},
}}  # fmt: skip

_ROUTE_GROUP_KIND = {"type": "object", "required": ["kind"], "properties": {"group": _STR, "kind": _STR}}
GATEWAY_SPEC = {"type": "object", "required": ["gatewayClassName", "listeners"], "properties": {
    "gatewayClassName": _STR,
    "addresses": {"type": "array", "items": {"type": "object", "required": ["value"], "properties": {
        "type": _STR, "value": _STR}}},
    "infrastructure": {"type": "object", "properties": {
        "labels": {"type": "object", "additionalProperties": _STR},
        "annotations": {"type": "object", "additionalProperties": _STR},
        "parametersRef": {"type": "object", "required": ["group", "kind", "name"], "properties": {
            "group": _STR, "kind": _STR, "name": _STR}}}},
    "listeners": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                  "items": {"type": "object", "required": ["name", "port", "protocol"], "properties": {
        "name": _STR, "hostname": _STR, "port": {"type": "integer", "format": "int32"}, "protocol": _STR,
        "tls": {"type": "object", "properties": {
            "mode": {"type": "string", "enum": ["Terminate", "Passthrough"]},
            "certificateRefs": {"type": "array", "items": _TARGET_REF | {"required": ["name"]}},
            "options": {"type": "object", "additionalProperties": _STR}}},
        "allowedRoutes": {"type": "object", "properties": {
            "namespaces": {"type": "object", "properties": {
                "from": {"type": "string", "enum": ["All", "Selector", "Same"]},
                "selector": {"$ref": "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"}}},
            "kinds": {"type": "array", "items": _ROUTE_GROUP_KIND}}},
    }}},
}}  # fmt: skip

_KINDS: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {
    ("security.istio.io/v1", "AuthorizationPolicy"): (
        "io.istio.security.v1.AuthorizationPolicy",
        AUTHORIZATION_POLICY_SPEC,
    ),
    ("security.istio.io/v1", "PeerAuthentication"): (
        "io.istio.security.v1.PeerAuthentication",
        PEER_AUTHENTICATION_SPEC,
    ),
    ("security.istio.io/v1", "RequestAuthentication"): (
        "io.istio.security.v1.RequestAuthentication",
        REQUEST_AUTHENTICATION_SPEC,
    ),
    ("gateway.networking.k8s.io/v1", "Gateway"): ("io.k8s.networking.gateway.v1.Gateway", GATEWAY_SPEC),
}


def definition_name(api_version: str, kind: str) -> str:
    return _KINDS[(api_version, kind)][0]


def definitions() -> dict[str, Any]:
    return {name: _kind(av, kind, spec) for (av, kind), (name, spec) in _KINDS.items()}
