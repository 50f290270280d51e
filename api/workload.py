"""workload.infergate.io/v1alpha1: Model and ModelInfer (autoscaling kinds: autoscaling.py).

`validate_*` mirror crds/workload.infergate.io_*.yaml: the schema's bounds and the CEL rules
(x-kubernetes-validations), with the CEL messages word for word.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from infergw.api.engines import TRTLLM
from infergw.api.lora_adapters import ADAPTER_NAME, ADAPTER_NAME_RULE, MAX_NAME
from infergw.api.meta import (
    ARTIFACT_URI,
    ARTIFACT_URI_RULE,
    DNS_LABEL,
    METRIC_NAME,
    QUANTITY,
    ApiStruct,
    Condition,
    LocalRef,
    ObjectMeta,
    Problems,
    check_status_conditions,
)
from infergw.api.model_source import ModelFiles, check_model_source
from infergw.api.networking import ENGINES, KVConnector, check_kv_connector
from infergw.api.nulls import PROPERTIES
from infergw.api.pod import check_pod_template, host_powers

GROUP_VERSION = "workload.infergate.io/v1alpha1"

DEFAULT_ENGINE = "vLLM"
# The Gateway a Model's HTTPRoute attaches to when spec.gateway names none (the CRD's default);
# its namespace is the Model's own unless spec.gateway.namespace says otherwise.
DEFAULT_GATEWAY = "inference-gateway"
DEFAULT_REPLICAS = 1
DEFAULT_ROLE_REPLICAS = 1
DEFAULT_WORKER_REPLICAS = 0
DEFAULT_MIN_REPLICAS = 1
RECOVERY_POLICIES = ("GroupRecreate", "RoleRecreate", "None")
DEFAULT_RECOVERY_POLICY = "RoleRecreate"
ROLLOUT_TYPES = ("RollingUpdate",)
DEFAULT_MAX_UNAVAILABLE = 1
DEFAULT_RESTART_GRACE_SECONDS = 0
MAX_COMMAND_WORDS = 16  # spec.engine.command: `python -m sglang.launch_server` is three
MAX_WORD_LENGTH = 4096  # one argument or word of the command

# The CEL message: trtllm-serve has no API that loads adapters at run time.
NO_LORA_FLAG = "loraAdapters need an engine that loads them at run time: vLLM, SGLang or Simulator"
# The CEL message: trtllm-serve spans nodes through MPI, which no flag of a pod sets up.
NO_MULTI_NODE = "workerReplicas need an engine that spans pods by flag: vLLM, SGLang or Simulator"
# The scheduler a gang needs (its PodGroups are Volcano's), and the CEL message for another.
VOLCANO = "volcano"
GANG_NEEDS_VOLCANO = "gangPolicy.enabled needs schedulerName volcano (or unset)"

_MAX_UNAVAILABLE_PERCENT = re.compile(r"^([1-9][0-9]?|100)%\Z")
_PARTITION_PERCENT = re.compile(r"^([0-9]|[1-9][0-9]|100)%\Z")


# ---- Model --------------------------------------------------------------------------------------


class ResourceRequirements(ApiStruct):
    limits: dict[str, int | str] | None = None
    requests: dict[str, int | str] | None = None


class EnvVar(ApiStruct):
    name: str
    value: str | None = None
    value_from: dict[str, Any] | None = None


class Engine(ApiStruct):
    """What serves: the engine type (its flags and metric names), its arguments and, when
    not the engine's usual one (controllers/engine_command.py), its command."""

    type: str | None = None
    args: list[str] | None = None
    command: list[str] | None = None


class ModelRole(ApiStruct):
    """The pods of one role (aggregated, prefill or decode) in each serving group."""

    replicas: int | None = None
    worker_replicas: int | None = None
    args: list[str] | None = None
    resources: ResourceRequirements | None = None


class ModelBackend(ApiStruct):
    aggregated: ModelRole | None = None
    prefill: ModelRole | None = None
    decode: ModelRole | None = None
    kv_connector: KVConnector | None = None


class LoraAdapter(ApiStruct):
    name: str
    artifact_url: str = msgspec.field(name="artifactURL")


class MetricTarget(ApiStruct):
    metric_name: str
    target_value: float


