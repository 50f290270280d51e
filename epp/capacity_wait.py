"""Holding requests that have no ready endpoint at all — a Model scaled to zero, or whose
pods are all starting — until one is ready, as Knative's activator does.

A held request waits in an AdmissionController of its own (flow control's queue: priority
bands, fair share across flows, request and byte limits, a TTL), whose "saturated" check
is "still no ready endpoint for this request". It leaves when a pod becomes ready (in
priority order, as flow control dispatches), when its TTL passes (503 with Retry-After),
or when its client leaves (counted). How many wait is the pool's demand
(`infergate_epp_pool_waiting_for_capacity`), which the autoscaler sums over every picker
replica to scale the pool up from zero (controllers/picker_demand.py).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from infergw.api.names import PICKER_DEMAND_METRIC
from infergw.epp.context import RequestContext
from infergw.epp.errors import NoCapacity, PickerError
from infergw.epp.flowcontrol import AdmissionController, FlowControlConfig, FlowItem, Outcome

log = logging.getLogger("epp.capacity_wait")

# How long a request may wait for its first ready endpoint: flow control's default TTL
# (llm-d-router's 60 s), long enough for a simulator or a cached small model to start.
DEFAULT_CAPACITY_WAIT_TTL = FlowControlConfig().default_request_ttl
OUTCOMES_METRIC = "infergate_epp_capacity_wait"  # a counter: the family gets _total

HasCapacity = Callable[[RequestContext], bool]


class CapacityWait:
    def __init__(
        self,
        ttl: float = DEFAULT_CAPACITY_WAIT_TTL,
        flow_control: FlowControlConfig | None = None,
        pool: Callable[[], str] = lambda: "",
    ) -> None:
        """`ttl` 0: no hold, a request without an endpoint is answered 503 at once. The
        queue's limits, bands and fairness are flow control's when it is configured."""
        self.ttl = ttl
        config = flow_control or FlowControlConfig()
        self.config = dataclasses.replace(config, default_request_ttl=ttl)
        self.pool = pool
        self.queue = AdmissionController(self.config, self._still_cold)

    async def hold(
        self, ctx: RequestContext, item: FlowItem, has_capacity: HasCapacity, cold: NoCapacity
    ) -> float:
        """Wait until `has_capacity(ctx)`; the seconds waited. Raises PickerError 503 with
        Retry-After past the TTL or over the queue's limits (429); CancelledError when the
        client leaves (the queue counts it)."""
        if self.ttl <= 0:
            raise cold
        item.payload = (ctx, has_capacity)
        admission = await self.queue.admit(item)
        if admission.admitted:
            return admission.waited
        retry = admission.retry_after or self.config.retry_after_min
        status = admission.status or 503
        if status == 503:
            message = f"{cold.message}; none became ready within {self.ttl:g}s"
        else:
            message = admission.message
        raise PickerError(status, message, headers={"retry-after": str(int(retry))})

    def notify(self) -> None:
        """The pool may have changed: try the held requests again."""
        self.queue.notify()

    async def close(self) -> None:
        await self.queue.close()

    @staticmethod
    def _still_cold(item: FlowItem) -> bool:
        ctx, has_capacity = item.payload
        try:
            return not has_capacity(ctx)
        except PickerError:
            return False  # another answer than "wait": the director gives it

    def waiting_by_model(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for ctx in self._held():
            out[ctx.request.model] = out.get(ctx.request.model, 0) + 1
        return out

    def _held(self) -> Iterator[RequestContext]:
        for item in self.queue.queued_items():
            yield item.payload[0]


class CapacityWaitCollector:
    """The demand gauge (per pool and model) and the held requests' outcomes, read from the
    queue at scrape time, so they can never drift from it."""

    def __init__(self, wait: CapacityWait, model_label: Callable[[str], str]) -> None:
        self.wait = wait
        self.model_label = model_label  # bounds the client-chosen names (metrics.ModelLabels)

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only

    def collect(self) -> Iterator[Any]:
        pool = self.wait.pool()
        gauge = GaugeMetricFamily(
            PICKER_DEMAND_METRIC,
            "Requests the picker holds because no endpoint of the pool can take them (scaled "
            "to zero, or every pod starting): the autoscaler's demand signal",
            labels=["name", "model_name"],
        )
        by_label: dict[str, int] = {}
        for model, n in self.wait.waiting_by_model().items():
            label = self.model_label(model)
            by_label[label] = by_label.get(label, 0) + n
        for label, n in by_label.items():
            gauge.add_metric([pool, label], n)
        yield gauge
        s = self.wait.queue.stats
        outcomes = CounterMetricFamily(
            OUTCOMES_METRIC,
            "Requests held for capacity, by how the wait ended",
            labels=["outcome"],
        )
        expired = s.rejected.get(Outcome.EVICTED_TTL.value, 0)
        outcomes.add_metric(["served"], s.dispatched)
        outcomes.add_metric(["expired"], expired)
        outcomes.add_metric(["cancelled"], s.cancelled_queued)
        outcomes.add_metric(["rejected"], sum(s.rejected.values()) - expired)  # limits, shutdown
        yield outcomes
