"""networking.infergate.io/v1alpha1: ModelRoute and ModelServer, as read by the picker.

`validate_*` mirror crds/networking.infergate.io_*.yaml: the schema's bounds and the CEL rules
(x-kubernetes-validations), with the CEL messages word for word.
"""

from __future__ import annotations

from typing import Any

import msgspec

from infergw.api.engines import ENGINE_TYPES
from infergw.api.lora_adapters import MAX_ADAPTERS
from infergw.api.meta import (
    DNS_LABEL,
    DNS_SUBDOMAIN,
    DURATION,
    LABEL_KEY,
    ApiStruct,
    Condition,
    ObjectMeta,
    Problems,
    check_status_conditions,
)

GROUP_VERSION = "networking.infergate.io/v1alpha1"

ENGINES = ENGINE_TYPES
KV_CONNECTORS = ("nixl", "mooncake", "lmcache", "http", "sglang")
DEFAULT_KV_CONNECTOR = "nixl"
RATE_UNITS = ("second", "minute", "hour", "day")
DEFAULT_RATE_UNIT = "second"
RATE_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
PROTOCOLS = ("http",)  # what the gateway speaks to the pods (the InferencePool's appProtocol)

# Fields a ModelServer once accepted and nothing honoured. The CRD keeps them only to refuse
# them with these messages (a field left out of a structural schema would be dropped in
# silence); the README's ModelServer reference says why each went.
REMOVED_RETRY_INTERVAL = (
    "retryInterval is not supported: Envoy takes its retry back-off from the route, never from "
    "a request, and each retry goes at once to the next endpoint the picker chose; remove it"
)
REMOVED_KV_CONNECTOR = (
    "kvConnector is not a ModelServer field: the decode pods' connector sidecar is chosen by "
    "the Model's spec.backend.kvConnector; remove it"
)


class NetworkingStatus(ApiStruct):
    observed_generation: int | None = None
    conditions: list[Condition] | None = None


# ---- ModelRoute ---------------------------------------------------------------------------------


