"""The vLLM metric names the picker's scraper reads, for tests that build exposition text."""

from __future__ import annotations

WANTED = [
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "vllm:cache_config_info",
    "vllm:lora_requests_info",
]
