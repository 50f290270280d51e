"""A CRD version's structural schema applied as kube-apiserver applies it on write: unknown
fields pruned, defaults filled in, then OpenAPI validation (type, enum, required, bounds,
lengths, pattern, cheap formats, list-type uniqueness, int-or-string) and the CEL rules, each
failure a FieldError that becomes one of a 422 Status's `details.causes`.

On an update, unchanged values are not validated again (validation ratcheting, on by default
since Kubernetes 1.30) and transition rules (`oldSelf`) run where the old value correlates:
object fields by name, map entries by key, items of `x-kubernetes-list-type: map` lists by their
keys.
"""

from __future__ import annotations

import base64
import binascii
import copy
import ipaddress
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tests.kube_cel import CELRuleError, CompiledRule, compile_rule

Obj = dict[str, Any]
_MISSING = object()
# What metadata keeps (ObjectMeta): anything else in it is an unknown field.
OBJECT_META_FIELDS = frozenset(
    "name generateName namespace selfLink uid resourceVersion generation creationTimestamp "
    "deletionTimestamp deletionGracePeriodSeconds labels annotations ownerReferences "
    "finalizers managedFields".split()
)
_GO_DURATION = re.compile(r"^[-+]?(\d+(\.\d*)?(ns|us|µs|ms|s|m|h))+$|^0$")
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


@dataclass(frozen=True, slots=True)
class FieldError:
    """One cause, as k8s.io/apimachinery's field.Error renders it."""

    reason: str  # FieldValueRequired, FieldValueInvalid, …
    field: str
    message: str  # without the field, e.g. 'Required value'

    def cause(self) -> Obj:
        return {"reason": self.reason, "message": self.message, "field": self.field}

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def _value(value: Any) -> str:
    """A bad value as Go's field.Error prints it (%q for strings, %v for scalars)."""
    if value is None:
        return '"null"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, separators=(",", ":"))


def required(path: str, detail: str = "") -> FieldError:
    return FieldError(
        "FieldValueRequired", path, "Required value" + (f": {detail}" if detail else "")
    )


def invalid(path: str, value: Any, detail: str) -> FieldError:
    return FieldError("FieldValueInvalid", path, f"Invalid value: {_value(value)}: {detail}")


