"""What a routed request passes before scheduling: its route's token rate limit, then flow
control (priority bands, fair queueing across flows, queue limits and TTL) while the
endpoints it may use are saturated. And, when its answer ends, what it is charged.

Input tokens are counted with the model's tokenizer when the picker has one (--tokenizer),
else estimated from the prompt's length (about 4 characters a token); output tokens come from
the response's usage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from infergw.api import tracing
from infergw.epp.capacity_wait import DEFAULT_CAPACITY_WAIT_TTL, CapacityWait, HasCapacity
from infergw.epp.context import RequestContext
from infergw.epp.datastore import Endpoint
from infergw.epp.errors import NoCapacity, PickerError
from infergw.epp.flowcontrol import (
    CANCELLED,
    AdmissionController,
    FlowControlConfig,
    FlowItem,
    SaturationDetector,
)
from infergw.epp.ratelimit import Limiter, RateLimitMetrics, RedisClients, build_limiter
from infergw.epp.routing.table import Resolution
from infergw.epp.tokenizing import PromptTokenizing

log = logging.getLogger("epp.gatekeeper")
MAX_FLOWS_REMEMBERED = 10_000  # answer-length averages kept, least recently used dropped


class Destinations(Protocol):
    """Where a request could go now (epp.eligibility.Eligibility): asked again each time
    flow control checks for room, since the pool changes while a request waits."""

    def destinations(self, ctx: RequestContext) -> list[Endpoint]: ...


class FlowObserver(Protocol):
    """Who hears what flow control does (its metrics)."""

    def waited(self, ctx: RequestContext, outcome: str, seconds: float) -> None: ...

    def enqueued(self, item: FlowItem, outcome: str, seconds: float) -> None: ...

    def dispatch_cycle(self, seconds: float) -> None: ...


@dataclass(slots=True)
class Ticket:
    """What the gate remembers of an admitted request, to charge it when it ends."""

    item: FlowItem | None = None
    limiter: Limiter | None = None
    route: str = ""
    user: str | None = None


@dataclass(frozen=True, slots=True)
class _Waiting:
    """A queued request as the saturation check sees it (FlowItem.payload)."""

    ctx: RequestContext
    where: Destinations


@dataclass
class Gatekeeper:
    metrics_registry: Any
    flow_control: FlowControlConfig | None = None  # None: requests never wait
    # How prompts are tokenized for counting (epp.tokenizing); None: estimated from length.
    prompts: PromptTokenizing | None = None
    # How long a request with no ready endpoint waits for one (scale from zero); 0: 503 at once.
    capacity_wait_ttl: float = DEFAULT_CAPACITY_WAIT_TTL
    # Told what flow control does (its metrics: epp.metric_collectors.FlowControlMetrics).
    flow_observer: FlowObserver | None = None
    _limiters: dict[str, tuple[str, Limiter]] = field(default_factory=dict)
    _output_avg: dict[str, float] = field(default_factory=dict)  # flow → recent answer length
    _tasks: set[asyncio.Task] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rate_metrics = RateLimitMetrics(self.metrics_registry)
        self.redis = RedisClients()
        self.detector = SaturationDetector(
            self.flow_control.saturation if self.flow_control is not None else None
        )
        self.queue = None
        if self.flow_control is not None:
            seen = self.flow_observer
            self.queue = AdmissionController(
                self.flow_control,
                self._saturated,
                observe_enqueue=seen.enqueued if seen is not None else None,
                observe_cycle=seen.dispatch_cycle if seen is not None else None,
            )
        self.capacity = CapacityWait(self.capacity_wait_ttl, self.flow_control)

    # ---- before routing ------------------------------------------------------------------

    async def hold_for_capacity(
        self, ctx: RequestContext, has_capacity: HasCapacity, cold: NoCapacity
    ) -> float:
        """Hold a request no ready endpoint can take until one can (epp.capacity_wait); the
        seconds it waited. Raises PickerError past the TTL, CancelledError if the client
        leaves."""
        item = FlowItem(
            flow_id=ctx.fairness_id,
            priority=ctx.priority,
            size_bytes=ctx.request.held_bytes,
            request_id=ctx.request_id,
        )
        return await self.capacity.hold(ctx, item, has_capacity, cold)

    # ---- before scheduling ----------------------------------------------------------------

    async def enter(self, ctx: RequestContext, where: Destinations) -> Ticket:
        """Raise PickerError (429 with Retry-After, or 503) unless the request may go on now;
        `where` says where it could go, fresh each time it is asked."""
        user = ctx.request.user
        ticket = Ticket(user=user)
        resolution = ctx.resolution
        if resolution is not None and resolution.route.spec.rate_limit is not None:
            ticket.route = resolution.route_name
            limiter = ticket.limiter = self._limiter(resolution)
            with tracing.span("gateway.rate_limit", {"infergate.route": ticket.route}):
                tokens = await self.count_input_tokens(ctx)
                decision = await limiter.check(ticket.route, user, tokens)
            if not decision.allowed:
                status = 503 if decision.limit == "unavailable" else 429
                retry = decision.retry_after_header()
                raise PickerError(
                    status,
                    f"{decision.message()} (ModelRoute {ticket.route})",
                    headers={"retry-after": retry} if retry else None,
                )
        try:
            with tracing.span("gateway.flow_control"):
                await self._wait_for_room(ctx, where, ticket)
        except BaseException:  # turned away, timed out or the client left: never served
            self._refund_input(ticket, ctx)
            raise
        return ticket

    async def _wait_for_room(
        self, ctx: RequestContext, where: Destinations, ticket: Ticket
    ) -> None:
        waiting = _Waiting(ctx, where)
        if self.queue is None:
            # No queue to wait in, but sheddable requests are still turned away when the
            # endpoints they may use are saturated, as the reference picker does.
            if ctx.priority < 0 and self._saturated_now(waiting):
                raise PickerError(
                    429,
                    "the pool is saturated and the request is sheddable",
                    headers={"retry-after": "1"},
                )
            return
        item = FlowItem(
            flow_id=ctx.fairness_id,
            priority=ctx.priority,
            input_tokens=await self.count_input_tokens(ctx),
            size_bytes=ctx.request.held_bytes,  # what it costs in memory while it waits
            request_id=ctx.request_id,
            payload=waiting,
            expected_output=self._expected_output(ctx),
        )
        try:
            admission = await self.queue.admit(item)
        except asyncio.CancelledError:
            self._observe_queue(ctx, CANCELLED, time.monotonic() - item.enqueued_at)
            raise
        self._observe_queue(ctx, admission.outcome.value, admission.waited)
        if not admission.admitted:
            retry = admission.retry_after
            raise PickerError(
                admission.status or 503,
                admission.message,
                headers={"retry-after": str(int(retry))} if retry else None,
            )
        ticket.item = item

    def _observe_queue(self, ctx: RequestContext, outcome: str, seconds: float) -> None:
        if self.flow_observer is not None:
            self.flow_observer.waited(ctx, outcome, seconds)

    def _refund_input(self, ticket: Ticket, ctx: RequestContext) -> None:
        if ticket.limiter is not None:
            self._spawn(
                ticket.limiter.refund_input(ticket.route, ticket.user, self.input_tokens(ctx))
            )

    def abandon(self, ticket: Ticket | None, ctx: RequestContext) -> None:
        """Admitted, then not sent anywhere (scheduling found no endpoint): give back what it
        was charged, and let the next request try."""
        if ticket is None:
            return
        self._refund_input(ticket, ctx)
        if ticket.item is not None and self.queue is not None:
            self.queue.undo(ticket.item)

    def _expected_output(self, ctx: RequestContext) -> int:
        """The flow's recent answer length, at most the request's max_tokens; 0 before the
        flow has finished anything (then only what it really produced is charged)."""
        avg = self._output_avg.get(ctx.fairness_id)
        if avg is None:
            return 0
        max_tokens = ctx.request.max_tokens
        return int(min(avg, max_tokens) if max_tokens is not None else avg)

    def _learn_output(self, flow: str, tokens: int) -> None:
        old = self._output_avg.pop(flow, None)  # re-inserted last: the dict stays LRU-ordered
        self._output_avg[flow] = tokens if old is None else 0.8 * old + 0.2 * tokens
        if len(self._output_avg) > MAX_FLOWS_REMEMBERED:
            del self._output_avg[next(iter(self._output_avg))]

    def _saturated(self, item: FlowItem) -> bool:
        return self._saturated_now(item.payload)

    def _saturated_now(self, waiting: _Waiting) -> bool:
        try:
            endpoints = waiting.where.destinations(waiting.ctx)
        except NoCapacity:
            return True  # the pool went to zero while it waited: wait on for a pod
        except PickerError:
            # Its pods left or its model is gone: there is nothing to wait for. Scheduling
            # answers it with the right error; holding it would hold the queue behind it.
            return False
        return self.detector.saturated(endpoints)

    async def count_input_tokens(self, ctx: RequestContext) -> int:
        """input_tokens, with the prompt tokenized off the event loop first."""
        if self.prompts is not None:
            await self.prompts.tokenize(ctx)
        return self.input_tokens(ctx)

    def input_tokens(self, ctx: RequestContext) -> int:
        """The prompt's token count: its tokens, kept in the context, or an estimate when no
        tokenizer fits its model or the prompt is refused."""
        ids = self.prompts.token_ids(ctx) if self.prompts is not None else None
        return len(ids) if ids is not None else ctx.request.approx_prompt_tokens

    def _limiter(self, resolution: Resolution) -> Limiter:
        """One limiter per route, rebuilt when the route's rateLimit changes."""
        name = resolution.route_name
        spec = resolution.route.spec.rate_limit
        key = json.dumps(_builtins(spec), sort_keys=True)
        have = self._limiters.get(name)
        if have is None or have[0] != key:
            if have is not None:
                self._spawn(have[1].aclose())
            try:
                limiter = build_limiter(spec, metrics=self.rate_metrics, redis_clients=self.redis)
            except ValueError as exc:  # the API's validation should have caught it
                log.error("ModelRoute %s: unusable rateLimit: %s", name, exc)
                message = f"ModelRoute {name} has an unusable rateLimit: {exc}"
                raise PickerError(503, message) from None
            self._limiters[name] = (key, limiter)
            return limiter
        return have[1]

    # ---- after the answer -------------------------------------------------------------

    def leave(self, ticket: Ticket | None, output_tokens: int | None) -> None:
        if ticket is None:
            return
        if output_tokens and ticket.limiter is not None:
            self._spawn(ticket.limiter.record_output(ticket.route, ticket.user, output_tokens))
        if ticket.item is not None and self.queue is not None:
            if output_tokens:
                self.queue.charge_output(ticket.item, output_tokens)
                self._learn_output(ticket.item.flow_id, output_tokens)
            self.queue.settle(ticket.item)
        self.notify()

    def notify(self) -> None:
        """Capacity may have freed: let waiting requests try again."""
        if self.queue is not None:
            self.queue.notify()
        self.capacity.notify()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        await self.capacity.close()
        if self.queue is not None:
            await self.queue.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, limiter in self._limiters.values():
            await limiter.aclose()
        await self.redis.aclose()


def _builtins(spec) -> Any:
    import msgspec

    return msgspec.to_builtins(spec)
