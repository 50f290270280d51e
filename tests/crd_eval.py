"""Our CRDs evaluated in Python as the API server would: the openAPIV3Schema (jsonschema, with
the list rules), defaults, and the CEL rules (cel-python, the dev extra; without it `needs_cel`
tests skip).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import jsonschema
import pytest
import yaml

from tests.kube_schema import apply_defaults
from tests.paths import ROOT
from tests.schema_lint import join_path, list_errors

try:  # cel-python (the dev extra) evaluates the CRDs' CEL rules; without it those tests skip.
    import celpy
except ImportError:  # pragma: no cover
    celpy = None
needs_cel = pytest.mark.skipif(celpy is None, reason="cel-python is not installed")


CRDS = ROOT / "crds"
K8S_VERSION = "1.30"

# kind → (group, plural, example file)
KINDS = {
    "ModelRoute": ("networking.infergate.io", "modelroutes", "modelroute.yaml"),
    "ModelServer": ("networking.infergate.io", "modelservers", "modelserver.yaml"),
    "Model": ("workload.infergate.io", "models", "model.yaml"),
    "ModelInfer": ("workload.infergate.io", "modelinfers", "modelinfer.yaml"),
    "AutoScalingPolicy": ("workload.infergate.io", "autoscalingpolicies", "autoscalingpolicy.yaml"),
    "AutoScalingPolicyBinding": (
        "workload.infergate.io",
        "autoscalingpolicybindings",
        "autoscalingpolicybinding.yaml",
    ),
}

Obj = dict[str, Any]


@functools.cache
def load_crd(kind: str) -> Obj:
    group, plural, _ = KINDS[kind]
    return yaml.safe_load((CRDS / f"{group}_{plural}.yaml").read_text())


def crd_schema(kind: str) -> Obj:
    [version] = load_crd(kind)["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def schema_errors(kind: str, doc: Obj) -> list[str]:
    """jsonschema (OpenAPI v3.0 as draft 4 reads it; x-kubernetes-* ignored) plus list rules."""
    schema = crd_schema(kind)
    errors = []
    for error in jsonschema.Draft4Validator(schema).iter_errors(doc):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        errors.append(f"{where.lstrip('.')}: {error.message}")
    return errors + list_errors(schema, doc)


@functools.cache
def cel_program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def to_cel(schema: Obj, value: Any) -> Any:
    """Python value → CEL value, typed by the schema as the API server types it (a `number`
    written as 2 is the double 2.0)."""
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        out = {}
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else {})
            out[key] = to_cel(sub, item)
        return out
    if isinstance(value, list):
        return [to_cel(schema.get("items", {}), item) for item in value]
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def cel_errors(schema: Obj, value: Any, path: str = "", old: Any = None) -> list[str]:
    """Every x-kubernetes-validations rule, evaluated where the API server would evaluate it.
    Transition rules (oldSelf) run only when an old value is given, as on an update."""
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        activation = {"self": celpy.json_to_cel(to_cel(schema, value))}
        if "oldSelf" in rule["rule"]:
            if old is None:
                continue
            activation["oldSelf"] = celpy.json_to_cel(to_cel(schema, old))
        try:
            result = cel_program(rule["rule"]).evaluate(activation)
        except celpy.CELEvalError as exc:
            errors.append(f"{path}: CEL rule {rule['rule']!r} failed to evaluate: {exc}")
            continue
        if isinstance(result, celpy.CELEvalError):
            errors.append(f"{path}: CEL rule {rule['rule']!r} failed to evaluate: {result}")
        elif not result:
            errors.append(f"{path}: {rule['message']}")
    if isinstance(value, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key, item in value.items():
            old_item = old.get(key) if isinstance(old, dict) else None
            if key in props:
                errors += cel_errors(props[key], item, join_path(path, key), old_item)
            elif isinstance(extra, dict):
                errors += cel_errors(extra, item, f"{path}[{key}]", old_item)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += cel_errors(schema["items"], item, f"{path}[{i}]")
    return errors


def all_cel_errors(kind: str, doc: Obj, old: Obj | None = None) -> list[str]:
    schema = crd_schema(kind)
    new = apply_defaults(schema, copy.deepcopy(doc))
    return cel_errors(schema, new, old=old and apply_defaults(schema, copy.deepcopy(old)))
