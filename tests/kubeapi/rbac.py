"""RBAC authorization from the stored Roles, ClusterRoles and their bindings, as kube-apiserver's
RBAC authorizer decides it, so a component run with its own service-account token gets the 403
a real cluster gives it when deploy/rbac.yaml lacks a grant.

Bootstrap policy: `system:masters` may do anything; every authenticated user may read discovery
and OpenAPI (`system:discovery`), everyone the version and health endpoints
(`system:public-info-viewer`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .auth import UserInfo

_PUBLIC_INFO = ("/healthz", "/livez", "/readyz", "/version", "/version/")
_DISCOVERY = ("/api", "/api/*", "/apis", "/apis/*", "/openapi", "/openapi/*", *_PUBLIC_INFO)


@dataclass(frozen=True)
class Attributes:
    verb: str  # get, list, watch, create, update, patch, delete, deletecollection
    group: str
    resource: str
    subresource: str
    namespace: str  # "" at the cluster scope
    name: str

    def describe(self, user: UserInfo) -> str:
        """The Forbidden message of a real server."""
        res = self.resource + (f"/{self.subresource}" if self.subresource else "")
        who = f'User "{user.username}" cannot {self.verb} resource "{res}" in API group "{self.group}"'
        where = f'in the namespace "{self.namespace}"' if self.namespace else "at the cluster scope"
        target = f"{self.resource}{'.' + self.group if self.group else ''}"
        if self.name:
            target += f' "{self.name}"'
        return f"{target} is forbidden: {who} {where}"


def _matches(values: Iterable[str], want: str) -> bool:
    return any(v == "*" or v == want for v in values)


def _rule_allows(rule: dict[str, Any], a: Attributes) -> bool:
    resources = rule.get("resources") or []
    if a.subresource:
        res_ok = _matches(resources, f"{a.resource}/{a.subresource}") or f"*/{a.subresource}" in resources
    else:
        res_ok = _matches(resources, a.resource)
    names = rule.get("resourceNames")
    return (_matches(rule.get("verbs") or [], a.verb) and _matches(rule.get("apiGroups") or [], a.group)
            and res_ok and (not names or (bool(a.name) and a.name in names)))  # fmt: skip


def _subject_matches(subject: dict[str, Any], user: UserInfo, binding_ns: str) -> bool:
    kind = subject.get("kind")
    if kind == "User":
        return bool(subject.get("name") == user.username)
    if kind == "Group":
        return subject.get("name") in user.groups
    if kind == "ServiceAccount":
        ns = subject.get("namespace") or binding_ns
        return user.username == f"system:serviceaccount:{ns}:{subject.get('name')}"
    return False


class Authorizer:
    def __init__(self, objects: Any) -> None:
        # objects(kind) -> stored RBAC objects of that kind ("ClusterRole", "ClusterRoleBinding", ...)
        self._objects = objects

    def allowed(self, user: UserInfo, a: Attributes) -> bool:
        if "system:masters" in user.groups:
            return True
        roles = {r["metadata"]["name"]: r for r in self._objects("ClusterRole")}
        ns_roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in self._objects("Role")}
        for b in self._objects("ClusterRoleBinding"):
            if any(_subject_matches(s, user, "") for s in b.get("subjects") or []):
                role = roles.get(b["roleRef"]["name"])
                if role and any(_rule_allows(rule, a) for rule in role.get("rules") or []):
                    return True
        if a.namespace:
            for b in self._objects("RoleBinding"):
                if b["metadata"]["namespace"] != a.namespace:
                    continue
                if not any(_subject_matches(s, user, a.namespace) for s in b.get("subjects") or []):
                    continue
                ref = b["roleRef"]
                role = (
                    roles.get(ref["name"])
                    if ref["kind"] == "ClusterRole"
                    else ns_roles.get((a.namespace, ref["name"]))
                )
                if role and any(_rule_allows(rule, a) for rule in role.get("rules") or []):
                    return True
        return False

    def allowed_path(self, user: UserInfo, path: str) -> bool:
        if "system:masters" in user.groups:
            return True
        allowed = _DISCOVERY if "system:authenticated" in user.groups else _PUBLIC_INFO
        return any(path == p or (p.endswith("*") and path.startswith(p[:-1])) for p in allowed)
