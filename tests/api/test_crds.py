"""Our six CRDs (crds/*.yaml), their examples (examples/crds/) and api, checked together.

- Each CRD passes the apiextensions v1 schema (kubernetes_validate, strict) and is structural.
- Each example passes its CRD's openAPIV3Schema (jsonschema), its CEL rules (evaluated with
  cel-python after applying the schema's defaults, as the API server does) and api's
  validate; and reads and writes back through api unchanged.
- Each broken example fails: bounds, enums and patterns fail jsonschema; cross-field rules pass
  jsonschema but fail CEL; all fail api's validate with the message we expect, which for
  a CEL rule is the rule's own `path: message`. Every CEL rule in the CRDs must have such a case.

tests/test_manifests.py checks all of crds/ too, with the API server's structural rules of
tests/schema_lint.py (here: those and our stricter ones) and its own CEL table; the evaluation
in Python (schema, defaults, CEL) is tests/crd_eval.py, which tests/test_examples.py uses too.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kubernetes_validate
import pytest
import yaml

from infergw import api
from infergw.api import autoscaling, networking, workload
from infergw.api.lora_adapters import MAX_ADAPTERS
from tests.crd_eval import (
    K8S_VERSION,
    KINDS,
    Obj,
    all_cel_errors,
    apply_defaults,
    cel_program,
    crd_schema,
    load_crd,
    needs_cel,
    schema_errors,
)
from tests.paths import ROOT
from tests.schema_lint import OUR_RULES, structural_errors

EXAMPLES = ROOT / "examples" / "crds"

# ---- loading ------------------------------------------------------------------------------------


def _example(kind: str) -> Obj:
    return yaml.safe_load((EXAMPLES / KINDS[kind][2]).read_text())


# ---- the CRDs themselves ------------------------------------------------------------------------


def _cel_rules(schema: Obj) -> list[Obj]:
    rules = list(schema.get("x-kubernetes-validations", []))
    for sub in schema.get("properties", {}).values():
        rules += _cel_rules(sub)
    for key in ("additionalProperties", "items"):
        if isinstance(schema.get(key), dict):
            rules += _cel_rules(schema[key])
    return rules


def _schema_at(schema: Obj, json_path: str) -> Obj | None:
    """The field a printer column's path names; `list[?(@.type=="X")]` is a list's item."""
    for part in re.sub(r"\[\?\(@\.[^)]*\)\]", "[]", json_path).strip(".").split("."):
        name, filtered = part.removesuffix("[]"), part.endswith("[]")
        schema = schema.get("properties", {}).get(name)
        if schema is not None and filtered:
            schema = schema.get("items")
        if schema is None:
            return None
    return schema


@pytest.mark.parametrize("kind", KINDS)
def test_crd_passes_the_apiextensions_schema(kind: str) -> None:
    try:
        kubernetes_validate.validate(load_crd(kind), K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{kind}: {exc}")


@pytest.mark.parametrize("kind", KINDS)
def test_crd_schema_is_structural(kind: str) -> None:
    schema = crd_schema(kind)
    assert structural_errors(schema, OUR_RULES) == []
    assert set(schema["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}
    assert schema["properties"]["metadata"] == {"type": "object"}
    assert schema["description"]


def test_the_structural_check_can_fail() -> None:
    broken = {
        "type": "object",
        "properties": {
            "a": {"description": "no type"},
            "b": {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}},
            "c": {"type": "integer", "minimum": 1, "default": 0},
            "d": {"x-kubernetes-int-or-string": True, "type": "string"},
        },
    }
    assert len(structural_errors(broken, OUR_RULES)) == 5


@pytest.mark.parametrize("kind", KINDS)
def test_crd_names_versions_and_subresources(kind: str) -> None:
    group, plural, _ = KINDS[kind]
    crd = load_crd(kind)
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{plural}.{group}"
    assert (spec["group"], spec["scope"]) == (group, "Namespaced")
    names = spec["names"]
    assert (names["kind"], names["plural"]) == (kind, plural)
    assert (names["listKind"], names["singular"]) == (f"{kind}List", kind.lower())
    assert names["categories"] == ["infergate"]
    assert names["shortNames"]
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"]["status"] == {}
    if kind == "ModelInfer":
        assert version["subresources"]["scale"] == {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.labelSelector",
        }
        schema = crd_schema(kind)
        assert _schema_at(schema, ".spec.replicas")["type"] == "integer"
        assert _schema_at(schema, ".status.replicas")["type"] == "integer"
        assert _schema_at(schema, ".status.labelSelector")["type"] == "string"
    else:
        assert "scale" not in version["subresources"]


@pytest.mark.parametrize("kind", KINDS)
def test_printer_columns_point_at_fields_of_their_type(kind: str) -> None:
    [version] = load_crd(kind)["spec"]["versions"]
    columns = version["additionalPrinterColumns"]
    assert columns[-1] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    for column in columns[:-1]:
        field = _schema_at(crd_schema(kind), column["jsonPath"])
        assert field is not None, f"{column['name']}: {column['jsonPath']} is not in the schema"
        assert field["type"] == column["type"], column


def test_short_names_do_not_collide() -> None:
    short = [s for kind in KINDS for s in load_crd(kind)["spec"]["names"]["shortNames"]]
    assert len(short) == len(set(short))


@needs_cel
@pytest.mark.parametrize("kind", KINDS)
def test_every_cel_rule_compiles(kind: str) -> None:
    for rule in _cel_rules(crd_schema(kind)):
        cel_program(rule["rule"])


# ---- the examples -------------------------------------------------------------------------------


def test_one_example_per_kind() -> None:
    files = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert files == {example for _, _, example in KINDS.values()}
    assert (EXAMPLES / "README.md").is_file()


@pytest.mark.parametrize("kind", KINDS)
def test_example_passes_its_crd_schema(kind: str) -> None:
    doc = _example(kind)
    assert (doc["apiVersion"], doc["kind"]) == (f"{KINDS[kind][0]}/v1alpha1", kind)
    assert schema_errors(kind, doc) == []
    defaulted = apply_defaults(crd_schema(kind), copy.deepcopy(doc))
    assert schema_errors(kind, defaulted) == []


@needs_cel
@pytest.mark.parametrize("kind", KINDS)
def test_example_passes_its_crd_cel_rules(kind: str) -> None:
    assert all_cel_errors(kind, _example(kind)) == []


@pytest.mark.parametrize("kind", KINDS)
def test_example_passes_api_validate_before_and_after_defaulting(kind: str) -> None:
    doc = _example(kind)
    assert api.validate(api.from_dict(doc)) == []
    defaulted = apply_defaults(crd_schema(kind), copy.deepcopy(doc))
    assert api.validate(api.from_dict(defaulted)) == []


@pytest.mark.parametrize("kind", KINDS)
def test_example_round_trips_through_the_api_types(kind: str) -> None:
    doc = _example(kind)
    obj = api.from_dict(doc)
    assert type(obj).__name__ == kind
    assert api.to_dict(obj) == doc
    assert yaml.safe_load(yaml.safe_dump(api.to_dict(obj))) == doc


def test_examples_refer_to_each_other() -> None:
    model, infer, server = _example("Model"), _example("ModelInfer"), _example("ModelServer")
    route, policy = _example("ModelRoute"), _example("AutoScalingPolicy")
    binding = _example("AutoScalingPolicyBinding")
    name = model["metadata"]["name"]
    assert infer["metadata"]["labels"]["infergate.io/model"] == name
    assert server["spec"]["workloadSelector"]["matchLabels"] == {"infergate.io/model": name}
    assert route["spec"]["modelName"] == server["spec"]["model"] == name
    assert model["spec"]["autoscaling"]["policyRef"]["name"] == policy["metadata"]["name"]
    assert binding["spec"]["policyRef"]["name"] == policy["metadata"]["name"]
    roles = {r["name"] for r in infer["spec"]["template"]["roles"]}
    pd = binding["spec"]["prefillDecode"]
    assert {pd["prefill"]["target"]["role"], pd["decode"]["target"]["role"]} == roles
    assert pd["prefill"]["target"]["name"] == infer["metadata"]["name"]
    targets = [t for rule in route["spec"]["rules"] for t in rule["targetModels"]]
    assert server["metadata"]["name"] in {t.get("modelServerName") for t in targets}


def test_python_defaults_match_the_crds() -> None:
    infer = crd_schema("ModelInfer")["properties"]["spec"]["properties"]
    assert infer["recoveryPolicy"]["default"] == workload.DEFAULT_RECOVERY_POLICY
    assert infer["recoveryPolicy"]["enum"] == list(workload.RECOVERY_POLICIES)
    assert infer["replicas"]["default"] == workload.DEFAULT_REPLICAS
    server = crd_schema("ModelServer")["properties"]["spec"]["properties"]
    assert server["inferenceEngine"]["enum"] == list(networking.ENGINES)
    assert server["workloadPort"]["properties"]["protocol"]["enum"] == list(networking.PROTOCOLS)
    model = crd_schema("Model")["properties"]["spec"]["properties"]["backend"]["properties"]
    assert model["kvConnector"]["properties"]["type"]["default"] == networking.DEFAULT_KV_CONNECTOR
    assert model["kvConnector"]["properties"]["type"]["enum"] == list(networking.KV_CONNECTORS)
    route = crd_schema("ModelRoute")["properties"]["spec"]["properties"]["rateLimit"]["properties"]
    assert route["unit"]["enum"] == list(networking.RATE_UNITS)
    policy = crd_schema("AutoScalingPolicy")["properties"]["spec"]["properties"]
    assert policy["tolerancePercent"]["default"] == autoscaling.DEFAULT_TOLERANCE_PERCENT
    up = policy["behavior"]["properties"]["scaleUp"]["properties"]
    stable = {k: v["default"] for k, v in up["stablePolicy"]["properties"].items()}
    assert stable == autoscaling.DEFAULT_STABLE_UP
    panic = {k: v["default"] for k, v in up["panicPolicy"]["properties"].items()}
    assert panic == autoscaling.DEFAULT_PANIC
    down = policy["behavior"]["properties"]["scaleDown"]["properties"]
    assert {k: v["default"] for k, v in down.items()} == autoscaling.DEFAULT_STABLE_DOWN


# ---- broken examples ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Broken:
    kind: str
    name: str
    mutate: Callable[[Obj], None]
    message: str  # what api.validate must say, `path: message`
    cel: bool = False  # a cross-field rule: jsonschema passes, CEL fails with the same message


def _set(path: str, value: Any) -> Callable[[Obj], None]:
    """A mutation that sets `a.b[0].c` (or deletes it, for value DELETE)."""

    def mutate(doc: Obj) -> None:
        parts = path.replace("[", ".").replace("]", "").split(".")
        target = doc
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else target[part]
        last = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
        if value is DELETE:
            del target[last]
        else:
            target[last] = copy.deepcopy(value)

    return mutate


def _all(*mutations: Callable[[Obj], None]) -> Callable[[Obj], None]:
    def mutate(doc: Obj) -> None:
        for m in mutations:
            m(doc)

    return mutate


DELETE = object()
ROUTE, SERVER, MODEL, INFER = "ModelRoute", "ModelServer", "Model", "ModelInfer"
POLICY, BINDING = "AutoScalingPolicy", "AutoScalingPolicyBinding"
_TARGETS = "spec.rules[1].targetModels"
_RUC = "spec.rolloutStrategy.rollingUpdateConfiguration"
_PD = "spec.prefillDecode"
_HETERO = {
    "targets": [
        {"target": {"name": "llama-3-8b-a100"}, "maxReplicas": 4, "cost": 3},
        {"target": {"name": "llama-3-8b-l4"}, "maxReplicas": 8, "cost": 1},
    ]
}
_to_hetero = _all(_set(_PD, DELETE), _set("spec.heterogeneousTarget", _HETERO))

BROKEN = [
    # ModelRoute
    Broken(
        ROUTE,
        "weight-101",
        _set(f"{_TARGETS}[1].weight", 101),
        f"{_TARGETS}[1].weight: must be 0..100",
    ),
    Broken(
        ROUTE,
        "unit-week",
        _set("spec.rateLimit.unit", "week"),
        "spec.rateLimit.unit: must be one of second, minute, hour, day",
    ),
    Broken(
        ROUTE,
        "zero-input-tokens",
        _set("spec.rateLimit.inputTokensPerUnit", 0),
        "spec.rateLimit.inputTokensPerUnit: must be at least 1",
    ),
    Broken(
        ROUTE,
        "17-targets",
        _set(_TARGETS, [{"modelServerName": "s", "weight": 1}] * 17),
        f"{_TARGETS}: must have 1..16 items",
    ),
    Broken(ROUTE, "no-rules", _set("spec.rules", []), "spec.rules: must have 1..16 items"),
    Broken(
        ROUTE,
        "bad-server-name",
        _set("spec.rules[0].targetModels[0].modelServerName", "Llama_3"),
        "spec.rules[0].targetModels[0].modelServerName: must be a DNS name",
    ),
    Broken(
        ROUTE,
        "redis-no-port",
        _set("spec.rateLimit.global.redis.address", "redis"),
        "spec.rateLimit.global.redis.address: must be host:port",
    ),
    Broken(
        ROUTE,
        "redis-port-too-big",
        _set("spec.rateLimit.global.redis.address", "redis:70000"),
        "spec.rateLimit.global.redis.address: must be host:port",
    ),
    Broken(
        ROUTE,
        "parent-namespace-uppercase",
        _set("spec.parentRefs[0].namespace", "Default"),
        "spec.parentRefs[0].namespace: must be a DNS label",
    ),
    # parentRefs name Gateways only: the router of that Gateway honours them (api/parents.py)
    Broken(
        ROUTE,
        "parent-not-a-gateway",
        _set("spec.parentRefs[0].kind", "Service"),
        "spec.parentRefs[0].kind: must be one of Gateway",
    ),
    Broken(
        ROUTE,
        "parent-other-group",
        _set("spec.parentRefs[0].group", "networking.istio.io"),
        "spec.parentRefs[0].group: must be one of gateway.networking.k8s.io",
    ),
    Broken(
        ROUTE,
        "parent-name-with-slash",
        _set("spec.parentRefs[0].name", "ns/gw"),
        "spec.parentRefs[0].name: must be a DNS name",
    ),
    Broken(
        ROUTE,
        "parent-section-with-newline",
        _set("spec.parentRefs[0].sectionName", "https\nx"),
        "spec.parentRefs[0].sectionName: must be a DNS name",
    ),
    Broken(
        ROUTE,
        "parent-name-too-long",
        _set("spec.parentRefs[0].name", "g" * 254),
        "spec.parentRefs[0].name: must be 1..253 characters",
    ),
    Broken(
        ROUTE,
        "17-parents",
        _set("spec.parentRefs", [{"name": f"g{i}"} for i in range(17)]),
        "spec.parentRefs: must have 0..16 items",
    ),
    Broken(
        ROUTE,
        "too-many-adapters",
        _set("spec.loraAdapters", [f"a{i}" for i in range(MAX_ADAPTERS + 1)]),
        f"spec.loraAdapters: must have 0..{MAX_ADAPTERS} items",
    ),
    Broken(
        ROUTE,
        "no-model-no-adapter",
        _all(_set("spec.modelName", DELETE), _set("spec.loraAdapters", DELETE)),
        "spec: set modelName or loraAdapters",
        cel=True,
    ),
    Broken(
        ROUTE,
        "weight-on-one-target",
        _set(f"{_TARGETS}[1].weight", DELETE),
        f"{_TARGETS}: set weight on all targetModels or on none",
        cel=True,
    ),
    Broken(
        ROUTE,
        "all-weights-zero",
        _all(_set(f"{_TARGETS}[0].weight", 0), _set(f"{_TARGETS}[1].weight", 0)),
        f"{_TARGETS}: at least one weight must be above 0",
        cel=True,
    ),
    Broken(
        ROUTE,
        "server-and-pool",
        _set("spec.rules[0].targetModels[0].inferencePoolName", "p"),
        "spec.rules[0].targetModels[0]: set exactly one of modelServerName, inferencePoolName",
        cel=True,
    ),
    Broken(
        ROUTE,
        "empty-target",
        _set("spec.rules[0].targetModels[0]", {}),
        "spec.rules[0].targetModels[0]: set exactly one of modelServerName, inferencePoolName",
        cel=True,
    ),
    Broken(
        ROUTE,
        "header-exact-and-prefix",
        _set("spec.rules[0].modelMatch.headers.x-infergate-user.exact", "a"),
        "spec.rules[0].modelMatch.headers[x-infergate-user]: "
        "set exactly one of exact, prefix, regex",
        cel=True,
    ),
    Broken(
        ROUTE,
        "uri-without-match",
        _set("spec.rules[0].modelMatch.uri", {}),
        "spec.rules[0].modelMatch.uri: set exactly one of exact, prefix, regex",
        cel=True,
    ),
    Broken(
        ROUTE,
        "rate-limit-without-tokens",
        _set("spec.rateLimit", {"unit": "minute"}),
        "spec.rateLimit: set inputTokensPerUnit or outputTokensPerUnit",
        cel=True,
    ),
    # ModelServer
    Broken(
        SERVER,
        "engine-lowercase",
        _set("spec.inferenceEngine", "vllm"),
        "spec.inferenceEngine: must be one of vLLM, SGLang, TRTLLM, Simulator",
    ),
    Broken(
        SERVER,
        "port-0",
        _set("spec.workloadPort.port", 0),
        "spec.workloadPort.port: must be 1..65535",
    ),
    Broken(
        SERVER,
        "timeout-in-words",
        _set("spec.trafficPolicy.timeout", "30 seconds"),
        "spec.trafficPolicy.timeout: must be a duration like 30s",
    ),
    Broken(
        SERVER,
        "11-attempts",
        _set("spec.trafficPolicy.retry.attempts", 11),
        "spec.trafficPolicy.retry.attempts: must be 0..10",
    ),
    Broken(
        SERVER,
        "https-to-pods",
        _set("spec.workloadPort.protocol", "https"),
        "spec.workloadPort.protocol: must be one of http",
    ),
    Broken(
        SERVER,
        "no-match-labels",
        _set("spec.workloadSelector.matchLabels", {}),
        "spec.workloadSelector.matchLabels: must have 1..64 labels",
    ),
    Broken(
        SERVER,
        "removed-kv-connector",
        _set("spec.kvConnector", {"type": "nixl"}),
        f"spec: {networking.REMOVED_KV_CONNECTOR}",
        cel=True,
    ),
    Broken(
        SERVER,
        "removed-retry-interval",
        _set("spec.trafficPolicy.retry.retryInterval", "100ms"),
        f"spec.trafficPolicy.retry: {networking.REMOVED_RETRY_INTERVAL}",
        cel=True,
    ),
    Broken(
        SERVER,
        "same-pd-labels",
        _set("spec.workloadSelector.pdGroup.decodeLabels", {"infergate.io/role": "prefill"}),
        "spec.workloadSelector.pdGroup: prefillLabels and decodeLabels must differ",
        cel=True,
    ),
    # Model
    Broken(
        MODEL,
        "uri-without-scheme",
        _set("spec.modelURI", "meta-llama/Meta-Llama-3-8B"),
        "spec.modelURI: must be a URI with hf, ms, s3, obs, pvc, file, http or https",
    ),
    Broken(
        MODEL,
        "revision-with-space",
        _set("spec.modelRevision", "v1 beta"),
        "spec.modelRevision: must be a branch, tag or commit (letters, digits, . _ / -)",
    ),
    Broken(
        MODEL,
        "revision-up-a-folder",
        _set("spec.modelRevision", "refs/../main"),
        "spec.modelRevision: a revision must not contain '..'",
        cel=True,
    ),
    Broken(
        MODEL,
        "revision-of-s3",
        _all(_set("spec.modelURI", "s3://models/llama"), _set("spec.modelRevision", "v1")),
        "spec: modelRevision applies to hf:// models only",
        cel=True,
    ),
    Broken(
        MODEL,
        "exclude-with-a-variable",
        _set("spec.modelFiles", {"exclude": ["$(AWS_SECRET_ACCESS_KEY)"]}),
        "spec.modelFiles.exclude[0]: must be a file glob (letters, digits, . _ / - and * ? [ ] !)",
    ),
    Broken(
        MODEL,
        "engine-lowercase",
        _set("spec.engine.type", "vllm"),
        "spec.engine.type: must be one of vLLM, SGLang, TRTLLM, Simulator",
    ),
    Broken(
        MODEL,
        "decode-0",
        _set("spec.backend.decode.replicas", 0),
        "spec.backend.decode.replicas: must be 1..64",
    ),
    Broken(
        MODEL, "replicas-negative", _set("spec.replicas", -1), "spec.replicas: must be at least 0"
    ),
    Broken(
        MODEL,
        "max-0",
        _all(_set("spec.autoscaling.maxReplicas", 0), _set("spec.autoscaling.minReplicas", 0)),
        "spec.autoscaling.maxReplicas: must be at least 1",
    ),
    Broken(
        MODEL,
        "memory-lots",
        _set("spec.resources.requests.memory", "lots"),
        "spec.resources.requests[memory]: must be a quantity like 2, 500m or 16Gi",
    ),
    Broken(
        MODEL,
        "duplicate-env",
        lambda d: d["spec"]["env"].append({"name": "HF_TOKEN", "value": "x"}),
        "spec.env[1]: duplicate name 'HF_TOKEN'",
    ),
    Broken(MODEL, "empty-image", _set("spec.image", ""), "spec.image: must be 1..512 characters"),
    Broken(
        MODEL,
        "gateway-namespace-upper",
        _set("spec.gateway.namespace", "Gateways"),
        "spec.gateway.namespace: must be a DNS label",
    ),
    Broken(
        MODEL,
        "gateway-empty-name",
        _set("spec.gateway.name", ""),
        "spec.gateway.name: must be 1..253 characters",
    ),
    Broken(
        MODEL,
        "empty-command",
        _set("spec.engine.command", []),
        "spec.engine.command: must have 1..16 items",
    ),
    Broken(
        MODEL,
        "empty-program",
        _set("spec.engine.command", [""]),
        "spec.engine.command[0]: must be 1..4096 characters",
    ),
    Broken(
        MODEL,
        "long-command",
        _set("spec.engine.command", ["vllm"] * 17),
        "spec.engine.command: must have 1..16 items",
    ),
    Broken(
        MODEL,
        "huge-command-word",
        _set("spec.engine.command", ["vllm", "x" * 4097]),
        "spec.engine.command[1]: must be 1..4096 characters",
    ),
    Broken(
        MODEL,
        "trtllm-adapters",
        _set("spec.engine.type", "TRTLLM"),
        "spec: loraAdapters need an engine that loads them at run time: vLLM, SGLang or Simulator",
        cel=True,
    ),
    Broken(
        MODEL,
        "trtllm-workers",
        _all(
            _set("spec.engine.type", "TRTLLM"),
            _set("spec.loraAdapters", DELETE),
            _set("spec.backend.kvConnector", DELETE),
            _set("spec.backend.decode.workerReplicas", 1),
        ),
        "spec: workerReplicas need an engine that spans pods by flag: vLLM, SGLang or Simulator",
        cel=True,
    ),
    Broken(
        MODEL,
        "adapter-name-climbs-out",
        _set("spec.loraAdapters[0].name", "../sql"),
        "spec.loraAdapters[0].name: must be a path component: letters, digits, '.', '_' or '-', "
        "a letter or digit first",
    ),
    Broken(
        MODEL,
        "adapter-url",
        _set("spec.loraAdapters[0].artifactURL", "llama-sql"),
        "spec.loraAdapters[0].artifactURL: must be a URI",
    ),
    Broken(
        MODEL,
        "aggregated-and-pd",
        _set("spec.backend.aggregated", {"replicas": 1}),
        "spec.backend: set either aggregated, or both prefill and decode",
        cel=True,
    ),
    Broken(
        MODEL,
        "prefill-only",
        _set("spec.backend.decode", DELETE),
        "spec.backend: set either aggregated, or both prefill and decode",
        cel=True,
    ),
    Broken(
        MODEL,
        "aggregated-with-connector",
        _set("spec.backend", {"aggregated": {}, "kvConnector": {"type": "nixl"}}),
        "spec.backend: kvConnector applies to prefill/decode backends only",
        cel=True,
    ),
    Broken(
        MODEL,
        "nixl-on-sglang",
        _set("spec.engine.type", "SGLang"),
        "spec: kvConnector type sglang goes with engine type SGLang, and only with it",
        cel=True,
    ),
    Broken(
        MODEL,
        "min-above-max",
        _set("spec.autoscaling.minReplicas", 5),
        "spec.autoscaling: minReplicas must not exceed maxReplicas",
        cel=True,
    ),
    Broken(
        MODEL,
        "policy-and-metrics",
        _set("spec.autoscaling.metrics", [{"metricName": "m", "targetValue": 1}]),
        "spec.autoscaling: set exactly one of policyRef, metrics",
        cel=True,
    ),
    # ModelInfer
    Broken(
        INFER,
        "5-roles",
        lambda d: d["spec"]["template"]["roles"].extend(
            {"name": f"r{i}", "entryTemplate": {"spec": {}}} for i in range(3)
        ),
        "spec.template.roles: must have 1..4 items",
    ),
    Broken(
        INFER,
        "long-role-name",
        _set("spec.template.roles[0].name", "prefill-stage-1"),
        "spec.template.roles[0].name: must be a DNS label of at most 12 characters",
    ),
    Broken(
        INFER,
        "gang-on-another-scheduler",
        _set("spec.schedulerName", "kai-scheduler"),
        "spec: gangPolicy.enabled needs schedulerName volcano (or unset)",
        cel=True,
    ),
    Broken(
        INFER,
        "recovery-restart",
        _set("spec.recoveryPolicy", "Restart"),
        "spec.recoveryPolicy: must be one of GroupRecreate, RoleRecreate, None",
    ),
    Broken(
        INFER,
        "max-unavailable-0",
        _set(f"{_RUC}.maxUnavailable", 0),
        f"{_RUC}.maxUnavailable: must be at least 1",
    ),
    Broken(
        INFER,
        "max-unavailable-0-percent",
        _set(f"{_RUC}.maxUnavailable", "0%"),
        f"{_RUC}.maxUnavailable: must be an integer or a percentage like 25% (at least 1)",
    ),
    Broken(
        INFER,
        "duplicate-role",
        _set("spec.template.roles[1].name", "prefill"),
        "spec.template.roles[1]: duplicate role name 'prefill'",
    ),
    Broken(
        INFER,
        "entry-without-spec",
        _set("spec.template.roles[0].entryTemplate.spec", DELETE),
        "spec.template.roles[0].entryTemplate.spec: is required",
    ),
    Broken(
        INFER,
        "64-workers",
        _set("spec.template.roles[0].workerReplicas", 64),
        "spec.template.roles[0].workerReplicas: must be 0..63",
    ),
    Broken(
        INFER,
        "rollout-recreate",
        _set("spec.rolloutStrategy.type", "Recreate"),
        "spec.rolloutStrategy.type: must be one of RollingUpdate",
    ),
    Broken(
        INFER,
        "gang-unknown-role",
        _set("spec.gangPolicy.minRoleReplicas", {"worker": 1}),
        "spec: gangPolicy.minRoleReplicas names a role that the template does not have",
        cel=True,
    ),
    # AutoScalingPolicy
    Broken(
        POLICY,
        "tolerance-101",
        _set("spec.tolerancePercent", 101),
        "spec.tolerancePercent: must be 0..100",
    ),
    Broken(
        POLICY,
        "panic-threshold-100",
        _set("spec.behavior.scaleUp.panicPolicy.panicThresholdPercent", 100),
        "spec.behavior.scaleUp.panicPolicy.panicThresholdPercent: must be 110..1000",
    ),
    Broken(
        POLICY,
        "select-max",
        _set("spec.behavior.scaleDown.selectPolicy", "Max"),
        "spec.behavior.scaleDown.selectPolicy: must be one of Or, And",
    ),
    Broken(
        POLICY,
        "target-0",
        _set("spec.metrics[0].targetValue", 0),
        "spec.metrics[0].targetValue: must be above 0",
    ),
    Broken(
        POLICY,
        "scale-down-150-percent",
        _set("spec.behavior.scaleDown.percent", 150),
        "spec.behavior.scaleDown.percent: must be 0..100",
    ),
    Broken(
        POLICY,
        "period-soon",
        _set("spec.behavior.scaleUp.stablePolicy.period", "soon"),
        "spec.behavior.scaleUp.stablePolicy.period: must be a duration like 30s or 1m30s",
    ),
    Broken(POLICY, "no-metrics", _set("spec.metrics", []), "spec.metrics: must have 1..8 items"),
    Broken(
        POLICY,
        "duplicate-metric",
        _set("spec.metrics[0].metricName", "vllm:kv_cache_usage_perc"),
        "spec.metrics[1]: duplicate metricName 'vllm:kv_cache_usage_perc'",
    ),
    Broken(
        POLICY,
        "scale-up-frozen",
        _all(
            _set("spec.behavior.scaleUp.stablePolicy.instances", 0),
            _set("spec.behavior.scaleUp.stablePolicy.percent", 0),
        ),
        "spec.behavior.scaleUp.stablePolicy: "
        "instances or percent must be above 0, or nothing can scale up",
        cel=True,
    ),
    Broken(
        POLICY,
        "scale-down-window-2h",
        _set("spec.behavior.scaleDown.stabilizationWindow", "2h"),
        "spec.behavior.scaleDown: stabilizationWindow must be at most 1h",
        cel=True,
    ),
    Broken(
        POLICY,
        "scale-up-window-61m",
        _set("spec.behavior.scaleUp.stablePolicy.stabilizationWindow", "61m"),
        "spec.behavior.scaleUp.stablePolicy: stabilizationWindow must be at most 1h",
        cel=True,
    ),
    # AutoScalingPolicyBinding
    Broken(
        BINDING,
        "ratio-min-0",
        _set(f"{_PD}.ratio.min", 0),
        f"{_PD}.ratio.min: must be above 0 and at most 100",
    ),
    Broken(
        BINDING,
        "target-deployment",
        _set(f"{_PD}.prefill.target.kind", "Deployment"),
        f"{_PD}.prefill.target.kind: must be one of ModelInfer",
    ),
    Broken(
        BINDING,
        "decode-max-0",
        _all(_set(f"{_PD}.decode.maxReplicas", 0), _set(f"{_PD}.decode.minReplicas", 0)),
        f"{_PD}.decode.maxReplicas: must be at least 1",
    ),
    Broken(
        BINDING,
        "one-heterogeneous-target",
        _all(_to_hetero, _set("spec.heterogeneousTarget.targets[1]", DELETE)),
        "spec.heterogeneousTarget.targets: must have 2..16 items",
    ),
    Broken(
        BINDING,
        "cost-0",
        _all(_to_hetero, _set("spec.heterogeneousTarget.targets[0].cost", 0)),
        "spec.heterogeneousTarget.targets[0].cost: must be at least 1",
    ),
    Broken(
        BINDING,
        "expansion-50",
        _all(_to_hetero, _set("spec.heterogeneousTarget.costExpansionRatePercent", 50)),
        "spec.heterogeneousTarget.costExpansionRatePercent: must be 100..1000",
    ),
    Broken(
        BINDING,
        "no-target",
        _set(_PD, DELETE),
        "spec: set exactly one of homogeneousTarget, heterogeneousTarget, prefillDecode",
        cel=True,
    ),
    Broken(
        BINDING,
        "two-targets",
        _set("spec.homogeneousTarget", {"target": {"name": "x"}, "maxReplicas": 2}),
        "spec: set exactly one of homogeneousTarget, heterogeneousTarget, prefillDecode",
        cel=True,
    ),
    Broken(
        BINDING,
        "prefill-min-above-max",
        _set(f"{_PD}.prefill.minReplicas", 5),
        f"{_PD}.prefill: minReplicas must not exceed maxReplicas",
        cel=True,
    ),
    Broken(
        BINDING,
        "ratio-min-above-max",
        _set(f"{_PD}.ratio.min", 3),
        f"{_PD}.ratio: ratio min must not exceed max",
        cel=True,
    ),
    Broken(
        BINDING,
        "same-pd-target",
        _set(f"{_PD}.decode.target.role", "prefill"),
        f"{_PD}: prefill and decode must be different targets",
        cel=True,
    ),
    Broken(
        BINDING,
        "duplicate-heterogeneous-target",
        _all(
            _to_hetero, _set("spec.heterogeneousTarget.targets[1].target.name", "llama-3-8b-a100")
        ),
        "spec.heterogeneousTarget.targets: targets must be distinct (name and role)",
        cel=True,
    ),
    Broken(
        BINDING,
        "homogeneous-min-above-max",
        _all(
            _set(_PD, DELETE),
            _set(
                "spec.homogeneousTarget",
                {"target": {"name": "x"}, "minReplicas": 3, "maxReplicas": 2},
            ),
        ),
        "spec.homogeneousTarget: minReplicas must not exceed maxReplicas",
        cel=True,
    ),
    Broken(
        BINDING,
        "heterogeneous-min-above-max",
        _all(_to_hetero, _set("spec.heterogeneousTarget.targets[0].minReplicas", 9)),
        "spec.heterogeneousTarget.targets[0]: minReplicas must not exceed maxReplicas",
        cel=True,
    ),
]


def _broken(case: Broken) -> Obj:
    doc = _example(case.kind)
    case.mutate(doc)
    return doc


def _bracketed_keys_as_dots(path: str) -> str:
    """spec.env[1] stays; spec.requests[memory] → spec.requests.memory, as jsonschema says it."""
    out, i = "", 0
    while i < len(path):
        if path[i] == "[" and not path[i + 1].isdigit():
            end = path.index("]", i)
            out, i = out + "." + path[i + 1 : end], end + 1
        else:
            out, i = out + path[i], i + 1
    return out


@pytest.mark.parametrize(
    "case", [c for c in BROKEN if not c.cel], ids=lambda c: f"{c.kind}-{c.name}"
)
def test_broken_example_fails_the_schema_and_validate(case: Broken) -> None:
    doc = _broken(case)
    errors = schema_errors(case.kind, doc)
    assert errors, f"{case.name} passed the CRD schema"
    # The schema objects at the same field (or, for a missing field, at its parent).
    where = _bracketed_keys_as_dots(case.message.split(": ", 1)[0])
    paths = [e.split(": ", 1)[0] for e in errors]
    assert any(where.startswith(p) for p in paths), (where, errors)
    assert case.message in api.validate(api.from_dict(doc))


_CROSS_FIELD = [c for c in BROKEN if c.cel]


@pytest.mark.parametrize("case", _CROSS_FIELD, ids=lambda c: f"{c.kind}-{c.name}")
def test_broken_cross_field_passes_the_schema_but_fails_validate(case: Broken) -> None:
    doc = _broken(case)
    assert schema_errors(case.kind, doc) == [], "a cross-field case should need CEL to fail"
    assert case.message in api.validate(api.from_dict(doc))


@needs_cel
@pytest.mark.parametrize("case", _CROSS_FIELD, ids=lambda c: f"{c.kind}-{c.name}")
def test_broken_cross_field_fails_cel_with_the_message_validate_gives(case: Broken) -> None:
    assert case.message in all_cel_errors(case.kind, _broken(case))


@pytest.mark.parametrize("kind", KINDS)
def test_every_cel_rule_has_a_failing_case(kind: str) -> None:
    tested = {c.message.split(": ", 1)[1] for c in BROKEN if c.cel and c.kind == kind}
    rules = [r for r in _cel_rules(crd_schema(kind)) if "oldSelf" not in r["rule"]]
    assert rules
    for rule in rules:
        assert rule["message"] in tested, f"no broken {kind} case for {rule['rule']!r}"


VALID_VARIANTS = [
    (
        ROUTE,
        "no-weights",
        _all(_set(f"{_TARGETS}[0].weight", DELETE), _set(f"{_TARGETS}[1].weight", DELETE)),
    ),
    (
        ROUTE,
        "pool-target-adapter-only",
        _all(
            _set("spec.modelName", DELETE),
            _set("spec.rules[0].targetModels[0]", {"inferencePoolName": "llama-3-8b"}),
        ),
    ),
    (SERVER, "sglang", _set("spec.inferenceEngine", "SGLang")),
    (SERVER, "aggregated", _set("spec.workloadSelector.pdGroup", DELETE)),
    (
        MODEL,
        "aggregated",
        _set("spec.backend", {"aggregated": {"replicas": 2, "workerReplicas": 1}}),
    ),
    (MODEL, "https-archive", _set("spec.modelURI", "https://models.example.com/llama.tar.gz")),
    (
        MODEL,
        "https-archive-with-its-sha256",
        _set("spec.modelURI", f"https://models.example.com/llama.tar.gz#sha256={'a' * 64}"),
    ),
    (
        MODEL,
        "pinned-revision-and-files",
        _all(
            _set("spec.modelRevision", "refs/pr/1"),
            _set("spec.modelFiles", {"include": ["*.safetensors", "*.json"], "exclude": []}),
        ),
    ),
    (
        MODEL,
        "inline-metrics",
        _all(
            _set("spec.autoscaling.policyRef", DELETE),
            _set(
                "spec.autoscaling.metrics",
                [{"metricName": "vllm:num_requests_waiting", "targetValue": 4}],
            ),
        ),
    ),
    (
        INFER,
        "percentages",
        _all(_set(f"{_RUC}.maxUnavailable", "25%"), _set(f"{_RUC}.partition", "50%")),
    ),
    (INFER, "partition-equals-replicas", _set(f"{_RUC}.partition", 2)),
    # as a StatefulSet's: scaling below the partition must stay possible (kubectl scale,
    # the autoscaler), so a partition above replicas is allowed and protects every group
    (INFER, "partition-above-replicas", _set(f"{_RUC}.partition", 3)),
    (INFER, "gang-min-roles", _set("spec.gangPolicy.minRoleReplicas", {"prefill": 1, "decode": 1})),
    (POLICY, "no-behavior", _set("spec.behavior", DELETE)),
    (BINDING, "heterogeneous", _to_hetero),
    (
        BINDING,
        "homogeneous",
        _all(
            _set(_PD, DELETE),
            _set("spec.homogeneousTarget", {"target": {"name": "llama-3-8b"}, "maxReplicas": 4}),
        ),
    ),
]


_VARIANT_IDS = [f"{k}-{n}" for k, n, _ in VALID_VARIANTS]


@pytest.mark.parametrize(("kind", "name", "mutate"), VALID_VARIANTS, ids=_VARIANT_IDS)
def test_valid_variant_passes_schema_and_validate(
    kind: str, name: str, mutate: Callable[[Obj], None]
) -> None:
    doc = _example(kind)
    mutate(doc)
    assert schema_errors(kind, doc) == []
    assert api.validate(api.from_dict(doc)) == []
    assert api.to_dict(api.from_dict(doc)) == doc


@needs_cel
@pytest.mark.parametrize(("kind", "name", "mutate"), VALID_VARIANTS, ids=_VARIANT_IDS)
def test_valid_variant_passes_cel(kind: str, name: str, mutate: Callable[[Obj], None]) -> None:
    doc = _example(kind)
    mutate(doc)
    assert all_cel_errors(kind, doc) == []


@needs_cel
def test_model_name_is_immutable() -> None:
    old = _example(ROUTE)
    new = copy.deepcopy(old)
    assert all_cel_errors(ROUTE, new, old=old) == []
    new["spec"]["modelName"] = "llama-3-70b"
    assert all_cel_errors(ROUTE, new, old=old) == ["spec.modelName: modelName is immutable"]


# ---- api on its own -------------------------------------------------------------------


def test_from_dict_names_the_field_with_the_wrong_type() -> None:
    doc = _example(INFER)
    doc["spec"]["template"]["roles"][1]["replicas"] = "two"
    with pytest.raises(api.ApiError, match=r"^spec\.template\.roles\[1\]\.replicas: Expected `int"):
        api.from_dict(doc)
    assert api.validate_dict(doc)[0].startswith("spec.template.roles[1].replicas:")


def test_from_dict_rejects_an_unknown_kind() -> None:
    with pytest.raises(api.ApiError, match="unknown kind 'Model'"):
        api.from_dict({"apiVersion": "workload.infergate.io/v2", "kind": "Model", "spec": {}})


def test_typed_fields_read_as_python() -> None:
    route = api.from_dict(_example(ROUTE))
    assert isinstance(route, api.ModelRoute)
    assert route.spec.rate_limit.global_.redis.address == "redis.default.svc:6379"
    assert [t.weight for t in route.spec.rules[1].target_models] == [90, 10]
    model = api.from_dict(_example(MODEL))
    assert model.spec.model_uri.startswith("hf://")
    binding = api.from_dict(_example(BINDING))
    assert binding.spec.prefill_decode.ratio.max == 2.0
    assert api.duration_seconds("1m30s") == 90.0


def test_the_api_package_imports_no_other_part() -> None:
    """The floor rule: every module of `api` loads only the standard library, msgspec and yaml
    (and what those load); measured against what the interpreter had loaded before."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        "before = set(sys.modules)\n"
        "import infergw.api as api\n"
        "for m in pkgutil.walk_packages(api.__path__, 'infergw.api.'):\n"
        "    importlib.import_module(m.name)\n"
        "def top(m):\n"
        "    return '.'.join(m.split('.')[:2]) if m.startswith('infergw.') else m.split('.')[0]\n"
        "print(json.dumps(sorted({top(m) for m in set(sys.modules) - before})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout)) - set(sys.stdlib_module_names)
    # yaml's C loader (_yaml) is compiled by Cython and loads its runtime.
    loaded = {m for m in loaded if m != "cython_runtime" and not m.startswith("_cython_")}
    # The namespace package itself (infergw, the launcher's light __init__) loads too.
    assert "infergw.api" in loaded
    assert loaded <= {"infergw", "infergw.api", "msgspec", "yaml", "_yaml", "typing_extensions"}, (
        loaded
    )


def test_api_modules_stay_small() -> None:
    for path in (ROOT / "api").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path.name
