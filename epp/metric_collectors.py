"""The picker's families read at scrape time, never on the request path: each pod's queue and
KV-cache use (from the datastore), flow control's queue by flow and the pool's saturation
(from the admission queue). And what flow control reports as it works (FlowControlMetrics):
each request's wait and outcome, once, when it leaves the queue; how long admitting it took;
each dispatch cycle."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from infergw.epp.context import RequestContext
from infergw.epp.datastore import Datastore
from infergw.epp.flowcontrol import (
    CANCELLED,
    QUEUED,
    AdmissionController,
    FlowItem,
    Outcome,
    SaturationDetector,
)
from infergw.epp.metrics import MODEL, PickerMetrics

PER_POD_QUEUE = "inference_pool_per_pod_queue_size"
PER_POD_KV = "infergate_epp_pod_kv_cache_utilization"
QUEUE_SIZE = "inference_extension_flow_control_queue_size"
QUEUE_BYTES = "inference_extension_flow_control_queue_bytes"
POOL_SATURATION = "inference_extension_flow_control_pool_saturation"
FLOW = (*MODEL, "fairness_id", "priority", "inference_pool")


class PoolEndpointsCollector:
    """Each endpoint's waiting queue and KV-cache use as last scraped, labelled by the pool
    and the endpoint's name; the series follow the pool's endpoints by construction."""

    def __init__(self, datastore: Datastore) -> None:
        self.datastore = datastore

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["name", "model_server_pod"]
        queue = GaugeMetricFamily(
            PER_POD_QUEUE,
            "The total number of requests pending in the model server queue for each "
            "underlying pod.",
            labels=labels,
        )
        kv = GaugeMetricFamily(
            PER_POD_KV,
            "Each model server's KV-cache utilization (0 to 1) as the picker last scraped it.",
            labels=labels,
        )
        pool = self.datastore.pool
        if pool is not None:
            for ep in self.datastore.endpoints():
                queue.add_metric([pool.name, ep.name], ep.metrics.waiting)
                kv.add_metric([pool.name, ep.name], ep.metrics.kv_usage)
        yield queue
        yield kv


class FlowQueueCollector:
    """Flow control's queue by model, flow and priority (requests and bytes), and the pool's
    saturation as the detector sees it (mean endpoint utilization; 1.0 = at the limits)."""

    def __init__(
        self,
        queue: AdmissionController,
        detector: SaturationDetector,
        datastore: Datastore,
        metrics: PickerMetrics,
        pool: str,
    ) -> None:
        self.queue, self.detector, self.datastore = queue, detector, datastore
        self.metrics, self.pool = metrics, pool

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only

    def collect(self) -> Iterator[GaugeMetricFamily]:
        requests: dict[tuple[str, ...], int] = {}
        size: dict[tuple[str, ...], int] = {}
        for item in self.queue.queued_items():
            key = flow_labels(self.metrics, item.payload.ctx, self.pool)
            requests[key] = requests.get(key, 0) + 1
            size[key] = size.get(key, 0) + item.size_bytes
        count = GaugeMetricFamily(
            QUEUE_SIZE,
            "Current number of requests actively held in the Flow Control queue.",
            labels=FLOW,
        )
        held = GaugeMetricFamily(
            QUEUE_BYTES,
            "Current total size in bytes of requests actively held in the Flow Control queue.",
            labels=FLOW,
        )
        for key, n in requests.items():
            count.add_metric(key, n)
            held.add_metric(key, size[key])
        yield count
        yield held
        saturation = GaugeMetricFamily(
            POOL_SATURATION,
            "Current saturation level of the inference pool (0.0 = empty, 1.0 = fully "
            "saturated): its endpoints' mean utilization of the saturation thresholds.",
            labels=["inference_pool"],
        )
        endpoints = self.datastore.endpoints()
        saturation.add_metric([self.pool], self.detector.pool_utilization(endpoints))
        yield saturation


def flow_labels(metrics: PickerMetrics, ctx: RequestContext, pool: str) -> tuple[str, ...]:
    """A request's flow-control label values, in FLOW's order, the client-chosen ones bounded."""
    models = metrics.model_labels
    return (
        models(ctx.request.model),
        models(ctx.target_model),
        metrics.fairness_labels(ctx.fairness_id),
        str(ctx.priority),
        pool,
    )


# Flow control's outcomes under the reference's names, which its dashboard selects on.
OUTCOME_LABELS = {
    Outcome.DISPATCHED.value: "Dispatched",
    Outcome.REJECTED_CAPACITY.value: "RejectedCapacity",
    Outcome.REJECTED_SHEDDABLE.value: "RejectedCapacity",  # no room, and it may not wait
    Outcome.EVICTED_TTL.value: "EvictedTTL",
    Outcome.REJECTED_SHUTDOWN.value: "RejectedOther",
    CANCELLED: "EvictedContextCancelled",
    QUEUED: "NotYetFinalized",
}


class FlowControlMetrics:
    """What flow control reports, recorded: each request's time in it and how it left, how
    long admitting it took, and each dispatch cycle (the gatekeeper passes these on)."""

    def __init__(self, metrics: PickerMetrics, pool: str) -> None:
        self.metrics, self.pool = metrics, pool
        self._cycle = metrics.dispatch_cycle

    def waited(self, ctx: RequestContext, outcome: str, seconds: float) -> None:
        """From enqueue to its outcome (an Outcome value, or flowcontrol.CANCELLED)."""
        m = self.metrics
        label, priority = OUTCOME_LABELS.get(outcome, outcome), str(ctx.priority)
        # The model names go as they are: the family bounds them itself (metrics._ModelSeries).
        m.queue_wait.labels(
            ctx.request.model,
            ctx.target_model,
            m.fairness_labels(ctx.fairness_id),
            priority,
            label,
            self.pool,
        ).observe(seconds)
        m.flow_requests.labels(label, priority, self.pool).inc()

    def enqueued(self, item: FlowItem, outcome: str, seconds: float) -> None:
        fairness = self.metrics.fairness_labels(item.flow_id)
        label = OUTCOME_LABELS.get(outcome, outcome)
        self.metrics.enqueue_duration.labels(fairness, str(item.priority), label).observe(seconds)

    def dispatch_cycle(self, seconds: float) -> None:
        self._cycle.observe(seconds)
