"""A simulated prefill/decode fleet running the real P/D scheduler: deterministic, in process.

Each pod is a vLLM-v1-like engine in miniature, timed by the simulator's own latency model
(simulator/latency.py, by default the calibrated llama-3.1-8b-h100 profile): a step decodes one
token for every running sequence first, then prefills prompt chunks within the token budget
(chunked prefill), and every sequence in the step waits for the whole step, so a prefill on a
pod with running sequences slows their tokens (the interference disaggregation removes). A
request's first token comes at the end of the step that finishes its prompt.

Disaggregated (the picker's decode pod got an x-prefiller-host-port): the prefill leg runs on
the prefill pod (one hop after arrival), then the decode pod pulls its KV (blocks × the
profile's per-block pull, one more hop) and computes the last prompt token in one of its
steps, which gives the first token; then it decodes there.

The picker side is the picker's: endpoints with role labels, the real pd-profile-handler,
filters, scorers and picker; each pod's metrics (waiting incl. KV pulls in flight, running,
KV use) scraped every `scrape_interval` at its own phase; between scrapes only the picker's
own counts move, as epp/director.py moves them for the destination and the P/D handler for the
prefill pod. The numbers are the model's, not a GPU's.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field

from infergw.api.names import ROLE_LABEL
from infergw.bench.routing.slo import Slo
from infergw.epp.datastore import Endpoint, EndpointMetrics
from infergw.epp.scheduling.framework import Profile, Scheduler, WeightedScorer
from infergw.epp.scheduling.plugins.least_request import LeastRequestScorer
from infergw.epp.scheduling.plugins.pd_filters import DecodeFilter, PrefillFilter
from infergw.epp.scheduling.plugins.pd_profile_handler import PDProfileHandler
from infergw.epp.scheduling.plugins.pickers import MaxScorePicker
from infergw.epp.scheduling.plugins.queue import QueueScorer
from infergw.simulator.latency import LatencyModel, StepWork, attention_pairs
from infergw.simulator.latency_profiles import KV_BLOCK_TOKENS, PROFILES
from tests.epp.scheduling.fleet_sim import SimClock
from tests.request_fixtures import bare_context

H100 = PROFILES["llama-3.1-8b-h100"].model
SLO = Slo()  # TTFT ≤ 1 s and TPOT ≤ 50 ms: issue 16's, as bench/routing judges goodput


@dataclass(frozen=True, slots=True)
class Mix:
    """bench/pd/workload.py's two kinds of request, its lengths as parameters."""

    long_share: float = 0.5
    long_prompt: int = 2000
    long_output: int = 16
    short_prompt: int = 150
    short_output: int = 128

    def trace(self, rate: float, seconds: float, seed: int) -> list[Arrival]:
        rng = random.Random(seed)
        out: list[Arrival] = []
        t = rng.expovariate(rate)
        while t < seconds:
            long = rng.random() < self.long_share
            prompt = self.long_prompt if long else self.short_prompt
            out.append(Arrival(t, prompt, self.long_output if long else self.short_output, long))
            t += rng.expovariate(rate)
        return out


@dataclass(frozen=True, slots=True)
class Arrival:
    at: float
    prompt: int
    output: int
    long: bool


@dataclass(frozen=True, slots=True)
class Fleet:
    prefill: int = 0  # prefill-only pods
    decode: int = 0  # decode-only pods
    both: int = 4  # pods of either role (aggregated serving; they may also prefill for others)
    latency: LatencyModel = H100
    token_budget: int = 8192  # vLLM's max_num_batched_tokens on an 80 GB GPU
    max_seqs: int = 256
    kv_tokens: int = 400_000  # ~52 GB of KV at 128 KiB a token
    scrape_interval: float = 0.05
    hop_s: float = 0.002  # the sidecar's extra request (each way of a P/D request's legs)

    @property
    def label(self) -> str:
        if not self.prefill and not self.decode:
            return f"{self.both} aggregated"
        return f"{self.prefill}P:{self.decode}D" + (f"+{self.both}" if self.both else "")


@dataclass(slots=True)
class _Job:
    """One leg of a request on one pod."""

    req: _Req
    prefill_left: int  # prompt tokens still to compute here
    computed: int  # tokens whose KV this pod holds for it
    decode_left: int  # tokens to sample here after the prompt (prefill leg: 0)
    leg: str  # "full", "prefill" or "decode"


@dataclass(slots=True)
class _Req:
    arrival: Arrival
    decode_pod: int
    prefill_pod: int | None
    first_token_at: float | None = None
    last_token_at: float | None = None
    done: bool = False

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival.at

    @property
    def tpot(self) -> float | None:
        n = self.arrival.output - 1
        if not self.done or n <= 0 or self.first_token_at is None or self.last_token_at is None:
            return None
        return (self.last_token_at - self.first_token_at) / n


