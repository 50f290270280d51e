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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from epp.errors import PickerError
from epp.flowcontrol import (
    AdmissionController,
    FlowControlConfig,
    FlowItem,
    SaturationDetector,
)
from epp.ratelimit import RateLimitMetrics, RedisClients, build_limiter
from epp.request import InferenceRequest

log = logging.getLogger("epp.gatekeeper")
MAX_FLOWS_REMEMBERED = 10_000  # answer-length averages kept, least recently used dropped


@dataclass(slots=True)
class Ticket:
    """What the gate remembers of an admitted request, to charge it when it ends."""

    item: FlowItem | None = None
    limiter: Any = None
    route: str = ""
    user: str | None = None


@dataclass
class Gatekeeper:
    metrics_registry: Any
    flow_control: FlowControlConfig | None = None  # None: requests never wait
    tokenizers: Any = None  # kvindex.tokenize.PromptTokenizers, when models were given
    _limiters: dict[str, tuple[str, Any]] = field(default_factory=dict)
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
            self.queue = AdmissionController(self.flow_control, self._saturated)

    # ---- before scheduling ----------------------------------------------------------------

    async def enter(self, req: InferenceRequest, eligible: Callable[[], list]) -> Ticket:
        """Raise PickerError (429 with Retry-After, or 503) unless the request may go on now;
        `eligible()` gives the endpoints it may use, fresh each time it is asked."""
        ticket = Ticket(user=req.user)
        resolution = req.resolution
        if resolution is not None and resolution.route.spec.rate_limit is not None:
            ticket.route = resolution.route_name
            ticket.limiter = self._limiter(resolution)
            tokens = await self.count_input_tokens(req)
            decision = await ticket.limiter.check(ticket.route, req.user, tokens)
            if not decision.allowed:
                status = 503 if decision.limit == "unavailable" else 429
                retry = decision.retry_after_header()
                raise PickerError(
                    status,
                    f"{decision.message()} (ModelRoute {ticket.route})",
                    headers={"retry-after": retry} if retry else None,
                )
        try:
            await self._wait_for_room(req, eligible, ticket)
        except BaseException:  # turned away, timed out or the client left: never served
            self._refund_input(ticket, req)
            raise
        return ticket

    async def _wait_for_room(
        self, req: InferenceRequest, eligible: Callable[[], list], ticket: Ticket
    ) -> None:
        if self.queue is None:
            # No queue to wait in, but sheddable requests are still turned away when the
            # endpoints they may use are saturated, as the reference picker does.
            if req.priority < 0 and self._saturated_now(eligible):
                raise PickerError(
                    429,
                    "the pool is saturated and the request is sheddable",
                    headers={"retry-after": "1"},
                )
            return
        item = FlowItem(
            flow_id=req.fairness_id,
            priority=req.priority,
            input_tokens=await self.count_input_tokens(req),
            size_bytes=req.held_bytes,  # what it costs in memory while it waits
            request_id=req.request_id,
            payload=eligible,
            expected_output=self._expected_output(req),
        )
        admission = await self.queue.admit(item)
        if not admission.admitted:
            retry = admission.retry_after
            raise PickerError(
                admission.status or 503,
                admission.message,
                headers={"retry-after": str(int(retry))} if retry else None,
            )
        ticket.item = item

    def _refund_input(self, ticket: Ticket, req: InferenceRequest) -> None:
        if ticket.limiter is not None:
            self._spawn(
                ticket.limiter.refund_input(ticket.route, ticket.user, self.input_tokens(req))
            )

    def abandon(self, ticket: Ticket | None, req: InferenceRequest) -> None:
        """Admitted, then not sent anywhere (scheduling found no endpoint): give back what it
        was charged, and let the next request try."""
        if ticket is None:
            return
        self._refund_input(ticket, req)
        if ticket.item is not None and self.queue is not None:
            self.queue.undo(ticket.item)

    def _expected_output(self, req: InferenceRequest) -> int:
        """The flow's recent answer length, at most the request's max_tokens; 0 before the
        flow has finished anything (then only what it really produced is charged)."""
        avg = self._output_avg.get(req.fairness_id)
        if avg is None:
            return 0
        return int(min(avg, req.max_tokens) if req.max_tokens is not None else avg)

    def _learn_output(self, flow: str, tokens: int) -> None:
        old = self._output_avg.pop(flow, None)  # re-inserted last: the dict stays LRU-ordered
        self._output_avg[flow] = tokens if old is None else 0.8 * old + 0.2 * tokens
        if len(self._output_avg) > MAX_FLOWS_REMEMBERED:
            del self._output_avg[next(iter(self._output_avg))]

    def _saturated(self, item: FlowItem) -> bool:
        return self._saturated_now(item.payload)

    def _saturated_now(self, eligible: Callable[[], list]) -> bool:
        try:
            endpoints = eligible()
        except PickerError:
            # Its pods left or its model is gone: there is nothing to wait for. Scheduling
            # answers it with the right error; holding it would hold the queue behind it.
            return False
        return self.detector.saturated(endpoints)

    async def count_input_tokens(self, req: InferenceRequest) -> int:
        """input_tokens, with the prompt tokenized off the event loop first."""
        tokenizer = self._tokenizer(req)
        if tokenizer is not None and req.api in ("chat", "completions"):
            await req.tokenize(tokenizer)
        return self.input_tokens(req)

    def input_tokens(self, req: InferenceRequest) -> int:
        """The prompt's token count, once per request."""
        if "prompt_tokens" in req.state:
            return req.state["prompt_tokens"]
        count = None
        tokenizer = self._tokenizer(req)
        if tokenizer is not None and req.api in ("chat", "completions"):
            try:
                count = len(req.prompt_token_ids(tokenizer))
            except Exception as exc:  # a prompt the template rejects: estimate instead
                log.debug("counting tokens of %s failed: %s", req.request_id, exc)
        if count is None:
            count = req.approx_prompt_tokens
        req.state["prompt_tokens"] = count
        return count

    def _tokenizer(self, req: InferenceRequest):
        if self.tokenizers is None:
            return None
        return self.tokenizers.get(req.target_model) or self.tokenizers.get(req.model)

    def _limiter(self, resolution):
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

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self.queue is not None:
            await self.queue.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, limiter in self._limiters.values():
            await limiter.aclose()
        await self.redis.aclose()


def _builtins(spec) -> Any:
    import msgspec

    return msgspec.to_builtins(spec)
