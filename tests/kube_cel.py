"""CEL as kube-apiserver runs a CRD's `x-kubernetes-validations`: cel-python (`celpy`) plus the
Kubernetes library functions our CRDs and upstream's may call, values typed by the schema, and a
compile step that refuses what the API server would refuse when the CRD is created (a parse
error, an unknown function or variable, a field the schema does not have).

    rule = compile_rule(text, schema)      # CELCompileError if kube-apiserver would refuse it
    rule.evaluate(self_value, old_value)   # -> bool, or raises CELRuleError
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import celpy
import lark
from celpy import celtypes

Obj = dict[str, Any]
MACROS = {"all", "exists", "exists_one", "map", "filter"}
VARIABLES = {"self", "oldSelf"}
EMBEDDED_FIELDS = {"apiVersion", "kind", "metadata"}  # an embedded resource has them anyway
TYPE_NAMES = {"int", "uint", "double", "bool", "string", "bytes", "list", "map", "null_type"}


class CELCompileError(ValueError):
    """A rule kube-apiserver would not compile: creating the CRD fails."""


class CELRuleError(ValueError):
    """A rule that compiled but failed while evaluating (kube-apiserver reports it as Invalid)."""


# ---- the Kubernetes CEL libraries (a subset: strings, lists, regex, IP/CIDR) ---------------


def _ip(text: celtypes.StringType) -> Any:
    if "%" in text:  # Kubernetes refuses zones; ipaddress refuses leading zeros itself
        raise ValueError(f"IP Address {text!r} parse error")
    return ipaddress.ip_address(str(text))


def _is_ip(text: celtypes.StringType) -> celtypes.BoolType:
    try:
        _ip(text)
    except ValueError:
        return celtypes.BoolType(False)
    return celtypes.BoolType(True)


def _cidr(text: celtypes.StringType) -> Any:
    return ipaddress.ip_interface(str(text))


def _is_cidr(text: celtypes.StringType) -> celtypes.BoolType:
    try:
        ipaddress.ip_network(str(text), strict=False)
    except ValueError:
        return celtypes.BoolType(False)
    return celtypes.BoolType("/" in text)


def _contains_ip(cidr: Any, ip: Any) -> celtypes.BoolType:
    address = _ip(ip) if isinstance(ip, str) else ip
    return celtypes.BoolType(address in cidr.network)


def _is_sorted(values: celtypes.ListType) -> celtypes.BoolType:
    return celtypes.BoolType(all(a <= b for a, b in itertools.pairwise(values)))


def _index_of(container: Any, item: Any) -> celtypes.IntType:
    if isinstance(container, str):
        return celtypes.IntType(container.find(item))
    return celtypes.IntType(next((i for i, v in enumerate(container) if v == item), -1))


def _last_index_of(container: Any, item: Any) -> celtypes.IntType:
    if isinstance(container, str):
        return celtypes.IntType(container.rfind(item))
    hits = [i for i, v in enumerate(container) if v == item]
    return celtypes.IntType(hits[-1] if hits else -1)


def _find(text: str, pattern: str) -> celtypes.StringType:
    match = re.search(pattern, text)
    return celtypes.StringType(match.group(0) if match else "")


def _find_all(text: str, pattern: str, limit: int = -1) -> celtypes.ListType:
    found = [celtypes.StringType(m.group(0)) for m in re.finditer(pattern, text)]
    return celtypes.ListType(found if limit < 0 else found[:limit])


def _split(text: str, sep: str, limit: int = -1) -> celtypes.ListType:
    if limit == 0:
        return celtypes.ListType()
    parts = text.split(sep, limit - 1) if limit > 0 else text.split(sep)
    return celtypes.ListType(celtypes.StringType(p) for p in parts)


def _join(values: celtypes.ListType, sep: str = "") -> celtypes.StringType:
    return celtypes.StringType(sep.join(values))


def _substring(text: str, start: int, end: int | None = None) -> celtypes.StringType:
    if not 0 <= start <= (len(text) if end is None else end) <= len(text):
        raise IndexError(f"substring({start}, {end}) out of range")
    return celtypes.StringType(text[start:end])


def _string_fn(fn: Callable[[str], str]) -> Callable[[str], celtypes.StringType]:
    return lambda text: celtypes.StringType(fn(text))


KUBERNETES_FUNCTIONS: dict[str, Callable[..., Any]] = {
    # strings (cel-go's ext.Strings, as Kubernetes enables it)
    "lowerAscii": _string_fn(str.lower),
    "upperAscii": _string_fn(str.upper),
    "trim": _string_fn(str.strip),
    "replace": lambda text, old, new, n=-1: celtypes.StringType(text.replace(old, new, n)),
    "split": _split,
    "join": _join,
    "substring": _substring,
    "charAt": lambda text, i: celtypes.StringType(text[i : i + 1]),
    "indexOf": _index_of,
    "lastIndexOf": _last_index_of,
    # lists
    "isSorted": _is_sorted,
    "sum": lambda values: sum(values[1:], values[0]) if values else celtypes.IntType(0),
    # regex
    "find": _find,
    "findAll": _find_all,
    # IP / CIDR (k8s.io/apiserver/pkg/cel/library/ip.go, cidr.go)
    "isIP": _is_ip,
    "ip": _ip,
    "isCIDR": _is_cidr,
    "cidr": _cidr,
    "family": lambda addr: celtypes.IntType(getattr(addr, "version", 0)),
    "containsIP": _contains_ip,
    "prefixLength": lambda cidr: celtypes.IntType(cidr.network.prefixlen),
    "isLoopback": lambda addr: celtypes.BoolType(addr.is_loopback),
}
KNOWN_FUNCTIONS = set(celpy.evaluation.base_functions) | set(KUBERNETES_FUNCTIONS) | {"has", "dyn"}


# ---- values typed by the schema, as the API server types them ------------------------------


def to_cel(schema: Obj, value: Any) -> Any:
    """JSON → CEL: `number` is double even when written as 2, strings of format duration /
    date-time / byte are durations / timestamps / bytes, objects and maps are maps."""
    if value is None:
        return None
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        return celtypes.MapType(
            {
                celtypes.StringType(k): to_cel(
                    props.get(k, extra if isinstance(extra, dict) else {}), v
                )
                for k, v in value.items()
            }
        )
    if isinstance(value, list):
        return celtypes.ListType(to_cel(schema.get("items", {}), v) for v in value)
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int):
        if schema.get("type") == "number":
            return celtypes.DoubleType(value)
        return celtypes.IntType(value)
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    return _typed_string(schema.get("format"), value)


def _typed_string(fmt: str | None, value: str) -> Any:
    try:
        if fmt == "duration":
            return celtypes.DurationType(value)
        if fmt in ("date-time", "date"):
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return celtypes.TimestampType(parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC))
    except ValueError:
        pass  # the format check reports it; CEL sees the string
    return celtypes.StringType(value)


# ---- compile ------------------------------------------------------------------------------

_ENV = celpy.Environment()


@dataclass(frozen=True)
class CompiledRule:
    text: str
    program: Any
    uses_old_self: bool

    def evaluate(self, value: Any, old: Any = None, *, schema: Obj) -> Any:
        activation = {"self": to_cel(schema, value)}
        if self.uses_old_self:
            activation["oldSelf"] = to_cel(schema, old)
        try:
            result = self.program.evaluate(activation)
        except celpy.CELEvalError as exc:
            raise CELRuleError(_eval_message(exc)) from None
        except Exception as exc:  # a library function's own error
            raise CELRuleError(str(exc)) from None
        if isinstance(result, celpy.CELEvalError):
            raise CELRuleError(_eval_message(result))
        return result


def _eval_message(exc: celpy.CELEvalError) -> str:
    return str(exc.args[0]) if exc.args else repr(exc)


def compile_rule(text: str, schema: Obj, *, where: str = "") -> CompiledRule:
    """Parse `text` and check it as kube-apiserver's type-checker would against `schema`
    (the node the rule sits on): unknown functions, variables and fields are errors."""
    try:
        ast = _ENV.compile(text)
    except Exception as exc:  # celpy's parse errors have no common base class
        raise CELCompileError(f"{where}: compilation failed: {text!r}: {exc}") from None
    problems = list(_check(ast, {"self": schema, "oldSelf": schema}))
    if problems:
        raise CELCompileError(f"{where}: compilation failed: {text!r}: {'; '.join(problems)}")
    program = _ENV.program(ast, functions=KUBERNETES_FUNCTIONS)
    return CompiledRule(text, program, uses_old_self=_mentions(ast, "oldSelf"))


def _mentions(ast: lark.Tree, name: str) -> bool:
    return any(n.data == "ident" and n.children[0].value == name for n in ast.iter_subtrees())


def _check(tree: lark.Tree, scope: dict[str, Obj | None]) -> Iterator[str]:
    """Walk the parse tree with the schema of each variable in scope."""
    if tree.data == "member_dot_arg":
        receiver, name = tree.children[0], tree.children[1].value
        args = _args(tree)
        yield from _check(receiver, scope)
        if name in MACROS:
            # (variable, expression), or map's (variable, filter, expression)
            if len(args) not in (2, 3 if name == "map" else 2) or not _is_ident(args[0]):
                yield f"macro {name} needs (variable, expression)"
                return
            inner = {**scope, _ident(args[0]): _element_schema(_schema_of(receiver, scope))}
            for arg in args[1:]:
                yield from _check(arg, inner)
            return
        if name not in KNOWN_FUNCTIONS:
            yield f"undeclared reference to {name!r}"
        for arg in args:
            yield from _check(arg, scope)
        return
    if tree.data in ("ident_arg", "dot_ident_arg"):
        name, args = tree.children[0].value, _args(tree)
        if name not in KNOWN_FUNCTIONS:
            yield f"undeclared reference to {name!r}"
        if name == "has" and args:
            yield from _check_has(args[0], scope)
            return
        for arg in args:
            yield from _check(arg, scope)
        return
    if tree.data == "ident":
        name = tree.children[0].value
        if name not in scope and name not in TYPE_NAMES:
            yield f"undeclared reference to {name!r}"
        return
    if tree.data == "member_dot":
        yield from _check_field(tree, scope)
    for child in tree.children:
        if isinstance(child, lark.Tree):
            yield from _check(child, scope)


def _check_has(arg: lark.Tree, scope: dict[str, Obj | None]) -> Iterator[str]:
    node = _unwrap(arg)
    if node.data != "member_dot":
        yield "invalid argument to has() macro"
        return
    yield from _check(node, scope)


def _check_field(tree: lark.Tree, scope: dict[str, Obj | None]) -> Iterator[str]:
    schema = _schema_of(tree.children[0], scope)
    name = tree.children[1].value
    if schema is None or not _closed_object(schema) or name in schema["properties"]:
        return
    if not (schema.get("x-kubernetes-embedded-resource") and name in EMBEDDED_FIELDS):
        yield f"undefined field {name!r}"


def _closed_object(schema: Obj) -> bool:
    return "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields")


def _schema_of(tree: Any, scope: dict[str, Obj | None]) -> Obj | None:
    """The schema of a `self.a.b` chain, or None when it cannot be told (then nothing is
    checked, as for dyn)."""
    node = _unwrap(tree)
    if node.data == "ident":
        return scope.get(node.children[0].value)
    if node.data == "member_dot":
        parent = _schema_of(node.children[0], scope)
        if parent is None:
            return None
        name = node.children[1].value
        if "properties" in parent:
            return parent["properties"].get(name)
        extra = parent.get("additionalProperties")
        return extra if isinstance(extra, dict) else None
    return None


def _element_schema(schema: Obj | None) -> Obj | None:
    if schema is None:
        return None
    if "items" in schema:
        return schema["items"]
    if schema.get("type") == "object":  # a macro over a map binds its keys
        return {"type": "string"}
    return None


def _unwrap(tree: Any) -> Any:
    """Down through the single-child wrappers (expr → … → member → primary)."""
    while (
        isinstance(tree, lark.Tree)
        and len(tree.children) == 1
        and isinstance(tree.children[0], lark.Tree)
        and tree.data not in ("member_dot", "ident")
    ):
        tree = tree.children[0]
    return tree


def _args(tree: lark.Tree) -> list[lark.Tree]:
    lists = [c for c in tree.children if isinstance(c, lark.Tree) and c.data == "exprlist"]
    return list(lists[0].children) if lists else []


def _is_ident(tree: lark.Tree) -> bool:
    return _unwrap(tree).data == "ident"


def _ident(tree: lark.Tree) -> str:
    return _unwrap(tree).children[0].value
