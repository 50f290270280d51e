"""A simulated fleet to replay the real scheduling plugins against: deterministic, in process.

Each pod is a continuous-batching engine in miniature (as simulator/engine.py, simplified):
a step prefills every waiting request's uncached tokens (FIFO, up to a token budget) and
decodes one token for each running one, and lasts `base + prefill tokens × per-token`; a
request arriving mid-step waits for the next. A pod caches the prompt prefixes it prefilled
(an LRU of prefix ids). The picker side is the picker's: each pod's metrics (waiting,
running, KV usage) are copied into its Endpoint by a scrape every `scrape_interval`, at its
own phase, and between scrapes only the picker's own counts move (`inflight_requests`,
`sent_since_scrape`), as epp/director.py and epp/scrape.py move them. With `quiet_interval`
or `idle_interval` set, the real pace policy (epp/scrape_pace.py) decides each pod's next
scrape, and a request sent to a waiting pod brings its scrape to the next manager tick, as
the scraper's manager does.

Used by the scheduling tests to show herding and affinity against round robin; the numbers
are the model's, not a real engine's.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from infergw.epp.context import RequestContext
from infergw.epp.datastore import Endpoint, EndpointMetrics
from infergw.epp.director import EWMA_ALPHA
from infergw.epp.scheduling.framework import Profile, ResponseInfo, Scheduler, WeightedScorer
from infergw.epp.scheduling.plugins.kv_cache_utilization import KVCacheUtilizationScorer
from infergw.epp.scheduling.plugins.least_request import LeastRequestScorer
from infergw.epp.scheduling.plugins.pickers import MaxScorePicker
from infergw.epp.scheduling.plugins.profile_handlers import SingleProfileHandler
from infergw.epp.scheduling.plugins.queue import QueueScorer
from infergw.epp.scrape_pace import FAST, Pace
from tests.request_fixtures import bare_context

TICK = 0.001  # seconds per simulated tick


class SimClock:
    """The simulated time, for plugins that read a clock (pass it as their `clock`)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(slots=True)
