"""The shape of an EndpointPickerConfig document as msgspec Structs, and the translation of
msgspec's errors ("Expected `float` >= 0.0 - at `$.schedulingProfiles[0].plugins[1].weight`")
into the operator's wording, prefixed with where in the document the fault is. What the shape
cannot say (plugin names that must exist, one picker per profile) config.build checks after."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

API_VERSIONS = (
    "inference.networking.x-k8s.io/v1alpha1",
    "llm-d.ai/v1alpha1",
    "infergate.io/v1alpha1",
)

# Far above any useful weight; a bound keeps the weighted sum of scores finite.
MAX_WEIGHT = 1_000_000

# NaN fails both bounds, so it is refused too.
Weight = Annotated[float, msgspec.Meta(ge=0, le=MAX_WEIGHT)]


class ConfigError(ValueError):
    pass


class PluginSpec(msgspec.Struct, frozen=True):
    type: str
    name: str | None = None  # defaults to the type
    parameters: dict[str, Any] | None = None

    @property
    def plugin_name(self) -> str:
        return self.name or self.type


class PluginRef(msgspec.Struct, frozen=True):
    pluginRef: str
    weight: Weight = 1.0  # read only for scorers


class ProfileSpec(msgspec.Struct, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    plugins: list[PluginRef] | None = None


class ConfigFile(msgspec.Struct, frozen=True):
    """The keys build reads; others (users:, read by epp.trust) pass through untouched."""

    kind: Literal["EndpointPickerConfig"]
    apiVersion: Literal[API_VERSIONS]
    plugins: list[PluginSpec] | None = None
    schedulingProfiles: list[ProfileSpec] | None = None
    featureGates: list[Any] | None = None


def decode(raw: Any) -> ConfigFile:
    """raw (the parsed YAML) as a ConfigFile; ConfigError in the operator's words otherwise."""
    try:
        return msgspec.convert(raw, ConfigFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(str(exc), raw)) from None
    except RecursionError:
        raise ConfigError("EndpointPickerConfig is nested too deeply") from None


# msgspec's message is "<what>[ - at `$<path>`]" or "... - at `key` in `$<path>`".
_AT = re.compile(r"^(?P<what>.*?)(?: - at `(?P<key>key` in `)?\$(?P<path>[^`]*)`)?$", re.S)
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]*)`")
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _describe(message: str, raw: Any) -> str:
    m = _AT.match(message)
    assert m is not None  # the pattern matches any text
    what, steps = m["what"], _steps(m["path"] or "")
    if m["key"]:
        return f"{_where(steps) or 'EndpointPickerConfig'}: every key must be a string"
    if missing := _MISSING.match(what):
        steps.append(missing["name"])
    return _wording(steps, raw, what)


def _steps(path: str) -> list[str | int]:
    return [name if name else int(index) for name, index in _STEP.findall(path)]


def _at(raw: Any, steps: list[str | int]) -> Any:
    """The value at steps in raw, None where the path leaves the document."""
    for step in steps:
        if isinstance(raw, dict):
            raw = raw.get(step)
        elif isinstance(raw, list) and isinstance(step, int) and step < len(raw):
            raw = raw[step]
        else:
            return None
    return raw


def _wording(steps: list[str | int], raw: Any, what: str) -> str:
    """The message for a fault at steps: the wording the picker used before msgspec did the
    checking (the tests and runbooks quote it), a generic path-prefixed one elsewhere."""
    got = _at(raw, steps)
    match steps:
        case []:
            return "EndpointPickerConfig must be a YAML mapping"
        case ["kind"]:
            return f"kind must be EndpointPickerConfig, got {got!r}"
        case ["apiVersion"]:
            return f"apiVersion must be one of {API_VERSIONS}, got {got!r}"
        case ["plugins" | "schedulingProfiles" | "featureGates" as key]:
            return f"{key} must be a list"
        case ["plugins", int(i)] | ["plugins", int(i), "type"]:
            return f"plugins[{i}] needs a 'type'"
        case ["plugins", int(i), "name"]:
            return f"plugins[{i}]: name must be a string"
        case ["plugins", int(i), "parameters", *_]:
            spec = _at(raw, steps[:2])
            return (
                f"plugins[{i}] ({spec.get('name') or spec.get('type')}): parameters must be a map"
            )
        case ["schedulingProfiles", int(i)] | ["schedulingProfiles", int(i), "name"]:
            return f"schedulingProfiles[{i}] needs a 'name' (a string)"
        case ["schedulingProfiles", int(i), "plugins"]:
            return f"schedulingProfiles[{i}].plugins must be a list"
        case ["schedulingProfiles", int(i), "plugins", int(j), *rest]:
            where = f"schedulingProfiles[{i}].plugins[{j}]"
            if rest == ["weight"]:
                return f"{where}: weight must be a number in 0..{MAX_WEIGHT}, got {got!r}"
            ref = _at(raw, steps[:4])
            named = ref.get("pluginRef") if isinstance(ref, dict) else ref
            return f"{where}: pluginRef {named!r} names no plugin"
    return f"{_where(steps)}: {what[0].lower()}{what[1:]}"


def _where(steps: list[str | int]) -> str:
    return "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".")
