"""Flow-control settings: one dataclass tree with defaults, parsed from the picker's YAML.

    flowControl:
      maxRequests: 0                # 0 = no overall request limit
      maxBytes: 0                   # 0 = no overall byte limit
      defaultRequestTTL: 60s        # 0 = wait until the client leaves
      recheckInterval: 50ms
      retryAfter: {min: 1, max: 60}
      flowGCTimeout: 5m
      saturation: {queueDepthThreshold: 5, kvCacheUtilThreshold: 0.8,
                   metricsStalenessThreshold: 200ms}
      fairness: {inputTokenWeight: 1, outputTokenWeight: 2, flowWeights: {tenant-a: 2}}
      defaultPriorityBand: {maxRequests: 0, maxBytes: 1000000000}
      priorityBands: [{priority: 10, maxRequests: 500, maxBytes: 100000000}]

Where the defaults come from: the saturation thresholds are GIE's saturation detector
(`pkg/epp/saturationdetector/config.go`: 5, 0.8, 200 ms); the band byte limit (1 GB), the
unlimited global byte limit and the 5-minute flow GC are GIE's flow registry
(`pkg/epp/flowcontrol/registry/config.go`); the 60 s TTL is llm-d-router's flow controller;
w_in = 1 and w_out = 2 are the VTC paper's ("Following OpenAI pricing, w_p=1 and w_q=2").
The recheck interval matches the picker's 50 ms metrics refresh; Retry-After bounds are ours.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class FlowControlConfigError(ValueError):
    """A flowControl section the picker cannot use; the message names the key."""


@dataclass(slots=True, frozen=True)
class SaturationConfig:
    queue_depth_threshold: float = 5
    kv_cache_util_threshold: float = 0.8
    metrics_staleness: float = 0.2  # seconds


@dataclass(slots=True, frozen=True)
class FairnessConfig:
    input_token_weight: float = 1.0
    output_token_weight: float = 2.0
    # Flow id → weight: a flow of weight 2 is entitled to twice the tokens of a flow of weight 1.
    flow_weights: dict[str, float] = field(default_factory=dict)


DEFAULT_BAND_MAX_BYTES = 1_000_000_000


@dataclass(slots=True, frozen=True)
class BandConfig:
    priority: int = 0
    max_requests: int = 0  # 0 = unlimited
    max_bytes: int = DEFAULT_BAND_MAX_BYTES  # 0 = unlimited


@dataclass(slots=True, frozen=True)
class FlowControlConfig:
    max_requests: int = 0  # over all bands; 0 = unlimited
    max_bytes: int = 0  # over all bands; 0 = unlimited
    default_request_ttl: float = 60.0  # seconds; 0 = no TTL
    recheck_interval: float = 0.05
    retry_after_min: int = 1
    retry_after_max: int = 60
    flow_gc_timeout: float = 300.0
    saturation: SaturationConfig = field(default_factory=SaturationConfig)
    fairness: FairnessConfig = field(default_factory=FairnessConfig)
    default_band: BandConfig = field(default_factory=BandConfig)
    bands: tuple[BandConfig, ...] = ()

    def band(self, priority: int) -> BandConfig:
        """The configured band for a priority, else the default template at that priority."""
        for b in self.bands:
            if b.priority == priority:
                return b
        d = self.default_band
        return BandConfig(priority=priority, max_requests=d.max_requests, max_bytes=d.max_bytes)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, where: str = "flowControl") -> FlowControlConfig:
        """Parse the YAML section (camelCase keys); unknown keys and bad values raise."""
        if raw is None:
            return cls()
        r = _Reader(raw, where, _TOP_KEYS)
        defaults = cls()
        retry = _Reader(r.get("retryAfter", {}), f"{where}.retryAfter", ("min", "max"))
        config = cls(
            max_requests=r.count("maxRequests", defaults.max_requests),
            max_bytes=r.count("maxBytes", defaults.max_bytes),
            default_request_ttl=r.duration("defaultRequestTTL", defaults.default_request_ttl),
            recheck_interval=r.duration(
                "recheckInterval", defaults.recheck_interval, positive=True
            ),
            retry_after_min=retry.count("min", defaults.retry_after_min, positive=True),
            retry_after_max=retry.count("max", defaults.retry_after_max, positive=True),
            flow_gc_timeout=r.duration("flowGCTimeout", defaults.flow_gc_timeout, positive=True),
            saturation=_saturation(r.get("saturation", {}), f"{where}.saturation"),
            fairness=_fairness(r.get("fairness", {}), f"{where}.fairness"),
            default_band=_band(
                r.get("defaultPriorityBand", {}), f"{where}.defaultPriorityBand", template=True
            ),
            bands=_bands(r.get("priorityBands", []), f"{where}.priorityBands"),
        )
        if config.retry_after_min > config.retry_after_max:
            raise FlowControlConfigError(
                f"{where}.retryAfter: min ({config.retry_after_min}) exceeds max "
                f"({config.retry_after_max})"
            )
        return config


_TOP_KEYS = (
    "maxRequests",
    "maxBytes",
    "defaultRequestTTL",
    "recheckInterval",
    "retryAfter",
    "flowGCTimeout",
    "saturation",
    "fairness",
    "defaultPriorityBand",
    "priorityBands",
)


def _saturation(raw: Any, where: str) -> SaturationConfig:
    r = _Reader(
        raw, where, ("queueDepthThreshold", "kvCacheUtilThreshold", "metricsStalenessThreshold")
    )
    d = SaturationConfig()
    kv = r.number("kvCacheUtilThreshold", d.kv_cache_util_threshold, positive=True)
    if kv > 1:
        raise FlowControlConfigError(f"{where}.kvCacheUtilThreshold must be in (0, 1], got {kv}")
    depth = r.number("queueDepthThreshold", d.queue_depth_threshold, positive=True)
    staleness = r.duration("metricsStalenessThreshold", d.metrics_staleness, positive=True)
    return SaturationConfig(depth, kv, staleness)


def _fairness(raw: Any, where: str) -> FairnessConfig:
    r = _Reader(raw, where, ("inputTokenWeight", "outputTokenWeight", "flowWeights"))
    d = FairnessConfig()
    weights_raw = r.get("flowWeights", {})
    if not isinstance(weights_raw, dict):
        raise FlowControlConfigError(f"{where}.flowWeights must be a map of flow id to weight")
    weights = {}
    for flow, w in weights_raw.items():
        weights[str(flow)] = _positive_number(w, f"{where}.flowWeights[{flow!r}]")
    w_in = r.number("inputTokenWeight", d.input_token_weight)
    w_out = r.number("outputTokenWeight", d.output_token_weight)
    if w_in == 0 and w_out == 0:
        raise FlowControlConfigError(f"{where}: inputTokenWeight and outputTokenWeight are both 0")
    return FairnessConfig(input_token_weight=w_in, output_token_weight=w_out, flow_weights=weights)


def _band(raw: Any, where: str, *, template: bool = False) -> BandConfig:
    keys = ("maxRequests", "maxBytes") if template else ("priority", "maxRequests", "maxBytes")
    r = _Reader(raw, where, keys)
    d = BandConfig()
    priority = 0
    if not template:
        if "priority" not in r.raw:
            raise FlowControlConfigError(f"{where}: 'priority' is required")
        priority = r.integer("priority", 0)
    return BandConfig(
        priority=priority,
        max_requests=r.count("maxRequests", d.max_requests),
        max_bytes=r.count("maxBytes", d.max_bytes),
    )


def _bands(raw: Any, where: str) -> tuple[BandConfig, ...]:
    if not isinstance(raw, list):
        raise FlowControlConfigError(f"{where} must be a list")
    bands = tuple(_band(b, f"{where}[{i}]") for i, b in enumerate(raw))
    seen: set[int] = set()
    for b in bands:
        if b.priority in seen:
            raise FlowControlConfigError(f"{where}: priority {b.priority} appears twice")
        seen.add(b.priority)
    return bands


def _is_number(value: Any) -> bool:
    # YAML `true` is an int to Python; a weight of True is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value)


def _positive_number(value: Any, where: str) -> float:
    if not _is_number(value):
        raise FlowControlConfigError(f"{where} must be a number, got {value!r}")
    if value <= 0:
        raise FlowControlConfigError(f"{where} must be > 0, got {value}")
    return float(value)


class _Reader:
    """Typed access to one mapping of the config, with the path for error messages."""

    def __init__(self, raw: Any, where: str, allowed: tuple[str, ...]) -> None:
        if not isinstance(raw, dict):
            raise FlowControlConfigError(f"{where} must be a map, got {type(raw).__name__}")
        unknown = sorted(str(k) for k in raw if k not in allowed)
        if unknown:
            raise FlowControlConfigError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(allowed)}"
            )
        self.raw, self.where = raw, where

    def get(self, key: str, default: Any) -> Any:
        value = self.raw.get(key)
        return default if value is None else value

    def number(self, key: str, default: float, *, positive: bool = False) -> float:
        value = self.raw.get(key)
        if value is None:
            return default
        if not _is_number(value):
            raise FlowControlConfigError(f"{self.where}.{key} must be a number, got {value!r}")
        if value < 0 or (positive and value == 0):
            bound = "> 0" if positive else ">= 0"
            raise FlowControlConfigError(f"{self.where}.{key} must be {bound}, got {value}")
        return float(value)

    def integer(self, key: str, default: int) -> int:
        value = self.raw.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise FlowControlConfigError(f"{self.where}.{key} must be an integer, got {value!r}")
        return value

    def count(self, key: str, default: int, *, positive: bool = False) -> int:
        value = self.integer(key, default)
        if value < 0 or (positive and value == 0):
            bound = "> 0" if positive else ">= 0"
            raise FlowControlConfigError(f"{self.where}.{key} must be {bound}, got {value}")
        return value

    def duration(self, key: str, default: float, *, positive: bool = False) -> float:
        """Seconds as a number, or a string like '200ms', '60s', '5m'."""
        value = self.raw.get(key)
        if value is None:
            return default
        seconds: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str):
            m = _DURATION.match(value)
            if m:
                seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
        if seconds is None or not math.isfinite(seconds):
            raise FlowControlConfigError(
                f"{self.where}.{key} must be a duration (e.g. 200ms, 60s, 5m), got {value!r}"
            )
        if seconds < 0 or (positive and seconds == 0):
            bound = "> 0" if positive else ">= 0"
            raise FlowControlConfigError(f"{self.where}.{key} must be {bound}, got {value!r}")
        return seconds
