"""EndpointPickerConfig: the YAML that names plugins and builds scheduling profiles.

    apiVersion: inference.networking.x-k8s.io/v1alpha1
    kind: EndpointPickerConfig
    plugins:
    - {name: prefix, type: prefix-cache-scorer, parameters: {blockSizeTokens: 16}}
    schedulingProfiles:
    - name: default
      plugins: [{pluginRef: prefix, weight: 3}]

A plugin's name defaults to its type; a weight defaults to 1. A profile without a picker
gets max-score-picker; a config without a profile handler gets single-profile-handler.
Several profiles need a handler that chooses among them (pd-profile-handler: a `decode` and
a `prefill` profile).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from epp.scheduling import registry
from epp.scheduling.framework import (
    DurationSink,
    Filter,
    Picker,
    Plugin,
    PostResponse,
    PreRequest,
    Profile,
    ProfileHandler,
    Scheduler,
    Scorer,
    WeightedScorer,
)

API_VERSIONS = (
    "inference.networking.x-k8s.io/v1alpha1",
    "llm-d.ai/v1alpha1",
    "infergate.io/v1alpha1",
)

DEFAULT_CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: max-score-picker}
"""


# Far above any useful weight; a bound keeps the weighted sum of scores finite.
MAX_WEIGHT = 1_000_000


class ConfigError(ValueError):
    pass


@dataclass(slots=True)
class SchedulingConfig:
    plugins: dict[str, Plugin]
    profiles: dict[str, Profile]
    handler: ProfileHandler
    pre_request: list[PreRequest] = field(default_factory=list)
    post_response: list[PostResponse] = field(default_factory=list)
    feature_gates: list[str] = field(default_factory=list)

    def scheduler(self, max_endpoints: int, observe: DurationSink | None = None) -> Scheduler:
        return Scheduler(self.profiles, self.handler, max_endpoints, observe)


def load_config(text: str | None) -> SchedulingConfig:
    try:
        raw = yaml.safe_load(text if text is not None else DEFAULT_CONFIG)
    except yaml.YAMLError as exc:
        raise ConfigError(f"EndpointPickerConfig is not valid YAML: {exc}") from exc
    except RecursionError:
        raise ConfigError("EndpointPickerConfig is nested too deeply") from None
    return build(raw)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def build(raw: Any) -> SchedulingConfig:
    _require(isinstance(raw, dict), "EndpointPickerConfig must be a YAML mapping")
    _require(
        raw.get("kind") == "EndpointPickerConfig",
        f"kind must be EndpointPickerConfig, got {raw.get('kind')!r}",
    )
    _require(
        raw.get("apiVersion") in API_VERSIONS,
        f"apiVersion must be one of {API_VERSIONS}, got {raw.get('apiVersion')!r}",
    )
    plugins: dict[str, Plugin] = {}
    _require(isinstance(raw.get("plugins") or [], list), "plugins must be a list")
    for i, spec in enumerate(raw.get("plugins") or []):
        _require(
            isinstance(spec, dict) and isinstance(spec.get("type"), str),
            f"plugins[{i}] needs a 'type'",
        )
        name = spec.get("name") or spec["type"]
        _require(isinstance(name, str), f"plugins[{i}]: name must be a string")
        _require(name not in plugins, f"plugins[{i}]: duplicate plugin name {name!r}")
        params = spec.get("parameters") or {}
        _require(isinstance(params, dict), f"plugins[{i}] ({name}): parameters must be a map")
        try:
            plugins[name] = registry.create(spec["type"], name, params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"plugins[{i}] ({name}, {spec['type']}): {exc}") from exc

    profiles: dict[str, Profile] = {}
    _require(
        isinstance(raw.get("schedulingProfiles") or [], list), "schedulingProfiles must be a list"
    )
    for i, spec in enumerate(raw.get("schedulingProfiles") or []):
        _require(
            isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec["name"],
            f"schedulingProfiles[{i}] needs a 'name' (a string)",
        )
        profile = Profile(spec["name"])
        _require(
            isinstance(spec.get("plugins") or [], list),
            f"schedulingProfiles[{i}].plugins must be a list",
        )
        for j, ref in enumerate(spec.get("plugins") or []):
            where = f"schedulingProfiles[{i}].plugins[{j}]"
            _require(
                isinstance(ref, dict)
                and isinstance(ref.get("pluginRef"), str)
                and ref["pluginRef"] in plugins,
                f"{where}: pluginRef {ref.get('pluginRef') if isinstance(ref, dict) else ref!r}"
                " names no plugin",
            )
            plugin = plugins[ref["pluginRef"]]
            if isinstance(plugin, Filter):
                profile.filters.append(plugin)
            if isinstance(plugin, Scorer):
                weight = ref.get("weight", 1)
                _require(
                    isinstance(weight, int | float)
                    and not isinstance(weight, bool)
                    and 0 <= weight <= MAX_WEIGHT,  # NaN fails both comparisons
                    f"{where}: weight must be a number in 0..{MAX_WEIGHT}, got {weight!r}",
                )
                profile.scorers.append(WeightedScorer(plugin, float(weight)))
            if isinstance(plugin, Picker):
                _require(profile.picker is None, f"{where}: a profile has one picker")
                profile.picker = plugin
            _require(
                isinstance(plugin, Filter | Scorer | Picker),
                f"{where}: {plugin.type_name} is not a filter, scorer or picker",
            )
        if profile.picker is None:
            profile.picker = registry.create("max-score-picker", "max-score-picker", {})
        _require(profile.name not in profiles, f"duplicate profile {profile.name!r}")
        profiles[profile.name] = profile
    _require(bool(profiles), "EndpointPickerConfig needs at least one schedulingProfile")

    handlers = [p for p in plugins.values() if isinstance(p, ProfileHandler)]
    _require(len(handlers) <= 1, "at most one profile handler")
    _require(
        bool(handlers) or len(profiles) == 1,
        "several schedulingProfiles need a profile handler plugin to choose among them",
    )
    handler = (
        handlers[0]
        if handlers
        else registry.create("single-profile-handler", "single-profile-handler", {})
    )
    try:
        handler.configure(plugins, profiles)
    except ValueError as exc:
        raise ConfigError(f"{handler.name}: {exc}") from exc
    gates = raw.get("featureGates") or []
    _require(isinstance(gates, list), "featureGates must be a list")
    return SchedulingConfig(
        plugins=plugins,
        profiles=profiles,
        handler=handler,
        pre_request=[p for p in plugins.values() if isinstance(p, PreRequest)],
        post_response=[p for p in plugins.values() if isinstance(p, PostResponse)],
        feature_gates=[str(g) for g in gates],
    )
