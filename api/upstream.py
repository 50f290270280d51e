"""The upstream kinds we serve from crds/upstream/: InferencePool (inference.networking.k8s.io/v1,
the Gateway API Inference Extension's) and InferenceObjective (llm-d.ai/v1alpha2, llm-d router's).

InferenceObjective moved in 2026 from the Inference Extension's inference.networking.x-k8s.io
group to llm-d.ai with the same fields: we read both apiVersions and write the current one.
`validate_*` mirror those CRDs' bounds and their CEL rules.
"""

from __future__ import annotations

from typing import Any

import msgspec

from infergw.api.meta import (
    ApiStruct,
    Condition,
    ObjectMeta,
    Problems,
    check_status_conditions,
)

POOL_GROUP_VERSION = "inference.networking.k8s.io/v1"
OBJECTIVE_GROUP_VERSION = "llm-d.ai/v1alpha2"
# Where InferenceObjective lived before llm-d router took it over; still read.
LEGACY_OBJECTIVE_GROUP_VERSION = "inference.networking.x-k8s.io/v1alpha2"
OBJECTIVE_GROUP_VERSIONS = (OBJECTIVE_GROUP_VERSION, LEGACY_OBJECTIVE_GROUP_VERSION)
APP_PROTOCOLS = ("http", "kubernetes.io/h2c")
FAILURE_MODES = ("FailOpen", "FailClose")
DEFAULT_FAILURE_MODE = "FailClose"
# The message of the CRD's CEL rule on endpointPickerRef.
PORT_REQUIRED = "port is required when kind is 'Service' or unspecified (defaults to 'Service')"


class PoolSelector(ApiStruct):
    match_labels: dict[str, str]


class Port(ApiStruct):
    number: int


class EndpointPickerRef(ApiStruct):
    name: str
    group: str | None = None
    kind: str | None = None
    port: Port | None = None
    failure_mode: str | None = None


class InferencePoolSpec(ApiStruct):
    selector: PoolSelector
    target_ports: list[Port]
    app_protocol: str | None = None
    endpoint_picker_ref: EndpointPickerRef | None = None


class InferencePoolStatus(ApiStruct):
    # One entry per parent Gateway; kept as plain objects, the picker does not read them.
    parents: list[dict[str, Any]] | None = None


class InferencePool(ApiStruct, kw_only=True):
    api_version: str = POOL_GROUP_VERSION
    kind: str = "InferencePool"
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: InferencePoolSpec
    status: InferencePoolStatus | None = None


def validate_inference_pool(pool: InferencePool) -> list[str]:
    p = Problems()
    spec = pool.spec
    p.labels("spec.selector.matchLabels", spec.selector.match_labels, 1, 64)
    p.length("spec.targetPorts", spec.target_ports, 1, 8, "items")
    p.unique("spec.targetPorts", [port.number for port in spec.target_ports], "port")
    for i, port in enumerate(spec.target_ports):
        p.number(f"spec.targetPorts[{i}].number", port.number, 1, 65535)
    p.choice("spec.appProtocol", spec.app_protocol, APP_PROTOCOLS)
    ref = spec.endpoint_picker_ref
    if ref is None:  # required in the release we ship (GIE v1.5.0); optional from v1.6.0
        p.add("spec.endpointPickerRef", "Required value")
    else:
        if (ref.kind or "Service") == "Service" and ref.port is None:
            p.add("spec.endpointPickerRef", PORT_REQUIRED)
        if ref.port is not None:
            p.number("spec.endpointPickerRef.port.number", ref.port.number, 1, 65535)
        p.choice("spec.endpointPickerRef.failureMode", ref.failure_mode, FAILURE_MODES)
    return p.messages


class PoolRef(ApiStruct):
    name: str
    group: str | None = None
    kind: str | None = None


class InferenceObjectiveSpec(ApiStruct):
    pool_ref: PoolRef
    priority: int | None = None


class InferenceObjectiveStatus(ApiStruct):
    conditions: list[Condition] | None = None


class InferenceObjective(ApiStruct, kw_only=True):
    api_version: str = OBJECTIVE_GROUP_VERSION
    kind: str = "InferenceObjective"
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: InferenceObjectiveSpec
    status: InferenceObjectiveStatus | None = None


def validate_inference_objective(objective: InferenceObjective) -> list[str]:
    p = Problems()
    p.number("spec.priority", objective.spec.priority, -(2**31), 2**31 - 1)
    if objective.status is not None:
        check_status_conditions(p, "status.conditions", objective.status.conditions)
    return p.messages


def current_group_last(objectives: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """InferenceObjectives of both groups, the legacy group's first: where a later object of
    the same name wins (the picker's datastore), the llm-d.ai one does."""
    return sorted(objectives, key=lambda o: o.get("apiVersion") == OBJECTIVE_GROUP_VERSION)
