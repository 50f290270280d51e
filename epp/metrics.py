"""The picker's own Prometheus metrics, with the Gateway API Inference Extension's names."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Info

from infergw.api import version
from infergw.epp.metric_aliases import LlmdAliases
from infergw.epp.metric_values import FastCounter, FastHistogram, LoopTally

LATENCY_BUCKETS = (
    0.005,
    0.025,
    0.05,
    0.1,
    0.2,
    0.4,
    0.6,
    0.8,
    1.0,
    1.25,
    1.5,
    2,
    3,
    4,
    5,
    6,
    8,
    10,
    15,
    20,
    30,
    45,
    60,
    120,
    180,
    240,
    300,
    360,
    480,
    600,
    900,
    1200,
    1800,
    2700,
    3600,
)
TOKEN_BUCKETS = (
    1,
    8,
    16,
    32,
    64,
    128,
    256,
    512,
    1024,
    2048,
    4096,
    8192,
    16384,
    32778,
    65536,
    131072,
    262144,
    524288,
    1048576,
)
# Request bodies, 64 B to 1 GiB; responses, as the reference buckets them (1 B to 64 KiB).
REQUEST_SIZE_BUCKETS = tuple(float(2**n) for n in range(6, 31))
RESPONSE_SIZE_BUCKETS = TOKEN_BUCKETS[:15]
# From enqueue to the outcome: flow control's wait, as the reference buckets it.
QUEUE_WAIT_BUCKETS = (
    0.0001,
    0.0005,
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
SCHEDULER_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
TPOT_BUCKETS = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.125,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.8,
    1,
    1.5,
    2,
    3,
    4.5,
    6,
    12,
    18,
    24,
    30,
    36,
    48,
    60,
    90,
    120,
)
# The gaps between a streamed answer's chunks, as the llm-d router buckets them.
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2)
# The picker's own part of a request, as the llm-d router buckets it.
PROCESSING_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.015,
    0.025,
    0.04,
    0.06,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
)

MODEL = ("model_name", "target_model_name")
# The data source the picker polls, by the reference config's plugin type.
METRICS_SOURCE = "metrics-data-source"
# An endpoint as the reference's scheduler_attempts_total names it.
ENDPOINT = ("pod_name", "namespace", "port")
SCHEDULED, NOT_SCHEDULED = "success", "failure"  # scheduler_attempts_total's status
# The kinds of ext_proc message the proxy sends (ProcessingRequest's `request` oneof).
EXTPROC_MESSAGE_KINDS = (
    "request_headers",
    "request_body",
    "request_trailers",
    "response_headers",
    "response_body",
    "response_trailers",
)

# Model names come from clients: while the pods' model lists are unknown (or for requests
# refused with 404) any name reaches the per-model series. Names the pool serves always get
# their own; other names get theirs up to this many, then share OTHER_MODEL.
MAX_UNLISTED_MODELS = 100
# Names the pool serves come from the pods' /v1/models, which a pod fills as it likes and
# LoRA loads change over time: all the names ever given a series, served or not, are
# bounded too; past this, new names share OTHER_MODEL as well.
MAX_MODEL_SERIES = 10_000
OTHER_MODEL = "(other)"
# Fairness ids come from a header (or the users section): the first this many get their own
# series in flow control's families, later ones share OTHER_MODEL's value.
MAX_FAIRNESS_SERIES = 100


class ModelLabels:
    """Maps a model name to its label value. A name's value only ever changes from
    OTHER_MODEL to the name (when the pool comes to serve it), never back."""

    def __init__(
        self, overflow: FastCounter, limit: int = MAX_UNLISTED_MODELS, total: int = MAX_MODEL_SERIES
    ) -> None:
        self.known: Callable[[str], bool] = lambda _name: False  # the pool serves it
        self.limit = limit
        self.total = total
        self._overflow = overflow
        self._named: set[str] = set()
        self._unlisted = 0

    def __call__(self, name: str) -> str:
        if name in self._named:
            return name
        known = len(self._named) < self.total and self.known(name)
        if known or (self._unlisted < self.limit and len(self._named) < self.total):
            if not known:
                self._unlisted += 1
            self._named.add(name)
            return name
        self._overflow.inc()
        return OTHER_MODEL


class BoundedLabel:
    """Maps a client-chosen label value (a fairness id) to itself for the first `limit`
    distinct values, to OTHER_MODEL after that: the series it makes stay bounded."""

    def __init__(self, limit: int = MAX_FAIRNESS_SERIES) -> None:
        self.limit = limit
        self._named: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._named:
            return value
        if len(self._named) < self.limit:
            self._named.add(value)
            return value
        return OTHER_MODEL


class _ModelSeries:
    """A metric family whose first `models` labels are model names, bounded by ModelLabels."""

    def __init__(self, metric: Any, label: ModelLabels, models: int) -> None:
        self._metric, self._label, self._models = metric, label, models
        # Children of label sets whose names have their own series: a name's label never
        # changes back from itself, so these stay right (prometheus_client's labels() costs
        # several µs a call, and a request makes a dozen). As many as the family has series.
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is not None:
            return child
        names = [self._label(v) for v in values[: self._models]]
        child = self._metric.labels(*names, *values[self._models :])
        if OTHER_MODEL not in names:
            self._children[values] = child
        return child


class _RunningGauge:
    """The running-requests gauge by model: a request counted under OTHER_MODEL when it
    started is taken off OTHER_MODEL when it ends, even if its name got its own series
    meanwhile (so neither series drifts)."""

    def __init__(self, gauge: Gauge, label: ModelLabels) -> None:
        self._gauge, self._label = gauge, label
        self._under_other: Tally[str] = Tally()  # in-flight requests counted as OTHER_MODEL
        self._children: dict[str, Any] = {}  # by label value, which ModelLabels bounds

    def labels(self, model: str) -> _RunningChild:
        return _RunningChild(self, model)

    def child(self, label: str) -> Any:
        found = self._children.get(label)
        if found is None:
            found = self._children[label] = self._gauge.labels(label)
        return found


class _RunningChild:
    def __init__(self, parent: _RunningGauge, model: str) -> None:
        self._parent, self._model = parent, model

    def inc(self) -> None:
        p = self._parent
        label = p._label(self._model)
        if label == OTHER_MODEL:
            p._under_other[self._model] += 1
        p.child(label).inc()

    def dec(self) -> None:
        p = self._parent
        if p._under_other[self._model] > 0:
            p._under_other[self._model] -= 1
            if not p._under_other[self._model]:
                del p._under_other[self._model]
            p.child(OTHER_MODEL).dec()
        else:
            p._under_other.pop(self._model, None)
            p.child(p._label(self._model)).dec()


class PickerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = FastCounter(
            "inference_objective_request_total",
            "Counter of inference objective requests, by the objective's priority.",
            (*MODEL, "priority"),
            registry=r,
        )
        self.errors = FastCounter(
            "inference_objective_request_error_total",
            "Counter of inference objective requests errors.",
            (*MODEL, "error_code"),
            registry=r,
        )
        self.duration = FastHistogram(
            "inference_objective_request_duration_seconds",
            "Inference objective response latency distribution in seconds.",
            MODEL,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.input_tokens = FastHistogram(
            "inference_objective_input_tokens",
            "Inference objective input token count distribution.",
            MODEL,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.output_tokens = FastHistogram(
            "inference_objective_output_tokens",
            "Inference objective output token count distribution.",
            MODEL,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.cached_tokens = FastHistogram(
            "inference_objective_prompt_cached_tokens",
            "Inference objective prompt cached token count distribution.",
            MODEL,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "inference_objective_running_requests",
            "Inference objective number of running requests in each model.",
            ("model_name",),
            registry=r,
        )
        self.ntpot = FastHistogram(
            "inference_objective_normalized_time_per_output_token_seconds",
            "Inference objective latency divided by number of output tokens in seconds.",
            MODEL,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.request_sizes = FastHistogram(
            "inference_objective_request_sizes",
            "Inference objective requests size distribution in bytes.",
            MODEL,
            buckets=REQUEST_SIZE_BUCKETS,
            registry=r,
        )
        self.response_sizes = FastHistogram(
            "inference_objective_response_sizes",
            "Inference objective responses size distribution in bytes (the body as the "
            "engine sent it).",
            MODEL,
            buckets=RESPONSE_SIZE_BUCKETS,
            registry=r,
        )
        self.ttft = FastHistogram(
            "inference_objective_request_ttft_seconds",
            "Inference objective time to first token in seconds: from the request's arrival "
            "at the picker to the answer's first body bytes (good answers only).",
            MODEL,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = FastHistogram(
            "inference_objective_request_tpot_seconds",
            "Inference objective time per output token in seconds of streamed answers: "
            "(last chunk - first chunk) / (output tokens - 1) (good answers only).",
            MODEL,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        # llm-d's (no inference_objective_* name): each gap, where TPOT is their mean, so a
        # stream that stalls mid-answer shows.
        self.itl = FastHistogram(
            "llm_d_epp_request_streaming_itl_seconds",
            "Inter-token latency in seconds of streamed answers: the time between consecutive "
            "chunks of the answer's body (good answers only).",
            MODEL,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        # llm-d's: what the picker added before the request went on (parsing, rate limits,
        # flow control's wait, scheduling), the answer to "was it the gateway?".
        self.processing = FastHistogram(
            "llm_d_epp_request_processing_duration_seconds",
            "Request processing latency in seconds, from the request's arrival at the picker "
            "until it was sent on to its endpoint (flow control's wait included).",
            buckets=PROCESSING_BUCKETS,
            registry=r,
        )
        self.queue_wait = FastHistogram(
            "inference_extension_flow_control_request_queue_duration_seconds",
            "Distribution of total time requests spend in the Flow Control layer (from "
            "enqueue to final outcome), by outcome.",
            (*MODEL, "fairness_id", "priority", "outcome", "inference_pool"),
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        # llm-d's count of what left flow control, by outcome: the wait's _count without the
        # model and flow labels, for its dashboards and alerts (few series: outcomes × bands).
        self.flow_requests = FastCounter(
            "llm_d_epp_flow_control_requests_total",
            "Total number of requests processed by the Flow Control layer, by outcome.",
            ("outcome", "priority", "inference_pool"),
            registry=r,
        )
        self.enqueue_duration = FastHistogram(
            "inference_extension_flow_control_request_enqueue_duration_seconds",
            "Distribution of time taken to enqueue requests into the Flow Control layer, by "
            "how it ended (NotYetFinalized: queued).",
            ("fairness_id", "priority", "outcome"),
            buckets=SCHEDULER_BUCKETS,
            registry=r,
        )
        self.dispatch_cycle = FastHistogram(
            "inference_extension_flow_control_dispatch_cycle_duration_seconds",
            "Distribution of time taken for each internal dispatch cycle in the Flow Control "
            "layer (one look over the queue for a request to dispatch).",
            buckets=SCHEDULER_BUCKETS,
            registry=r,
        )
        self.fairness_labels = BoundedLabel()
        # Model names are the client's: bound the series they make (ModelLabels).
        self.model_labels = ModelLabels(
            FastCounter(
                "infergate_epp_model_label_overflow_total",
                f"Per-model observations recorded under model_name={OTHER_MODEL!r}: the "
                f"name is not served by the pool and {MAX_UNLISTED_MODELS} such names "
                f"already have series, or {MAX_MODEL_SERIES} names of any kind do.",
                registry=r,
            )
        )
        labels = self.model_labels
        self.requests = _ModelSeries(self.requests, labels, 2)
        self.errors = _ModelSeries(self.errors, labels, 2)
        self.duration = _ModelSeries(self.duration, labels, 2)
        self.input_tokens = _ModelSeries(self.input_tokens, labels, 2)
        self.output_tokens = _ModelSeries(self.output_tokens, labels, 2)
        self.cached_tokens = _ModelSeries(self.cached_tokens, labels, 2)
        self.ntpot = _ModelSeries(self.ntpot, labels, 2)
        self.request_sizes = _ModelSeries(self.request_sizes, labels, 2)
        self.response_sizes = _ModelSeries(self.response_sizes, labels, 2)
        self.ttft = _ModelSeries(self.ttft, labels, 2)
        self.tpot = _ModelSeries(self.tpot, labels, 2)
        self.itl = _ModelSeries(self.itl, labels, 2)
        self.queue_wait = _ModelSeries(self.queue_wait, labels, 2)
        self.running = _RunningGauge(self.running, labels)
        self.pool_kv = Gauge(
            "inference_pool_average_kv_cache_utilization",
            "The average kv cache utilization for an inference server pool.",
            ("name",),
            registry=r,
        )
        self.pool_queue = Gauge(
            "inference_pool_average_queue_size",
            "The average number of requests pending in the model server queue.",
            ("name",),
            registry=r,
        )
        self.pool_running = Gauge(
            "inference_pool_average_running_requests",
            "The average number of running requests across model servers in the pool.",
            ("name",),
            registry=r,
        )
        # The spread over the pool's ready pods, as the llm-d router exports it (it has no
        # inference_pool_* name): a pool whose averages look fine can hide one hot pod.
        self.pool_spread = {
            what: Gauge(
                f"llm_d_epp_std_dev_{what}",
                f"The standard deviation of {meaning} across the pool's ready pods.",
                ("name",),
                registry=r,
            )
            for what, meaning in (
                ("kv_cache_utilization", "the KV-cache utilization"),
                ("queue_size", "the number of requests pending in the model server queue"),
                ("running_requests", "the number of running requests"),
            )
        }
        self.pool_ready = Gauge(
            "inference_pool_ready_pods",
            "The number of ready pods in the inference server pool.",
            ("name",),
            registry=r,
        )
        self.scheduler_e2e = FastHistogram(
            "inference_extension_scheduler_e2e_duration_seconds",
            "End-to-end scheduling latency distribution in seconds.",
            buckets=SCHEDULER_BUCKETS,
            registry=r,
        )
        self.rewrites = _ModelSeries(
            FastCounter(
                "inference_extension_model_rewrite_decisions_total",
                "Total number of model rewrite decisions: requests a ModelRoute sent on under "
                "a model name (model_rewrite_name: the route).",
                ("model_name", "target_model", "model_rewrite_name"),
                registry=r,
            ),
            self.model_labels,
            2,
        )
        self.scheduler_attempts = FastCounter(
            "inference_extension_scheduler_attempts_total",
            "Total number of scheduling attempts, by status (success: the primary endpoint "
            "chosen; failure: none left).",
            ("status", "target_model_name", *ENDPOINT),
            registry=r,
        )
        self._attempt_children: dict[tuple[str, str], Any] = {}  # (target model, address)
        self._attempt_series: dict[str, set[tuple[str, ...]]] = {}  # address → its label sets
        self._plugin_children: dict[tuple[str, str, str], Any] = {}
        self.plugin_duration = FastHistogram(
            "inference_extension_plugin_duration_seconds",
            "Plugin processing latency distribution in seconds "
            "for each extension point, plugin type and plugin "
            "name.",
            ("extension_point", "plugin_type", "plugin_name"),
            buckets=SCHEDULER_BUCKETS,
            registry=r,
        )
        self.prefix_hit_ratio = FastHistogram(
            "inference_extension_prefix_indexer_hit_ratio",
            "Ratio of prefix length matched to total prefix length in the cache lookup.",
            buckets=(0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=r,
        )
        self.prefix_hit_bytes = FastHistogram(
            "inference_extension_prefix_indexer_hit_bytes",
            "Length of the prefix match in number of bytes in the cache lookup.",
            buckets=(0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
            registry=r,
        )
        # The approximate prefix scorers' indexes, read at scrape time (their entry counts).
        self.prefix_indexes: list[Callable[[], int]] = []
        prefix_size = Gauge(
            "inference_extension_prefix_indexer_size",
            "Size of the prefix indexer: (block, pod) entries the approximate prefix scorers hold.",
            registry=r,
        )
        prefix_size.set_function(lambda: sum(size() for size in self.prefix_indexes))
        # Prefill/decode disaggregation (pd-profile-handler, given them by its handle).
        self.pd_decisions = FastCounter(
            "infergate_epp_pd_decisions_total",
            "Prefill/decode decisions by outcome: disaggregated, decode_only (the decode pod "
            "holds enough of the prompt, or P/D is off) and no_prefill_pod (none in the "
            "decode pod's group: served aggregated).",
            ("outcome",),
            registry=r,
        )
        self.pd_picks = FastCounter(
            "infergate_epp_pd_endpoint_picks_total",
            "Endpoints chosen by prefill/decode scheduling, by role (decode, prefill): the "
            "primary of each.",
            ("role", "endpoint"),
            registry=r,
        )
        self.pd_uncached_tokens = FastHistogram(
            "infergate_epp_pd_uncached_prompt_tokens",
            "Prompt tokens the chosen decode pod did not hold, as prefill/decode scheduling "
            "measured them against nonCachedTokens.",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.scrapes = FastCounter(
            "infergate_epp_metrics_scrapes_total",
            "Model-server /metrics pages this picker asked for (with several replicas sharing "
            "scrapes, about 1/N of the fleet's).",
            registry=r,
        )
        self.scrape_errors = FastCounter(
            "infergate_epp_metrics_scrape_errors_total",
            "Model-server /metrics scrapes that failed.",
            ("endpoint", "reason"),
            registry=r,
        )
        # llm-d's count of failed polls by data source type: the same failures, without the
        # endpoint, so it never drops a series when a pod leaves (the picker polls one source:
        # the model servers' /metrics, the reference config's metrics-data-source).
        self.poll_errors = FastCounter(
            "llm_d_epp_datalayer_poll_errors_total",
            "Data-source poll errors per source type (metrics-data-source: model-server "
            "/metrics scrapes that failed).",
            ("source_type",),
            registry=r,
        ).labels(METRICS_SOURCE)
        self.pool_file_errors = FastCounter(
            "infergate_epp_pool_file_errors_total",
            "Pool file reloads refused (the previous pool stays), by reason: invalid, "
            "unreadable, internal.",
            ("reason",),
            registry=r,
        )
        self.kubernetes_skipped = FastCounter(
            "infergate_epp_kubernetes_objects_skipped_total",
            "Objects from the Kubernetes API the picker left out as malformed (the previous "
            "state stays), by kind.",
            ("kind",),
            registry=r,
        )
        self.bad_requests = FastCounter(
            "infergate_epp_protocol_errors_total",
            "ext_proc streams the picker could not make sense of.",
            ("reason",),
            registry=r,
        )
        # Counted for every message on the hot path: plain ints, by the event loop alone.
        self.extproc_messages = LoopTally(
            "infergate_epp_extproc_messages_total",
            "ext_proc messages received from the proxy, by kind.",
            "kind",
            EXTPROC_MESSAGE_KINDS,
            registry=r,
        )
        info = Info("inference_extension", "General information of the current build.", registry=r)
        # The reference's labels (commit, build_ref) and our version (api/version.py).
        info.info(
            {"commit": version.commit(), "build_ref": "infergate", "version": version.version()}
        )
        r.register(LlmdAliases(r))  # every family above and registered later, under llm-d's names

    def count_attempt(
        self, target_model: str, endpoint: str = "", pod: str = "", namespace: str = ""
    ) -> None:
        """A scheduling attempt: chose `endpoint` (ip:port) of `pod`, or, with none, failed."""
        key = (target_model, endpoint)
        child = self._attempt_children.get(key)
        if child is None:
            model = self.model_labels(target_model)
            port = endpoint.rpartition(":")[2]
            status = SCHEDULED if endpoint else NOT_SCHEDULED
            labels = (status, model, pod, namespace, port)
            child = self.scheduler_attempts.labels(*labels)
            if endpoint:
                self._attempt_series.setdefault(endpoint, set()).add(labels)
            if model != OTHER_MODEL:  # kept only while its label cannot change
                self._attempt_children[key] = child
        child.inc()

    def forget_endpoint(self, address: str) -> None:
        """Drop the series labelled with an endpoint that left the pool: pods come and go,
        and their series would otherwise pile up for the life of the picker."""
        self._forget_attempts(address)
        for metric in (self.pd_picks, self.scrape_errors):
            names = metric._labelnames
            seen = set()
            for family in metric.collect():
                for sample in family.samples:
                    if sample.labels.get("endpoint") == address:
                        seen.add(tuple(sample.labels[n] for n in names))
            for labels in seen:
                metric.remove(*labels)

    def observe_plugin(self, point: str, plugin_type: str, name: str, seconds: float) -> None:
        # The config's plugins make a fixed set of label sets: their children are kept.
        key = (point, plugin_type, name)
        child = self._plugin_children.get(key)
        if child is None:
            child = self._plugin_children[key] = self.plugin_duration.labels(*key)
        child.observe(seconds)

    def _forget_attempts(self, address: str) -> None:
        for key in [k for k in self._attempt_children if k[1] == address]:
            del self._attempt_children[key]
        gone = self._attempt_series.pop(address, set())
        # A pod made again under its name at another IP keeps its series.
        for labels in gone.difference(*self._attempt_series.values()):
            self.scheduler_attempts.remove(*labels)
