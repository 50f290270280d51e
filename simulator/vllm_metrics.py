"""/metrics in vLLM 0.32's vocabulary: its family names, types, label sets and HELP strings
(checked against a real vLLM's /metrics by tests/test_simulator_parity.py).

Everything is read from the engine at scrape time, so the hot path only bumps plain counters.
Families vLLM exports that the simulator cannot have are listed, with the reason, in that test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import Metric

from infergw.simulator.config import SimulatorConfig
from infergw.simulator.engine import Engine
from infergw.simulator.kv_transfer import KVTransfer
from infergw.simulator.metric_families import Families
from infergw.simulator.stats import FINISH_REASONS

PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
# The cache tiers of vllm:prompt_tokens_cached_by_source; the simulator fills device and p2p.
CACHED_SOURCES = ("device", "host", "p2p", "disk", "external_unspecified")
# Queue limits (--max-num-queued-reqs/-tokens) the simulator does not have: never rejected.
ADMISSION_REJECTION_REASONS = ("max_num_queued_reqs", "max_num_queued_tokens")


class VllmCollector:
    def __init__(self, engine: Engine, cfg: SimulatorConfig) -> None:
        self.engine = engine
        self.cfg = cfg
        created = time.time()
        self.families = Families({"engine": "0", "model_name": cfg.model_name}, created)
        # vLLM counts admission rejections in the API server, which has no engine label.
        self.frontend = Families({"model_name": cfg.model_name}, created)

    def collect(self) -> Iterator[Metric]:
        yield from self._scheduler()
        yield from self._caches()
        yield from self._tokens()
        yield from self._requests()
        yield from self._histograms()
        yield self._cache_config_info()
        if self.cfg.enable_lora:
            yield self._lora_requests_info()
        # As in vLLM, only a pod with a KV connector (--kv-role/--kv-transfer-config) has them.
        if self.cfg.kv_transfer.connector and self.engine.kv is not None:
            yield from self._nixl(self.engine.kv)

    def _scheduler(self) -> Iterator[Metric]:
        e, f = self.engine, self.families
        yield f.gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            len(e.running),
        )
        yield f.gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            e.num_waiting,
        )
        yield f.gauges(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for "
            "scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, "
            "KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
            "reason",
            e.waiting_by_reason(),
        )
        # The simulator has no sleep mode (no /sleep route): always awake.
        yield f.gauges(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is "
            "awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep "
            "level 2.",
            "sleep_state",
            {"awake": 1, "weights_offloaded": 0, "discard_all": 0},
        )
        yield f.gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", e.pool.usage
        )

    def _caches(self) -> Iterator[Metric]:
        s, f = self.engine.stats, self.families
        yield f.counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            s.prefix_cache_queries,
        )
        yield f.counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            s.prefix_cache_hits,
        )
        yield f.counter(
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, "
            "in terms of number of queried tokens.",
            s.external_prefix_cache_queries,
        )
        yield f.counter(
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, "
            "in terms of number of cached tokens.",
            s.external_prefix_cache_hits,
        )
        # Text only: no multi-modal item is ever looked up, as in a real text-only vLLM.
        yield f.counter(
            "vllm:mm_cache_queries",
            "Multi-modal cache queries, in terms of number of queried items.",
            0,
        )
        yield f.counter(
            "vllm:mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items.", 0
        )

    def _tokens(self) -> Iterator[Metric]:
        s, f = self.engine.stats, self.families
        yield f.counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            s.preemptions,
        )
        yield f.counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens
        )
        yield f.counters(
            "vllm:prompt_tokens_by_source",
            "Number of prompt tokens by source.",
            "source",
            {source: s.prompt_tokens_by_source[source] for source in PROMPT_SOURCES},
        )
        yield f.counter(
            "vllm:prompt_tokens_cached",
            "Number of cached prompt tokens (local + external).",
            s.prompt_tokens_cached,
        )
        yield f.counters(
            "vllm:prompt_tokens_cached_by_source",
            "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), "
            "host (offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or "
            "external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + "
            "vllm:external_prefix_cache_hits.",
            "source",
            {source: s.prompt_tokens_cached_by_source[source] for source in CACHED_SOURCES},
        )
        yield f.counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", s.generation_tokens
        )

    def _requests(self) -> Iterator[Metric]:
        s = self.engine.stats
        yield self.families.counters(
            "vllm:request_success",
            "Count of successfully processed requests.",
            "finished_reason",
            {reason: s.finished[reason] for reason in FINISH_REASONS},
        )
        yield self.frontend.counters(
            "vllm:admission_rejections",
            "Number of admission attempts rejected by a queue limit, by reason.",
            "reason",
            dict.fromkeys(ADMISSION_REJECTION_REASONS, 0),
        )

    def _histograms(self) -> Iterator[Metric]:
        s, f = self.engine.stats, self.families
        for name, doc, hist in (
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
            (
                "vllm:iteration_tokens_total",
                "Histogram of number of tokens per engine_step.",
                s.iteration_tokens,
            ),
            (
                "vllm:request_max_num_generation_tokens",
                "Histogram of maximum number of requested generation tokens.",
                s.request_max_num_generation_tokens,
            ),
            ("vllm:request_params_n", "Histogram of the n request parameter.", s.request_params_n),
            (
                "vllm:request_params_max_tokens",
                "Histogram of the max_tokens request parameter.",
                s.request_params_max_tokens,
            ),
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
                "vllm:request_inference_time_seconds",
                "Histogram of time spent in RUNNING phase for request.",
                s.inference_time,
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
                "vllm:request_num_preemptions",
                "Histogram of the number of times a request was preempted.",
                s.request_num_preemptions,
            ),
            (
                "vllm:request_prefill_kv_computed_tokens",
                "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
                s.request_prefill_kv_computed_tokens,
            ),
        ):
            yield f.histogram(name, doc, hist)

    def _cache_config_info(self) -> Metric:
        """vLLM 0.32's CacheConfig labels; those the simulator has no notion of carry the
        values the recorded vLLM reported (its defaults for a plain attention model)."""
        cfg, pool = self.cfg, self.engine.pool
        bs = str(cfg.block_size)
        size_tokens = cfg.num_gpu_blocks * cfg.block_size
        labels = {
            "_block_size_resolved": "True",
            "block_size": bs,
            "cache_dtype": "auto",
            "cache_hit_alignment_tokens": "None",
            "effective_attention_block_size": bs,
            "enable_mamba_shared_prefix_checkpoint": "False",
            "enable_prefix_caching": str(pool.enable_caching),
            "gpu_memory_utilization": "0.92",
            "hash_block_size": "None",
            "is_attention_free": "False",
            "kv_cache_dtype_skip_layers": "[]",
            "kv_cache_layout": "None",
            "kv_cache_max_concurrency": str(size_tokens / self.engine.limits.max_model_len),
            "kv_cache_memory_bytes": "None",
            "kv_cache_size_tokens": str(size_tokens),
            "kv_offloading_backend": "native",
            "kv_offloading_size": "None",
            "kv_sharing_fast_prefill": "False",
            "mamba_block_size": "None",
            "mamba_cache_dtype": "auto",
            "mamba_cache_mode": "none",
            "mamba_page_size_padded": "None",
            "mamba_ssm_cache_dtype": "auto",
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(cfg.num_gpu_blocks),
            "num_gpu_blocks_override": str(cfg.num_gpu_blocks),
            "prefix_cache_retention_interval": "0",
            "prefix_caching_hash_algo": cfg.prefix_caching_hash_algo,
            "prefix_match_unit": "None",
            "replayssm_buffer_len": "16",
            "skip_page_size_padded": "None",
            "sliding_window": "None",
            "swa_bounded_replay": "True",
            "use_kda_recoverssm": "False",
            "use_replayssm": "False",
            "user_specified_block_size": "True",
        }
        return Families({"engine": "0"}).gauge_by(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", labels, 1.0
        )

    def _lora_requests_info(self) -> Metric:
        running, waiting = self.engine.lora_adapters()
        # vLLM's value is a timestamp; readers take the newest sample.
        return Families({}).gauge_by(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            {
                "max_lora": str(self.cfg.max_loras),
                "running_lora_adapters": ",".join(sorted(running)),
                "waiting_lora_adapters": ",".join(sorted(waiting)),
            },
            time.time(),
        )

    def _nixl(self, kv: KVTransfer) -> Iterator[Metric]:
        """The NixlConnector's metrics that a simulated transfer can fill."""
        f = self.families
        yield f.histogram(
            "vllm:nixl_xfer_time_seconds",
            "Histogram of transfer duration for NIXL KV Cache transfers.",
            kv.transfer_time,
        )
        yield f.counter(
            "vllm:nixl_num_failed_transfers",
            "Number of failed NIXL KV Cache transfers.",
            kv.failed_transfers,
        )
        yield f.counter(
            "vllm:nixl_num_kv_expired_reqs",
            "Number of requests that had their KV expire. NOTE: This metric is tracked on "
            "the P instance.",
            kv.expired_requests,
        )
