"""The request pipeline between the protocol and scheduling: route → rate limit and flow
control (the gatekeeper) → candidates → schedule, and the bookkeeping when the answer ends."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

from epp.bodyless import allowed_without_body
from epp.datastore import Datastore, Endpoint
from epp.errors import PickerError
from epp.gatekeeper import Gatekeeper
from epp.metrics import PickerMetrics
from epp.request import InferenceRequest
from epp.routing.table import selects
from epp.scheduling.config import SchedulingConfig
from epp.scheduling.framework import PrepareData, ResponseInfo
from epp.trust import HeaderTrust

log = logging.getLogger("epp.director")

TIMEOUT_HEADER = "x-envoy-upstream-rq-timeout-ms"
EWMA_ALPHA = 0.2  # weight of the newest observation in per-endpoint latency averages


@dataclass(slots=True)
class DirectorOptions:
    fallbacks: int = 1
    max_body_bytes: int = 32 * 1024 * 1024
    subset_filter: bool = True
    trust: HeaderTrust = field(default_factory=HeaderTrust)


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
        self.scheduler = scheduling.scheduler(1 + options.fallbacks, metrics.observe_plugin)
        self._preparers = [p for p in scheduling.plugins.values() if isinstance(p, PrepareData)]
        self._rng = random.Random()

    def candidates(self, subset: list[str] | None) -> list[Endpoint]:
        endpoints = self.datastore.ready_endpoints()
        if subset is None or not self.options.subset_filter:
            return endpoints
        if not subset:
            raise PickerError(503, "the endpoint subset hint is empty")
        # An ip:port names one endpoint; a bare IP (as the reference picker matches) a pod.
        addresses = {s for s in subset if ":" in s}
        ips = {s for s in subset if ":" not in s}
        chosen = [e for e in endpoints if e.address in addresses or e.ip in ips]
        if not chosen:
            raise PickerError(503, "no endpoint of the subset hint is in the pool")
        return chosen

    async def admit(self, req: InferenceRequest, subset: list[str] | None) -> list[Endpoint]:
        """Route, gate and schedule a parsed request; on success the primary endpoint counts
        it in flight. Raises PickerError for every request that cannot go on."""
        self.options.trust.apply(req)
        eligible = self._route(req, self.candidates(subset))
        req.priority = self.datastore.priority_of(req.objective)
        if req.stream and not req.client_wants_usage and self._needs_usage(req):
            req.strip_usage = True  # ask the engine for usage; the client does not see it
        req.ticket = await self.gate.enter(req, lambda: self._destinations(req, subset))
        if req.ticket.item is not None:  # it may have waited: the pool may have changed
            eligible = self._eligible(req, subset)
        try:
            for plugin in self._preparers:
                await plugin.prepare(req)
            return self._schedule(req, eligible)
        except BaseException:
            self.gate.abandon(req.ticket, req)
            raise

    def _needs_usage(self, req: InferenceRequest) -> bool:
        """Output tokens are charged to a rate limit or a flow's fair share."""
        limit = req.resolution.route.spec.rate_limit if req.resolution else None
        return self.gate.queue is not None or (
            limit is not None and limit.output_tokens_per_unit is not None
        )

    def _destinations(self, req: InferenceRequest, subset: list[str] | None) -> list[Endpoint]:
        """The endpoints that can be the request's destination, for flow control's saturation
        check: with prefill/decode picking, prefill pods never are (their room is no room for
        a decode)."""
        return self.scheduling.handler.destinations(self._eligible(req, subset))

    def _eligible(self, req: InferenceRequest, subset: list[str] | None) -> list[Endpoint]:
        """The ready endpoints this request may use now: its ModelServer's, or those serving
        its model."""
        candidates = self.candidates(subset)
        resolution = req.resolution
        if resolution is None:
            return self._serving(req.target_model, candidates)
        if resolution.server is None:
            return candidates
        return [e for e in candidates if selects(resolution.server, e)]

    def _schedule(self, req: InferenceRequest, candidates: list[Endpoint]) -> list[Endpoint]:
        if not candidates:
            raise PickerError(503, f"no ready endpoint left for model {req.model!r}")
        t0 = time.perf_counter()
        result = self.scheduler.schedule(req, candidates)
        self.metrics.scheduler_e2e.observe(time.perf_counter() - t0)
        for plugin in self.scheduling.pre_request:
            t1 = time.perf_counter()
            plugin.pre_request(req, result)
            self.metrics.observe_plugin(
                "PreRequest", plugin.type_name, plugin.name, time.perf_counter() - t1
            )
        targets = result.targets
        if not targets:
            raise PickerError(429, "no endpoint left after scheduling")
        route = req.resolution
        if route is not None and route.retries is not None:
            targets = targets[: 1 + route.retries]  # the ModelServer's retry attempts
        primary = targets[0]
        primary.inflight_requests += 1
        primary.sent_since_scrape += 1
        primary.inflight_tokens += self._token_weight(req)
        req.targets = [e.address for e in targets]
        self.metrics.requests.labels(req.model, req.target_model).inc()
        self.metrics.running.labels(req.model).inc()
        return targets

    def _route(self, req: InferenceRequest, candidates: list[Endpoint]) -> list[Endpoint]:
        """A ModelRoute for the request's model decides its ModelServer, pods and model
        name; without one, the pool's pods that serve the model take it."""
        resolution = self.datastore.routes.resolve(
            req.model, req.headers, req.path, candidates, self._rng
        )
        if resolution is None:
            return self._serving(req.target_model, candidates)
        req.resolution = resolution
        # The route decides the engine's model name: even a trusted
        # x-gateway-model-name-rewrite must not reach an adapter or model it does not expose.
        req.target_model = resolution.target_model
        if resolution.timeout_s is not None:
            # Envoy's router takes the per-request timeout from this header.
            req.upstream_headers[TIMEOUT_HEADER] = str(max(1, int(resolution.timeout_s * 1000)))
        return resolution.candidates

    def _serving(self, model: str, candidates: list[Endpoint]) -> list[Endpoint]:
        """Candidates that serve `model` (or whose models are not known yet)."""
        everyone = self.datastore.endpoints()
        if (
            everyone
            and all(e.models is not None for e in everyone)
            and not any(model in e.models for e in everyone)
        ):
            pool = self.datastore.pool.name if self.datastore.pool else "?"
            raise PickerError(404, f"model {model!r} is not served by pool {pool}")
        serving = [e for e in candidates if e.models is None or model in e.models]
        if candidates and not serving:
            raise PickerError(503, f"no available endpoint serves model {model!r}")
        return serving

    def pick_for_bodyless(self, method: str, path: str, subset: list[str] | None) -> list[Endpoint]:
        """A request without a body has nothing to score: any candidate will do, if it is
        one of the inference API's (epp.bodyless); anything else is not a client's to send."""
        if not allowed_without_body(method, path):
            raise PickerError(404, f"no inference API for {method} {path!r} without a body")
        candidates = self.candidates(subset)
        if not candidates:
            raise PickerError(503, "no pods available in the pool")
        count = min(len(candidates), 1 + self.options.fallbacks)
        return self._rng.sample(candidates, count)

    def finish(
        self,
        req: InferenceRequest,
        info: ResponseInfo,
        started: float,
        streamed_tokens: int | None = None,
    ) -> None:
        """The answer ended (or the client left): release the slot and learn from it.
        `streamed_tokens`: output tokens counted from a streamed answer, charged when its
        usage never came (the client left mid-answer, or the engine sends none)."""
        primary = self.datastore.endpoint(req.targets[0]) if req.targets else None
        if primary is not None:
            primary.inflight_requests = max(0, primary.inflight_requests - 1)
            primary.inflight_tokens = max(0, primary.inflight_tokens - self._token_weight(req))
        charged = info.completion_tokens
        if charged is None:
            charged = streamed_tokens
        self.gate.leave(req.ticket, charged)
        m = self.metrics
        m.running.labels(req.model).dec()
        labels = (req.model, req.target_model)
        if info.status >= 400 or info.status == 0:
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
        served = info.endpoint
        # Only good answers teach latency: a pod that fails fast must not look fast.
        if served is not None and info.ttft is not None and 200 <= info.status < 400:
            served.ttft_ewma = _ewma(served.ttft_ewma, info.ttft)
            if info.tpot is not None:
                served.tpot_ewma = _ewma(served.tpot_ewma, info.tpot)
        for plugin in self.scheduling.post_response:
            try:
                plugin.post_response(req, info)
            except Exception:  # a plugin bug must not break the stream it observes
                log.exception("post_response plugin %s failed", plugin.name)

    @staticmethod
    def _token_weight(req: InferenceRequest) -> int:
        return req.approx_prompt_tokens + (req.max_tokens or 0)


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * new
