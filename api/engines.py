"""The engines a Model may name, which of them is the simulator, and the metric names each
engine uses for the few numbers both the picker and the autoscaler read (queue, running
requests, KV-cache use). Shared, because controllers never import the picker and the local
stack imports neither."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_METRICS_PATH = "/metrics"


@dataclass(frozen=True, slots=True)
class EngineNames:
    waiting: str
    running: str
    kv_usage: str
    cache_info: str | None = None
    block_size_label: str = "block_size"
    num_blocks_label: str = "num_gpu_blocks"
    lora_info: str | None = None
    # Where the engine serves its Prometheus page: trtllm-serve's /metrics is JSON
    # iteration stats, its Prometheus text is at /prometheus/metrics.
    metrics_path: str = DEFAULT_METRICS_PATH


# The metric vocabularies: the value of the pods' ENGINE_LABEL and the keys of ENGINES, one
# spelling for the controllers that write the label and the picker and autoscaler that read it.
VLLM_METRICS = "vllm"
SGLANG_METRICS = "sglang"
TRTLLM_METRICS = "trtllm-serve"

ENGINES = {
    VLLM_METRICS: EngineNames(
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:cache_config_info",
        lora_info="vllm:lora_requests_info",
    ),
    SGLANG_METRICS: EngineNames(
        "sglang:num_queue_reqs",
        "sglang:num_running_reqs",
        "sglang:token_usage",
        "sglang:cache_config_info",
        block_size_label="page_size",
        num_blocks_label="num_pages",
    ),
    TRTLLM_METRICS: EngineNames(
        "trtllm_num_requests_waiting",
        "trtllm_num_requests_running",
        "trtllm_kv_cache_utilization",
        metrics_path="/prometheus/metrics",
    ),
}


# The engine types of Model.spec.engine.type and ModelServer.spec.inferenceEngine (the CRDs'
# enums). The simulator runs only when asked for: by this type, or by a simulator image.
VLLM = "vLLM"
SGLANG = "SGLang"
TRTLLM = "TRTLLM"
SIMULATOR = "Simulator"
ENGINE_TYPES = (VLLM, SGLANG, TRTLLM, SIMULATOR)

# The image of every part of ours (`infergate connector`, `infergate download`, `infergate epp`).
INFERGATE_IMAGE = "ghcr.io/infergate/infergate:latest"
# Images whose entrypoint is the simulator (the infergate image runs it for arguments that
# start with a flag: the Dockerfile's ENTRYPOINT), by repository, without registry or tag.
SIMULATOR_IMAGES = ("infergate/simulator", "infergate/infergate")

# An engine type → the vocabulary of its /metrics, the value of the pods' ENGINE_LABEL and a
# key of ENGINES. The simulator speaks vLLM's unless it stands in for SGLang.
METRIC_VOCABULARY = {
    VLLM: VLLM_METRICS,
    SGLANG: SGLANG_METRICS,
    TRTLLM: TRTLLM_METRICS,
    SIMULATOR: VLLM_METRICS,
}


def image_repository(image: str) -> str:
    """`ghcr.io/infergate/infergate:latest` → `infergate/infergate`: the image's path without
    its registry (a first part with a dot, a colon or `localhost`), tag or digest."""
    name = image.split("@", 1)[0]
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    path = "/".join(parts)
    if ":" in parts[-1]:
        path = path.rsplit(":", 1)[0]
    return path


def runs_simulator(engine_type: str, image: str) -> bool:
    """Whether a Model of this engine type and image is served by the simulator."""
    return engine_type == SIMULATOR or image_repository(image) in SIMULATOR_IMAGES


def metrics_path(engine: str) -> str:
    """The path of the Prometheus page of a pod labelled with this vocabulary (/metrics for
    one we do not know: the picker then says the page lacks the engine's names)."""
    names = ENGINES.get(engine)
    return names.metrics_path if names is not None else DEFAULT_METRICS_PATH


def metric_name(engine: str, metric: str) -> str:
    """A neutral name (waiting, running, kv_usage) in this engine's words; any other name is
    a Prometheus metric name already."""
    names = ENGINES.get(engine)
    if names is not None and metric in ("waiting", "running", "kv_usage"):
        return getattr(names, metric)
    return metric