class Arrival:
    at: float
    prefix: int  # prompt prefix id: the same id is the same leading tokens
    prefix_tokens: int
    suffix_tokens: int  # unique to this request
    output_tokens: int = 16

    @property
    def text(self) -> str:
        # What the approximate prefix scorer hashes: 4 characters a token.
        head = f"{self.prefix:08d}" * (self.prefix_tokens // 2)
        return head + f"{id(self):016x}" * (self.suffix_tokens // 4)


@dataclass(slots=True)
class _Req:
    arrival: Arrival
    pod: int
    prefill: int = 0  # uncached tokens still to prefill
    uncached: int = 0  # the prompt tokens it did not find cached
    decoded: int = 0
    first_token_at: float | None = None


@dataclass(slots=True)
class _Pod:
    endpoint: Endpoint
    waiting: list[_Req] = field(default_factory=list)
    running: list[_Req] = field(default_factory=list)
    step: list[_Req] = field(default_factory=list)
    step_ends: float = 0.0
    cached: OrderedDict[int, None] = field(default_factory=OrderedDict)


@dataclass(slots=True)
class Fleet:
    pods: int = 8
    scrape_interval: float = 0.05
    step_base: float = 0.0095
    prefill_per_token: float = 150e-6
    token_budget: int = 8192
    kv_tokens: int = 5120  # 320 blocks of 16
    cached_prefixes: int = 3
    cache_info: bool = True  # pages say their block size and count (vLLM's cache_config_info)
    quiet_interval: float = 0.0  # 0: busy pods at scrape_interval (epp/scrape_pace.py)
    idle_interval: float = 0.0  # 0: idle pods at scrape_interval

    @property
    def pace(self) -> Pace:
        return Pace(self.scrape_interval, self.idle_interval, self.quiet_interval)

    def endpoints(self) -> list[Endpoint]:
        out = []
        for i in range(self.pods):
            e = Endpoint(name=f"p{i}-rank-0", pod=f"p{i}", address=f"10.0.0.{i}:8000")
            e.metrics = EndpointMetrics(updated_at=1.0)
            e.stale = False
            out.append(e)
        return out


@dataclass(slots=True)
class Result:
    ttft: list[float]  # seconds, per request in arrival order
    pods: list[int]  # the pod each request went to
    scrapes: int = 0  # pages read over the replay

    def p(self, q: float) -> float:
        s = sorted(self.ttft)
        return s[min(len(s) - 1, int(q * len(s)))]


Route = Callable[[Arrival, list[Endpoint]], int]
# Told each answer, as epp/director.py tells the PostResponse plugins: the arrival, and what
# the picker would see of it (its pod, TTFT, prompt and cached tokens).
Finished = Callable[[Arrival, ResponseInfo], None]


def scheduler_route(scorers: Sequence[tuple[object, float]], seed: int = 1) -> Route:
    """Route with a profile of these (scorer, weight) and a max-score picker, as the picker
    runs it: the chosen pod's PreRequest plugins are told, like epp/director.py does."""
    profile = Profile(
        "default",
        scorers=[WeightedScorer(s, w) for s, w in scorers],  # type: ignore[arg-type]
        picker=MaxScorePicker("pick", {"seed": seed}),
    )
    scheduler = Scheduler({"default": profile}, SingleProfileHandler("h"), 1)
    contexts: dict[int, RequestContext] = {}  # by id(arrival), until its answer

    def route(a: Arrival, eps: list[Endpoint]) -> int:
        ctx = bare_context(prompt_text=a.text)
        result = scheduler.schedule(ctx, eps)
        for s, _ in scorers:
            if hasattr(s, "pre_request"):
                s.pre_request(ctx, result)  # type: ignore[attr-defined]
        contexts[id(a)] = ctx
        return eps.index(result.targets[0])

    def finished(a: Arrival, info: ResponseInfo) -> None:
        ctx = contexts.pop(id(a))
        for s, _ in scorers:
            if hasattr(s, "post_response"):
                s.post_response(ctx, info)  # type: ignore[attr-defined]

    route.finished = finished  # type: ignore[attr-defined]
    return route


def round_robin() -> Route:
    n = [0]

    def route(a: Arrival, eps: list[Endpoint]) -> int:
        n[0] += 1
        return (n[0] - 1) % len(eps)

    return route


def poisson(
    rate: float, seconds: float, seed: int, make: Callable[[float, random.Random], Arrival]
) -> list[Arrival]:
    rng = random.Random(seed)
    t, out = rng.expovariate(rate), []
    while t < seconds:
        out.append(make(t, rng))
        t += rng.expovariate(rate)
    return out


def no_reuse(rate: float, seconds: float = 30.0, seed: int = 7) -> list[Arrival]:
    """bench/routing's no-reuse workload: ~1,800 unique prompt tokens, 16 out."""
    return poisson(rate, seconds, seed, lambda t, rng: Arrival(t, -1, 0, 1800))


def shared_prefix(
    rate: float, seconds: float = 30.0, seed: int = 7, groups: int = 48
) -> list[Arrival]:
    """bench/routing's shared-prefix workload: one of `groups` ~1,600-token prefixes, chosen
    uniformly, and a short question; 16 out."""
    return poisson(rate, seconds, seed, lambda t, rng: Arrival(t, rng.randrange(groups), 1600, 16))


def replay(
    fleet: Fleet, arrivals: list[Arrival], route: Route, clock: SimClock | None = None
) -> Result:
    clock = clock or SimClock()
    eps = fleet.endpoints()
    pods = [_Pod(e) for e in eps]
    reqs: list[_Req] = []
    # Pods are scraped at staggered phases, as the picker's per-endpoint loops drift apart.
    interval, pace = fleet.scrape_interval, fleet.pace
    phase = [interval * i / fleet.pods for i in range(fleet.pods)]
    next_scrape = list(phase)
    last_scrape = [-interval] * fleet.pods
    waits = [FAST] * fleet.pods
    scrapes = 0
    end = arrivals[-1].at + 10.0
    nxt, now = 0, 0.0
    while now < end and (nxt < len(arrivals) or any(p.running or p.waiting for p in pods)):
        clock.now = now
        while nxt < len(arrivals) and arrivals[nxt].at <= now:
            a = arrivals[nxt]
            i = route(a, eps)
            r = _Req(a, i)
            pods[i].waiting.append(r)
            eps[i].inflight_requests += 1
            eps[i].sent_since_scrape += 1
            eps[i].last_sent_at = now
            eps[i].inflight_tokens += a.prefix_tokens + a.suffix_tokens + a.output_tokens
            reqs.append(r)
            nxt += 1
        for i, pod in enumerate(pods):
            if now >= pod.step_ends:
                _finish_step(fleet, pod, now, getattr(route, "finished", None))
                _start_step(fleet, pod, now)
            if waits[i] != FAST and pace.wakes(waits[i], eps[i]):
                # The manager sees it at its next tick; still no sooner than one interval.
                tick = interval * -(-now // interval)
                next_scrape[i] = min(next_scrape[i], max(last_scrape[i] + interval, tick))
                waits[i] = FAST
            if now >= next_scrape[i]:
                _scrape(fleet, pod, now)
                scrapes += 1
                last_scrape[i] = now
                waits[i] = pace.pace(eps[i])
                next_scrape[i] += pace.wait_for(waits[i])
        now += TICK
    ttft = [(r.first_token_at or end) - r.arrival.at for r in reqs]
    return Result(ttft, [r.pod for r in reqs], scrapes)


def _finish_step(fleet: Fleet, pod: _Pod, now: float, finished: Finished | None) -> None:
    for r in pod.step:
        if r.prefill:
            r.prefill = 0
        if r.first_token_at is None:
            r.first_token_at = now
            ttft, e = now - r.arrival.at, pod.endpoint
            old = e.ttft_ewma
            e.ttft_ewma = ttft if old is None else old + EWMA_ALPHA * (ttft - old)
        r.decoded += 1
        if r.decoded >= r.arrival.output_tokens:
            pod.running.remove(r)
            pod.endpoint.inflight_requests -= 1
            a = r.arrival
            pod.endpoint.inflight_tokens -= a.prefix_tokens + a.suffix_tokens + a.output_tokens
            if finished is not None:
                prompt = a.prefix_tokens + a.suffix_tokens
                ttft = (r.first_token_at or now) - a.at
                info = ResponseInfo(pod.endpoint, 200, prompt, a.output_tokens)
                info.cached_tokens, info.ttft = prompt - r.uncached, ttft
                finished(a, info)
    pod.step = []


def _start_step(fleet: Fleet, pod: _Pod, now: float) -> None:
    budget, prefill = fleet.token_budget, 0
    while pod.waiting and budget > 0:
        r = pod.waiting[0]
        a = r.arrival
        hit = a.prefix >= 0 and a.prefix in pod.cached
        r.prefill = r.uncached = a.suffix_tokens + (0 if hit else a.prefix_tokens)
        if r.prefill > budget and pod.running:
            break
        pod.waiting.pop(0)
        if a.prefix >= 0:
            pod.cached[a.prefix] = None
            pod.cached.move_to_end(a.prefix)
            while len(pod.cached) > fleet.cached_prefixes:
                pod.cached.popitem(last=False)
        budget -= r.prefill
        prefill += r.prefill
        pod.running.append(r)
    pod.step = list(pod.running)
    if pod.step:
        pod.step_ends = now + fleet.step_base + prefill * fleet.prefill_per_token


def _scrape(fleet: Fleet, pod: _Pod, now: float) -> None:
    held = sum(r.arrival.prefix_tokens + r.arrival.suffix_tokens + r.decoded for r in pod.running)
    pod.endpoint.metrics = EndpointMetrics(
        waiting=len(pod.waiting),
        running=len(pod.running),
        kv_usage=min(1.0, held / fleet.kv_tokens),
        block_size=16 if fleet.cache_info else None,
        num_blocks=fleet.kv_tokens // 16 if fleet.cache_info else None,
        updated_at=now,
    )
    pod.endpoint.sent_since_scrape = 0


def load_profile(clock, recent=None, weight: float = 1):
    """bench/routing's `load` profile (the precise one's load part, at weight 2)."""
    params = None if recent is None else {"recentSeconds": recent}
    return [
        (QueueScorer("q"), weight),
        (KVCacheUtilizationScorer("kv"), weight),
        (LeastRequestScorer("lr", params, clock=clock), weight),
    ]
