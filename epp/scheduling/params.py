"""Typed plugin parameters: each plugin with parameters declares a msgspec Struct of them,
with the bounds a value must keep (a block size of 0 or -1e30, a negative LRU capacity,
.inf). A config that breaks one is refused at start with an error naming the parameter."""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

import msgspec

# Bounds shared by several plugins: large enough for any real setting, small enough that
# what they size (LRUs, session tables, token counts) fits in memory.
MAX_ENTRIES = 10_000_000
MAX_TOKENS = 10_000_000
MAX_SEED = 2**63 - 1  # msgspec bounds fit an int64

Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_ENTRIES)]
PositiveCount = Annotated[int, msgspec.Meta(ge=1, le=MAX_ENTRIES)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)]
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=317)]  # a label key's longest


class PluginParams(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    """Base of every plugin's parameters: camelCase names as in the YAML; a name the plugin
    does not know is an error (a typo would otherwise silently keep the default)."""


P = TypeVar("P", bound=PluginParams)

_AT = re.compile(r"^(?P<what>.*) - at `\$\.(?P<path>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]*)`")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>[^`]*)`")


def parse_params(cls: type[P], raw: Any) -> P:
    """raw (the YAML's `parameters`) as cls; ValueError naming the parameter otherwise."""
    try:
        return msgspec.convert({} if raw is None else raw, cls)
    except msgspec.ValidationError as exc:
        raise ValueError(_describe(cls, str(exc), raw)) from None
    except RecursionError:
        raise ValueError("parameters nested too deeply") from None


def _describe(cls: type[PluginParams], message: str, raw: Any) -> str:
    known = sorted(cls.__struct_encode_fields__)
    if m := _MISSING.match(message):
        return f"parameter {m['name']} is required"
    if m := _UNKNOWN.match(message):
        return f"unknown parameter {m['name']!r}; known: {known}"
    if m := _AT.match(message):
        path, what = m["path"], m["what"][0].lower() + m["what"][1:]
        if isinstance(raw, dict) and path in raw and repr(raw[path]) not in what:
            what += f", got {raw[path]!r}"
        return f"parameter {path}: {what}"
    return f"parameters: {message}"
