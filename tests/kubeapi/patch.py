"""The three PATCH bodies a real API server takes (besides server-side apply):

- application/merge-patch+json: RFC 7386 (maps merge, null deletes, lists replace);
- application/json-patch+json: RFC 6902, through the `jsonpatch` library;
- application/strategic-merge-patch+json: Kubernetes' strategic merge patch, for built-in kinds
  only. Lists merge by the `x-kubernetes-patch-merge-key` the schema names (containers by name,
  ports by containerPort, ...), with the directives `kubectl apply` sends: `$patch` (replace,
  delete), `$retainKeys`, `$setElementOrder/<list>` and `$deleteFromPrimitiveList/<list>`.
  Written here rather than imported because no Python library implements it; the strategies come
  from Kubernetes' published schemas (openapi.py), not a table of our own.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from . import openapi


class PatchError(ValueError):
    pass


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def json_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, list):
        raise PatchError("json patch must be a list of operations")
    try:
        return jsonpatch.apply_patch(target, patch)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, KeyError) as e:
        raise PatchError(str(e)) from e


_DIRECTIVE_PREFIXES = ("$setElementOrder/", "$deleteFromPrimitiveList/")


def _strip(v: Any) -> Any:
    if isinstance(v, dict):
        return {
            k: _strip(x)
            for k, x in v.items()
            if k not in ("$patch", "$retainKeys") and not k.startswith(_DIRECTIVE_PREFIXES)
        }
    if isinstance(v, list):
        return [
            _strip(x) for x in v if not (isinstance(x, dict) and x.get("$patch") == "replace" and len(x) == 1)
        ]
    return copy.deepcopy(v)


def strategic_merge_patch(
    original: dict[str, Any], patch: dict[str, Any], api_version: str, kind: str
) -> dict[str, Any]:
    if not isinstance(patch, dict):
        raise PatchError("strategic merge patch must be a JSON object")
    result = _merge_map(original, patch, openapi.schema_for(api_version, kind))
    if result is None:
        raise PatchError("a strategic merge patch may not delete the whole object")
    return result


def _merge_map(orig: Any, patch: dict[str, Any], schema: dict[str, Any] | None) -> dict[str, Any] | None:
    directive = patch.get("$patch")
    if directive == "replace":
        return _strip(patch)  # type: ignore[no-any-return]
    if directive == "delete":
        return None
    if directive is not None:
        raise PatchError(f"Unknown patch type: {directive!r} in map")
    out: dict[str, Any] = dict(orig) if isinstance(orig, dict) else {}
    orders: dict[str, list[Any]] = {}
    for k, v in patch.items():
        if k == "$retainKeys":
            continue
        if k.startswith("$setElementOrder/"):
            orders[k.removeprefix("$setElementOrder/")] = v
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            name = k.removeprefix("$deleteFromPrimitiveList/")
            if isinstance(out.get(name), list):
                out[name] = [x for x in out[name] if x not in v]
            continue
        if v is None:
            out.pop(k, None)
            continue
        sub = openapi.property_schema(schema, k)
        if isinstance(v, dict):
            merged = _merge_map(out.get(k), v, sub)
            if merged is None:
                out.pop(k, None)
            else:
                out[k] = merged
        elif isinstance(v, list):
            out[k] = _merge_list(out.get(k), v, sub)
        else:
            out[k] = v
    for name, order in orders.items():
        if isinstance(out.get(name), list):
            out[name] = _reorder(out[name], order, _merge_key(openapi.property_schema(schema, name)))
    if "$retainKeys" in patch:
        keep = set(patch["$retainKeys"])
        out = {k: v for k, v in out.items() if k in keep}
    return out


def _merge_key(schema: dict[str, Any] | None) -> str | None:
    if schema is None:
        return None
    key = schema.get("x-kubernetes-patch-merge-key")
    return key if isinstance(key, str) else None


def _merge_list(orig: Any, patch: list[Any], schema: dict[str, Any] | None) -> list[Any]:
    strategy = (schema or {}).get("x-kubernetes-patch-strategy", "")
    if "merge" not in str(strategy).split(","):
        return _strip(patch)  # type: ignore[no-any-return]
    if any(isinstance(x, dict) and x.get("$patch") == "replace" for x in patch):
        return _strip(patch)  # type: ignore[no-any-return]
    base = list(orig) if isinstance(orig, list) else []
    key = _merge_key(schema)
    if key is None:  # a list of primitives merged as a set (e.g. metadata.finalizers)
        return base + [x for x in patch if x not in base]
    item_schema = openapi.items_schema(schema)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise PatchError(f"map: {item!r} does not contain declared merge key: {key}")
        idx = next((i for i, o in enumerate(base) if isinstance(o, dict) and o.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                del base[idx]
            continue
        if idx is None:
            base.append(_strip(item))
        else:
            merged = _merge_map(base[idx], item, item_schema)
            if merged is None:
                del base[idx]
            else:
                base[idx] = merged
    return base


def _reorder(items: list[Any], order: list[Any], key: str | None) -> list[Any]:
    def ident(x: Any) -> Any:
        return x.get(key) if key is not None and isinstance(x, dict) else x

    wanted = [ident(o) for o in order]
    ranked = [x for w in wanted for x in items if ident(x) == w]
    return ranked + [x for x in items if ident(x) not in wanted]
