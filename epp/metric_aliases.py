"""The llm-d router's names (`llm_d_epp_*`) for the picker's reference-named families.

The reference moved to llm-d in mid-2026 and renamed its picker's metrics; dashboards and
alerts written since use the new names. Each alias is the same family under the llm-d name,
made at scrape time from the inference_* family (so the request path records once), with the
llm-d label names where llm-d renamed a label. llm-d also splits its request families by
`fairness_id` (and `priority`); ours keep the inference_* families' labels.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample


@dataclass(frozen=True, slots=True)
class Alias:
    name: str  # the llm-d family's name (a counter's without `_total`)
    labels: dict[str, str] = field(default_factory=dict)  # ours → llm-d's, where renamed


# Family name (a counter's without `_total`) → its llm-d alias.
LLMD_ALIASES: dict[str, Alias] = {
    "inference_objective_request": Alias("llm_d_epp_request"),
    "inference_objective_request_error": Alias("llm_d_epp_request_error"),
    "inference_objective_request_duration_seconds": Alias("llm_d_epp_request_duration_seconds"),
    "inference_objective_request_sizes": Alias("llm_d_epp_request_size_bytes"),
    "inference_objective_response_sizes": Alias("llm_d_epp_response_size_bytes"),
    "inference_objective_input_tokens": Alias("llm_d_epp_request_input_tokens"),
    "inference_objective_output_tokens": Alias("llm_d_epp_request_output_tokens"),
    "inference_objective_prompt_cached_tokens": Alias("llm_d_epp_request_cached_tokens"),
    "inference_objective_running_requests": Alias("llm_d_epp_request_running"),
    "inference_objective_normalized_time_per_output_token_seconds": Alias(
        "llm_d_epp_request_ntpot_seconds"
    ),
    "inference_objective_request_ttft_seconds": Alias("llm_d_epp_request_ttft_seconds"),
    "inference_objective_request_tpot_seconds": Alias("llm_d_epp_request_streaming_tpot_seconds"),
    "inference_pool_average_kv_cache_utilization": Alias("llm_d_epp_average_kv_cache_utilization"),
    "inference_pool_average_queue_size": Alias("llm_d_epp_average_queue_size"),
    "inference_pool_average_running_requests": Alias("llm_d_epp_average_running_requests"),
    "inference_pool_ready_pods": Alias("llm_d_epp_ready_endpoints"),
    "inference_pool_per_pod_queue_size": Alias(
        "llm_d_epp_per_endpoint_queue_size", {"model_server_pod": "model_server_endpoint"}
    ),
    "inference_extension_scheduler_e2e_duration_seconds": Alias(
        "llm_d_epp_scheduler_e2e_duration_seconds"
    ),
    "inference_extension_scheduler_attempts": Alias(
        "llm_d_epp_scheduler_attempts", {"pod_name": "endpoint_name"}
    ),
    "inference_extension_plugin_duration_seconds": Alias("llm_d_epp_plugin_duration_seconds"),
    "inference_extension": Alias("llm_d_epp"),  # the build's info
    "inference_extension_model_rewrite_decisions": Alias("llm_d_epp_model_rewrite_decisions"),
    "inference_extension_flow_control_request_queue_duration_seconds": Alias(
        "llm_d_epp_flow_control_request_queue_duration_seconds"
    ),
    "inference_extension_flow_control_request_enqueue_duration_seconds": Alias(
        "llm_d_epp_flow_control_request_enqueue_duration_seconds"
    ),
    "inference_extension_flow_control_dispatch_cycle_duration_seconds": Alias(
        "llm_d_epp_flow_control_dispatch_cycle_duration_seconds"
    ),
    "inference_extension_flow_control_queue_size": Alias("llm_d_epp_flow_control_queue_size"),
    "inference_extension_flow_control_queue_bytes": Alias("llm_d_epp_flow_control_queue_bytes"),
    "inference_extension_flow_control_pool_saturation": Alias(
        "llm_d_epp_flow_control_pool_saturation"
    ),
}


class LlmdAliases:
    """Registered in the picker's registry: re-exposes the aliased families found in it."""

    def __init__(self, registry: CollectorRegistry, aliases: dict[str, Alias] = LLMD_ALIASES):
        self.registry, self.aliases = registry, aliases
        self._inside = threading.local()  # the registry's collect() reaches this one too

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only

    def collect(self) -> Iterator[Metric]:
        if getattr(self._inside, "active", False):
            return
        self._inside.active = True
        try:
            families = list(self.registry.collect())
        finally:
            self._inside.active = False
        for family in families:
            alias = self.aliases.get(family.name)
            if alias is not None:
                yield renamed(family, alias)


def renamed(family: Metric, alias: Alias) -> Metric:
    """`family` under the alias's name and label names (its samples' suffixes kept)."""
    out = Metric(alias.name, family.documentation, family.type, family.unit)
    cut = len(family.name)
    for s in family.samples:
        labels = {alias.labels.get(k, k): v for k, v in s.labels.items()}
        out.samples.append(Sample(alias.name + s.name[cut:], labels, s.value, s.timestamp))
    return out