def _type_invalid(path: str, actual: str, want: str) -> FieldError:
    detail = f"{path} in body must be of type {want}: {json.dumps(actual)}"
    return FieldError(
        "FieldValueTypeInvalid", path, f"Invalid value: {json.dumps(actual)}: {detail}"
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _has_type(want: str, value: Any) -> bool:
    actual = _json_type(value)
    if want == "integer" and actual == "number":
        return float(value).is_integer()  # JSON 2.0 is the integer 2, as go-openapi reads it
    return actual == want or (want == "number" and actual == "integer")


def child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _format_ok(fmt: str, text: str) -> bool:
    try:
        if fmt == "date-time":
            return bool(_RFC3339.match(text))
        if fmt == "date":
            datetime.strptime(text, "%Y-%m-%d")
        elif fmt == "duration":
            return bool(_GO_DURATION.match(text))
        elif fmt == "byte":
            base64.b64decode(text, validate=True)
        elif fmt == "uuid":
            uuid.UUID(text)
        elif fmt == "ipv4":
            ipaddress.IPv4Address(text)
        elif fmt == "ipv6":
            ipaddress.IPv6Address(text)
        elif fmt == "cidr":
            ipaddress.ip_network(text, strict=False)
            return "/" in text
    except (ValueError, binascii.Error):
        return False
    return True  # other formats (int32, int64, …) are not checked on strings


@dataclass(frozen=True)
class Rule:
    """One `x-kubernetes-validations` entry, compiled."""

    check: CompiledRule
    message: str
    message_expression: CompiledRule | None
    field_path: str
    reason: str

    def error(self, path: str, schema: Obj, value: Any, old: Any) -> FieldError:
        where = (path + self.field_path).lstrip(".")
        message = self.message or f"failed rule: {self.check.text}"
        if self.message_expression is not None:
            try:
                text = self.message_expression.evaluate(value, old, schema=schema)
                if isinstance(text, str) and text.strip():
                    message = str(text)
            except CELRuleError:
                pass  # kube-apiserver falls back to message too
        if self.reason == "FieldValueForbidden":
            return FieldError(self.reason, where, f"Forbidden: {message}")
        if self.reason == "FieldValueRequired":
            return required(where, message)
        if self.reason == "FieldValueDuplicate":
            return FieldError(self.reason, where, f"Duplicate value: {json.dumps(message)}")
        return invalid(where, _schema_type(schema), message)


def _schema_type(schema: Obj) -> str:
    return (
        "integer-or-string" if schema.get("x-kubernetes-int-or-string") else schema.get("type", "")
    )


class StructuralSchema:
    """One CRD version's openAPIV3Schema, its CEL rules compiled up front (a rule that does not
    compile raises CELCompileError, as creating the CRD fails on the API server)."""

    def __init__(self, schema: Obj, where: str) -> None:
        self.root = schema
        self._rules: dict[int, list[Rule]] = {}
        self._compile(schema, where)

    def _compile(self, schema: Obj, path: str) -> None:
        rules = []
        for i, entry in enumerate(schema.get("x-kubernetes-validations") or []):
            where = f"{path}.x-kubernetes-validations[{i}]"
            expression = entry.get("messageExpression")
            rules.append(
                Rule(
                    check=compile_rule(entry["rule"], schema, where=f"{where}.rule"),
                    message=entry.get("message", ""),
                    message_expression=expression
                    and compile_rule(expression, schema, where=f"{where}.messageExpression"),
                    field_path=entry.get("fieldPath", ""),
                    reason=entry.get("reason", "FieldValueInvalid"),
                )
            )
        if rules:
            self._rules[id(schema)] = rules
        for key, sub in (schema.get("properties") or {}).items():
            self._compile(sub, f"{path}.properties[{key}]")
        if isinstance(schema.get("additionalProperties"), dict):
            self._compile(schema["additionalProperties"], f"{path}.additionalProperties")
        if isinstance(schema.get("items"), dict):
            self._compile(schema["items"], f"{path}.items")

    def rules(self) -> list[Rule]:
        return [rule for rules in self._rules.values() for rule in rules]

    # ---- pruning --------------------------------------------------------------------------

    def prune(self, obj: Obj) -> list[str]:
        """Drop what the schema does not know, in place; return the dropped fields' paths."""
        dropped: list[str] = []
        meta = obj.get("metadata")
        if isinstance(meta, dict):
            _prune_meta(meta, "metadata", dropped)
        _prune(self.root, obj, "", dropped, root=True)
        return dropped

    # ---- defaulting -----------------------------------------------------------------------

    def default(self, obj: Obj) -> Obj:
        return apply_defaults(self.root, obj)

    # ---- validation -----------------------------------------------------------------------

    def validate(self, obj: Obj, old: Obj | None = None) -> list[FieldError]:
        """OpenAPI errors first, then CEL ones, as kube-apiserver lists them."""
        schema_errors: list[FieldError] = []
        cel_errors: list[FieldError] = []
        body = {k: v for k, v in obj.items() if k != "metadata"}
        old_body = _MISSING if old is None else {k: v for k, v in old.items() if k != "metadata"}
        self._walk(self.root, body, "", old_body, schema_errors, cel_errors)
        return schema_errors + cel_errors

    def _walk(self, schema: Obj, value: Any, path: str, old: Any, errors: list, cel: list) -> None:
        if old is not _MISSING and old == value:
            return  # ratcheting: an unchanged value is not validated again
        if not _check_node(schema, value, path, errors):
            return
        for rule in self._rules.get(id(schema), ()):
            if rule.check.uses_old_self and old is _MISSING:
                continue  # transition rules run on updates of a correlated value only
            try:
                ok = rule.check.evaluate(value, None if old is _MISSING else old, schema=schema)
            except CELRuleError as exc:
                detail = f"{exc} evaluating rule: {rule.check.text}"
                cel.append(invalid(path, _schema_type(schema), detail))
                continue
            if not ok:
                cel.append(rule.error(path, schema, value, old))
        for key, sub_schema, item, old_item in _children(schema, value, path, old):
            self._walk(sub_schema, item, key, old_item, errors, cel)


def _children(schema: Obj, value: Any, path: str, old: Any) -> Iterator[tuple[str, Obj, Any, Any]]:
    """(path, schema, value, correlated old value or _MISSING) of each child."""
    if isinstance(value, dict):
        props, extra = schema.get("properties") or {}, schema.get("additionalProperties")
        old_map = old if isinstance(old, dict) else {}
        for key, item in value.items():
            if key in props:
                yield child(path, key), props[key], item, old_map.get(key, _MISSING)
            elif isinstance(extra, dict):
                yield f"{path}[{key}]", extra, item, old_map.get(key, _MISSING)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        keys = schema.get("x-kubernetes-list-map-keys") or []
        by_key = {}
        if schema.get("x-kubernetes-list-type") == "map" and isinstance(old, list):
            by_key = {_map_key(keys, o): o for o in old if isinstance(o, dict)}
        for i, item in enumerate(value):
            old_item = by_key.get(_map_key(keys, item), _MISSING) if by_key else _MISSING
            yield f"{path}[{i}]", schema["items"], item, old_item


def _map_key(keys: list[str], item: Any) -> str:
    return json.dumps([item.get(k) for k in keys] if isinstance(item, dict) else item)


def _check_node(schema: Obj, value: Any, path: str, errors: list[FieldError]) -> bool:
    """The node's own OpenAPI constraints; False when its type is wrong (nothing below is
    checked then)."""
    if value is None:
        if schema.get("nullable"):
            return False
        errors.append(_type_invalid(path, "null", schema.get("type") or "integer-or-string"))
        return False
    if schema.get("x-kubernetes-int-or-string"):
        if _json_type(value) not in ("integer", "string"):
            errors.append(_type_invalid(path, _json_type(value), "integer,string"))
            return False
    elif "type" in schema and not _has_type(schema["type"], value):
        errors.append(_type_invalid(path, _json_type(value), schema["type"]))
        return False
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(json.dumps(v) for v in schema["enum"])
        errors.append(
            FieldError(
                "FieldValueNotSupported",
                path,
                f"Unsupported value: {_value(value)}: supported values: {allowed}",
            )
        )
    if isinstance(value, str):
        errors += _string_errors(schema, value, path)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        errors += _number_errors(schema, value, path)
    elif isinstance(value, list):
        errors += _list_errors(schema, value, path)
    elif isinstance(value, dict):
        errors += _object_errors(schema, value, path)
    return True


def _string_errors(schema: Obj, value: str, path: str) -> Iterator[FieldError]:
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        yield FieldError(
            "FieldValueTooLong", path, f"Too long: may not be more than {schema['maxLength']} bytes"
        )
    if "minLength" in schema and len(value) < schema["minLength"]:
        yield invalid(
            path, value, f"{path} in body should be at least {schema['minLength']} chars long"
        )
    if "pattern" in schema and not re.search(schema["pattern"], value):
        yield invalid(path, value, f"{path} in body should match '{schema['pattern']}'")
    fmt = schema.get("format")
    if fmt and not _format_ok(fmt, value):
        yield invalid(path, value, f"{path} in body must be of type {fmt}: {json.dumps(value)}")


def _number_errors(schema: Obj, value: float, path: str) -> Iterator[FieldError]:
    if "minimum" in schema:
        low, exclusive = schema["minimum"], schema.get("exclusiveMinimum", False)
        if value < low or (exclusive and value == low):
            than = "greater than" if exclusive else "greater than or equal to"
            yield invalid(path, value, f"{path} in body should be {than} {low}")
    if "maximum" in schema:
        high, exclusive = schema["maximum"], schema.get("exclusiveMaximum", False)
        if value > high or (exclusive and value == high):
            than = "less than" if exclusive else "less than or equal to"
            yield invalid(path, value, f"{path} in body should be {than} {high}")
    step = schema.get("multipleOf")
    if step and (value / step) != int(value / step):
        yield invalid(path, value, f"{path} in body should be a multiple of {step}")


def _size_errors(schema: Obj, value: list | Obj, path: str, noun: str) -> Iterator[FieldError]:
    """maxItems/minItems (noun "Items") or maxProperties/minProperties ("Properties")."""
    most, least = schema.get(f"max{noun}"), schema.get(f"min{noun}")
    if most is not None and len(value) > most:
        # apimachinery's field.TooMany says "items" for both
        yield FieldError(
            "FieldValueTooMany", path, f"Too many: {len(value)}: must have at most {most} items"
        )
    if least is not None and len(value) < least:
        yield invalid(path, value, f"{path} in body should have at least {least} {noun.lower()}")


def _list_errors(schema: Obj, value: list, path: str) -> Iterator[FieldError]:
    yield from _size_errors(schema, value, path, "Items")
    kind = schema.get("x-kubernetes-list-type")
    if kind not in ("map", "set") and not schema.get("uniqueItems"):
        return
    keys = schema.get("x-kubernetes-list-map-keys") or []
    seen: set[str] = set()
    for i, item in enumerate(value):
        if kind == "map" and isinstance(item, dict):
            identity: Any = {k: item[k] for k in keys if k in item}
        else:
            identity = item
        token = json.dumps(identity, sort_keys=True)
        if token in seen:
            message = f"Duplicate value: {_value(identity)}"
            yield FieldError("FieldValueDuplicate", f"{path}[{i}]", message)
        seen.add(token)


def _object_errors(schema: Obj, value: Obj, path: str) -> Iterator[FieldError]:
    for name in schema.get("required") or []:
        if name not in value:
            yield required(child(path, name))
    yield from _size_errors(schema, value, path, "Properties")


def _prune(schema: Obj, value: Any, path: str, dropped: list[str], root: bool = False) -> None:
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            _prune(schema["items"], item, f"{path}[{i}]", dropped)
        return
    if not isinstance(value, dict):
        return
    props, extra = schema.get("properties") or {}, schema.get("additionalProperties")
    keep_unknown = schema.get("x-kubernetes-preserve-unknown-fields") or extra is True
    embedded = root or schema.get("x-kubernetes-embedded-resource")
    for key in list(value):
        if root and key == "metadata":
            continue  # ObjectMeta, pruned by prune() itself
        if key in props:
            _prune(props[key], value[key], child(path, key), dropped)
        elif isinstance(extra, dict):
            _prune(extra, value[key], f"{path}[{key}]", dropped)
        elif embedded and key in ("apiVersion", "kind", "metadata"):
            if key == "metadata" and not root and isinstance(value[key], dict):
                _prune_meta(value[key], child(path, key), dropped)
        elif not keep_unknown:
            del value[key]
            dropped.append(child(path, key))


def _prune_meta(meta: Obj, path: str, dropped: list[str]) -> None:
    for key in list(meta):
        if key not in OBJECT_META_FIELDS:
            del meta[key]
            dropped.append(child(path, key))


def apply_defaults(schema: Obj, value: Any) -> Any:
    """Fill in, in place, unset fields that have a default, as the API server does on write."""
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value and value[key] is None and not sub.get("nullable"):
                del value[key]  # null where null is not allowed is pruned, then defaulted
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(sub, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for item in value.values():
                apply_defaults(extra, item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)
    return value