class ModelAutoscaling(ApiStruct):
    max_replicas: int
    min_replicas: int | None = None
    policy_ref: LocalRef | None = None
    metrics: list[MetricTarget] | None = None


class GatewayRef(ApiStruct):
    """The Gateway (gateway.networking.k8s.io) the Model's HTTPRoute attaches to, as a Gateway
    API parentRef names one: a name (DEFAULT_GATEWAY), a namespace (the Model's) and
    optionally one listener."""

    name: str | None = None
    namespace: str | None = None
    section_name: str | None = None


class ModelSpec(ApiStruct):
    model_uri: str = msgspec.field(name="modelURI")
    image: str
    engine: Engine
    backend: ModelBackend
    served_model_name: str | None = None
    env: list[EnvVar] | None = None
    resources: ResourceRequirements | None = None
    replicas: int | None = None
    lora_adapters: list[LoraAdapter] | None = None
    autoscaling: ModelAutoscaling | None = None
    gateway: GatewayRef | None = None
    # The revision of an hf:// model (default: the repository's main branch).
    model_revision: str | None = None
    model_files: ModelFiles | None = None


class ModelStatus(ApiStruct):
    observed_generation: int | None = None
    replicas: int | None = None
    ready_replicas: int | None = None
    conditions: list[Condition] | None = None


class Model(ApiStruct, kw_only=True):
    api_version: str = GROUP_VERSION
    kind: str = "Model"
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: ModelSpec
    status: ModelStatus | None = None


def engine_type(model: Model) -> str:
    """The Model's engine type, DEFAULT_ENGINE when it does not say."""
    return model.spec.engine.type or DEFAULT_ENGINE


def check_metric_targets(p: Problems, path: str, metrics: list[MetricTarget]) -> None:
    p.length(path, metrics, 1, 8, "items")
    p.unique(path, [m.metric_name for m in metrics], "metricName")
    for i, metric in enumerate(metrics):
        p.match(f"{path}[{i}].metricName", metric.metric_name, METRIC_NAME, "a metric name")
        p.number(f"{path}[{i}].targetValue", metric.target_value, 0, above=True)


def _check_words(p: Problems, path: str, words: list[str], shortest: int = 0) -> None:
    for i, word in enumerate(words):
        p.text(f"{path}[{i}]", word, shortest, MAX_WORD_LENGTH)


def _check_resources(p: Problems, path: str, resources: ResourceRequirements | None) -> None:
    if resources is None:
        return
    for part in ("limits", "requests"):
        for name, value in (getattr(resources, part) or {}).items():
            if isinstance(value, str) and not QUANTITY.match(value):
                p.add(f"{path}.{part}[{name}]", "must be a quantity like 2, 500m or 16Gi")


def _check_model_role(p: Problems, path: str, role: ModelRole) -> None:
    p.number(f"{path}.replicas", role.replicas, 1, 64)
    p.number(f"{path}.workerReplicas", role.worker_replicas, 0, 63)
    if role.args is not None:
        p.length(f"{path}.args", role.args, 0, 64, "items")
        _check_words(p, f"{path}.args", role.args)
    _check_resources(p, f"{path}.resources", role.resources)


