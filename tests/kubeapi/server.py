"""A stand-in Kubernetes API server for tests: the real wire protocol (JSON over HTTPS, bearer
tokens, legacy discovery, OpenAPI v3, list/watch with resourceVersion semantics, bookmarks, 410
Expired, continue tokens, status subresources, PATCH types, Status errors, TokenRequest and
TokenReview), driven by real `kubectl` and a real client library in tests/kubeapi.

It stands in for kube-apiserver only where one cannot run: every behaviour here is the real
server's (see the API conventions and API concepts documents), so code tested against it runs
against a real cluster. What it leaves out (admission beyond the service account check,
controllers other than the namespace, service-account and EndpointSlice ones, protobuf, HTTP/2,
server-side apply, aggregated discovery) is listed in tests/kubeapi/README.md."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import datetime
import ipaddress
import json
import random
import re
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from aiohttp import web

from . import auth, openapi, patch, rbac
from .resources import BY_KIND, BY_PATH, RESOURCES, Resource, group_versions
from .selectors import (
    SelectorError,
    fields_match,
    labels_match,
    parse_field_selector,
    parse_label_selector,
)  # fmt: skip
from .store import Event, Expired, Store, object_key

SERVER_VERSION = {
    "major": "1", "minor": "32", "gitVersion": "v1.32.4", "gitCommit": "ztagent-kubeapi",
    "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23.8",
    "compiler": "gc", "platform": "linux/amd64",
}  # fmt: skip

_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # apimachinery's utilrand alphabet (no vowels)
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class ApiError(Exception):
    """A Status response."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
        list_meta: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details, self.list_meta, self.headers = details, list_meta, headers or {}

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": dict(self.list_meta or {}),
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.reason == "":
            del out["reason"]
        if self.details:
            out["details"] = self.details
        return out


def _details(res: Resource, name: str) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "kind": res.plural}
    if res.group:
        d["group"] = res.group
    return d


def not_found(res: Resource, name: str) -> ApiError:
    qual = f"{res.plural}.{res.group}" if res.group else res.plural
    return ApiError(404, "NotFound", f'{qual} "{name}" not found', _details(res, name))


def conflict(res: Resource, name: str) -> ApiError:
    qual = f"{res.plural}.{res.group}" if res.group else res.plural
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {qual} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again",
        _details(res, name),
    )


def invalid(res: Resource, name: str, causes: list[tuple[str, str, str]]) -> ApiError:
    """422 with field causes: (field, reason type, message)."""
    msgs = "; ".join(f"{f}: {m}" for f, _, m in causes)
    qual = f"{res.kind}.{res.group}" if res.group else res.kind
    d = _details(res, name)
    d["causes"] = [{"reason": r, "message": m, "field": f} for f, r, m in causes]
    return ApiError(422, "Invalid", f'{qual} "{name}" is invalid: {msgs}', d)


@dataclass
class Faults:
    """Test hooks for the failures a real API server shows."""

    delay: float = 0.0  # seconds added before every API response
    # (status code, reason) answered to the next N API requests, e.g. (429, "TooManyRequests").
    fail_next: list[tuple[int, str]] = field(default_factory=list)
    # Drop each watch connection after it has sent this many events (None: never).
    drop_watch_after_events: int | None = None


@dataclass(eq=False)  # identity: kept in a set of open watches
class _Watch:
    res: Resource
    namespace: str | None
    labels: list[Any]
    fields: list[Any]
    queue: asyncio.Queue[tuple[str, Any]]
    rv: int  # events at or below this revision are not delivered


def _now_rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(int(t), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_rfc3339(s: str) -> float:
    return datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC).timestamp()


def _bool_param(q: Any, name: str) -> bool:
    return str(q.get(name, "")).lower() in ("1", "true")


