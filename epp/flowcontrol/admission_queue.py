"""Admission control: admit at once while the pool has room, otherwise hold requests in order.

Order under saturation: strict priority bands (higher first); within a band, the flow with the
smallest virtual token counter; within a flow, first come first served. Dispatch resumes when
the caller says capacity may have freed (`notify()`) and on a periodic re-check.

Policies, made explicit:
- Sheddable requests (priority < 0) never wait: admitted only when the pool has room and
  nothing is queued, otherwise rejected with 429.
- A full queue (requests or bytes, overall or in the item's band) rejects the newcomer with
  429 and a Retry-After hint; queued requests are never displaced.
- A request that waits past its TTL is rejected with 503.
- A client that leaves (its `admit` task is cancelled) leaves the queue at once; if it was
  dispatched but never resumed, its input-token charge is refunded.
- The head of the highest band is held while its candidates are saturated; lower bands and
  other flows do not overtake it (as GIE does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from infergw.epp.flowcontrol.admission import QUEUED, Admission, FlowControlStats, Outcome
from infergw.epp.flowcontrol.config import FlowControlConfig
from infergw.epp.flowcontrol.queue import Band, FlowItem
from infergw.epp.flowcontrol.vtc import VirtualTokenCounter

log = logging.getLogger("epp.flowcontrol")


Saturated = Callable[[FlowItem], bool]


class AdmissionController:
    def __init__(
        self,
        config: FlowControlConfig,
        saturated: Saturated,
        *,
        clock: Callable[[], float] = time.monotonic,
        observe_wait: Callable[[FlowItem, float], None] | None = None,
        observe_enqueue: Callable[[FlowItem, str, float], None] | None = None,
        observe_cycle: Callable[[float], None] | None = None,
    ) -> None:
        """`saturated(item)` says whether the endpoints `item` may use have no room; it must be
        cheap (it runs per request and per dispatch). `clock` is FlowItem.enqueued_at's.
        Observers (metrics): `observe_enqueue(item, outcome, seconds)` once an item is answered
        at once or queued (outcome QUEUED), `observe_cycle(seconds)` for each look over the
        queue for an item to dispatch."""
        self.config = config
        self.saturated = saturated
        self.clock = clock
        self.observe_wait = observe_wait
        self.observe_enqueue = observe_enqueue
        self.observe_cycle = observe_cycle
        self.stats = FlowControlStats()
        self._bands: dict[int, Band] = {}
        self._order: list[Band] = []  # highest priority first
        self._requests = 0
        self._bytes = 0
        self._wake = asyncio.Event()
        self._dispatching = asyncio.Lock()
        self._pump: asyncio.Task[None] | None = None
        self._closed = False
        self._dispatch_times: deque[float] = deque(maxlen=64)
        self._last_gc = clock()

    # ---- the picker's API --------------------------------------------------------------------

    async def admit(self, item: FlowItem) -> Admission:
        """Wait until `item` may be scheduled, or learn why not. Cancel the awaiting task to
        withdraw it (the client went away)."""
        started = time.perf_counter()
        admission = self._decide_now(item)
        if admission is not None:
            self._enqueued(item, admission.outcome.value, started)
            return admission
        return await self._wait(self._band(item.priority), item, started)

    def _decide_now(self, item: FlowItem) -> Admission | None:
        """Admission's answer without waiting, or None when `item` must queue."""
        if self._closed:
            return self._reject(item, Outcome.REJECTED_SHUTDOWN, "flow control is shutting down")
        self._maybe_gc()
        band = self._band(item.priority)
        if item.sheddable:
            if self._requests or self.saturated(item):
                return self._reject(
                    item,
                    Outcome.REJECTED_SHEDDABLE,
                    "the pool is saturated or requests are queued, and the request is sheddable",
                    self.config.retry_after_min,
                )
            return self._dispatch_now(band, item)
        if not self._requests and not self.saturated(item):
            return self._dispatch_now(band, item)
        why = self._over_limit(band, item)
        if why is not None:
            return self._reject(
                item, Outcome.REJECTED_CAPACITY, why, self._retry_after(item.priority)
            )
        return None

    def _enqueued(self, item: FlowItem, outcome: str, started: float) -> None:
        """Tell the observer how long admitting took before an answer or a place in the
        queue (QUEUED), and which."""
        if self.observe_enqueue is not None:
            self.observe_enqueue(item, outcome, time.perf_counter() - started)

    def notify(self) -> None:
        """Capacity may have freed (a request finished, metrics refreshed): try to dispatch."""
        if self._requests:
            self._wake.set()
            self._ensure_pump()

    def charge_output(self, item: FlowItem, tokens: int) -> None:
        """Charge output tokens served to an admitted request's flow (call with each usage
        report; the counts add up). What the dispatch estimate already covered is not
        charged twice."""
        if tokens <= 0:
            return
        item.output_reported += tokens
        extra = item.output_reported - item.output_charged
        if extra > 0:
            self._band(item.priority).vtc.charge_output(item.flow_id, extra)
            item.output_charged += extra

    def settle(self, item: FlowItem) -> None:
        """The request ended: give back what the estimate charged beyond what it produced."""
        unused = item.output_charged - item.output_reported
        if unused > 0:
            self._band(item.priority).vtc.charge_output(item.flow_id, -unused)
            item.output_charged = item.output_reported

    def undo(self, item: FlowItem) -> None:
        """A dispatched request was not served after all (scheduling found no endpoint): give
        its flow back what its dispatch charged."""
        band = self._band(item.priority)
        band.vtc.refund_input(item.flow_id, item.input_tokens)
        self.settle(item)
        self.notify()

    def _charge_dispatch(self, band: Band, item: FlowItem) -> None:
        band.vtc.charge_input(item.flow_id, item.input_tokens)
        if item.expected_output > 0:
            band.vtc.charge_output(item.flow_id, item.expected_output)
            item.output_charged = item.expected_output

    async def dispatch_ready(self) -> int:
        """Dispatch queued items while their candidates have room; how many went.

        Items are tried in queue order (priority, then the flows' counters; a flow's head
        only): the first whose candidates have room goes. One whose candidates are saturated
        does not hold back another whose candidates are not — requests for different models
        or servers share one queue, not one pool."""
        dispatched = 0
        async with self._dispatching:  # one loop at a time, or two could fill one free slot
            while True:
                started = time.perf_counter()
                item = self._first_with_room()
                if item is not None:
                    self._dispatch_queued(item)
                if self.observe_cycle is not None:  # one look over the queue: its cost
                    self.observe_cycle(time.perf_counter() - started)
                if item is None:
                    return dispatched
                dispatched += 1
                # Let the resumed request claim its endpoint before the next saturation check.
                await asyncio.sleep(0)

    def _first_with_room(self) -> FlowItem | None:
        for item in self._heads():
            try:
                if not self.saturated(item):
                    return item
            except Exception:  # a broken check must not kill the dispatcher: skip, retry
                log.exception("saturation check failed for %s; it waits", item.request_id)
        return None

    async def close(self) -> None:
        """Stop the dispatcher and answer every waiting request with 503."""
        self._closed = True
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        for band in self._order:
            for item in band.items():
                self._remove(item)
                self._resolve(
                    item, Outcome.REJECTED_SHUTDOWN, "flow control is shutting down", None
                )

    # ---- observability -----------------------------------------------------------------------

    @property
    def queued_requests(self) -> int:
        return self._requests

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def snapshot(self) -> dict[str, Any]:
        """Queue lengths per band and flow, VTC counters and totals, for metrics and debug."""
        s = self.stats
        return {
            "queued_requests": self._requests,
            "queued_bytes": self._bytes,
            "bands": {
                b.priority: {
                    "requests": b.requests,
                    "bytes": b.bytes,
                    "flows": b.lengths(),
                    "counters": b.vtc.counters(),
                }
                for b in self._order
            },
            "dispatched": s.dispatched,
            "dispatched_after_wait": s.dispatched_after_wait,
            "rejected": dict(s.rejected),
            "cancelled_queued": s.cancelled_queued,
            "cancelled_dispatched": s.cancelled_dispatched,
            "wait_seconds_sum": s.wait_seconds_sum,
            "wait_seconds_max": s.wait_seconds_max,
        }

    def queued_items(self) -> Iterator[FlowItem]:
        """Every waiting item, highest band first (for gauges: a snapshot's worth of work)."""
        for band in self._order:
            yield from band.items()

    def band_vtc(self, priority: int) -> VirtualTokenCounter:
        return self._band(priority).vtc

    # ---- internals ---------------------------------------------------------------------------

    def _band(self, priority: int) -> Band:
        band = self._bands.get(priority)
        if band is None:
            f = self.config.fairness
            vtc = VirtualTokenCounter(
                f.input_token_weight, f.output_token_weight, f.flow_weights, self.clock
            )
            band = self._bands[priority] = Band(self.config.band(priority), vtc)
            self._order.append(band)
            self._order.sort(key=lambda b: -b.priority)
        return band

    def _over_limit(self, band: Band, item: FlowItem) -> str | None:
        c = self.config
        if c.max_requests and self._requests + 1 > c.max_requests:
            return f"the queue holds its limit of {c.max_requests} requests"
        if c.max_bytes and self._bytes + item.size_bytes > c.max_bytes:
            return (
                f"the queue cannot take {item.size_bytes} more bytes "
                f"({self._bytes} of {c.max_bytes} queued)"
            )
        return band.over_limit(item)

    def _dispatch_now(self, band: Band, item: FlowItem) -> Admission:
        # The paper's arrival followed by an immediate dispatch: lift, then charge.
        band.vtc.activate(item.flow_id)
        band.vtc.deactivate(item.flow_id)
        self._charge_dispatch(band, item)
        self.stats.dispatched += 1
        self._dispatch_times.append(self.clock())
        return Admission(Outcome.DISPATCHED, item)

    async def _wait(self, band: Band, item: FlowItem, started: float) -> Admission:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Admission] = loop.create_future()
        item.future = fut
        band.push(item)
        self._requests += 1
        self._bytes += item.size_bytes
        ttl = self.config.default_request_ttl if item.ttl is None else item.ttl
        if ttl > 0:
            delay = max(0.0, item.enqueued_at + ttl - self.clock())
            item.timer = loop.call_later(delay, self._expire, item)
        self._enqueued(item, QUEUED, started)
        self.notify()
        try:
            return await fut
        except asyncio.CancelledError:
            self._withdraw(item, fut)
            raise

    def _withdraw(self, item: FlowItem, fut: asyncio.Future[Admission]) -> None:
        """The awaiting task was cancelled: take the item back, whatever state it reached."""
        if fut.done() and not fut.cancelled():
            admission = fut.result()
            if admission.admitted:  # dispatched, but the request will never run
                self._band(item.priority).vtc.refund_input(item.flow_id, item.input_tokens)
                self.settle(item)
                self.stats.cancelled_dispatched += 1
                self.notify()
            return
        fut.cancel()
        self._remove(item)  # may already be gone: the dispatcher drops withdrawn items it meets
        self.stats.cancelled_queued += 1

    def _heads(self) -> Iterator[FlowItem]:
        """Each backlogged flow's first item, in dispatch order: bands by priority, flows by
        their counters. Items whose client already left are dropped on the way."""
        for band in self._order:
            for flow in band.vtc.in_order():
                queue = band.flows.get(flow)
                while queue:
                    item = queue[0]
                    if item.future is not None and item.future.done():
                        self._remove(item)  # withdrawn, its task not yet resumed
                        continue
                    yield item
                    break

    def _dispatch_queued(self, item: FlowItem) -> None:
        self._remove(item)
        self._charge_dispatch(self._band(item.priority), item)
        now = self.clock()
        waited = max(0.0, now - item.enqueued_at)
        s = self.stats
        s.dispatched += 1
        s.dispatched_after_wait += 1
        s.wait_seconds_sum += waited
        s.wait_seconds_max = max(s.wait_seconds_max, waited)
        self._dispatch_times.append(now)
        if item.future is not None and not item.future.done():
            item.future.set_result(Admission(Outcome.DISPATCHED, item, waited=waited))
        if self.observe_wait is not None:
            self.observe_wait(item, waited)

    def _expire(self, item: FlowItem) -> None:
        item.timer = None
        if self._remove(item):
            ttl = self.config.default_request_ttl if item.ttl is None else item.ttl
            self._resolve(
                item,
                Outcome.EVICTED_TTL,
                f"request waited in the queue past its TTL of {ttl:g}s",
                None,
            )

    def _remove(self, item: FlowItem) -> bool:
        band = self._bands.get(item.priority)
        if band is None or not band.remove(item):
            return False
        self._requests -= 1
        self._bytes -= item.size_bytes
        if item.timer is not None:
            item.timer.cancel()
            item.timer = None
        return True

    def _resolve(
        self, item: FlowItem, outcome: Outcome, message: str, retry_after: int | None
    ) -> None:
        """Answer a queued item with a rejection."""
        waited = max(0.0, self.clock() - item.enqueued_at)
        admission = self._reject(item, outcome, message, retry_after, waited)
        if item.future is not None and not item.future.done():
            item.future.set_result(admission)

    def _reject(
        self,
        item: FlowItem,
        outcome: Outcome,
        message: str,
        retry_after: int | None = None,
        waited: float = 0.0,
    ) -> Admission:
        self.stats.rejected[outcome.value] = self.stats.rejected.get(outcome.value, 0) + 1
        return Admission(outcome, item, message, retry_after, waited)

    def _retry_after(self, priority: int) -> int:
        """Seconds until the requests ahead (same or higher priority) should have drained, at
        the recent dispatch rate; the configured minimum when there is no rate yet."""
        c = self.config
        times = self._dispatch_times
        now = self.clock()
        if len(times) < 2 or now <= times[0]:
            return c.retry_after_min
        # Measured up to now, so a pool that stopped dispatching reads as slow, not as fast.
        rate = len(times) / (now - times[0])
        ahead = sum(b.requests for b in self._order if b.priority >= priority)
        return min(c.retry_after_max, max(c.retry_after_min, math.ceil(ahead / rate)))

    def _ensure_pump(self) -> None:
        if self._closed:
            return
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(
                self._run(), name="flowcontrol-dispatch"
            )

    async def _run(self) -> None:
        """Dispatch on every notify and, while anything waits, every recheck interval."""
        interval = self.config.recheck_interval
        while True:
            if self._requests:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._wake.wait()
            else:
                await self._wake.wait()
            self._wake.clear()
            await self.dispatch_ready()

    def _maybe_gc(self) -> None:
        now = self.clock()
        timeout = self.config.flow_gc_timeout
        if now - self._last_gc < timeout:
            return
        self._last_gc = now
        for band in self._order:
            band.vtc.forget_idle(timeout, now)
