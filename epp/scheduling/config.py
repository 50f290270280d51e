"""EndpointPickerConfig: the YAML that names plugins and builds scheduling profiles.

    apiVersion: llm-d.ai/v1alpha1
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

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import yaml

from infergw.api import yaml_files
from infergw.epp.scheduling import registry
from infergw.epp.scheduling.config_file import ConfigError, ConfigFile, ProfileSpec, decode
from infergw.epp.scheduling.framework import (
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
from infergw.epp.scheduling.handle import Handle

DEFAULT_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
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


def read_config(text: str | None) -> ConfigFile:
    """The document (the default one for None) parsed and its shape checked; its plugins are
    not built yet, so the picker can first see whether one needs the KV cache."""
    try:
        raw = yaml_files.safe_load(text if text is not None else DEFAULT_CONFIG)
    except yaml.YAMLError as exc:
        raise ConfigError(f"EndpointPickerConfig is not valid YAML: {exc}") from exc
    return decode(raw)


def needs_kv_cache(doc: ConfigFile) -> bool:
    """Whether a plugin the document names takes the KV cache from the handle."""
    return registry.needs_kv_cache(spec.type for spec in doc.plugins or [])


def load_config(text: str | None, handle: Handle | None = None) -> SchedulingConfig:
    return from_document(read_config(text), handle)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def build(raw: Any, handle: Handle | None = None) -> SchedulingConfig:
    """The scheduling config from a parsed document: its shape checked by decode, then
    what refers to what (plugin names, one picker, one handler)."""
    return from_document(decode(raw), handle)


def from_document(doc: ConfigFile, handle: Handle | None = None) -> SchedulingConfig:
    """The plugins, each made by its factory with `handle`'s services (none given: no KV
    cache, no metrics) and this config's own table of plugins; then the profiles and the
    handler."""
    plugins: dict[str, Plugin] = {}
    handle = replace(handle or Handle(), plugins=MappingProxyType(plugins))
    _make_plugins(doc, handle, plugins)
    profiles = {}
    for i, spec in enumerate(doc.schedulingProfiles or []):
        _require(spec.name not in profiles, f"duplicate profile {spec.name!r}")
        profiles[spec.name] = _profile(i, spec, plugins, handle)
    _require(bool(profiles), "EndpointPickerConfig needs at least one schedulingProfile")
    handler = _handler(plugins, profiles, handle)
    return SchedulingConfig(
        plugins=plugins,
        profiles=profiles,
        handler=handler,
        pre_request=[p for p in plugins.values() if isinstance(p, PreRequest)],
        post_response=[p for p in plugins.values() if isinstance(p, PostResponse)],
        feature_gates=[str(g) for g in doc.featureGates or []],
    )


def _make_plugins(doc: ConfigFile, handle: Handle, plugins: dict[str, Plugin]) -> None:
    """Each plugin in the document's order, into `plugins` (the handle's view of it)."""
    for i, spec in enumerate(doc.plugins or []):
        name = spec.plugin_name
        _require(name not in plugins, f"plugins[{i}]: duplicate plugin name {name!r}")
        try:
            plugins[name] = registry.create(spec.type, name, spec.parameters or {}, handle)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"plugins[{i}] ({name}, {spec.type}): {exc}") from exc


def _profile(i: int, spec: ProfileSpec, plugins: dict[str, Plugin], handle: Handle) -> Profile:
    profile = Profile(spec.name)
    for j, ref in enumerate(spec.plugins or []):
        where = f"schedulingProfiles[{i}].plugins[{j}]"
        plugin = plugins.get(ref.pluginRef)
        _require(plugin is not None, f"{where}: pluginRef {ref.pluginRef!r} names no plugin")
        _require(
            isinstance(plugin, Filter | Scorer | Picker),
            f"{where}: {plugin.type_name} is not a filter, scorer or picker",
        )
        if isinstance(plugin, Filter):
            profile.filters.append(plugin)
        if isinstance(plugin, Scorer):
            profile.scorers.append(WeightedScorer(plugin, ref.weight))
        if isinstance(plugin, Picker):
            _require(profile.picker is None, f"{where}: a profile has one picker")
            profile.picker = plugin
    if profile.picker is None:
        profile.picker = registry.create("max-score-picker", "max-score-picker", {}, handle)
    return profile


def _handler(
    plugins: dict[str, Plugin], profiles: dict[str, Profile], handle: Handle
) -> ProfileHandler:
    handlers = [p for p in plugins.values() if isinstance(p, ProfileHandler)]
    _require(len(handlers) <= 1, "at most one profile handler")
    _require(
        bool(handlers) or len(profiles) == 1,
        "several schedulingProfiles need a profile handler plugin to choose among them",
    )
    handler = (
        handlers[0]
        if handlers
        else registry.create("single-profile-handler", "single-profile-handler", {}, handle)
    )
    try:
        handler.configure(profiles)
    except ValueError as exc:
        raise ConfigError(f"{handler.name}: {exc}") from exc
    return handler
