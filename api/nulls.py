"""Explicit nulls, as the API server treats them for a structural schema.

A null in a field the schema declares, and does not mark nullable (none of ours is), is
dropped before defaulting, so `spec.replicas: null` reads as unset and gets its default.
Inside a subtree kept as written (x-kubernetes-preserve-unknown-fields, typed here as
`dict[str, Any]`) nulls stay, except in the properties the schema declares there, named by
`msgspec.Meta(extra={"properties": ...})` on the field's type. Standalone mode has no API
server, so its store and its admission apply this to every object of our kinds.
"""

from __future__ import annotations

from typing import Any

from msgspec import inspect

PROPERTIES = "properties"  # the Meta extra naming the declared keys of a preserved object


def prune_nulls(obj: dict[str, Any], cls: type) -> dict[str, Any]:
    """A copy of `obj` (a dict of kind `cls`) without the nulls the API server drops."""
    return _prune(obj, inspect.type_info(cls))


def _prune(value: Any, info: inspect.Type) -> Any:
    if isinstance(info, inspect.Metadata):
        declared = (info.extra or {}).get(PROPERTIES)
        if declared and isinstance(value, dict):
            value = {k: v for k, v in value.items() if not (v is None and k in declared)}
        return _prune(value, info.type)
    if isinstance(info, inspect.UnionType):
        for member in info.types:
            if _fits(value, member):
                return _prune(value, member)
        return value
    if isinstance(info, inspect.StructType) and isinstance(value, dict):
        fields = {f.encode_name: f.type for f in info.fields}
        return {
            k: _prune(v, fields[k]) if k in fields else v
            for k, v in value.items()
            if not (v is None and k in fields)
        }
    if isinstance(info, inspect.DictType) and isinstance(value, dict):
        if isinstance(info.value_type, inspect.AnyType):
            return value  # preserved as written
        return {k: _prune(v, info.value_type) for k, v in value.items() if v is not None}
    if isinstance(info, inspect.ListType) and isinstance(value, list):
        return [_prune(v, info.item_type) for v in value]
    return value


def _fits(value: Any, info: inspect.Type) -> bool:
    if isinstance(info, inspect.Metadata):
        return _fits(value, info.type)
    if isinstance(value, dict):
        return isinstance(info, inspect.StructType | inspect.DictType)
    if isinstance(value, list):
        return isinstance(info, inspect.ListType)
    return False