class KubeApiServer:
    def __init__(
        self,
        *,
        history: int = 10_000,
        bookmark_interval: float = 60.0,
        watch_timeout: float = 1800.0,
        clock: Callable[[], float] = time.time,
        too_large_rv_wait: float = 3.0,
        endpointslice_controller: bool = True,
        authorization: bool = True,
    ) -> None:
        self.store = Store(history)
        self.store.listeners.append(self._dispatch)
        if endpointslice_controller:
            from .controllers import EndpointSliceController

            self.store.listeners.append(EndpointSliceController(self).on_event)
        self.bookmark_interval = bookmark_interval
        self.watch_timeout = watch_timeout
        self.too_large_rv_wait = too_large_rv_wait
        self.clock = clock
        self.auth = auth.Authenticator(clock)
        self.rbac = rbac.Authorizer(self._rbac_objects) if authorization else None
        self.faults = Faults()
        self._watches: set[_Watch] = set()
        self._svc_ips = (ipaddress.ip_address("10.96.0.1") + i for i in range(1, 1 << 16))
        self.requests: list[tuple[str, str]] = []  # (method, path_qs) of every API request, for tests
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.create(self.res("v1", "Namespace"), None, {"metadata": {"name": ns}})
        self.create(
            self.res("v1", "Service"),
            "default",
            {
                "metadata": {
                    "name": "kubernetes",
                    "labels": {"component": "apiserver", "provider": "kubernetes"},
                },
                "spec": {
                    "clusterIP": "10.96.0.1",
                    "ports": [{"name": "https", "port": 443, "targetPort": 6443}],
                },
            },
        )

    # --- helpers for tests ---------------------------------------------------------------------

    @staticmethod
    def res(api_version: str, kind: str) -> Resource:
        return BY_KIND[(api_version, kind)]

    def add_token(self, token: str, username: str, groups: tuple[str, ...] = ("system:masters",)) -> None:
        self.auth.add_static_token(token, auth.UserInfo(username, groups=[*groups, "system:authenticated"]))

    def issue_token(
        self,
        namespace: str,
        service_account: str,
        audiences: list[str],
        *,
        pod: str | None = None,
        expiration_seconds: int = 3600,
    ) -> str:
        """What the kubelet does for a projected token volume (a TokenRequest bound to a pod)."""
        body: dict[str, Any] = {"spec": {"audiences": audiences, "expirationSeconds": expiration_seconds}}
        if pod is not None:
            body["spec"]["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": pod}
        out = self._token_request(namespace, service_account, body)
        return str(out["status"]["token"])

    def compact(self) -> None:
        """Forgets all history: every older resourceVersion and continue token is now 410."""
        self.store.compact()

    def drop_watches(self) -> int:
        """Cuts every open watch connection mid-stream (no terminating chunk)."""
        for w in list(self._watches):
            w.queue.put_nowait(("drop", None))
        return len(self._watches)

    def expire_watches(self) -> int:
        """Ends every open watch with an ERROR event carrying a 410 Expired Status, as a watch
        served from etcd ends when its revision is compacted."""
        n = 0
        for w in list(self._watches):
            w.queue.put_nowait(("expire", None))
            n += 1
        return n

    @property
    def open_watches(self) -> int:
        return len(self._watches)

    # --- storage operations (also used in-process by tests) -------------------------------------

    def _get(self, res: Resource, ns: str | None, name: str) -> dict[str, Any]:
        obj = self.store.get(res, object_key(ns, name))
        if obj is None:
            raise not_found(res, name)
        return obj

    def _lookup(self, plural: str, ns: str, name: str) -> dict[str, Any] | None:
        obj = self.store.get(BY_PATH[("", "v1", plural)], object_key(ns, name))
        if obj is None:
            return None
        dt = obj["metadata"].get("deletionTimestamp")
        if dt and _parse_rfc3339(dt) <= self.clock():
            return None
        return obj

    def _check_type(self, res: Resource, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the request body must be a JSON object")
        av, kind = body.get("apiVersion"), body.get("kind")
        if av is not None and av != res.api_version:
            raise ApiError(
                400,
                "BadRequest",
                f"the API version in the data ({av}) does not match the expected "
                f"API version ({res.api_version})",
            )
        if kind is not None and kind != res.kind:
            raise ApiError(
                400,
                "BadRequest",
                f"the kind in the data ({kind}) does not match the expected kind ({res.kind})",
            )
        obj: dict[str, Any] = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        if not isinstance(obj.get("metadata", {}), dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        obj.setdefault("metadata", {})
        return obj

    def _validate_fields(self, res: Resource, body: dict[str, Any], directive: str) -> list[str]:
        """fieldValidation: Strict -> 400 on unknown fields, Warn (the default) -> warnings,
        Ignore -> silently dropped. Unknown fields are dropped in every case."""
        if directive not in ("Strict", "Warn", "Ignore"):
            raise ApiError(400, "BadRequest", f"fieldValidation invalid value: {directive!r}")
        unknown = openapi.unknown_fields(body, openapi.schema_for(res.api_version, res.kind), prune=True)
        if not unknown or directive == "Ignore":
            return []
        msgs = [f'unknown field "{u.lstrip(".")}"' for u in unknown]
        if directive == "Strict":
            qual = f"{res.kind}.{res.group}" if res.group else res.kind
            raise ApiError(
                400,
                "BadRequest",
                f'{qual} in version "{res.version}" cannot be handled as a '
                f"{res.kind}: strict decoding error: {', '.join(msgs)}",
            )
        return msgs

    def _validate_name(self, res: Resource, name: str) -> None:
        pattern = {"namespaces": _DNS1123_LABEL, "services": _DNS1035_LABEL}.get(
            res.plural, _DNS1123_SUBDOMAIN
        )
        if len(name) > (63 if res.plural in ("namespaces", "services") else 253) or not pattern.match(name):
            raise invalid(
                res,
                name,
                [
                    (
                        "metadata.name",
                        "FieldValueInvalid",
                        f'Invalid value: "{name}": a '
                        "lowercase RFC 1123 name must consist of lower case alphanumeric "
                        "characters, '-' or '.'",
                    )
                ],
            )

    def _validate_labels(self, res: Resource, name: str, meta: dict[str, Any]) -> None:
        labels = meta.get("labels") or {}
        if not isinstance(labels, dict):
            raise invalid(res, name, [("metadata.labels", "FieldValueInvalid", "must be a map of strings")])
        try:
            from .selectors import _check_key, _check_value

            for k, v in labels.items():
                _check_key(k)
                if not isinstance(v, str):
                    raise SelectorError(f"label value for {k} must be a string")
                _check_value(v)
        except SelectorError as e:
            raise invalid(res, name, [("metadata.labels", "FieldValueInvalid", str(e))]) from None

    def _validate_kind(self, res: Resource, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        spec = obj.get("spec") or {}
        if res.plural == "pods":
            containers = spec.get("containers")
            if not containers:
                raise invalid(res, name, [("spec.containers", "FieldValueRequired", "Required value")])
            for i, c in enumerate(containers):
                if not c.get("name"):
                    raise invalid(
                        res, name, [(f"spec.containers[{i}].name", "FieldValueRequired", "Required value")]
                    )
                if not c.get("image"):
                    raise invalid(
                        res, name, [(f"spec.containers[{i}].image", "FieldValueRequired", "Required value")]
                    )
        elif res.plural == "services":
            if not spec.get("ports") and spec.get("clusterIP") != "None":
                raise invalid(res, name, [("spec.ports", "FieldValueRequired", "Required value")])
        elif res.plural == "endpointslices":
            if obj.get("addressType") not in ("IPv4", "IPv6", "FQDN"):
                raise invalid(
                    res,
                    name,
                    [
                        (
                            "addressType",
                            "FieldValueNotSupported",
                            'Unsupported value: supported values: "FQDN", "IPv4", "IPv6"',
                        )
                    ],
                )
        elif res.group == "apps":
            selector = (spec.get("selector") or {}).get("matchLabels") or {}
            template_labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
            if not spec.get("selector"):
                raise invalid(res, name, [("spec.selector", "FieldValueRequired", "Required value")])
            if any(template_labels.get(k) != v for k, v in selector.items()):
                raise invalid(
                    res,
                    name,
                    [
                        (
                            "spec.template.metadata.labels",
                            "FieldValueInvalid",
                            "Invalid value: `selector` does not match template `labels`",
                        )
                    ],
                )
            if not ((spec.get("template") or {}).get("spec") or {}).get("containers"):
                raise invalid(
                    res, name, [("spec.template.spec.containers", "FieldValueRequired", "Required value")]
                )
        elif res.kind == "Gateway" and not spec.get("gatewayClassName"):
            raise invalid(res, name, [("spec.gatewayClassName", "FieldValueRequired", "Required value")])

    def _defaults(self, res: Resource, obj: dict[str, Any]) -> None:
        """Defaulting and the create-time status a real server sets."""
        spec = obj.get("spec")
        if res.plural == "pods":
            assert isinstance(spec, dict)
            spec.setdefault("restartPolicy", "Always")
            spec.setdefault("dnsPolicy", "ClusterFirst")
            spec.setdefault("schedulerName", "default-scheduler")
            spec.setdefault("terminationGracePeriodSeconds", 30)
            spec.setdefault("securityContext", {})
            spec.setdefault("enableServiceLinks", True)
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                image = c.get("image", "")
                tagged = ":" in image.rsplit("/", 1)[-1] or "@" in image
                c.setdefault(
                    "imagePullPolicy",
                    "IfNotPresent" if tagged and not image.endswith(":latest") else "Always",
                )
                c.setdefault("terminationMessagePath", "/dev/termination-log")
                c.setdefault("terminationMessagePolicy", "File")
                c.setdefault("resources", {})
                for p in c.get("ports", []):
                    p.setdefault("protocol", "TCP")
        elif res.plural == "services":
            assert isinstance(spec, dict)
            spec.setdefault("type", "ClusterIP")
            spec.setdefault("sessionAffinity", "None")
            if "clusterIP" not in spec:
                spec["clusterIP"] = str(next(self._svc_ips))
            if spec["clusterIP"] != "None":
                spec.setdefault("clusterIPs", [spec["clusterIP"]])
                spec.setdefault("ipFamilies", ["IPv4"])
                spec.setdefault("ipFamilyPolicy", "SingleStack")
            spec.setdefault("internalTrafficPolicy", "Cluster")
            for p in spec.get("ports", []):
                p.setdefault("protocol", "TCP")
                p.setdefault("targetPort", p.get("port"))
        elif res.plural == "secrets":
            obj.setdefault("type", "Opaque")
            string_data = obj.pop("stringData", None) or {}
            data = obj.setdefault("data", {}) if string_data or obj.get("data") is not None else None
            for k, v in string_data.items():
                assert data is not None
                data[k] = base64.b64encode(str(v).encode()).decode()
            for k, v in (obj.get("data") or {}).items():
                try:
                    base64.b64decode(v, validate=True)
                except (binascii.Error, TypeError):
                    raise invalid(
                        res,
                        obj["metadata"]["name"],
                        [(f"data[{k}]", "FieldValueInvalid", "illegal base64 data")],
                    ) from None

    def _pod_status(self, pod: dict[str, Any]) -> dict[str, Any]:
        containers = pod["spec"].get("containers", [])
        reqs = [c.get("resources") or {} for c in containers]
        if all(not r.get("requests") and not r.get("limits") for r in reqs):
            qos = "BestEffort"
        elif all(
            set(r.get("limits") or {}) >= {"cpu", "memory"}
            and all((r.get("requests") or {}).get(k, v) == v for k, v in (r.get("limits") or {}).items())
            for r in reqs
        ):
            qos = "Guaranteed"
        else:
            qos = "Burstable"
        return {"phase": "Pending", "qosClass": qos}

    def create(
        self,
        res: Resource,
        ns: str | None,
        body: Any,
        *,
        dry_run: bool = False,
        field_validation: str = "Warn",
    ) -> tuple[dict[str, Any], list[str]]:
        if res.virtual:
            raise ApiError(
                405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
            )
        obj = self._check_type(res, body)
        warnings = self._validate_fields(res, obj, field_validation)
        meta = obj["metadata"]
        if res.namespaced:
            if meta.get("namespace") not in (None, "", ns):
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        if meta.get("resourceVersion"):
            raise ApiError(500, "InternalError", "resourceVersion should not be set on objects to be created")
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(random.choice(_NAME_CHARS) for _ in range(5))
            else:
                raise invalid(
                    res,
                    "",
                    [
                        (
                            "metadata.name",
                            "FieldValueRequired",
                            "Required value: name or generateName is required",
                        )
                    ],
                )
        name = meta["name"]
        self._validate_name(res, name)
        self._validate_labels(res, name, meta)
        self._validate_kind(res, obj)
        if res.namespaced:
            namespace = self.store.get(BY_PATH[("", "v1", "namespaces")], str(ns))
            if namespace is None:
                raise ApiError(
                    404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"}
                )
            if namespace["metadata"].get("deletionTimestamp"):
                raise ApiError(
                    403,
                    "Forbidden",
                    f"unable to create new content in namespace {ns} because it is being terminated",
                    _details(res, name),
                )
        key = object_key(ns if res.namespaced else None, name)
        if self.store.get(res, key) is not None:
            qual = f"{res.plural}.{res.group}" if res.group else res.plural
            raise ApiError(409, "AlreadyExists", f'{qual} "{name}" already exists', _details(res, name))
        for f in ("deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"):
            meta.pop(f, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now_rfc3339(self.clock())
        if res.generation:
            meta["generation"] = 1
        self._defaults(res, obj)
        if res.plural == "pods":
            spec = obj["spec"]
            sa_name = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
            spec["serviceAccountName"] = spec["serviceAccount"] = sa_name
            if self.store.get(BY_PATH[("", "v1", "serviceaccounts")], object_key(ns, sa_name)) is None:
                raise ApiError(
                    403,
                    "Forbidden",
                    f'pods "{name}" is forbidden: error looking up service account '
                    f'{ns}/{sa_name}: serviceaccount "{sa_name}" not found',
                    _details(res, name),
                )
            obj["status"] = self._pod_status(obj)
        elif res.plural == "namespaces":
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = name
            obj["spec"] = {"finalizers": ["kubernetes"]}
            obj["status"] = {"phase": "Active"}
        elif res.plural == "services":
            obj["status"] = {"loadBalancer": {}}
        elif res.has_status and res.plural != "nodes":
            obj.pop("status", None)  # the status subresource owns it
        if dry_run:
            return obj, warnings
        ev = self.store.put(res, key, obj)
        if res.plural == "namespaces":
            # The service-account controller's job on a real cluster: every namespace gets "default".
            self.create(BY_PATH[("", "v1", "serviceaccounts")], name, {"metadata": {"name": "default"}})
        return ev.obj, warnings

    def update(
        self,
        res: Resource,
        ns: str | None,
        name: str,
        body: Any,
        *,
        subresource: str = "",
        dry_run: bool = False,
        field_validation: str = "Warn",
    ) -> tuple[dict[str, Any], list[str]]:
        old = self._get(res, ns, name)
        obj = self._check_type(res, body)
        warnings = self._validate_fields(res, obj, field_validation)
        meta = obj["metadata"]
        if meta.get("name", name) != name:
            raise ApiError(
                400,
                "BadRequest",
                f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})",
            )
        if res.namespaced and meta.get("namespace") not in (None, "", ns):
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        rv = meta.get("resourceVersion")
        if rv:
            if rv != old["metadata"]["resourceVersion"]:
                raise conflict(res, name)
        elif res.custom:
            raise invalid(
                res,
                name,
                [
                    (
                        "metadata.resourceVersion",
                        "FieldValueInvalid",
                        "Invalid value: 0x0: must be specified for an update",
                    )
                ],
            )
        if subresource == "status":
            # ResetObjectMetaForStatus: a status write changes status only.
            new = copy.deepcopy(old)
            new["status"] = obj.get("status")
            if new["status"] is None:
                new.pop("status")
        else:
            new = obj
            nm = new["metadata"]
            om = old["metadata"]
            for f in (
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ):
                if f in om:
                    nm[f] = om[f]
                else:
                    nm.pop(f, None)
            nm["name"] = name
            if res.namespaced:
                nm["namespace"] = ns
            if res.has_status:
                if "status" in old:
                    new["status"] = old["status"]
                else:
                    new.pop("status", None)
            self._validate_labels(res, name, nm)
            self._validate_kind(res, new)
            self._defaults(res, new)
            if res.plural == "pods":
                self._check_pod_update(res, name, old, new)
            if res.plural == "services" and new["spec"].get("clusterIP") != old["spec"].get("clusterIP"):
                raise invalid(
                    res,
                    name,
                    [("spec.clusterIPs[0]", "FieldValueInvalid", "Invalid value: field is immutable")],
                )
            if res.plural == "namespaces":
                new["spec"] = old["spec"]
                nm.setdefault("labels", {})["kubernetes.io/metadata.name"] = name
            if res.generation and _without_meta(new) != _without_meta(old):
                nm["generation"] = om.get("generation", 1) + 1
        new["metadata"].pop("resourceVersion", None)
        if _same(new, old):
            return old, warnings  # a no-op write keeps the resourceVersion and emits no event
        if dry_run:
            return new, warnings
        key = object_key(ns if res.namespaced else None, name)
        if (
            new["metadata"].get("deletionTimestamp")
            and not new["metadata"].get("finalizers")
            and res.plural not in ("pods", "namespaces")
        ):
            # The last finalizer is gone: the deletion completes (pods wait for the kubelet,
            # namespaces for the namespace controller).
            self.store.put(res, key, new)
            return self.store.delete(res, key).obj, warnings
        return self.store.put(res, key, new).obj, warnings

    def _check_pod_update(self, res: Resource, name: str, old: dict[str, Any], new: dict[str, Any]) -> None:
        def mutable_stripped(spec: dict[str, Any]) -> dict[str, Any]:
            s = copy.deepcopy(spec)
            for key in ("containers", "initContainers"):
                for c in s.get(key, []):
                    c.pop("image", None)
            for key in ("activeDeadlineSeconds", "terminationGracePeriodSeconds"):
                s.pop(key, None)
            return s

        old_spec, new_spec = old["spec"], new["spec"]
        tol_old = old_spec.get("tolerations") or []
        tol_new = new_spec.get("tolerations") or []
        if not all(t in tol_new for t in tol_old):
            raise invalid(
                res,
                name,
                [
                    (
                        "spec.tolerations",
                        "FieldValueForbidden",
                        "Forbidden: existing toleration can not be modified except its tolerationSeconds",
                    )
                ],
            )
        a, b = mutable_stripped(old_spec), mutable_stripped(new_spec)
        a.pop("tolerations", None)
        b.pop("tolerations", None)
        if a != b:
            raise invalid(
                res,
                name,
                [
                    (
                        "spec",
                        "FieldValueForbidden",
                        "Forbidden: pod updates may not change "
                        "fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,"
                        "`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to "
                        "existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to "
                        "be set to 1 if it was previously negative)",
                    )
                ],
            )

    def patch(
        self,
        res: Resource,
        ns: str | None,
        name: str,
        content_type: str,
        body: bytes,
        *,
        subresource: str = "",
        dry_run: bool = False,
        field_validation: str = "Warn",
    ) -> tuple[dict[str, Any], list[str]]:
        old = self._get(res, ns, name)
        ct = content_type.split(";")[0].strip()
        accepted = ["application/json-patch+json", "application/merge-patch+json"]
        if not res.custom:
            accepted.append("application/strategic-merge-patch+json")
        if ct not in accepted:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - "
                f"accepted media types include: {', '.join(accepted)}",
            )
        try:
            doc = json.loads(body or b"null")
        except ValueError as e:
            raise ApiError(400, "BadRequest", f"error decoding patch: {e}") from None
        current = copy.deepcopy(old)
        try:
            if ct == "application/merge-patch+json":
                if not isinstance(doc, dict):
                    raise patch.PatchError("merge patch must be a JSON object")
                patched = patch.merge_patch(current, doc)
            elif ct == "application/json-patch+json":
                patched = patch.json_patch(current, doc)
            else:
                patched = patch.strategic_merge_patch(current, doc, res.api_version, res.kind)
        except patch.PatchError as e:
            raise ApiError(
                422 if ct == "application/json-patch+json" else 400,
                "Invalid" if ct == "application/json-patch+json" else "BadRequest",
                str(e),
            ) from None
        if not isinstance(patched, dict):
            raise ApiError(400, "BadRequest", "the patched object is not a JSON object")
        md = patched.setdefault("metadata", {})
        # A patch may carry a resourceVersion precondition; without one it applies to the current object.
        if not md.get("resourceVersion"):
            md["resourceVersion"] = old["metadata"]["resourceVersion"]
        return self.update(
            res,
            ns,
            name,
            patched,
            subresource=subresource,
            dry_run=dry_run,
            field_validation=field_validation,
        )

    def delete(
        self, res: Resource, ns: str | None, name: str, options: dict[str, Any], *, dry_run: bool = False
    ) -> tuple[dict[str, Any], bool]:
        """Returns (object or Status, deleted now)."""
        obj = self._get(res, ns, name)
        key = object_key(ns if res.namespaced else None, name)
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != obj["metadata"]["uid"]:
            raise ApiError(
                409,
                "Conflict",
                f"Precondition failed: UID in precondition: {pre['uid']}, UID in "
                f"object meta: {obj['metadata']['uid']}",
                _details(res, name),
            )
        if pre.get("resourceVersion") and pre["resourceVersion"] != obj["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f"Precondition failed: ResourceVersion in precondition: "
                f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                f"{obj['metadata']['resourceVersion']}",
                _details(res, name),
            )
        if dry_run:
            return obj, False
        now = self.clock()
        meta = obj["metadata"]
        grace = options.get("gracePeriodSeconds")
        if res.plural == "pods":
            spec_grace = obj["spec"].get("terminationGracePeriodSeconds", 30)
            grace = spec_grace if grace is None else int(grace)
            terminal = (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            if obj["spec"].get("nodeName") and grace > 0 and not terminal:
                # Graceful deletion: the kubelet stops the pod, then deletes it with grace 0.
                deadline = now + grace
                current = meta.get("deletionTimestamp")
                if current is None or _parse_rfc3339(current) > deadline:
                    new = copy.deepcopy(obj)
                    new["metadata"]["deletionTimestamp"] = _now_rfc3339(deadline)
                    new["metadata"]["deletionGracePeriodSeconds"] = grace
                    new["metadata"].pop("resourceVersion", None)
                    obj = self.store.put(res, key, new).obj
                return obj, False
        if res.plural == "namespaces":
            if not meta.get("deletionTimestamp"):
                new = copy.deepcopy(obj)
                new["metadata"]["deletionTimestamp"] = _now_rfc3339(now)
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                new["status"] = {"phase": "Terminating"}
                obj = self.store.put(res, key, new).obj
                asyncio.get_event_loop().call_soon(self._finish_namespace, name)
            return obj, False
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                new = copy.deepcopy(obj)
                new["metadata"]["deletionTimestamp"] = _now_rfc3339(now)
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                obj = self.store.put(res, key, new).obj
            return obj, False
        ev = self.store.delete(res, key)
        if res.return_deleted_object:
            return ev.obj, True
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {**_details(res, name), "uid": meta["uid"]},
        }, True

    def _finish_namespace(self, name: str) -> None:
        """The namespace controller: deletes the namespace's content, then the namespace."""
        for res in RESOURCES:
            if not res.namespaced or res.virtual:
                continue
            for obj in list(self.store.scan(res, self.store.rv, prefix=name + "/")):
                self.store.delete(res, object_key(name, obj["metadata"]["name"]))
        ns_res = BY_PATH[("", "v1", "namespaces")]
        if self.store.get(ns_res, name) is not None:
            self.store.delete(ns_res, name)

    def _token_request(self, ns: str, sa_name: str, body: Any) -> dict[str, Any]:
        sa_res = BY_PATH[("", "v1", "serviceaccounts")]
        sa = self._get(sa_res, ns, sa_name)
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the request body must be a TokenRequest")
        spec = body.get("spec") or {}
        audiences = spec.get("audiences") or [auth.API_AUDIENCE]
        exp = int(spec.get("expirationSeconds") or 3600)
        if exp < 600:
            raise ApiError(
                422,
                "Invalid",
                'TokenRequest.authentication.k8s.io "" is invalid: '
                "spec.expirationSeconds: Invalid value: may not specify a duration less than 10 minutes",
            )
        pod = node = None
        ref = spec.get("boundObjectRef")
        if ref:
            if ref.get("kind") != "Pod":
                raise ApiError(400, "BadRequest", f"cannot bind token to object of type {ref.get('kind')}")
            pod = self._get(BY_PATH[("", "v1", "pods")], ns, ref.get("name", ""))
            if ref.get("uid") and ref["uid"] != pod["metadata"]["uid"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f"the UID in the bound object reference ({ref['uid']}) does not "
                    f"match the UID in record. The object might have been deleted and then recreated",
                )
            if pod["spec"].get("serviceAccountName") != sa_name:
                raise ApiError(
                    400,
                    "BadRequest",
                    f'cannot bind token for serviceaccount "{sa_name}" to pod '
                    "running with different serviceaccount name.",
                )
            node_name = pod["spec"].get("nodeName")
            if node_name:
                node = self.store.get(BY_PATH[("", "v1", "nodes")], node_name)
        token, expiry = self.auth.issue(
            namespace=ns, service_account=sa, audiences=audiences, expiration_seconds=exp, pod=pod, node=node
        )
        return {
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": sa_name, "namespace": ns, "creationTimestamp": None},
            "spec": {
                "audiences": audiences,
                "expirationSeconds": exp,
                "boundObjectRef": ref if ref else None,
            },
            "status": {"token": token, "expirationTimestamp": _now_rfc3339(expiry)},
        }

    def _token_review(self, body: Any) -> dict[str, Any]:
        res = BY_PATH[("authentication.k8s.io", "v1", "tokenreviews")]
        obj = self._check_type(res, body)
        spec = obj.get("spec") or {}
        if not spec.get("token"):
            raise invalid(res, "", [("spec.token", "FieldValueRequired", "Required value")])
        audiences = spec.get("audiences") or [auth.API_AUDIENCE]
        try:
            user, valid = self.auth.authenticate(spec["token"], audiences, self._lookup)
            status: dict[str, Any] = {"authenticated": True, "user": user.to_json(), "audiences": valid}
        except auth.AuthError as e:
            status = {"user": {}, "error": str(e)}
        return {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }

    # --- watch fan-out -------------------------------------------------------------------------

    def _dispatch(self, ev: Event) -> None:
        for w in list(self._watches):
            if w.res is ev.resource and ev.rv > w.rv:
                out = self._convert(w, ev)
                if out is not None:
                    w.queue.put_nowait(("event", out))

    def _passes(self, w: _Watch, obj: dict[str, Any] | None) -> bool:
        if obj is None:
            return False
        if w.namespace is not None and obj["metadata"].get("namespace") != w.namespace:
            return False
        return labels_match(w.labels, obj["metadata"].get("labels")) and fields_match(w.fields, obj)

    def _convert(self, w: _Watch, ev: Event) -> tuple[str, dict[str, Any]] | None:
        """The watch cache's view through a selector: entering it is ADDED, leaving it is DELETED
        (with the previous state at the new revision)."""
        cur = None if ev.type == "DELETED" else ev.obj
        prev = ev.prev
        cur_ok, prev_ok = self._passes(w, cur), self._passes(w, prev)
        if ev.type == "DELETED":
            return ("DELETED", ev.obj) if prev_ok else None
        if cur_ok and prev_ok:
            return "MODIFIED", ev.obj
        if cur_ok:
            return "ADDED", ev.obj
        if prev_ok and prev is not None:
            gone = copy.deepcopy(prev)
            gone["metadata"]["resourceVersion"] = str(ev.rv)
            return "DELETED", gone
        return None

    # --- HTTP ----------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=16 << 20)
        app.router.add_route("*", "/{tail:.*}", self._route)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except ApiError as e:
            return _json_response(e.status(), status=e.code, headers=e.headers)

    _PUBLIC = ("/version", "/healthz", "/livez", "/readyz")

    def _authenticate(self, request: web.Request) -> auth.UserInfo:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            try:
                user, _ = self.auth.authenticate(header[7:].strip(), [auth.API_AUDIENCE], self._lookup)
                return user
            except auth.AuthError:
                pass
        if request.path in self._PUBLIC or request.path.startswith(self._PUBLIC):
            return auth.UserInfo("system:anonymous", groups=["system:unauthenticated"])
        raise ApiError(401, "Unauthorized", "Unauthorized")

    def _rbac_objects(self, kind: str) -> list[dict[str, Any]]:
        res = BY_KIND[("rbac.authorization.k8s.io/v1", kind)]
        return list(self.store.scan(res, self.store.rv))

    async def _route(self, request: web.Request) -> web.StreamResponse:
        user = self._authenticate(request)
        path = request.path.rstrip("/") or "/"
        parts_ = [p for p in path.split("/") if p]
        is_resource = len(parts_) >= 3 and (parts_[0] == "api" or (parts_[0] == "apis" and len(parts_) >= 4))
        if self.rbac is not None and not is_resource and not self.rbac.allowed_path(user, path):
            raise ApiError(403, "Forbidden", f'forbidden: User "{user.username}" cannot get path "{path}"')
        if path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        if path == "/version":
            return _json_response(SERVER_VERSION)
        if path.startswith("/openapi/"):
            return self._openapi(request, path)
        self.requests.append((request.method, request.path_qs))
        if self.faults.delay:
            await asyncio.sleep(self.faults.delay)
        if self.faults.fail_next:
            code, reason = self.faults.fail_next.pop(0)
            headers = {"Retry-After": "1"} if code == 429 else {}
            raise ApiError(code, reason, f"injected failure: {reason}", headers=headers)
        parts = [p for p in path.split("/") if p]
        if parts == ["api"]:
            return _json_response(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": request.host}
                    ],
                }
            )
        if parts == ["apis"]:
            return _json_response(self._group_list())
        if parts[:1] == ["api"] and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 2:
            if len(parts) == 2:
                g = next((x for x in self._group_list()["groups"] if x["name"] == parts[1]), None)
                if g is None:
                    raise ApiError(404, "NotFound", "the server could not find the requested resource")
                return _json_response({"kind": "APIGroup", "apiVersion": "v1", **g})
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if version not in group_versions().get(group, []):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            return _json_response(self._resource_list(group, version))
        return await self._resource_request(request, user, group, version, rest)

    def _group_list(self) -> dict[str, Any]:
        groups = []
        for g, versions in group_versions().items():
            if not g:
                continue
            vs = [{"groupVersion": f"{g}/{v}", "version": v} for v in versions]
            groups.append({"name": g, "versions": vs, "preferredVersion": vs[0]})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    def _resource_list(self, group: str, version: str) -> dict[str, Any]:
        out = []
        for r in RESOURCES:
            if r.group != group or r.version != version:
                continue
            entry: dict[str, Any] = {
                "name": r.plural,
                "singularName": r.singular,
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": list(r.verbs),
            }
            if r.short_names:
                entry["shortNames"] = list(r.short_names)
            if r.categories:
                entry["categories"] = list(r.categories)
            entry["storageVersionHash"] = base64.b64encode(r.plural.encode()).decode()[:11]
            out.append(entry)
            for sub in r.subresources:
                kind = "TokenRequest" if sub == "token" else r.kind
                verbs = ["create"] if sub == "token" else ["get", "patch", "update"]
                sub_entry = {
                    "name": f"{r.plural}/{sub}",
                    "singularName": "",
                    "namespaced": r.namespaced,
                    "kind": kind,
                    "verbs": verbs,
                }
                if sub == "token":
                    sub_entry.update(group="authentication.k8s.io", version="v1")
                out.append(sub_entry)
        gv = f"{group}/{version}" if group else version
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}

    def _openapi(self, request: web.Request, path: str) -> web.StreamResponse:
        if path == "/openapi/v3":
            return _json_response(openapi.root_document())
        if path.startswith("/openapi/v3/"):
            gv = path.removeprefix("/openapi/v3/")
            try:
                body = openapi.gv_document_bytes(gv)
            except KeyError:
                raise ApiError(404, "NotFound", "the server could not find the requested resource") from None
            return web.Response(
                body=body,
                content_type="application/json",
                headers={"Cache-Control": "public, immutable", "Etag": f'"{openapi.gv_hash(gv)}"'},
            )
        # /openapi/v2 is served by real servers as protobuf; we serve v3 only, which kubectl prefers.
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    async def _resource_request(
        self, request: web.Request, user: auth.UserInfo, group: str, version: str, rest: list[str]
    ) -> web.StreamResponse:
        ns: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        res = BY_PATH.get((group, version, rest[0]))
        if res is None or len(rest) > 3 or (ns is not None and not res.namespaced):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) >= 2 else None
        sub = rest[2] if len(rest) == 3 else ""
        if sub and sub not in res.subresources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        q = request.query
        method = request.method
        if self.rbac is not None:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                    "DELETE": "delete" if name else "deletecollection"}.get(method)  # fmt: skip
            if method == "GET":
                verb = "watch" if _bool_param(q, "watch") else ("get" if name else "list")
            if verb is None:
                raise ApiError(
                    405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
                )
            attrs = rbac.Attributes(verb, group, res.plural, sub, ns or "", name or "")
            if not self.rbac.allowed(user, attrs):
                raise ApiError(403, "Forbidden", attrs.describe(user), _details(res, name or ""))
        dry_run = q.get("dryRun") == "All"
        fv = q.get("fieldValidation", "Warn")
        scope_ns = ns if res.namespaced else None
        if res.virtual:
            if method != "POST" or name:
                raise ApiError(
                    405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
                )
            return _json_response(self._token_review(await _json_body(request)), status=201)
        if res.namespaced and ns is None and method not in ("GET",):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if name is None:
            if method == "GET":
                if _bool_param(q, "watch"):
                    return await self._watch(request, res, scope_ns)
                return self._respond(request, res, self._list(res, scope_ns, q))
            if method == "POST":
                obj, warnings = self.create(
                    res, scope_ns, await _json_body(request), dry_run=dry_run, field_validation=fv
                )
                return self._respond(request, res, obj, 201, warnings)
            if method == "DELETE":
                return self._respond(request, res, await self._delete_collection(request, res, scope_ns))
            raise ApiError(
                405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
            )
        if sub == "token":
            if method != "POST":
                raise ApiError(
                    405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
                )
            return _json_response(self._token_request(str(ns), name, await _json_body(request)), status=201)
        if method == "GET":
            obj = self._get(res, scope_ns, name)
            await self._wait_rv(q.get("resourceVersion", ""))
            return self._respond(request, res, obj)
        if method == "PUT":
            obj, warnings = self.update(
                res,
                scope_ns,
                name,
                await _json_body(request),
                subresource=sub,
                dry_run=dry_run,
                field_validation=fv,
            )
            return self._respond(request, res, obj, 200, warnings)
        if method == "PATCH":
            obj, warnings = self.patch(
                res,
                scope_ns,
                name,
                request.headers.get("Content-Type", ""),
                await request.read(),
                subresource=sub,
                dry_run=dry_run,
                field_validation=fv,
            )
            return self._respond(request, res, obj, 200, warnings)
        if method == "DELETE" and not sub:
            options = await _json_body(request, allow_empty=True) or {}
            if "gracePeriodSeconds" in q:
                options["gracePeriodSeconds"] = int(q["gracePeriodSeconds"])
            out, _ = self.delete(res, scope_ns, name, options, dry_run=dry_run)
            return self._respond(request, res, out)
        raise ApiError(
            405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
        )

    async def _delete_collection(self, request: web.Request, res: Resource, ns: str | None) -> dict[str, Any]:
        if "deletecollection" not in res.verbs:
            raise ApiError(
                405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
            )
        options = await _json_body(request, allow_empty=True) or {}
        lst = self._list(res, ns, request.query)
        for item in lst["items"]:
            with contextlib.suppress(ApiError):
                self.delete(res, item["metadata"].get("namespace"), item["metadata"]["name"], options)
        return {"kind": res.list_kind, "apiVersion": res.api_version, "metadata": {}, "items": []}

    async def _wait_rv(self, rv_param: str) -> None:
        """NotOlderThan semantics for a revision the server has not reached: wait a little, then
        504 "Too large resource version", as the watch cache does."""
        if rv_param in ("", "0"):
            return
        rv = _parse_rv(rv_param)
        deadline = time.monotonic() + self.too_large_rv_wait
        while self.store.rv < rv:
            if time.monotonic() >= deadline:
                raise ApiError(
                    504,
                    "Timeout",
                    f"Too large resource version: {rv}, current: {self.store.rv}",
                    {
                        "causes": [
                            {"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}
                        ],
                        "retryAfterSeconds": 1,
                    },
                )
            await asyncio.sleep(0.05)

    def _selectors(self, res: Resource, q: Any) -> tuple[list[Any], list[Any]]:
        try:
            labels = parse_label_selector(q.get("labelSelector", ""))
            fields = parse_field_selector(q.get("fieldSelector", ""), res.field_selectors)
        except SelectorError as e:
            raise ApiError(400, "BadRequest", str(e)) from None
        return labels, fields

    def _list(self, res: Resource, ns: str | None, q: Any) -> dict[str, Any]:
        labels, fields = self._selectors(res, q)
        limit = int(q.get("limit") or 0)
        cont = q.get("continue", "")
        rv_param = q.get("resourceVersion", "")
        match = q.get("resourceVersionMatch", "")
        if match and not rv_param:
            raise ApiError(
                422,
                "Invalid",
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden "
                "unless resourceVersion is provided",
            )
        if match not in ("", "Exact", "NotOlderThan"):
            raise ApiError(422, "Invalid", f"resourceVersionMatch: Unsupported value: {match!r}")
        start = ""
        if cont:
            if rv_param:
                raise ApiError(
                    400, "BadRequest", "specifying resource version is not allowed when using continue"
                )
            read_rv, start = _decode_continue(cont)
            try:
                self.store.check_rv(read_rv)
            except Expired:
                inconsistent = _encode_continue(-1, start)
                raise ApiError(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a "
                    "consistent list result. You can start a new list without the continue parameter, "
                    "or use the continue token in this response to retrieve the remainder of the "
                    "results. Continuing with the provided token results in an inconsistent list - "
                    "objects that were created, modified, or deleted between the time the first chunk "
                    "was returned and now may show up in the list.",
                    list_meta={"continue": inconsistent},
                ) from None
            if read_rv == -1:
                read_rv = self.store.rv
        elif rv_param in ("", "0"):
            if match == "Exact":
                raise ApiError(
                    422,
                    "Invalid",
                    'resourceVersionMatch: Forbidden: resourceVersionMatch "exact" '
                    'is forbidden for resourceVersion "0"',
                )
            read_rv = self.store.rv
        else:
            rv = _parse_rv(rv_param)
            if match == "Exact" or (not match and limit > 0):  # limit + rv without match: legacy exact
                if rv > self.store.rv:
                    raise ApiError(
                        504,
                        "Timeout",
                        f"Too large resource version: {rv}, current: {self.store.rv}",
                        {
                            "causes": [
                                {"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}
                            ],
                            "retryAfterSeconds": 1,
                        },
                    )
                try:
                    self.store.check_rv(rv)
                except Expired as e:
                    raise ApiError(
                        410, "Expired", f"The resourceVersion for the provided list is too old. ({e})"
                    ) from None
                read_rv = rv
            else:
                if rv > self.store.rv:
                    raise ApiError(
                        504,
                        "Timeout",
                        f"Too large resource version: {rv}, current: {self.store.rv}",
                        {
                            "causes": [
                                {"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}
                            ],
                            "retryAfterSeconds": 1,
                        },
                    )
                read_rv = self.store.rv
        prefix = f"{ns}/" if ns is not None else ""
        items: list[dict[str, Any]] = []
        meta: dict[str, Any] = {"resourceVersion": str(read_rv)}
        it = self.store.scan(res, read_rv, start=start, prefix=prefix)
        last_key = ""
        for obj in it:
            if not (labels_match(labels, obj["metadata"].get("labels")) and fields_match(fields, obj)):
                continue
            if limit and len(items) == limit:
                meta["continue"] = _encode_continue(read_rv, last_key + "\x00")
                if not labels and not fields:
                    meta["remainingItemCount"] = 1 + sum(1 for _ in it)
                break
            items.append(obj)
            last_key = object_key(obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if not res.custom:
            # Lists of built-in kinds carry apiVersion/kind on the list only (Go structs, no
            # TypeMeta on items); custom resources keep them (unstructured).
            items = [{k: v for k, v in o.items() if k not in ("apiVersion", "kind")} for o in items]
        return {"kind": res.list_kind, "apiVersion": res.api_version, "metadata": meta, "items": items}

    # --- response encoding ---------------------------------------------------------------------

    def _respond(
        self,
        request: web.Request,
        res: Resource,
        obj: dict[str, Any],
        status: int = 200,
        warnings: list[str] | None = None,
    ) -> web.Response:
        headers = {}
        if warnings:
            headers["Warning"] = ", ".join(
                f'299 - "{w.replace(chr(34), chr(92) + chr(34))}"' for w in warnings
            )
        if _wants_table(request) and obj.get("kind") != "Status":
            obj = self._table(res, obj, request.query.get("includeObject", "Metadata"))
        return web.Response(
            body=json.dumps(obj, separators=(",", ":")).encode(),
            status=status,
            content_type="application/json",
            headers=headers,
        )

    def _table(self, res: Resource, obj: dict[str, Any], include: str) -> dict[str, Any]:
        """The default table convertor (what a real server answers for kinds without printer
        columns): Name and Created At."""
        items = obj.get("items", [obj])
        rows = []
        for it in items:
            row: dict[str, Any] = {"cells": [it["metadata"]["name"], it["metadata"].get("creationTimestamp")]}
            if include == "Object":
                row["object"] = {"apiVersion": res.api_version, "kind": res.kind, **it}
            elif include != "None":
                row["object"] = {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": it["metadata"],
                }
            rows.append(row)
        meta = {
            k: v
            for k, v in obj.get("metadata", {}).items()
            if k in ("resourceVersion", "continue", "remainingItemCount")
        }
        if "items" not in obj:
            meta = {"resourceVersion": obj["metadata"].get("resourceVersion", "")}
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": meta,
            "columnDefinitions": [
                {
                    "name": "Name",
                    "type": "string",
                    "format": "name",
                    "description": "Name must be unique within a namespace.",
                    "priority": 0,
                },
                {
                    "name": "Created At",
                    "type": "date",
                    "format": "",
                    "description": "CreationTimestamp is a timestamp "
                    "representing the server time when this object was created.",
                    "priority": 0,
                },
            ],
            "rows": rows,
        }

    # --- watch ---------------------------------------------------------------------------------

    async def _watch(self, request: web.Request, res: Resource, ns: str | None) -> web.StreamResponse:
        q = request.query
        labels, fields = self._selectors(res, q)
        rv_param = q.get("resourceVersion", "")
        bookmarks = _bool_param(q, "allowWatchBookmarks")
        initial = q.get("sendInitialEvents")
        match = q.get("resourceVersionMatch", "")
        if initial is not None:
            if match != "NotOlderThan":
                raise ApiError(
                    422,
                    "Invalid",
                    "resourceVersionMatch: Forbidden: sendInitialEvents requires "
                    "setting resourceVersionMatch to NotOlderThan",
                )
            if not bookmarks:
                raise ApiError(
                    422,
                    "Invalid",
                    "allowWatchBookmarks: Forbidden: sendInitialEvents requires "
                    "setting allowWatchBookmarks to true",
                )
        elif match:
            raise ApiError(
                422,
                "Invalid",
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden "
                "for watch unless sendInitialEvents is provided",
            )
        send_initial = initial == "true" if initial is not None else rv_param in ("", "0")
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else self.watch_timeout
        table = _wants_table(request)
        include = q.get("includeObject", "Metadata")

        resp = web.StreamResponse(
            status=200, headers={"Content-Type": "application/json", "Cache-Control": "no-cache, private"}
        )
        resp.enable_chunked_encoding()
        await resp.prepare(request)

        def encode(ev_type: str, obj: dict[str, Any]) -> bytes:
            if table and ev_type in ("ADDED", "MODIFIED", "DELETED"):
                obj = self._table(res, obj, include)
            return json.dumps({"type": ev_type, "object": obj}, separators=(",", ":")).encode() + b"\n"

        start_rv = self.store.rv if rv_param in ("", "0") else _parse_rv(rv_param)
        w = _Watch(res, ns, labels, fields, asyncio.Queue(), start_rv)
        pending: list[bytes] = []
        # Synchronous from here to registration: no write can slip between the replay and the
        # live feed (single-threaded event loop).
        try:
            replay = [] if rv_param in ("", "0") else self.store.events_since(res, start_rv)
        except Expired as e:
            status = ApiError(410, "Expired", str(e)).status()
            await resp.write(encode("ERROR", status))
            await resp.write_eof()
            return resp
        if send_initial:
            prefix = f"{ns}/" if ns is not None else ""
            for obj in self.store.scan(res, self.store.rv, prefix=prefix):
                if self._passes(w, obj):
                    pending.append(encode("ADDED", obj))
            if initial == "true":
                bm = {
                    "kind": res.kind,
                    "apiVersion": res.api_version,
                    "metadata": {
                        "resourceVersion": str(self.store.rv),
                        "annotations": {"k8s.io/initial-events-end": "true"},
                    },
                }
                pending.append(encode("BOOKMARK", bm))
        for ev in replay:
            out = self._convert(w, ev)
            if out is not None:
                pending.append(encode(*out))
        self._watches.add(w)
        sent = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        next_bookmark = loop.time() + self.bookmark_interval
        try:
            for chunk in pending:
                await resp.write(chunk)
                sent += 1
                if (
                    self.faults.drop_watch_after_events is not None
                    and sent >= self.faults.drop_watch_after_events
                ):
                    _abort(request)
                    return resp
            while True:
                now = loop.time()
                if now >= deadline:
                    break
                wait = min(deadline, next_bookmark if bookmarks else deadline) - now
                try:
                    kind, item = await asyncio.wait_for(w.queue.get(), timeout=max(wait, 0.001))
                except TimeoutError:
                    if bookmarks and loop.time() >= next_bookmark:
                        bm = {
                            "kind": res.kind,
                            "apiVersion": res.api_version,
                            "metadata": {"resourceVersion": str(self.store.rv)},
                        }
                        await resp.write(encode("BOOKMARK", bm))
                        next_bookmark = loop.time() + self.bookmark_interval
                    continue
                if kind == "drop":
                    _abort(request)
                    return resp
                if kind == "expire":
                    status = ApiError(
                        410, "Expired", "The resourceVersion for the provided watch is too old."
                    ).status()
                    await resp.write(encode("ERROR", status))
                    break
                ev_type, obj = item
                await resp.write(encode(ev_type, obj))
                sent += 1
                if (
                    self.faults.drop_watch_after_events is not None
                    and sent >= self.faults.drop_watch_after_events
                ):
                    _abort(request)
                    return resp
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._watches.discard(w)
        return resp


def _json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # Exactly "application/json" (no charset), as kube-apiserver sends it; clients compare it.
    return web.Response(
        body=json.dumps(obj, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def _without_meta(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def strip(o: dict[str, Any]) -> dict[str, Any]:
        o = dict(o)
        o["metadata"] = {k: v for k, v in o.get("metadata", {}).items() if k != "resourceVersion"}
        return o

    return strip(a) == strip(b)


def _parse_rv(s: str) -> int:
    try:
        v = int(s)
        if v < 0:
            raise ValueError
        return v
    except ValueError:
        raise ApiError(400, "BadRequest", f'invalid resource version "{s}"') from None


def _encode_continue(rv: int, start: str) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        d = json.loads(raw)
        if d.get("v") != "meta.k8s.io/v1":
            raise ValueError("unknown version")
        return int(d["rv"]), str(d["start"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise ApiError(
            400,
            "BadRequest",
            "continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
        ) from None


def _wants_table(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    first = accept.split(",")[0]
    return "as=Table" in first and "g=meta.k8s.io" in first


async def _json_body(request: web.Request, allow_empty: bool = False) -> Any:
    raw = await request.read()
    if not raw and allow_empty:
        return None
    ct = request.headers.get("Content-Type", "application/json").split(";")[0].strip()
    if ct not in ("application/json", "application/yaml", ""):
        # Real servers also take application/vnd.kubernetes.protobuf (what typed client-go
        # clientsets send, e.g. `kubectl create configmap`); the stand-in does not.
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format "
            f"({ct}) - accepted media types include: application/json, application/yaml",
        )
    try:
        return yaml.safe_load(raw) if ct == "application/yaml" else json.loads(raw)
    except (ValueError, yaml.YAMLError) as e:
        raise ApiError(400, "BadRequest", f"error decoding body: {e}") from None


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    ctx.set_alpn_protocols(["http/1.1"])  # aiohttp speaks HTTP/1.1; clients fall back from h2
    return ctx
