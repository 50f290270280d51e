"""/metrics in the engine's own vocabulary: vLLM's names and labels (vllm_metrics.py), or
SGLang's; plus the simulator's own health.

Everything is read from the engine at scrape time, so the hot path only bumps plain counters.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from infergw.simulator.config import SimulatorConfig
from infergw.simulator.engine import Engine
from infergw.simulator.metric_families import Families
from infergw.simulator.vllm_metrics import VllmCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SglangCollector:
    def __init__(self, engine: Engine, cfg: SimulatorConfig) -> None:
        self.engine = engine
        self.cfg = cfg
        self.families = Families({"model_name": cfg.model_name})

    def collect(self) -> Iterator[Metric]:
        e, s, f = self.engine, self.engine.stats, self.families
        used_tokens = (e.pool.num_usable - e.pool.num_free) * e.pool.block_size
        hit_rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        yield f.gauge("sglang:num_running_reqs", "The number of running requests.", len(e.running))
        yield f.gauge(
            "sglang:num_queue_reqs", "The number of requests in the waiting queue.", e.num_waiting
        )
        yield f.gauge("sglang:num_used_tokens", "The number of used tokens.", used_tokens)
        yield f.gauge("sglang:token_usage", "The token usage.", e.pool.usage)
        yield f.gauge("sglang:cache_hit_rate", "The prefix cache hit rate.", hit_rate)
        yield f.counter(
            "sglang:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens
        )
        yield f.counter(
            "sglang:generation_tokens",
            "Number of generation tokens processed.",
            s.generation_tokens,
        )
        yield f.counter(
            "sglang:cached_tokens", "Number of cached prompt tokens.", s.prefix_cache_hits
        )
        yield f.counter(
            "sglang:num_requests", "Number of requests processed.", sum(s.finished.values())
        )
        yield f.histogram(
            "sglang:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            s.ttft,
        )
        yield f.histogram(
            "sglang:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            s.inter_token_latency,
        )
        yield f.histogram(
            "sglang:e2e_request_latency_seconds",
            "Histogram of End-to-end request latency in seconds",
            s.e2e_latency,
        )
        yield Families({}).gauge_by(
            "sglang:cache_config_info",
            "Cache configuration.",
            {"page_size": str(self.cfg.block_size), "num_pages": str(self.cfg.num_gpu_blocks)},
            1.0,
        )


class SimulatorCollector:
    """The simulator's own health, under a prefix no engine uses."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.families = Families({})

    def collect(self) -> Iterator[Metric]:
        s, f = self.engine.stats, self.families
        yield f.counter("infergate_sim:engine_steps", "Engine steps run.", s.steps)
        yield f.counter(
            "infergate_sim:step_modeled_seconds",
            "Step time the latency model asked for.",
            s.step_seconds_modeled,
        )
        yield f.counter(
            "infergate_sim:step_busy_seconds",
            "Wall time engine steps took; above the modeled time the process was "
            "too busy to keep the model's pace.",
            s.step_seconds_busy,
        )
        kv = self.engine.kv
        if kv is not None:
            yield f.gauge_by(
                "infergate_sim:kv_held_requests",
                "Finished prefill legs whose KV blocks this pod holds for a decode pod.",
                {"role": kv.role},
                kv.num_held_requests,
            )
            yield f.counters(
                "infergate_sim:kv_role_mismatch",
                "P/D legs sent to a pod of the other --kv-role (served anyway, as vLLM does).",
                "leg",
                {
                    leg: kv.role_mismatch[leg]
                    for leg in ("prefill_leg_on_decode_pod", "decode_leg_on_prefill_pod")
                },
            )


class MetricsRenderer:
    def __init__(self, engine: Engine, cfg: SimulatorConfig) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        collector = SglangCollector if cfg.engine == "sglang" else VllmCollector
        self.registry.register(collector(engine, cfg))
        self.registry.register(SimulatorCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
