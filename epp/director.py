"""The request pipeline between the protocol and scheduling: route → rate limit and flow
control (the gatekeeper) → eligible endpoints (epp.eligibility) → schedule, and the
bookkeeping when the answer ends. What it learns about a request goes in the request's
context (epp.context)."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

from infergw.api import tracing
from infergw.epp.body_budget import DEFAULT_MAX_BODY_BYTES
from infergw.epp.body_deadline import DEFAULT_REQUEST_BODY_TIMEOUT
from infergw.epp.bodyless import allowed_without_body
from infergw.epp.context import RequestContext
from infergw.epp.datastore import Datastore, Endpoint
from infergw.epp.eligibility import Eligibility
from infergw.epp.errors import NoCapacity, PickerError
from infergw.epp.gatekeeper import Gatekeeper
from infergw.epp.metrics import PickerMetrics
from infergw.epp.request import api_for_path
from infergw.epp.response_ids import ResponseIds
from infergw.epp.scheduling.config import SchedulingConfig
from infergw.epp.scheduling.framework import PrepareData, ResponseInfo
from infergw.epp.stored_responses import StoredResponses
from infergw.epp.trust import HeaderTrust

log = logging.getLogger("epp.director")

TIMEOUT_HEADER = "x-envoy-upstream-rq-timeout-ms"
# Overrides the route's num_retries: without it Envoy would retry a ModelServer with fewer
# attempts than the route allows on the same pod again (override_host keeps the last host).
MAX_RETRIES_HEADER = "x-envoy-max-retries"
EWMA_ALPHA = 0.2  # weight of the newest observation in per-endpoint latency averages


@dataclass(slots=True)
class DirectorOptions:
    fallbacks: int = 1
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    subset_filter: bool = True
    trust: HeaderTrust = field(default_factory=HeaderTrust)
    # The proxy sends no response headers (--response-headers-skipped): a stream's end after
    # the request went on is its answer's end, status unknown.
    response_headers_skipped: bool = False
    # Longest gap between two parts of an open request body (epp/body_deadline.py); 0: none.
    request_body_timeout: float = DEFAULT_REQUEST_BODY_TIMEOUT
    # The MAC key of response ids (--response-id-key-file); None: derived from the pool name.
    response_id_key: bytes | None = None


class Director:
    def __init__(
        self,
        datastore: Datastore,
        scheduling: SchedulingConfig,
        metrics: PickerMetrics,
        options: DirectorOptions,
        gate: Gatekeeper | None = None,
    ) -> None:
        self.datastore = datastore
        self.scheduling = scheduling
        self.metrics = metrics
        self.options = options
        self.gate = gate or Gatekeeper(metrics.registry)
        self.eligibility = Eligibility(datastore, scheduling.handler, options.subset_filter)
        self.scheduler = scheduling.scheduler(1 + options.fallbacks, metrics.observe_plugin)
        self._preparers = [p for p in scheduling.plugins.values() if isinstance(p, PrepareData)]
        self._rng = random.Random()
        self.stored = StoredResponses(
            datastore,
            ResponseIds(options.response_id_key),
            stamped=not options.response_headers_skipped,
        )

    async def handle(self, ctx: RequestContext) -> list[Endpoint]:
        """Route, gate and schedule a parsed request; on success the primary endpoint counts
        it in flight. Raises PickerError for every request that cannot go on."""
        self.options.trust.apply(ctx)
        ctx.priority = self.datastore.priority_of(ctx.objective)
        ctx.pinned = self.stored.pinned_by_body(ctx.request)
        if ctx.pinned is not None:
            self.stored.endpoint_for(ctx.pinned)  # gone or not ready: say so before the gate
        try:
            with tracing.span("gateway.route"):
                eligible = self._routed(ctx)
        except NoCapacity as cold:
            # Nothing ready (scaled to zero, pods starting): hold it until a pod is, as an
            # activator does; the autoscaler reads how many wait (epp.capacity_wait).
            with tracing.span("gateway.capacity_wait"):
                waited = await self.gate.hold_for_capacity(ctx, self._has_capacity, cold)
            log.info("request %s waited %.2fs for a ready endpoint", ctx.request_id, waited)
            eligible = self._routed(ctx)
        req = ctx.request
        if (
            req.stream
            and req.takes_stream_options
            and not req.client_wants_usage
            and self._needs_usage(ctx)
        ):
            ctx.strip_usage = True  # ask the engine for usage; the client does not see it
        ctx.ticket = await self.gate.enter(ctx, self.eligibility)
        if ctx.ticket.item is not None:  # it may have waited: the pool may have changed
            eligible = self.eligibility.endpoints(ctx)
        try:
            if self._preparers:
                with tracing.span("gateway.prepare"):
                    for plugin in self._preparers:
                        await plugin.prepare(ctx)
            with tracing.span("gateway.schedule", {"infergate.candidates": len(eligible)}):
                return self._schedule(ctx, eligible)
        except BaseException:
            self.gate.abandon(ctx.ticket, ctx)
            raise

    def _routed(self, ctx: RequestContext) -> list[Endpoint]:
        """Route the request, then the endpoints it may use."""
        self._route(ctx)
        return self.eligibility.endpoints(ctx)

    def _has_capacity(self, ctx: RequestContext) -> bool:
        """A held request may go on: some endpoint can take it, or another error than "no
        ready endpoint" answers it."""
        try:
            self._routed(ctx)
        except NoCapacity:
            return False
        except PickerError:
            pass
        return True

    def _needs_usage(self, ctx: RequestContext) -> bool:
        """Output tokens are charged to a rate limit or a flow's fair share."""
        limit = ctx.resolution.route.spec.rate_limit if ctx.resolution else None
        return self.gate.queue is not None or (
            limit is not None and limit.output_tokens_per_unit is not None
        )

    def _schedule(self, ctx: RequestContext, candidates: list[Endpoint]) -> list[Endpoint]:
        if ctx.pinned is not None:  # only the pod that stored the response has it
            return self._dispatch(ctx, [self.stored.endpoint_for(ctx.pinned, candidates)])
        if not candidates:
            self.metrics.count_attempt(ctx.target_model)
            raise PickerError(503, f"no ready endpoint left for model {ctx.request.model!r}")
        t0 = time.perf_counter()
        result = self.scheduler.schedule(ctx, candidates)
        self.metrics.scheduler_e2e.observe(time.perf_counter() - t0)
        for plugin in self.scheduling.pre_request:
            t1 = time.perf_counter()
            plugin.pre_request(ctx, result)
            self.metrics.observe_plugin(
                "PreRequest", plugin.type_name, plugin.name, time.perf_counter() - t1
            )
        targets = result.targets
        if not targets:
            self.metrics.count_attempt(ctx.target_model)
            raise PickerError(429, "no endpoint left after scheduling")
        route = ctx.resolution
        if route is not None and route.retries is not None:
            targets = targets[: 1 + route.retries]  # the ModelServer's retry attempts
            ctx.upstream_headers[MAX_RETRIES_HEADER] = str(route.retries)
        return self._dispatch(ctx, targets)

    def _dispatch(self, ctx: RequestContext, targets: list[Endpoint]) -> list[Endpoint]:
        """Send the request to `targets` (primary first), counting it on the primary."""
        primary = targets[0]
        primary.inflight_requests += 1
        primary.sent_since_scrape += 1
        primary.last_sent_at = time.monotonic()
        primary.inflight_tokens += self._token_weight(ctx)
        ctx.targets = [e.address for e in targets]
        m, model, target = self.metrics, ctx.request.model, ctx.target_model
        pool = self.datastore.pool
        m.count_attempt(target, primary.address, primary.pod, pool.namespace if pool else "")
        m.requests.labels(model, target, str(ctx.priority)).inc()
        m.request_sizes.labels(model, target).observe(len(ctx.request.raw_body))
        m.running.labels(model).inc()
        route = ctx.resolution
        if route is not None:  # counted once a request (routing runs again while one waits)
            m.rewrites.labels(model, target, route.route_name).inc()
        return targets

    def _route(self, ctx: RequestContext) -> None:
        """A ModelRoute for the request's model decides its ModelServer, pods and model
        name; without one, the pool's pods that serve the model take it."""
        req = ctx.request
        routes = self.datastore.routes
        if routes.route_for(req.model) is None:
            return  # no route: the eligible endpoints are those serving the model
        resolution = routes.resolve(
            req.model,
            ctx.match_headers,
            req.path,
            self.eligibility.candidates(ctx.subset),
            self._rng,
        )
        if resolution is None:
            return
        ctx.resolution = resolution
        # The route decides the engine's model name: even a trusted
        # x-gateway-model-name-rewrite must not reach an adapter or model it does not expose.
        ctx.target_model = resolution.target_model
        if resolution.timeout_s is not None:
            # Envoy's router takes the per-request timeout from this header.
            ctx.upstream_headers[TIMEOUT_HEADER] = str(max(1, int(resolution.timeout_s * 1000)))

    def route_bodyless(
        self, method: str, path: str, subset: list[str] | None, user: str | None = None
    ) -> tuple[list[Endpoint], str | None]:
        """Where a request without a body (of `user`, the verified one, if any) goes, and the
        path to send it with when that changes: one naming a stored response by one of our
        ids goes to the pod that stored it, with the engine's id in the path
        (epp/stored_responses.py)."""
        if allowed_without_body(method, path):
            pinned = self.stored.pinned_by_path(path, user)
            if pinned is not None:
                return [self.stored.endpoint_for(pinned[0])], pinned[1]
        return self.pick_for_bodyless(method, path, subset), None

    def pick_for_bodyless(self, method: str, path: str, subset: list[str] | None) -> list[Endpoint]:
        """A request without a body has nothing to score: any candidate will do, if it is
        one of the inference API's (epp.bodyless); anything else is not a client's to send."""
        if not allowed_without_body(method, path):
            if method == "POST" and api_for_path(path) is not None:  # a body was due
                raise PickerError(
                    400, "'model' is required: this API takes a body naming it", param="model"
                )
            raise PickerError(404, f"no inference API for {method} {path!r} without a body")
        candidates = self.eligibility.candidates(subset)
        if not candidates:
            raise PickerError(503, "no pods available in the pool")
        count = min(len(candidates), 1 + self.options.fallbacks)
        return self._rng.sample(candidates, count)

    def finish(
        self,
        ctx: RequestContext,
        info: ResponseInfo,
        started: float,
        streamed_tokens: int | None = None,
    ) -> None:
        """The answer ended (or the client left): release the slot and learn from it.
        `streamed_tokens`: output tokens counted from a streamed answer, charged when its
        usage never came (the client left mid-answer, or the engine sends none)."""
        primary = self.datastore.endpoint(ctx.targets[0]) if ctx.targets else None
        if primary is not None:
            primary.inflight_requests = max(0, primary.inflight_requests - 1)
            primary.inflight_tokens = max(0, primary.inflight_tokens - self._token_weight(ctx))
        charged = info.completion_tokens
        if charged is None:
            charged = streamed_tokens
        self.gate.leave(ctx.ticket, charged)
        m = self.metrics
        m.running.labels(ctx.request.model).dec()
        labels = (ctx.request.model, ctx.target_model)
        if info.status is None:  # answered; the proxy did not show the picker its status
            m.duration.labels(*labels).observe(time.monotonic() - started)
        elif info.status >= 400 or info.status == 0:
            m.errors.labels(*labels, str(info.status or "cancelled")).inc()
        else:
            m.duration.labels(*labels).observe(time.monotonic() - started)
        if info.prompt_tokens is not None:
            m.input_tokens.labels(*labels).observe(info.prompt_tokens)
        if info.completion_tokens:
            m.output_tokens.labels(*labels).observe(info.completion_tokens)
            m.ntpot.labels(*labels).observe((time.monotonic() - started) / info.completion_tokens)
        if info.cached_tokens is not None:
            m.cached_tokens.labels(*labels).observe(info.cached_tokens)
        if info.response_bytes:
            m.response_sizes.labels(*labels).observe(info.response_bytes)
        # Only good answers teach latency: a pod that fails fast must not look fast.
        if info.ttft is not None and 200 <= (info.status or 0) < 400:
            m.ttft.labels(*labels).observe(
                info.ttft if info.client_ttft is None else info.client_ttft
            )
            if info.tpot is not None:
                m.tpot.labels(*labels).observe(info.tpot)
            if info.chunk_gaps is not None and any(info.chunk_gaps.counts):
                m.itl.labels(*labels).merge(info.chunk_gaps)
            served = info.endpoint
            if served is not None:
                served.ttft_ewma = _ewma(served.ttft_ewma, info.ttft)
                if info.tpot is not None:
                    served.tpot_ewma = _ewma(served.tpot_ewma, info.tpot)
        for plugin in self.scheduling.post_response:
            try:
                plugin.post_response(ctx, info)
            except Exception:  # a plugin bug must not break the stream it observes
                log.exception("post_response plugin %s failed", plugin.name)

    @staticmethod
    def _token_weight(ctx: RequestContext) -> int:
        req = ctx.request
        return req.approx_prompt_tokens + (req.max_tokens or 0)


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * new
