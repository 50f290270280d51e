"""workload.infergate.io/v1alpha1: AutoScalingPolicy and AutoScalingPolicyBinding.

`validate_*` mirror crds/workload.infergate.io_autoscalingpolic*.yaml: the schema's bounds and
the CEL rules (x-kubernetes-validations), with the CEL messages word for word. The DEFAULT_*
constants are the CRDs' defaults, for the autoscaler to fall back on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from infergw.api.meta import (
    DNS_LABEL,
    DNS_SUBDOMAIN,
    DURATION,
    ApiStruct,
    Condition,
    LocalRef,
    ObjectMeta,
    Problems,
    check_status_conditions,
    duration_seconds,
)
from infergw.api.workload import (
    DEFAULT_MIN_REPLICAS,
    GROUP_VERSION,
    MetricTarget,
    check_metric_targets,
)

SELECT_POLICIES = ("Or", "And")
SCALE_MODES = ("Stable", "Panic")
TARGET_KINDS = ("ModelInfer",)
DEFAULT_TOLERANCE_PERCENT = 10
DEFAULT_PANIC = {
    "percent": 1000,
    "period": "10s",
    "panicThresholdPercent": 200,
    "panicModeHold": "60s",
}
DEFAULT_STABLE_UP = {
    "instances": 1,
    "percent": 100,
    "period": "15s",
    "selectPolicy": "Or",
    "stabilizationWindow": "0s",
}
DEFAULT_STABLE_DOWN = {**DEFAULT_STABLE_UP, "stabilizationWindow": "5m"}
DEFAULT_COST_EXPANSION_RATE_PERCENT = 200
MAX_STABILIZATION_SECONDS = 3600


# ---- AutoScalingPolicy --------------------------------------------------------------------------


class PanicPolicy(ApiStruct):
    percent: int | None = None
    period: str | None = None
    panic_threshold_percent: int | None = None
    panic_mode_hold: str | None = None


class StablePolicy(ApiStruct):
    instances: int | None = None
    percent: int | None = None
    period: str | None = None
    select_policy: str | None = None
    stabilization_window: str | None = None


class ScaleUp(ApiStruct):
    panic_policy: PanicPolicy | None = None
    stable_policy: StablePolicy | None = None


class Behavior(ApiStruct):
    scale_up: ScaleUp | None = None
    scale_down: StablePolicy | None = None


class AutoScalingPolicySpec(ApiStruct):
    metrics: list[MetricTarget]
    tolerance_percent: int | None = None
    behavior: Behavior | None = None


class PolicyStatus(ApiStruct):
    observed_generation: int | None = None
    bindings: int | None = None  # the bindings that name it
    conditions: list[Condition] | None = None


class AutoScalingPolicy(ApiStruct, kw_only=True):
    api_version: str = GROUP_VERSION
    kind: str = "AutoScalingPolicy"
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: AutoScalingPolicySpec
    status: PolicyStatus | None = None


def _check_duration(p: Problems, path: str, value: str | None) -> None:
    p.match(path, value, DURATION, "a duration like 30s or 1m30s")


def _check_stable(
    p: Problems, path: str, policy: StablePolicy, max_percent: int, defaults: dict[str, object]
) -> None:
    p.number(f"{path}.instances", policy.instances, 0)
    p.number(f"{path}.percent", policy.percent, 0, max_percent)
    _check_duration(p, f"{path}.period", policy.period)
    p.choice(f"{path}.selectPolicy", policy.select_policy, SELECT_POLICIES)
    _check_duration(p, f"{path}.stabilizationWindow", policy.stabilization_window)
    window = policy.stabilization_window or str(defaults["stabilizationWindow"])
    if DURATION.match(window) and duration_seconds(window) > MAX_STABILIZATION_SECONDS:
        p.add(path, "stabilizationWindow must be at most 1h")


def validate_autoscaling_policy(policy: AutoScalingPolicy) -> list[str]:
    p = Problems()
    spec = policy.spec
    check_metric_targets(p, "spec.metrics", spec.metrics)
    p.number("spec.tolerancePercent", spec.tolerance_percent, 0, 100)
    up = spec.behavior.scale_up if spec.behavior is not None else None
    if up is not None and up.panic_policy is not None:
        panic, where = up.panic_policy, "spec.behavior.scaleUp.panicPolicy"
        p.number(f"{where}.percent", panic.percent, 0, 1000)
        _check_duration(p, f"{where}.period", panic.period)
        p.number(f"{where}.panicThresholdPercent", panic.panic_threshold_percent, 110, 1000)
        _check_duration(p, f"{where}.panicModeHold", panic.panic_mode_hold)
    if up is not None and up.stable_policy is not None:
        stable, where = up.stable_policy, "spec.behavior.scaleUp.stablePolicy"
        _check_stable(p, where, stable, 1000, DEFAULT_STABLE_UP)
        instances = stable.instances if stable.instances is not None else 1
        percent = stable.percent if stable.percent is not None else 100
        if instances <= 0 and percent <= 0:
            p.add(where, "instances or percent must be above 0, or nothing can scale up")
    down = spec.behavior.scale_down if spec.behavior is not None else None
    if down is not None:
        _check_stable(p, "spec.behavior.scaleDown", down, 100, DEFAULT_STABLE_DOWN)
    if policy.status is not None:
        check_status_conditions(p, "status.conditions", policy.status.conditions)
    return p.messages


@dataclass(frozen=True, slots=True)
class EffectiveStep:
    """A scale-up or scale-down step with the CRD's defaults filled in; durations in seconds."""

    instances: int
    percent: int
    period: float
    select_policy: str
    stabilization_window: float


