"""Our API objects as Python types, with the same validation as the CRDs in crds/.

    obj = from_dict(yaml.safe_load(text))   # the type is chosen by apiVersion and kind
    problems = validate(obj)                # ["spec.replicas: must be at least 0", ...]
    text = yaml.safe_dump(to_dict(obj))     # what was read, unchanged

Imported by the picker (epp) and the controllers alike, so it imports neither.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from infergw.api import networking, upstream, workload
from infergw.api.autoscaling import (
    AutoScalingPolicy,
    AutoScalingPolicyBinding,
    validate_autoscaling_policy,
    validate_autoscaling_policy_binding,
)
from infergw.api.meta import (
    ApiStruct,
    Condition,
    ObjectMeta,
    check_object_meta,
    conversion_problem,
    duration_seconds,
)
from infergw.api.networking import (
    ModelRoute,
    ModelServer,
    validate_model_route,
    validate_model_server,
)
from infergw.api.nulls import prune_nulls as _prune_nulls
from infergw.api.pod import ALLOW_PRIVILEGED_LABEL
from infergw.api.upstream import (
    InferenceObjective,
    InferencePool,
    validate_inference_objective,
    validate_inference_pool,
)
from infergw.api.workload import (
    Model,
    ModelInfer,
    model_infer_host_powers,
    validate_model,
    validate_model_infer,
)

__all__ = [
    "ALLOW_PRIVILEGED_LABEL",
    "KINDS",
    "ApiError",
    "AutoScalingPolicy",
    "AutoScalingPolicyBinding",
    "Condition",
    "InferenceObjective",
    "InferencePool",
    "Model",
    "ModelInfer",
    "ModelRoute",
    "ModelServer",
    "ObjectMeta",
    "duration_seconds",
    "forbidden_host_powers",
    "from_dict",
    "from_dict_as",
    "prune_nulls",
    "to_dict",
    "validate",
    "validate_dict",
]

_VALIDATORS: dict[type[ApiStruct], Callable[[Any], list[str]]] = {
    ModelRoute: validate_model_route,
    ModelServer: validate_model_server,
    Model: validate_model,
    ModelInfer: validate_model_infer,
    AutoScalingPolicy: validate_autoscaling_policy,
    AutoScalingPolicyBinding: validate_autoscaling_policy_binding,
    InferencePool: validate_inference_pool,
    InferenceObjective: validate_inference_objective,
}

# (apiVersion, kind) → type.
KINDS: dict[tuple[str, str], type[ApiStruct]] = {
    (networking.GROUP_VERSION, "ModelRoute"): ModelRoute,
    (networking.GROUP_VERSION, "ModelServer"): ModelServer,
    (workload.GROUP_VERSION, "Model"): Model,
    (workload.GROUP_VERSION, "ModelInfer"): ModelInfer,
    (workload.GROUP_VERSION, "AutoScalingPolicy"): AutoScalingPolicy,
    (workload.GROUP_VERSION, "AutoScalingPolicyBinding"): AutoScalingPolicyBinding,
    (upstream.POOL_GROUP_VERSION, "InferencePool"): InferencePool,
    **{(v, "InferenceObjective"): InferenceObjective for v in upstream.OBJECTIVE_GROUP_VERSIONS},
}


class ApiError(ValueError):
    """An object that cannot be read as the kind it claims to be."""


def from_dict(obj: dict[str, Any]) -> ApiStruct:
    """The typed object for a Kubernetes-style dict; ApiError names the field that is wrong."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    cls = KINDS.get(key)  # type: ignore[arg-type]
    if cls is None:
        raise ApiError(f"unknown kind {key[1]!r} in {key[0]!r}")
    try:
        return msgspec.convert(obj, cls)
    except msgspec.ValidationError as exc:
        raise ApiError(conversion_problem(exc)) from None


T = TypeVar("T", bound=ApiStruct)


def from_dict_as(cls: type[T], obj: dict[str, Any]) -> T:
    """from_dict where the kind is known (a store's get of that kind): ApiError, naming the
    object, if it cannot be read as one."""
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    try:
        typed = from_dict(obj)
    except ApiError as exc:
        raise ApiError(f"{cls.__name__} {name}: {exc}") from None
    if not isinstance(typed, cls):
        raise ApiError(f"{cls.__name__} {name}: is a {obj.get('kind')!r}")
    return typed


def prune_nulls(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` without the nulls the API server would drop (see nulls.py); other kinds as given."""
    cls = KINDS.get((obj.get("apiVersion"), obj.get("kind")))  # type: ignore[arg-type]
    return obj if cls is None else _prune_nulls(obj, cls)


def to_dict(obj: ApiStruct) -> dict[str, Any]:
    """Back to a plain dict, apiVersion and kind first; unset fields are left out."""
    out = msgspec.to_builtins(obj)
    return {"apiVersion": obj.api_version, "kind": obj.kind, **out}  # type: ignore[attr-defined]


def validate(obj: ApiStruct) -> list[str]:
    """Every problem the API server (object names) and the CRD's schema and CEL rules would
    report, as `path: message`."""
    return check_object_meta(obj.metadata) + _VALIDATORS[type(obj)](obj)  # type: ignore[attr-defined]


def validate_dict(obj: dict[str, Any]) -> list[str]:
    """from_dict, then validate: for admission, where a bad object is an answer, not a crash."""
    try:
        return validate(from_dict(prune_nulls(obj)))
    except ApiError as exc:
        return [str(exc)]


def forbidden_host_powers(obj: dict[str, Any], namespace_labels: dict[str, str]) -> list[str]:
    """The problems of a valid object whose pods would get power over their node (privileged,
    added capabilities, hostPath, host namespaces) in a namespace that has not opted in."""
    if namespace_labels.get(ALLOW_PRIVILEGED_LABEL) == "true":
        return []
    typed = from_dict(prune_nulls(obj))
    powers = model_infer_host_powers(typed) if isinstance(typed, ModelInfer) else []
    hint = f"allowed only in a namespace labelled {ALLOW_PRIVILEGED_LABEL}=true"
    return [f"{power} ({hint})" for power in powers]
