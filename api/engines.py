"""The metric names each model-server engine uses for the few numbers both the picker and
the autoscaler read (queue, running requests, KV-cache use). Shared, because controllers
never import the picker."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineNames:
    waiting: str
    running: str
    kv_usage: str
    cache_info: str | None = None
    block_size_label: str = "block_size"
    num_blocks_label: str = "num_gpu_blocks"
    lora_info: str | None = None


ENGINES = {
    "vllm": EngineNames(
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:cache_config_info",
        lora_info="vllm:lora_requests_info",
    ),
    "sglang": EngineNames(
        "sglang:num_queue_reqs",
        "sglang:num_running_reqs",
        "sglang:token_usage",
        "sglang:cache_config_info",
        block_size_label="page_size",
        num_blocks_label="num_pages",
    ),
    "trtllm-serve": EngineNames(
        "trtllm_num_requests_waiting", "trtllm_num_requests_running", "trtllm_kv_cache_utilization"
    ),
}


def metric_name(engine: str, metric: str) -> str:
    """A neutral name (waiting, running, kv_usage) in this engine's words; any other name is
    a Prometheus metric name already."""
    names = ENGINES.get(engine)
    if names is not None and metric in ("waiting", "running", "kv_usage"):
        return getattr(names, metric)
    return metric