@dataclass(frozen=True, slots=True)
class EffectivePanic:
    """A panic policy with the CRD's defaults filled in; durations in seconds."""

    percent: int
    period: float
    threshold_percent: int
    hold: float


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    """An AutoScalingPolicy as the autoscaler applies it: every unset field at its default."""

    targets: dict[str, float]  # metric name → target value per replica
    tolerance_percent: int
    scale_up: EffectiveStep
    scale_down: EffectiveStep
    panic: EffectivePanic | None  # None: the policy has no panic mode


def _with_defaults(given: ApiStruct | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """The CRD's defaults overlaid with what the object sets (unset fields are left out)."""
    return {**defaults, **(msgspec.to_builtins(given) if given is not None else {})}


def _step(given: StablePolicy | None, defaults: dict[str, Any]) -> EffectiveStep:
    f = _with_defaults(given, defaults)
    return EffectiveStep(
        instances=f["instances"],
        percent=f["percent"],
        period=duration_seconds(f["period"]),
        select_policy=f["selectPolicy"],
        stabilization_window=duration_seconds(f["stabilizationWindow"]),
    )


def effective_policy(policy: AutoScalingPolicy) -> EffectivePolicy:
    """What a validated policy means, with the defaults the API server would have applied."""
    spec = policy.spec
    behavior = spec.behavior or Behavior()
    up = behavior.scale_up or ScaleUp()
    panic = None
    if up.panic_policy is not None:
        f = _with_defaults(up.panic_policy, DEFAULT_PANIC)
        panic = EffectivePanic(
            percent=f["percent"],
            period=duration_seconds(f["period"]),
            threshold_percent=f["panicThresholdPercent"],
            hold=duration_seconds(f["panicModeHold"]),
        )
    tolerance = spec.tolerance_percent
    return EffectivePolicy(
        targets={m.metric_name: m.target_value for m in spec.metrics},
        tolerance_percent=DEFAULT_TOLERANCE_PERCENT if tolerance is None else tolerance,
        scale_up=_step(up.stable_policy, DEFAULT_STABLE_UP),
        scale_down=_step(behavior.scale_down, DEFAULT_STABLE_DOWN),
        panic=panic,
    )


# ---- AutoScalingPolicyBinding -------------------------------------------------------------------


class ScaleTargetRef(ApiStruct):
    name: str
    kind: str | None = None
    role: str | None = None

    def key(self) -> tuple[str, str, str]:
        return (self.kind or TARGET_KINDS[0], self.name, self.role or "")


class BoundedTarget(ApiStruct):
    target: ScaleTargetRef
    max_replicas: int
    min_replicas: int | None = None


class CostedTarget(BoundedTarget, kw_only=True):
    cost: int


class HeterogeneousTarget(ApiStruct):
    targets: list[CostedTarget]
    cost_expansion_rate_percent: int | None = None


class RatioBounds(ApiStruct):
    min: float
    max: float


class PrefillDecodeTarget(ApiStruct):
    prefill: BoundedTarget
    decode: BoundedTarget
    ratio: RatioBounds


class AutoScalingPolicyBindingSpec(ApiStruct):
    policy_ref: LocalRef
    homogeneous_target: BoundedTarget | None = None
    heterogeneous_target: HeterogeneousTarget | None = None
    prefill_decode: PrefillDecodeTarget | None = None


class MetricValue(ApiStruct):
    name: str
    value: str  # the sum over the target's ready pods, as %g


class TargetStatus(ApiStruct):
    name: str
    role: str | None = None
    current_replicas: int | None = None
    desired_replicas: int | None = None
    mode: str | None = None
    last_scale_time: str | None = None
    # the last decision's inputs and why (controllers/autoscaling.py's Decision)
    metrics: list[MetricValue] | None = None
    held_requests: str | None = None
    recommended_replicas: int | None = None
    reason: str | None = None


class BindingStatus(ApiStruct):
    observed_generation: int | None = None
    targets: list[TargetStatus] | None = None
    conditions: list[Condition] | None = None


class AutoScalingPolicyBinding(ApiStruct, kw_only=True):
    api_version: str = GROUP_VERSION
    kind: str = "AutoScalingPolicyBinding"
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: AutoScalingPolicyBindingSpec
    status: BindingStatus | None = None


def _check_bounded(p: Problems, path: str, bounded: BoundedTarget) -> None:
    ref = bounded.target
    p.choice(f"{path}.target.kind", ref.kind, TARGET_KINDS)
    p.match(f"{path}.target.name", ref.name, DNS_SUBDOMAIN, "a DNS name")
    if ref.role is not None and (len(ref.role) > 12 or not DNS_LABEL.match(ref.role)):
        p.add(f"{path}.target.role", "must be a DNS label of at most 12 characters")
    low = bounded.min_replicas if bounded.min_replicas is not None else DEFAULT_MIN_REPLICAS
    p.number(f"{path}.minReplicas", low, 0)
    p.number(f"{path}.maxReplicas", bounded.max_replicas, 1)
    if low > bounded.max_replicas:
        p.add(path, "minReplicas must not exceed maxReplicas")


def validate_autoscaling_policy_binding(binding: AutoScalingPolicyBinding) -> list[str]:
    p = Problems()
    spec = binding.spec
    chosen = [spec.homogeneous_target, spec.heterogeneous_target, spec.prefill_decode]
    if sum(c is not None for c in chosen) != 1:
        p.add("spec", "set exactly one of homogeneousTarget, heterogeneousTarget, prefillDecode")
    if spec.homogeneous_target is not None:
        _check_bounded(p, "spec.homogeneousTarget", spec.homogeneous_target)
    hetero = spec.heterogeneous_target
    if hetero is not None:
        where = "spec.heterogeneousTarget"
        p.length(f"{where}.targets", hetero.targets, 2, 16, "items")
        for i, costed in enumerate(hetero.targets):
            _check_bounded(p, f"{where}.targets[{i}]", costed)
            p.number(f"{where}.targets[{i}].cost", costed.cost, 1)
        keys = [t.target.key()[1:] for t in hetero.targets]
        if len(set(keys)) != len(keys):
            p.add(f"{where}.targets", "targets must be distinct (name and role)")
        p.number(f"{where}.costExpansionRatePercent", hetero.cost_expansion_rate_percent, 100, 1000)
    pd = spec.prefill_decode
    if pd is not None:
        where = "spec.prefillDecode"
        _check_bounded(p, f"{where}.prefill", pd.prefill)
        _check_bounded(p, f"{where}.decode", pd.decode)
        if pd.prefill.target.key() == pd.decode.target.key():
            p.add(where, "prefill and decode must be different targets")
        p.number(f"{where}.ratio.min", pd.ratio.min, 0, 100, above=True)
        p.number(f"{where}.ratio.max", pd.ratio.max, 0, 100, above=True)
        if pd.ratio.min > pd.ratio.max:
            p.add(f"{where}.ratio", "ratio min must not exceed max")
    status = binding.status
    if status is not None:
        for i, target in enumerate(status.targets or []):
            p.choice(f"status.targets[{i}].mode", target.mode, SCALE_MODES)
        check_status_conditions(p, "status.conditions", status.conditions)
    return p.messages
