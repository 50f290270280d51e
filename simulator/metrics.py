"""/metrics in the engine's own vocabulary: vLLM's names and labels, or SGLang's.

Everything is read from the engine at scrape time, so the hot path only bumps plain counters.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from simulator.config import SimulatorConfig
from simulator.engine import Engine
from simulator.kv_transfer import KVTransfer
from simulator.stats import FINISH_REASONS, Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _gauge(name: str, doc: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels))
    g.add_metric(list(labels.values()), value)
    return g


def _counter(name: str, doc: str, labels: dict[str, str], value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=list(labels))
    c.add_metric(list(labels.values()), value)
    return c


def _histogram(name: str, doc: str, labels: dict[str, str], h: Histogram) -> Metric:
    m = HistogramMetricFamily(name, doc, labels=list(labels))
    m.add_metric(list(labels.values()), h.cumulative(), h.total)
    return m


class VllmCollector:
    def __init__(self, engine: Engine, cfg: SimulatorConfig) -> None:
        self.engine = engine
        self.cfg = cfg
        self.labels = {"engine": "0", "model_name": cfg.model_name}

    def collect(self) -> Iterator[Metric]:
        e, s, lb = self.engine, self.engine.stats, self.labels
        yield _gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            lb,
            len(e.running),
        )
        yield _gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            lb,
            e.num_waiting,
        )
        yield _gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            lb,
            e.pool.usage,
        )
        yield _counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            lb,
            s.prefix_cache_queries,
        )
        yield _counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            lb,
            s.prefix_cache_hits,
        )
        yield _counter(
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, "
            "in terms of number of queried tokens.",
            lb,
            s.external_prefix_cache_queries,
        )
        yield _counter(
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, "
            "in terms of number of cached tokens.",
            lb,
            s.external_prefix_cache_hits,
        )
        by_source = CounterMetricFamily(
            "vllm:prompt_tokens_by_source",
            "Number of prompt tokens by source.",
            labels=["engine", "model_name", "source"],
        )
        for source in ("local_compute", "local_cache_hit", "external_kv_transfer"):
            by_source.add_metric(
                ["0", self.cfg.model_name, source], s.prompt_tokens_by_source[source]
            )
        yield by_source
        if e.kv is not None:
            yield from self._nixl(e.kv)
        yield _counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            lb,
            s.preemptions,
        )
        yield _counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", lb, s.prompt_tokens
        )
        yield _counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            lb,
            s.generation_tokens,
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=["engine", "finished_reason", "model_name"],
        )
        for reason in FINISH_REASONS:
            success.add_metric(["0", reason, self.cfg.model_name], s.finished[reason])
        yield success
        for name, doc, hist in (
            (
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                s.ttft,
            ),
            (
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                s.inter_token_latency,
            ),
            (
                "vllm:request_time_per_output_token_seconds",
                "Histogram of time_per_output_token_seconds per request.",
                s.time_per_output_token,
            ),
            (
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                s.e2e_latency,
            ),
            (
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                s.queue_time,
            ),
            (
                "vllm:request_prefill_time_seconds",
                "Histogram of time spent in PREFILL phase for request.",
                s.prefill_time,
            ),
            (
                "vllm:request_decode_time_seconds",
                "Histogram of time spent in DECODE phase for request.",
                s.decode_time,
            ),
            (
                "vllm:request_prompt_tokens",
                "Number of prefill tokens processed.",
                s.request_prompt_tokens,
            ),
            (
                "vllm:request_generation_tokens",
                "Number of generation tokens processed.",
                s.request_generation_tokens,
            ),
        ):
            yield _histogram(name, doc, lb, hist)
        cfg = self.cfg
        yield _gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            {
                "block_size": str(cfg.block_size),
                "cache_dtype": "auto",
                "enable_prefix_caching": str(cfg.enable_prefix_caching),
                "engine": "0",
                "gpu_memory_utilization": "0.9",
                "num_cpu_blocks": "None",
                "num_gpu_blocks": str(cfg.num_gpu_blocks),
                "num_gpu_blocks_override": str(cfg.num_gpu_blocks),
                "prefix_caching_hash_algo": cfg.prefix_caching_hash_algo,
            },
            1.0,
        )
        if cfg.enable_lora:
            running, waiting = e.lora_adapters()
            # vLLM's value is a timestamp; readers take the newest sample.
            yield _gauge(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                {
                    "max_lora": str(cfg.max_loras),
                    "running_lora_adapters": ",".join(sorted(running)),
                    "waiting_lora_adapters": ",".join(sorted(waiting)),
                },
                time.time(),
            )

    def _nixl(self, kv: KVTransfer) -> Iterator[Metric]:
        """The NixlConnector's metrics that a simulated transfer can fill."""
        lb = self.labels
        yield _histogram(
            "vllm:nixl_xfer_time_seconds",
            "Histogram of transfer duration for NIXL KV Cache transfers.",
            lb,
            kv.transfer_time,
        )
        yield _counter(
            "vllm:nixl_num_failed_transfers",
            "Number of failed NIXL KV Cache transfers.",
            lb,
            kv.failed_transfers,
        )
        yield _counter(
            "vllm:nixl_num_kv_expired_reqs",
            "Number of requests that had their KV expire. NOTE: This metric is tracked on "
            "the P instance.",
            lb,
            kv.expired_requests,
        )