@dataclass(slots=True)
class _Pod:
    endpoint: Endpoint
    waiting: list[_Job] = field(default_factory=list)
    running: list[_Job] = field(default_factory=list)
    pulling: int = 0  # decode legs whose KV is on its way (vLLM counts them as waiting)
    step: list[tuple[_Job, int]] = field(default_factory=list)  # (job, prompt tokens this step)
    busy_until: float = 0.0


@dataclass(frozen=True, slots=True)
class Decider:
    """The pd-profile-handler's parameters (nonCachedTokens 0: never disaggregate)."""

    non_cached_tokens: int
    decode_batch_weight: float = 0.0
    prefill_queue_weight: float = 0.0
    decode_queue_limit: int | None = None

    def params(self) -> dict:
        return {
            "nonCachedTokens": self.non_cached_tokens,
            "decodeBatchWeight": self.decode_batch_weight,
            "prefillQueueWeight": self.prefill_queue_weight,
            "decodeQueueLimit": self.decode_queue_limit,
        }


@dataclass(slots=True)
class Result:
    reqs: list[_Req]
    seconds: float  # the trace's length: goodput is per second of it

    def _pct(self, values: list[float], q: float) -> float:
        if not values:
            return math.inf
        s = sorted(values)
        return s[min(len(s) - 1, int(q * len(s)))]

    def ttft_p(self, q: float) -> float:
        return self._pct([r.ttft if r.ttft is not None else math.inf for r in self.reqs], q)

    def tpot_p(self, q: float) -> float:
        return self._pct([t for r in self.reqs if (t := r.tpot) is not None], q)

    def good(self, r: _Req) -> bool:
        ttft, tpot = r.ttft, r.tpot
        return (
            r.done
            and ttft is not None
            and ttft <= SLO.ttft_s
            and (tpot is None or tpot <= SLO.tpot_s)
        )

    @property
    def goodput(self) -> float:
        """Requests a second that met both SLOs."""
        return sum(self.good(r) for r in self.reqs) / self.seconds

    @property
    def disaggregated_share(self) -> float:
        return sum(r.prefill_pod is not None for r in self.reqs) / max(1, len(self.reqs))


def _endpoints(fleet: Fleet) -> list[Endpoint]:
    roles = ["prefill"] * fleet.prefill + ["decode"] * fleet.decode + ["both"] * fleet.both
    out = []
    for i, role in enumerate(roles):
        e = Endpoint(
            name=f"p{i}-rank-0",
            pod=f"p{i}",
            address=f"10.0.0.{i}:8000",
            labels={ROLE_LABEL: role},
        )
        e.metrics = EndpointMetrics(updated_at=1e-9, block_size=16, num_blocks=25_000)
        e.stale = False
        out.append(e)
    return out


def scheduler(decider: Decider, clock: SimClock) -> Scheduler:
    """examples/pd's profiles without the prefix scorers (no prompt here shares a prefix)."""

    def profile(name: str, role_filter) -> Profile:
        return Profile(
            name,
            filters=[role_filter],
            scorers=[
                WeightedScorer(QueueScorer("queue"), 1.0),
                WeightedScorer(LeastRequestScorer("least", clock=clock), 1.0),
            ],
            picker=MaxScorePicker("pick", {"seed": 1}),
        )

    profiles = {
        "decode": profile("decode", DecodeFilter("decode-filter")),
        "prefill": profile("prefill", PrefillFilter("prefill-filter")),
    }
    handler = PDProfileHandler("pd", decider.params())
    handler.configure(profiles)
    return Scheduler(profiles, handler, 1)


_TEXT: dict[int, str] = {}


def _prompt_text(tokens: int) -> str:
    """What the handler reads a prompt's length from (4 characters a token); one per length."""
    return _TEXT.setdefault(tokens, "abcd" * tokens)


