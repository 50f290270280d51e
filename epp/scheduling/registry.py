"""Plugin types by name. Adding a plugin: one module in plugins/ and one line here.

A type's factory is its `create` classmethod: it gets the plugin's name, its parameters and
the handle (what the picker lends plugins, epp/scheduling/handle.py). A type whose
`needs_kv_cache` is set makes the picker build the KV cache before any plugin."""

from __future__ import annotations

from collections.abc import Iterable

from infergw.epp.scheduling.framework import Plugin
from infergw.epp.scheduling.handle import Handle
from infergw.epp.scheduling.plugins import (
    header_filter,
    kv_cache_utilization,
    least_latency,
    least_request,
    lora_affinity,
    pd_filters,
    pd_profile_handler,
    pickers,
    precise_prefix_cache,
    prefill_backlog,
    prefix_cache,
    profile_handlers,
    queue,
    random_scorer,
    running_requests,
    session_affinity,
)

PLUGIN_TYPES: dict[str, type[Plugin]] = {
    cls.type_name: cls
    for cls in (
        queue.QueueScorer,
        kv_cache_utilization.KVCacheUtilizationScorer,
        running_requests.RunningRequestsScorer,
        least_request.LeastRequestScorer,
        least_request.LowQueueFilter,
        prefill_backlog.PrefillBacklogScorer,
        least_latency.LeastLatencyScorer,
        lora_affinity.LoraAffinityFilter,
        lora_affinity.LoraAffinityScorer,
        prefix_cache.PrefixCacheScorer,
        precise_prefix_cache.PrecisePrefixCacheScorer,
        session_affinity.SessionAffinityScorer,
        random_scorer.RandomScorer,
        pickers.MaxScorePicker,
        pickers.WeightedRandomPicker,
        pickers.RandomPicker,
        pickers.RoundRobinPicker,
        header_filter.HeaderBasedTestingFilter,
        profile_handlers.SingleProfileHandler,
        pd_profile_handler.PDProfileHandler,
        pd_filters.DecodeFilter,
        pd_filters.PrefillFilter,
    )
}


def plugin_type(type_name: str) -> type[Plugin]:
    cls = PLUGIN_TYPES.get(type_name)
    if cls is None:
        raise ValueError(f"unknown plugin type {type_name!r}; known: {sorted(PLUGIN_TYPES)}")
    return cls


def needs_kv_cache(type_names: Iterable[str]) -> bool:
    """Whether any of these plugin types takes the KV cache (unknown names do not: building
    the plugins refuses them)."""
    return any(cls.needs_kv_cache for t in type_names if (cls := PLUGIN_TYPES.get(t)) is not None)


def create(type_name: str, name: str, params: dict | None, handle: Handle | None = None) -> Plugin:
    cls = plugin_type(type_name)
    # A plugin that reads parameters names their struct in params_type and checks them in
    # its constructor; one without takes none, and a config that gives it some is mistaken.
    if params and getattr(cls, "params_type", None) is None:
        raise ValueError(f"{type_name} takes no parameters, got {sorted(map(str, params))}")
    return cls.create(name, params, handle if handle is not None else Handle())