class SglangCollector:
    def __init__(self, engine: Engine, cfg: SimulatorConfig) -> None:
        self.engine = engine
        self.cfg = cfg
        self.labels = {"model_name": cfg.model_name}

    def collect(self) -> Iterator[Metric]:
        e, s, lb = self.engine, self.engine.stats, self.labels
        used_tokens = (e.pool.num_usable - e.pool.num_free) * e.pool.block_size
        hit_rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        yield _gauge(
            "sglang:num_running_reqs", "The number of running requests.", lb, len(e.running)
        )
        yield _gauge(
            "sglang:num_queue_reqs",
            "The number of requests in the waiting queue.",
            lb,
            e.num_waiting,
        )
        yield _gauge("sglang:num_used_tokens", "The number of used tokens.", lb, used_tokens)
        yield _gauge("sglang:token_usage", "The token usage.", lb, e.pool.usage)
        yield _gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", lb, hit_rate)
        yield _counter(
            "sglang:prompt_tokens", "Number of prefill tokens processed.", lb, s.prompt_tokens
        )
        yield _counter(
            "sglang:generation_tokens",
            "Number of generation tokens processed.",
            lb,
            s.generation_tokens,
        )
        yield _counter(
            "sglang:cached_tokens", "Number of cached prompt tokens.", lb, s.prefix_cache_hits
        )
        yield _counter(
            "sglang:num_requests", "Number of requests processed.", lb, sum(s.finished.values())
        )
        yield _histogram(
            "sglang:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            lb,
            s.ttft,
        )
        yield _histogram(
            "sglang:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            lb,
            s.inter_token_latency,
        )
        yield _histogram(
            "sglang:e2e_request_latency_seconds",
            "Histogram of End-to-end request latency in seconds",
            lb,
            s.e2e_latency,
        )
        yield _gauge(
            "sglang:cache_config_info",
            "Cache configuration.",
            {
                "page_size": str(self.cfg.block_size),
                "num_pages": str(self.cfg.num_gpu_blocks),
            },
            1.0,
        )


class SimulatorCollector:
    """The simulator's own health, under a prefix no engine uses."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats
        yield _counter("infergate_sim:engine_steps", "Engine steps run.", {}, s.steps)
        yield _counter(
            "infergate_sim:step_modeled_seconds",
            "Step time the latency model asked for.",
            {},
            s.step_seconds_modeled,
        )
        yield _counter(
            "infergate_sim:step_busy_seconds",
            "Wall time engine steps took; above the modeled time the process was "
            "too busy to keep the model's pace.",
            {},
            s.step_seconds_busy,
        )
        kv = self.engine.kv
        if kv is not None:
            yield _gauge(
                "infergate_sim:kv_held_requests",
                "Finished prefill legs whose KV blocks this pod holds for a decode pod.",
                {"role": kv.role},
                kv.num_held_requests,
            )
            mismatch = CounterMetricFamily(
                "infergate_sim:kv_role_mismatch",
                "P/D legs sent to a pod of the other --kv-role (served anyway, as vLLM does).",
                labels=["leg"],
            )
            for leg in ("prefill_leg_on_decode_pod", "decode_leg_on_prefill_pod"):
                mismatch.add_metric([leg], kv.role_mismatch[leg])
            yield mismatch


class MetricsRenderer:
    def __init__(self, engine: Engine, cfg: SimulatorConfig) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        collector = SglangCollector if cfg.engine == "sglang" else VllmCollector
        self.registry.register(collector(engine, cfg))
        self.registry.register(SimulatorCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