class StringMatch(ApiStruct):
    """Exactly one of exact, prefix, regex (RE2)."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None


class ModelMatch(ApiStruct):
    headers: dict[str, StringMatch] | None = None
    uri: StringMatch | None = None


class TargetModel(ApiStruct):
    model_server_name: str | None = None
    inference_pool_name: str | None = None
    weight: int | None = None


class RouteRule(ApiStruct):
    target_models: list[TargetModel]
    name: str | None = None
    model_match: ModelMatch | None = None


# What a ModelRoute's parentRefs may name (api/parents.py reads them): Gateways.
PARENT_GROUP = "gateway.networking.k8s.io"
PARENT_KIND = "Gateway"


class ParentRef(ApiStruct):
    name: str
    group: str | None = None
    kind: str | None = None
    namespace: str | None = None
    section_name: str | None = None


class RedisBackend(ApiStruct):
    address: str


class GlobalRateLimit(ApiStruct):
    redis: RedisBackend


class RateLimit(ApiStruct):
    input_tokens_per_unit: int | None = None
    output_tokens_per_unit: int | None = None
    unit: str | None = None
    per_user: bool | None = None
    global_: GlobalRateLimit | None = msgspec.field(default=None, name="global")


class ModelRouteSpec(ApiStruct):
    rules: list[RouteRule]
    model_name: str | None = None
    lora_adapters: list[str] | None = None
    parent_refs: list[ParentRef] | None = None
    rate_limit: RateLimit | None = None


class ModelRoute(ApiStruct, kw_only=True):
    api_version: str = GROUP_VERSION
    kind: str = "ModelRoute"
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: ModelRouteSpec
    status: NetworkingStatus | None = None


def _check_string_match(p: Problems, path: str, match: StringMatch) -> None:
    if sum(v is not None for v in (match.exact, match.prefix, match.regex)) != 1:
        p.add(path, "set exactly one of exact, prefix, regex")
    for name in ("exact", "prefix", "regex"):
        value = getattr(match, name)
        if value is not None and len(value) > 1024:
            p.add(f"{path}.{name}", "must be at most 1024 characters")


def _check_targets(p: Problems, path: str, targets: list[TargetModel]) -> None:
    p.length(path, targets, 1, 16, "items")
    for i, target in enumerate(targets):
        where = f"{path}[{i}]"
        if (target.model_server_name is None) == (target.inference_pool_name is None):
            p.add(where, "set exactly one of modelServerName, inferencePoolName")
        p.match(f"{where}.modelServerName", target.model_server_name, DNS_SUBDOMAIN, "a DNS name")
        p.match(
            f"{where}.inferencePoolName", target.inference_pool_name, DNS_SUBDOMAIN, "a DNS name"
        )
        p.number(f"{where}.weight", target.weight, 0, 100)
    weighted = [t.weight is not None for t in targets]
    if any(weighted) and not all(weighted):
        p.add(path, "set weight on all targetModels or on none")
    if targets and all(weighted) and not any((t.weight or 0) > 0 for t in targets):
        p.add(path, "at least one weight must be above 0")


def _check_rate_limit(p: Problems, path: str, limit: RateLimit) -> None:
    if limit.input_tokens_per_unit is None and limit.output_tokens_per_unit is None:
        p.add(path, "set inputTokensPerUnit or outputTokensPerUnit")
    p.number(f"{path}.inputTokensPerUnit", limit.input_tokens_per_unit, 1)
    p.number(f"{path}.outputTokensPerUnit", limit.output_tokens_per_unit, 1)
    p.choice(f"{path}.unit", limit.unit, RATE_UNITS)
    if limit.global_ is not None:
        address = limit.global_.redis.address
        host, _, port = address.rpartition(":")
        if (
            not host
            or not port.isdigit()
            or not 0 < int(port) < 65536
            or any(c.isspace() for c in host)
        ):
            p.add(f"{path}.global.redis.address", "must be host:port")


def validate_model_route(route: ModelRoute) -> list[str]:
    p = Problems()
    spec = route.spec
    if spec.model_name is None and not spec.lora_adapters:
        p.add("spec", "set modelName or loraAdapters")
    p.text("spec.modelName", spec.model_name, 1, 256)
    if spec.lora_adapters is not None:
        p.length("spec.loraAdapters", spec.lora_adapters, 0, MAX_ADAPTERS, "items")
        p.unique("spec.loraAdapters", list(spec.lora_adapters), "adapter")
        for i, adapter in enumerate(spec.lora_adapters):
            p.text(f"spec.loraAdapters[{i}]", adapter, 1, 256)
    if spec.parent_refs is not None:
        p.length("spec.parentRefs", spec.parent_refs, 0, 16, "items")
        for i, ref in enumerate(spec.parent_refs):
            where = f"spec.parentRefs[{i}]"
            # Only a Gateway: the body-based router of that Gateway is what honours them.
            p.choice(f"{where}.group", ref.group, (PARENT_GROUP,))
            p.choice(f"{where}.kind", ref.kind, (PARENT_KIND,))
            p.text(f"{where}.name", ref.name, 1, 253)
            p.match(f"{where}.name", ref.name, DNS_SUBDOMAIN, "a DNS name")
            p.match(f"{where}.namespace", ref.namespace, DNS_LABEL, "a DNS label")
            p.text(f"{where}.sectionName", ref.section_name, 1, 253)
            p.match(f"{where}.sectionName", ref.section_name, DNS_SUBDOMAIN, "a DNS name")
    p.length("spec.rules", spec.rules, 1, 16, "items")
    for i, rule in enumerate(spec.rules):
        where = f"spec.rules[{i}]"
        p.match(f"{where}.name", rule.name, DNS_LABEL, "a DNS label")
        match = rule.model_match
        if match is not None and match.headers is not None:
            p.length(f"{where}.modelMatch.headers", match.headers, 0, 16, "headers")
            for header, value in match.headers.items():
                _check_string_match(p, f"{where}.modelMatch.headers[{header}]", value)
        if match is not None and match.uri is not None:
            _check_string_match(p, f"{where}.modelMatch.uri", match.uri)
        _check_targets(p, f"{where}.targetModels", rule.target_models)
    if spec.rate_limit is not None:
        _check_rate_limit(p, "spec.rateLimit", spec.rate_limit)
    if route.status is not None:
        check_status_conditions(p, "status.conditions", route.status.conditions)
    return p.messages


# ---- ModelServer --------------------------------------------------------------------------------


class PDGroup(ApiStruct):
    group_key: str
    prefill_labels: dict[str, str]
    decode_labels: dict[str, str]


class WorkloadSelector(ApiStruct):
    match_labels: dict[str, str]
    pd_group: PDGroup | None = msgspec.field(default=None, name="pdGroup")


class WorkloadPort(ApiStruct):
    port: int
    protocol: str | None = None


class Retry(ApiStruct):
    attempts: int | None = None
    # Removed (REMOVED_RETRY_INTERVAL): read only to be refused.
    retry_interval: Any = None


class TrafficPolicy(ApiStruct):
    timeout: str | None = None
    retry: Retry | None = None


class KVConnector(ApiStruct):
    type: str | None = None


class ModelServerSpec(ApiStruct):
    inference_engine: str
    workload_selector: WorkloadSelector
    model: str | None = None
    workload_port: WorkloadPort | None = None
    traffic_policy: TrafficPolicy | None = None
    # Removed (REMOVED_KV_CONNECTOR): read only to be refused.
    kv_connector: Any = None


class ModelServer(ApiStruct, kw_only=True):
    api_version: str = GROUP_VERSION
    kind: str = "ModelServer"
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: ModelServerSpec
    status: NetworkingStatus | None = None


def check_kv_connector(
    p: Problems, path: str, connector: KVConnector | None, engine: str, rule: tuple[str, str]
) -> None:
    """The connector's protocol must be the engine's: SGLang pairs only with its bootstrap.
    `rule` is (path of the object holding the CEL rule, how that object names the engine)."""
    if connector is None:
        return
    kind = connector.type or DEFAULT_KV_CONNECTOR
    p.choice(f"{path}.type", kind, KV_CONNECTORS)
    if (kind == "sglang") != (engine == "SGLang"):
        rule_path, engine_field = rule
        p.add(
            rule_path, f"kvConnector type sglang goes with {engine_field} SGLang, and only with it"
        )


def validate_model_server(server: ModelServer) -> list[str]:
    p = Problems()
    spec = server.spec
    p.choice("spec.inferenceEngine", spec.inference_engine, ENGINES)
    p.text("spec.model", spec.model, 1, 256)
    selector = spec.workload_selector
    p.labels("spec.workloadSelector.matchLabels", selector.match_labels, 1, 64)
    pd = selector.pd_group
    if pd is not None:
        where = "spec.workloadSelector.pdGroup"
        p.match(f"{where}.groupKey", pd.group_key, LABEL_KEY, "a label key")
        p.labels(f"{where}.prefillLabels", pd.prefill_labels, 1, 16)
        p.labels(f"{where}.decodeLabels", pd.decode_labels, 1, 16)
        if pd.prefill_labels == pd.decode_labels:
            p.add(where, "prefillLabels and decodeLabels must differ")
    if spec.workload_port is not None:
        p.number("spec.workloadPort.port", spec.workload_port.port, 1, 65535)
        p.choice("spec.workloadPort.protocol", spec.workload_port.protocol, PROTOCOLS)
    traffic = spec.traffic_policy
    if traffic is not None:
        p.match("spec.trafficPolicy.timeout", traffic.timeout, DURATION, "a duration like 30s")
        if traffic.retry is not None:
            p.number("spec.trafficPolicy.retry.attempts", traffic.retry.attempts, 0, 10)
            if traffic.retry.retry_interval is not None:
                p.add("spec.trafficPolicy.retry", REMOVED_RETRY_INTERVAL)
    if spec.kv_connector is not None:
        p.add("spec", REMOVED_KV_CONNECTOR)
    if server.status is not None:
        check_status_conditions(p, "status.conditions", server.status.conditions)
    return p.messages