def validate_model(model: Model) -> list[str]:
    p = Problems()
    spec = model.spec
    p.match("spec.modelURI", spec.model_uri, ARTIFACT_URI, ARTIFACT_URI_RULE)
    p.text("spec.modelURI", spec.model_uri, 1, 2048)
    check_model_source(p, spec.model_uri, spec.model_revision, spec.model_files)
    p.text("spec.image", spec.image, 1, 512)
    p.text("spec.servedModelName", spec.served_model_name, 1, 256)
    engine = spec.engine.type or DEFAULT_ENGINE
    p.choice("spec.engine.type", engine, ENGINES)
    if spec.engine.args is not None:
        p.length("spec.engine.args", spec.engine.args, 0, 128, "items")
        _check_words(p, "spec.engine.args", spec.engine.args)
    if spec.engine.command is not None:
        p.length("spec.engine.command", spec.engine.command, 1, MAX_COMMAND_WORDS, "items")
        _check_words(p, "spec.engine.command", spec.engine.command, shortest=1)
    if spec.env is not None:
        p.length("spec.env", spec.env, 0, 64, "items")
        p.unique("spec.env", [e.name for e in spec.env], "name")
    _check_resources(p, "spec.resources", spec.resources)
    p.number("spec.replicas", spec.replicas, 0)
    backend = spec.backend
    split = backend.prefill is not None or backend.decode is not None
    both = backend.prefill is not None and backend.decode is not None
    if (backend.aggregated is not None and split) or (backend.aggregated is None and not both):
        p.add("spec.backend", "set either aggregated, or both prefill and decode")
    if backend.kv_connector is not None and backend.prefill is None:
        p.add("spec.backend", "kvConnector applies to prefill/decode backends only")
    for name in ("aggregated", "prefill", "decode"):
        role = getattr(backend, name)
        if role is not None:
            _check_model_role(p, f"spec.backend.{name}", role)
    check_kv_connector(
        p, "spec.backend.kvConnector", backend.kv_connector, engine, ("spec", "engine type")
    )
    if spec.lora_adapters and engine == TRTLLM:
        p.add("spec", NO_LORA_FLAG)
    roles = (backend.aggregated, backend.prefill, backend.decode)
    if engine == TRTLLM and any(r is not None and (r.worker_replicas or 0) > 0 for r in roles):
        p.add("spec", NO_MULTI_NODE)
    if spec.lora_adapters is not None:
        p.length("spec.loraAdapters", spec.lora_adapters, 0, 32, "items")
        p.unique("spec.loraAdapters", [a.name for a in spec.lora_adapters], "name")
        for i, adapter in enumerate(spec.lora_adapters):
            name = f"spec.loraAdapters[{i}].name"
            p.match(name, adapter.name, ADAPTER_NAME, ADAPTER_NAME_RULE)
            p.text(name, adapter.name, 1, MAX_NAME)
            p.match(
                f"spec.loraAdapters[{i}].artifactURL", adapter.artifact_url, ARTIFACT_URI, "a URI"
            )
    if spec.gateway is not None:
        p.text("spec.gateway.name", spec.gateway.name, 1, 253)
        p.match("spec.gateway.namespace", spec.gateway.namespace, DNS_LABEL, "a DNS label")
        p.text("spec.gateway.namespace", spec.gateway.namespace, 1, 63)
        p.text("spec.gateway.sectionName", spec.gateway.section_name, 1, 253)
    scaling = spec.autoscaling
    if scaling is not None:
        low = scaling.min_replicas if scaling.min_replicas is not None else DEFAULT_MIN_REPLICAS
        p.number("spec.autoscaling.minReplicas", low, 0)
        p.number("spec.autoscaling.maxReplicas", scaling.max_replicas, 1)
        if low > scaling.max_replicas:
            p.add("spec.autoscaling", "minReplicas must not exceed maxReplicas")
        if (scaling.policy_ref is None) == (scaling.metrics is None):
            p.add("spec.autoscaling", "set exactly one of policyRef, metrics")
        if scaling.metrics is not None:
            check_metric_targets(p, "spec.autoscaling.metrics", scaling.metrics)
    if model.status is not None:
        check_status_conditions(p, "status.conditions", model.status.conditions)
    return p.messages


# ---- ModelInfer ---------------------------------------------------------------------------------


# A core/v1 PodTemplateSpec, kept as written; its checks are pod.py's.
PodTemplateDict = Annotated[dict[str, Any], msgspec.Meta(extra={PROPERTIES: ("metadata", "spec")})]


class Role(ApiStruct):
    name: str
    entry_template: PodTemplateDict
    replicas: int | None = None
    worker_replicas: int | None = None
    worker_template: PodTemplateDict | None = None


class GroupTemplate(ApiStruct):
    roles: list[Role]
    restart_grace_period_seconds: int | None = None


class RollingUpdateConfiguration(ApiStruct):
    max_unavailable: int | str | None = None
    partition: int | str | None = None


class RolloutStrategy(ApiStruct):
    type: str | None = None
    rolling_update_configuration: RollingUpdateConfiguration | None = None


class GangPolicy(ApiStruct):
    enabled: bool | None = None
    min_role_replicas: dict[str, int] | None = None


