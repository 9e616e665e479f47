"""The resource types the stand-in API server serves, with the facts discovery and the handlers
need about each (what `kube-apiserver` would publish for them in /api/v1 and /apis/<g>/<v>)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Field selectors a real API server accepts per resource (pkg/registry/*/strategy.go
# GetAttrs / the conversion funcs registered with AddFieldLabelConversionFunc). Every resource
# also takes metadata.name and metadata.namespace. Anything else is a 400 "field label not
# supported", as on a real server.
_POD_FIELDS = (
    "spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
    "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName",
)  # fmt: skip


@dataclass(frozen=True)
class Resource:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    has_status: bool = False
    # Served from a CRD on a real cluster: list items keep apiVersion/kind, strategic merge patch
    # is refused (415), updates need a resourceVersion.
    custom: bool = False
    # metadata.generation is set on create and bumped when anything but metadata/status changes
    # (custom resources, apps, policy; the registries whose strategies do it).
    generation: bool = False
    # Only `create` (TokenReview): nothing is stored.
    virtual: bool = False
    field_selectors: tuple[str, ...] = ()
    # A DELETE answers with the object (registry Store.ReturnDeletedObject) or with a Status.
    return_deleted_object: bool = False
    verbs: tuple[str, ...] = (
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    )
    subresources: tuple[str, ...] = field(default=())

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def gv_path(self) -> str:
        """URL prefix of the group/version: /api/v1 or /apis/<group>/<version>."""
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


RESOURCES: tuple[Resource, ...] = (
    Resource("", "v1", "namespaces", "Namespace", False, "namespace", ("ns",), has_status=True,
             field_selectors=("status.phase",), return_deleted_object=True,
             verbs=("create", "delete", "get", "list", "patch", "update", "watch"),
             subresources=("status",)),
    Resource("", "v1", "pods", "Pod", True, "pod", ("po",), ("all",), has_status=True,
             field_selectors=_POD_FIELDS, return_deleted_object=True, subresources=("status",)),
    Resource("", "v1", "nodes", "Node", False, "node", ("no",), has_status=True,
             field_selectors=("spec.unschedulable",), return_deleted_object=True, subresources=("status",)),
    Resource("", "v1", "services", "Service", True, "service", ("svc",), ("all",), has_status=True,
             return_deleted_object=True, subresources=("status",),
             verbs=("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")),
    Resource("", "v1", "serviceaccounts", "ServiceAccount", True, "serviceaccount", ("sa",),
             subresources=("token",)),
    Resource("", "v1", "configmaps", "ConfigMap", True, "configmap", ("cm",)),
    Resource("", "v1", "secrets", "Secret", True, "secret", (), field_selectors=("type",)),
    Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True, "endpointslice",
             field_selectors=("addressType",)),
    # What deploy/ needs so `kubectl apply` (client and server dry-run) maps its kinds.
    Resource("apps", "v1", "daemonsets", "DaemonSet", True, "daemonset", ("ds",), ("all",), has_status=True,
             generation=True, subresources=("status",)),
    Resource("apps", "v1", "deployments", "Deployment", True, "deployment", ("deploy",), ("all",),
             has_status=True, generation=True, subresources=("status",)),
    Resource("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True, "poddisruptionbudget",
             ("pdb",), has_status=True, generation=True, subresources=("status",)),
    Resource("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False, "clusterrole"),
    Resource("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False,
             "clusterrolebinding"),
    Resource("rbac.authorization.k8s.io", "v1", "roles", "Role", True, "role"),
    Resource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True, "rolebinding"),
    Resource("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", False, "tokenreview",
             virtual=True, verbs=("create",)),
    Resource("security.istio.io", "v1", "authorizationpolicies", "AuthorizationPolicy", True,
             "authorizationpolicy", ("ap",), ("istio-io", "security-istio-io"), has_status=True,
             custom=True, generation=True, return_deleted_object=True, subresources=("status",)),
    Resource("security.istio.io", "v1", "peerauthentications", "PeerAuthentication", True,
             "peerauthentication", ("pa",), ("istio-io", "security-istio-io"), has_status=True,
             custom=True, generation=True, return_deleted_object=True, subresources=("status",)),
    Resource("security.istio.io", "v1", "requestauthentications", "RequestAuthentication", True,
             "requestauthentication", ("ra",), ("istio-io", "security-istio-io"), has_status=True,
             custom=True, generation=True, return_deleted_object=True, subresources=("status",)),
    Resource("gateway.networking.k8s.io", "v1", "gateways", "Gateway", True, "gateway", ("gtw",),
             ("gateway-api",), has_status=True, custom=True, generation=True, return_deleted_object=True,
             subresources=("status",)),
)  # fmt: skip

BY_PATH: dict[tuple[str, str, str], Resource] = {(r.group, r.version, r.plural): r for r in RESOURCES}
BY_KIND: dict[tuple[str, str], Resource] = {(r.api_version, r.kind): r for r in RESOURCES}


def group_versions() -> dict[str, list[str]]:
    """group -> its versions (one each here, the preferred one first)."""
    out: dict[str, list[str]] = {}
    for r in RESOURCES:
        out.setdefault(r.group, [])
        if r.version not in out[r.group]:
            out[r.group].append(r.version)
    return out
