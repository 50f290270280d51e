"""What the Kubernetes API server checks on a CRD schema and on an object beyond JSON Schema.

One walker each, used by tests/test_crds.py (our CRDs, with our stricter conventions) and
tests/test_manifests.py (every CRD we ship, upstream ones included: the API server's rules).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jsonschema

Obj = dict[str, Any]
Rule = Callable[[Obj, str, str], list[str]]  # (schema node, where, path) -> errors


def _typed(schema: Obj, where: str, path: str) -> list[str]:
    if "type" not in schema and not schema.get("x-kubernetes-int-or-string"):
        return [f"{where}: no type"]
    return []


def _exclusive_properties(schema: Obj, where: str, path: str) -> list[str]:
    if "properties" in schema and "additionalProperties" in schema:
        return [f"{where}: properties and additionalProperties are mutually exclusive"]
    return []


def _valid_default(schema: Obj, where: str, path: str) -> list[str]:
    if "default" not in schema:
        return []
    try:
        jsonschema.Draft4Validator(schema).validate(schema["default"])
    except jsonschema.ValidationError as exc:
        return [f"{where}: default {schema['default']!r} is invalid: {exc.message}"]
    return []


def _list_map_keys_set(schema: Obj, where: str, path: str) -> list[str]:
    if schema.get("x-kubernetes-list-type") != "map":
        return []
    item = schema["items"]
    return [
        f"{where}: list-map key {key} must be required or defaulted"
        for key in schema.get("x-kubernetes-list-map-keys", [])
        if key not in item.get("required", [])
        and "default" not in item.get("properties", {}).get(key, {})
    ]


def _int_or_string_only_union(schema: Obj, where: str, path: str) -> list[str]:
    errors = []
    if schema.get("x-kubernetes-int-or-string"):
        if "type" in schema:
            errors.append(f"{where}: int-or-string must not set type")
        if schema.get("anyOf", []) != [{"type": "integer"}, {"type": "string"}]:
            errors.append(f"{where}: int-or-string needs anyOf [integer, string]")
    elif "type" in schema and ({"anyOf", "oneOf", "allOf"} & schema.keys()):
        errors.append(f"{where}: anyOf/oneOf/allOf only for int-or-string here")
    return errors


def _preserve_only_objects(schema: Obj, where: str, path: str) -> list[str]:
    preserve = schema.get("x-kubernetes-preserve-unknown-fields")
    if preserve and schema.get("type") != "object":
        return [f"{where}: preserve-unknown-fields on a non-object"]
    return []


def _objects_not_pruned(schema: Obj, where: str, path: str) -> list[str]:
    if (
        schema.get("type") == "object"
        and not (
            {"properties", "additionalProperties"} & schema.keys()
            or schema.get("x-kubernetes-preserve-unknown-fields")
        )
        and path != "/metadata"
    ):
        return [f"{where}: an object without properties is pruned to {{}}"]
    return []


def _required_are_properties(schema: Obj, where: str, path: str) -> list[str]:
    props = schema.get("properties", {})
    return [
        f"{where}: required {name} is not a property"
        for name in schema.get("required", [])
        if name not in props
    ]


def _arrays_bounded(schema: Obj, where: str, path: str) -> list[str]:
    if schema.get("type") == "array" and "maxItems" not in schema:
        return [f"{where}: arrays need maxItems, or CEL cost estimates are unbounded"]
    return []


def _cel_rules_explained(schema: Obj, where: str, path: str) -> list[str]:
    return [
        f"{where}: CEL rule {rule['rule']!r} has no message"
        for rule in schema.get("x-kubernetes-validations", [])
        if not rule.get("message")
    ]


# What the API server refuses (or silently changes) in any CRD, upstream ones included.
API_SERVER_RULES: tuple[Rule, ...] = (
    _typed,
    _exclusive_properties,
    _valid_default,
    _list_map_keys_set,
)
# Our own CRDs also keep to these, so what the API server accepts is what we meant.
OUR_RULES: tuple[Rule, ...] = (
    *API_SERVER_RULES,
    _int_or_string_only_union,
    _preserve_only_objects,
    _objects_not_pruned,
    _required_are_properties,
    _arrays_bounded,
    _cel_rules_explained,
)


def structural_errors(
    schema: Obj, rules: tuple[Rule, ...] = API_SERVER_RULES, path: str = ""
) -> list[str]:
    """Every rule on every node of an openAPIV3Schema."""
    errors = [e for rule in rules for e in rule(schema, path or "/", path)]
    for key, sub in schema.get("properties", {}).items():
        errors += structural_errors(sub, rules, f"{path}/{key}")
    if isinstance(schema.get("additionalProperties"), dict):
        errors += structural_errors(schema["additionalProperties"], rules, f"{path}/*")
    if "items" in schema:
        errors += structural_errors(schema["items"], rules, f"{path}[]")
    return errors


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def list_errors(schema: Obj, value: Any, path: str = "") -> list[str]:
    """List-map and set uniqueness in an object, which JSON Schema does not know."""
    errors = []
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                errors += list_errors(sub, item, join_path(path, key))
    elif isinstance(value, list) and "items" in schema:
        kind = schema.get("x-kubernetes-list-type")
        if kind == "map":
            keys = schema["x-kubernetes-list-map-keys"]
            seen = [tuple(i.get(k) for k in keys) for i in value if isinstance(i, dict)]
        else:
            seen = list(value) if kind == "set" else []
        if len({repr(s) for s in seen}) != len(seen):
            errors.append(f"{path}: duplicate entries in a {kind} list")
        for i, item in enumerate(value):
            errors += list_errors(schema["items"], item, f"{path}[{i}]")
    return errors