class ModelInferSpec(ApiStruct):
    template: GroupTemplate
    replicas: int | None = None
    scheduler_name: str | None = None
    gang_policy: GangPolicy | None = None
    recovery_policy: str | None = None
    rollout_strategy: RolloutStrategy | None = None


class ModelInferStatus(ApiStruct):
    observed_generation: int | None = None
    replicas: int | None = None
    ready_replicas: int | None = None
    updated_replicas: int | None = None
    current_revision: str | None = None
    update_revision: str | None = None
    label_selector: str | None = None
    conditions: list[Condition] | None = None


class ModelInfer(ApiStruct, kw_only=True):
    api_version: str = GROUP_VERSION
    kind: str = "ModelInfer"
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: ModelInferSpec
    status: ModelInferStatus | None = None


def _check_int_or_percent(
    p: Problems, path: str, value: int | str | None, low: int, percent: re.Pattern[str]
) -> None:
    if isinstance(value, str):
        p.match(path, value, percent, f"an integer or a percentage like 25% (at least {low})")
    else:
        p.number(path, value, low)


def validate_model_infer(infer: ModelInfer) -> list[str]:
    p = Problems()
    spec = infer.spec
    replicas = spec.replicas if spec.replicas is not None else DEFAULT_REPLICAS
    p.number("spec.replicas", replicas, 0)
    p.choice("spec.recoveryPolicy", spec.recovery_policy, RECOVERY_POLICIES)
    p.text("spec.schedulerName", spec.scheduler_name, 1, 253)
    roles = spec.template.roles
    p.length("spec.template.roles", roles, 1, 4, "items")
    p.unique("spec.template.roles", [r.name for r in roles], "role name")
    p.number(
        "spec.template.restartGracePeriodSeconds", spec.template.restart_grace_period_seconds, 0
    )
    for i, role in enumerate(roles):
        where = f"spec.template.roles[{i}]"
        if not 1 <= len(role.name) <= 12 or not DNS_LABEL.match(role.name):
            p.add(f"{where}.name", "must be a DNS label of at most 12 characters")
        p.number(f"{where}.replicas", role.replicas, 0, 64)
        p.number(f"{where}.workerReplicas", role.worker_replicas, 0, 63)
        check_pod_template(p, f"{where}.entryTemplate", role.entry_template, required=True)
        if role.worker_template is not None:
            check_pod_template(p, f"{where}.workerTemplate", role.worker_template, required=False)
    rollout = spec.rollout_strategy
    config = rollout.rolling_update_configuration if rollout is not None else None
    if rollout is not None:
        p.choice("spec.rolloutStrategy.type", rollout.type, ROLLOUT_TYPES)
    if config is not None:
        where = "spec.rolloutStrategy.rollingUpdateConfiguration"
        _check_int_or_percent(
            p, f"{where}.maxUnavailable", config.max_unavailable, 1, _MAX_UNAVAILABLE_PERCENT
        )
        _check_int_or_percent(p, f"{where}.partition", config.partition, 0, _PARTITION_PERCENT)
    gang = spec.gang_policy
    if gang is not None and gang.enabled and spec.scheduler_name not in (None, VOLCANO):
        p.add("spec", GANG_NEEDS_VOLCANO)
    if gang is not None and gang.min_role_replicas is not None:
        p.length("spec.gangPolicy.minRoleReplicas", gang.min_role_replicas, 0, 4, "roles")
        names = {r.name for r in roles}
        for name, count in gang.min_role_replicas.items():
            p.number(f"spec.gangPolicy.minRoleReplicas[{name}]", count, 0)
        if not set(gang.min_role_replicas) <= names:
            p.add("spec", "gangPolicy.minRoleReplicas names a role that the template does not have")
    if infer.status is not None:
        check_status_conditions(p, "status.conditions", infer.status.conditions)
    return p.messages


def model_infer_host_powers(infer: ModelInfer) -> list[str]:
    """What the ModelInfer's pod templates ask of the node (see pod.host_powers)."""
    out = []
    for i, role in enumerate(infer.spec.template.roles):
        where = f"spec.template.roles[{i}]"
        out += host_powers(f"{where}.entryTemplate", role.entry_template)
        if role.worker_template is not None:
            out += host_powers(f"{where}.workerTemplate", role.worker_template)
    return out