def replay(
    fleet: Fleet, decider: Decider, arrivals: list[Arrival], horizon: float = 60.0
) -> Result:
    """Every arrival through the picker onto the fleet; requests unfinished `horizon` seconds
    after the last arrival count as missing both SLOs."""
    clock = SimClock()
    eps = _endpoints(fleet)
    pods = [_Pod(e) for e in eps]
    sched = scheduler(decider, clock)
    lat = fleet.latency
    reqs: list[_Req] = []
    # (time, order, kind, payload): arrivals, legs reaching a pod, step ends, scrapes
    events: list[tuple[float, int, str, object]] = []
    order = 0

    def push(t: float, kind: str, payload: object) -> None:
        nonlocal order
        heapq.heappush(events, (t, order, kind, payload))
        order += 1

    for a in arrivals:
        push(a.at, "arrive", a)
    for i in range(len(pods)):
        push(fleet.scrape_interval * i / len(pods), "scrape", i)
    end = (arrivals[-1].at if arrivals else 0.0) + horizon

    def start_step(i: int, now: float) -> None:
        pod = pods[i]
        if pod.step or not (pod.running or pod.waiting):
            return
        budget, work = fleet.token_budget, []
        prefill = decode = context = pairs = 0
        for job in pod.running:  # running first: decodes, then unfinished prompts
            if job.prefill_left == 0:
                work.append((job, 0))
                decode += 1
                context += job.computed
                budget -= 1
        for job in pod.running:
            if job.prefill_left and budget > 0:
                n = min(job.prefill_left, budget)
                work.append((job, n))
                prefill, context = prefill + n, context + job.computed
                pairs += attention_pairs(n, job.computed)
                budget -= n
        while pod.waiting and budget > 0 and len(pod.running) < fleet.max_seqs:
            job = pod.waiting.pop(0)
            pod.running.append(job)
            n = min(job.prefill_left, budget)
            work.append((job, n))
            prefill, context = prefill + n, context + job.computed
            pairs += attention_pairs(n, job.computed)
            budget -= n
        pod.step = work
        seconds = lat.work_seconds(StepWork(prefill, decode, context, pairs))
        pod.busy_until = now + seconds
        push(pod.busy_until, "step", i)

    def finish_step(i: int, now: float) -> None:
        pod = pods[i]
        for job, n in pod.step:
            r = job.req
            if n:
                job.prefill_left -= n
                job.computed += n
                if job.prefill_left:
                    continue
                # The step that finishes a prompt samples its first token.
                if job.leg == "prefill":
                    pod.running.remove(job)  # the picker counts no prefill leg in flight
                    blocks = math.ceil(r.arrival.prompt / KV_BLOCK_TOKENS)
                    push(now + lat.transfer_seconds(blocks) + fleet.hop_s, "pulled", r)
                    continue
                r.first_token_at = r.last_token_at = now
            else:
                job.computed += 1
                r.last_token_at = now
            job.decode_left -= 1
            if job.decode_left <= 0:
                pod.running.remove(job)
                r.done = True
                _release(pod.endpoint, r)
        pod.step = []

    def scrape(i: int, now: float) -> None:
        pod = pods[i]
        held = sum(j.computed for j in pod.running)
        pod.endpoint.metrics = EndpointMetrics(
            waiting=len(pod.waiting) + pod.pulling,
            running=len(pod.running),
            kv_usage=min(1.0, held / fleet.kv_tokens),
            block_size=16,
            num_blocks=fleet.kv_tokens // 16,
            updated_at=now,
        )
        pod.endpoint.sent_since_scrape = 0

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if now > end:
            break
        clock.now = now
        if kind == "arrive":
            a = payload
            assert isinstance(a, Arrival)
            r = _route(sched, eps, a, now)
            reqs.append(r)
            if r.prefill_pod is None:
                pods[r.decode_pod].waiting.append(_Job(r, a.prompt, 0, a.output, "full"))
                start_step(r.decode_pod, now)
            else:
                push(now + fleet.hop_s, "prefill", r)
        elif kind == "prefill":
            r = payload
            assert isinstance(r, _Req) and r.prefill_pod is not None
            pods[r.prefill_pod].waiting.append(_Job(r, r.arrival.prompt, 0, 0, "prefill"))
            pods[r.decode_pod].pulling += 1
            start_step(r.prefill_pod, now)
        elif kind == "pulled":
            r = payload
            assert isinstance(r, _Req)
            pod = pods[r.decode_pod]
            pod.pulling -= 1
            # The pulled KV is all but the last prompt token, which the decode pod computes.
            pod.waiting.append(_Job(r, 1, r.arrival.prompt - 1, r.arrival.output, "decode"))
            start_step(r.decode_pod, now)
        elif kind == "step":
            i = payload
            assert isinstance(i, int)
            finish_step(i, now)
            start_step(i, now)
        elif kind == "scrape":
            i = payload
            assert isinstance(i, int)
            scrape(i, now)
            if now + fleet.scrape_interval <= end:
                push(now + fleet.scrape_interval, "scrape", i)
    seconds = arrivals[-1].at if arrivals else 1.0
    return Result(reqs, max(seconds, 1e-9))


def _route(sched: Scheduler, eps: list[Endpoint], a: Arrival, now: float) -> _Req:
    ctx = bare_context(prompt_text=_prompt_text(a.prompt), max_tokens=a.output)
    result = sched.schedule(ctx, eps)
    decode = result.targets[0]
    prefill = result.results.get("prefill")
    # As epp/director.py counts its destination (the handler counted the prefill pod).
    decode.inflight_requests += 1
    decode.sent_since_scrape += 1
    decode.last_sent_at = now
    decode.inflight_tokens += a.prompt + a.output
    p = eps.index(prefill.targets[0]) if prefill is not None and prefill.targets else None
    return _Req(a, eps.index(decode), p)


def _release(e: Endpoint, r: _Req) -> None:
    """The request is answered: the destination's in-flight counts drop, as the director's."""
    e.inflight_requests -= 1
    e.inflight_tokens -= r.arrival.prompt + r.arrival.output
