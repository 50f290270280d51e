"""LoRA affinity from vLLM's vllm:lora_requests_info.

The scorer: 1.0 where the adapter is running, 0.8 where a slot is free (running + waiting
adapters < max_lora), 0.6 where it is already waiting, else 0. The filter keeps the best of
those tiers that is not empty, so a request never loses all candidates to it.
"""

from __future__ import annotations

from infergw.epp.scheduling.framework import Filter, Scorer


def _affinity(adapter: str, e) -> float:
    m = e.metrics
    if adapter in m.running_loras:
        return 1.0
    if m.max_loras is None or len(m.running_loras | m.waiting_loras) < m.max_loras:
        return 0.8
    if adapter in m.waiting_loras:
        return 0.6
    return 0.0


class LoraAffinityScorer(Scorer):
    type_name = "lora-affinity-scorer"

    def score(self, ctx, endpoints):
        return [_affinity(ctx.target_model, e) for e in endpoints]


class LoraAffinityFilter(Filter):
    type_name = "lora-affinity-filter"

    def filter(self, ctx, endpoints):
        tiers: dict[float, list] = {}
        for e in endpoints:
            tiers.setdefault(_affinity(ctx.target_model, e), []).append(e)
        return tiers[max(tiers)] if tiers else endpoints
