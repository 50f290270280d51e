"""Load balance (issue 16): never worse than round robin with no reuse, and a bound on how far
cache affinity may pull load. The replays run the real plugins against fleet_sim's pods."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from infergw.epp.context import RequestContext
from infergw.epp.datastore import Endpoint, EndpointMetrics
from infergw.epp.request import parse_request
from infergw.epp.scheduling.framework import (
    Profile,
    ProfileResult,
    ResponseInfo,
    Scheduler,
    SchedulingResult,
    WeightedScorer,
)
from infergw.epp.scheduling.plugins.kv_cache_utilization import (
    usage_now,
)
from infergw.epp.scheduling.plugins.least_request import LeastRequestScorer
from infergw.epp.scheduling.plugins.pickers import MaxScorePicker
from infergw.epp.scheduling.plugins.precise_prefix_cache import PrecisePrefixCacheScorer
from infergw.epp.scheduling.plugins.prefill_backlog import PrefillBacklogScorer
from infergw.epp.scheduling.plugins.prefix_cache import PrefixCacheScorer
from infergw.epp.scheduling.plugins.profile_handlers import SingleProfileHandler
from infergw.kvindex.cache import KVCache
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.tokenize import PromptTokenizers
from infergw.stack.local import DEFAULT_MODEL_DIR
from tests.epp.scheduling.fleet_sim import (
    Fleet,
    SimClock,
    load_profile,
    no_reuse,
    replay,
    round_robin,
    scheduler_route,
    shared_prefix,
)
from tests.request_fixtures import bare_context


def scheduler(scorers, seed: int = 3) -> Scheduler:
    profile = Profile(
        "default",
        scorers=[WeightedScorer(s, w) for s, w in scorers],
        picker=MaxScorePicker("pick", {"seed": seed}),
    )
    return Scheduler({"default": profile}, SingleProfileHandler("h"), 1)


def send(sched: Scheduler, ctx: RequestContext, eps: list[Endpoint], now: float) -> Endpoint:
    """Schedule and count the request in flight on its pod, as epp/director.py does."""
    result = sched.schedule(ctx, eps)
    for ws in sched.profiles["default"].scorers:
        if hasattr(ws.scorer, "pre_request"):
            ws.scorer.pre_request(ctx, result)
    chosen = result.targets[0]
    chosen.inflight_requests += 1
    chosen.sent_since_scrape += 1
    chosen.last_sent_at = now
    return chosen


# ---- no reuse ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_no_reuse_ttft_p90_is_within_5_percent_of_round_robin(seed):
    # bench/routing's no-reuse point: 8 pods, 12 req/s, ~1,800 unique prompt tokens each.
    fleet, arrivals = Fleet(pods=8), no_reuse(12.0, seconds=30, seed=seed)
    rr = replay(fleet, arrivals, round_robin())
    clock = SimClock()
    ours = replay(fleet, arrivals, scheduler_route(load_profile(clock, weight=2)), clock)
    assert ours.p(0.9) <= 1.05 * rr.p(0.9)


def test_without_recency_equal_counts_pick_at_random_and_lose_to_round_robin():
    # The cause: a pod whose request was just sent (still prefilling) and one whose request is
    # decoding have the same in-flight count; picking at random among them lets prefills meet.
    fleet, arrivals = Fleet(pods=8), no_reuse(12.0, seconds=30, seed=7)
    rr = replay(fleet, arrivals, round_robin())
    clock = SimClock()
    old = replay(fleet, arrivals, scheduler_route(load_profile(clock, recent=0)), clock)
    assert old.p(0.9) > 1.2 * rr.p(0.9)


@pytest.mark.parametrize("seed", [7, 8])
def test_kv_usage_counts_what_was_sent_since_the_scrape(seed):
    # Busier (20 req/s on 8 pods) and scraped every 200 ms: without the pods' cache size the
    # scorer cannot add what was sent since, and it pulls towards the pod just chosen.
    arrivals = no_reuse(20.0, seconds=30, seed=seed)
    p90 = {}
    for info in (True, False):
        fleet = Fleet(pods=8, scrape_interval=0.2, cache_info=info)
        clock = SimClock()
        p90[info] = replay(fleet, arrivals, scheduler_route(load_profile(clock)), clock).p(0.9)
    assert p90[True] < 0.9 * p90[False]


def test_usage_now_adds_the_mean_in_flight_tokens_sent_since_the_scrape():
    (e,) = Fleet(pods=1).endpoints()
    e.metrics = EndpointMetrics(kv_usage=0.25, block_size=16, num_blocks=100, updated_at=1.0)
    e.inflight_requests, e.inflight_tokens, e.sent_since_scrape = 2, 800, 1
    assert usage_now(e) == pytest.approx(0.25 + 400 / 1600)
    e.sent_since_scrape = 9
    assert usage_now(e) == 1.0
    e.metrics.num_blocks = None  # the page does not say: the scrape's number alone
    assert usage_now(e) == 0.25


def test_a_burst_between_two_scrapes_spreads_evenly():
    # No scrape in between: the scraped numbers are the same for every pod all along.
    eps = Fleet(pods=8).endpoints()
    clock = SimClock()
    sched = scheduler(load_profile(clock))
    for i in range(20):
        clock.now = 0.001 * i
        send(sched, bare_context(prompt_text=f"{i} unique"), eps, clock.now)
    counts = [e.inflight_requests for e in eps]
    assert max(counts) - min(counts) <= 1 and sum(counts) == 20


def test_equal_counts_go_to_the_pod_sent_to_longest_ago():
    a, b, c = Fleet(pods=3).endpoints()
    for e, sent in ((a, 9.9), (b, 9.5), (c, 9.8)):
        e.inflight_requests, e.last_sent_at = 1, sent
    lr = LeastRequestScorer("lr", {"recentSeconds": 1.0}, clock=lambda: 10.0)
    assert lr.score(None, [a, b, c]) == pytest.approx([0.0, 1.0, 0.1 / 0.4])
    # Two in flight still count more than one just sent; older than the window, no extra.
    a.inflight_requests, a.last_sent_at = 2, 5.0
    b.last_sent_at = 9.99
    assert [lr.load(e, 10.0) for e in (a, b)] == pytest.approx([2.0, 1.99])


def test_the_window_defaults_to_the_pods_ttft_and_zero_turns_it_off():
    (e,) = Fleet(pods=1).endpoints()
    e.inflight_requests, e.last_sent_at, e.ttft_ewma = 1, 9.0, 2.0
    assert LeastRequestScorer("lr").load(e, 10.0) == pytest.approx(1.5)
    assert LeastRequestScorer("lr", {"recentSeconds": 0}).load(e, 10.0) == 1.0
    e.ttft_ewma = None  # not learnt yet: half a second
    assert LeastRequestScorer("lr").load(e, 9.25) == pytest.approx(1.5)


def test_by_tokens_the_recent_request_counts_its_mean_tokens():
    (e,) = Fleet(pods=1).endpoints()
    e.inflight_requests, e.inflight_tokens, e.last_sent_at = 2, 1000, 10.0
    lr = LeastRequestScorer("lr", {"by": "tokens", "recentSeconds": 1.0})
    assert lr.load(e, 10.0) == pytest.approx(1500.0)


# ---- affinity against load -------------------------------------------------------------------


def affinity_profile(prefix, clock):
    return [(prefix, 3), (LeastRequestScorer("lr", {"recentSeconds": 0}, clock=clock), 2)]


@pytest.mark.parametrize("bound", [2, 4])
def test_a_popular_prefix_stays_on_its_pod_until_the_bound_then_spills(bound):
    eps = Fleet(pods=4).endpoints()
    clock = SimClock()
    sched = scheduler(affinity_profile(PrefixCacheScorer("p", {"loadBound": bound}), clock))
    prompt = "system prompt shared by a burst " * 40
    first = send(sched, bare_context(prompt_text=prompt + "0"), eps, 0.0)
    picks = [send(sched, bare_context(prompt_text=f"{prompt}{i}"), eps, 0.0) for i in range(1, 9)]
    # Affinity holds while the pod is at most `bound` above the least loaded (0 elsewhere).
    assert picks[:bound] == [first] * bound
    spill = picks[bound]
    assert spill is not first
    # The spill pod was recorded: the prefix's next requests follow it while it is in bound.
    assert picks[bound + 1] is spill
    assert first.inflight_requests == bound + 1


def test_without_a_bound_affinity_takes_every_request():
    eps = Fleet(pods=4).endpoints()
    clock = SimClock()
    sched = scheduler(affinity_profile(PrefixCacheScorer("p", {"loadBound": None}), clock))
    prompt = "system prompt shared by a burst " * 40
    picks = [send(sched, bare_context(prompt_text=f"{prompt}{i}"), eps, 0.0) for i in range(8)]
    assert Counter(map(id, picks)).most_common(1)[0][1] == 8


def test_the_default_bound_is_four_and_is_in_the_parameters():
    assert PrefixCacheScorer("p").load_bound == 4
    assert PrecisePrefixCacheScorer("p").load_bound == 4
    with pytest.raises(ValueError, match="loadBound"):
        PrefixCacheScorer("p", {"loadBound": -1})


def completion(prompt: str) -> RequestContext:
    body = json.dumps({"model": "m", "prompt": prompt}).encode()
    return RequestContext(parse_request("/v1/completions", body, {}, max_body_bytes=1 << 20))


async def test_the_precise_scorer_spills_and_the_spill_pod_gets_the_speculative_entries():
    kv = KVCache(
        tokenizers=PromptTokenizers({"m": DEFAULT_MODEL_DIR}), index=KVBlockIndex(block_size=16)
    )
    precise = PrecisePrefixCacheScorer("precise", {"loadBound": 2}, kv=kv)
    eps = Fleet(pods=3).endpoints()
    sched = scheduler(affinity_profile(precise, SimClock()))
    prompt = " ".join(f"a new popular system prompt, part {i}" for i in range(40))
    picks = []
    for i in range(5):
        ctx = completion(f"{prompt} question {i}")
        await precise.prepare(ctx)
        picks.append(send(sched, ctx, eps, 0.0))
    first = picks[0]
    assert picks[1:3] == [first, first]  # 1 and 2 above the others: within the bound
    spill = picks[3]  # 3 above: affinity yields
    assert spill is not first
    ctx = completion(f"{prompt} question 9")
    await precise.prepare(ctx)
    held = precise.score(ctx, eps)
    assert held[eps.index(spill)] > 0.8  # speculative entries on the spill pod
    assert held[eps.index(first)] == 0.0  # still over the bound
    assert picks[4] is spill


# ---- the prefill backlog ---------------------------------------------------------------------


def backlog_profile(clock, learn: bool = True):
    """The `load` profile at weight 2 with the prefill-backlog scorer at 4, as bench/routing's
    profiles weigh it; learning its seconds a token from the answers unless told (150 µs)."""
    params = None if learn else {"secondsPerToken": 150e-6}
    return [*load_profile(clock, weight=2), (PrefillBacklogScorer("b", params, clock=clock), 4)]


@pytest.mark.parametrize(("pods", "rate", "seed"), [(8, 20.0, 7), (8, 20.0, 9), (4, 8.0, 8)])
def test_the_prefill_backlog_keeps_busier_fleets_near_round_robin(pods, rate, seed):
    # 2–2.5 requests a second a pod: counts alone were 1.10–1.22× round robin's p90 here.
    fleet, arrivals = Fleet(pods=pods), no_reuse(rate, seconds=30, seed=seed)
    rr = replay(fleet, arrivals, round_robin()).p(0.9)
    clock = SimClock()
    counts = replay(fleet, arrivals, scheduler_route(load_profile(clock, weight=2)), clock).p(0.9)
    clock = SimClock()
    ours = replay(fleet, arrivals, scheduler_route(backlog_profile(clock)), clock).p(0.9)
    assert ours <= 1.07 * rr
    assert ours < counts


def test_the_prefill_backlog_does_not_cost_shared_prefixes_their_affinity():
    fleet, arrivals = Fleet(pods=8), shared_prefix(20.0, seconds=30, seed=7)
    p90 = {}
    for backlog in (False, True):
        clock = SimClock()
        profile = [(PrefixCacheScorer("p"), 3), *load_profile(clock, weight=2)]
        if backlog:
            profile.append((PrefillBacklogScorer("b", clock=clock), 4))
        p90[backlog] = replay(fleet, arrivals, scheduler_route(profile), clock).p(0.9)
    assert p90[True] <= p90[False]


def sent_to(scorer: PrefillBacklogScorer, e: Endpoint, prompt_tokens: int) -> RequestContext:
    ctx = bare_context(prompt_text="w" * 4 * prompt_tokens)  # 4 characters a token
    scorer.pre_request(ctx, SchedulingResult({"default": ProfileResult([e])}, "default"))
    return ctx


def test_a_pod_waits_for_the_prefills_sent_to_it_then_is_free_again():
    a, b = Fleet(pods=2).endpoints()
    clock = SimClock()
    scorer = PrefillBacklogScorer("b", {"secondsPerToken": 1e-3}, clock=clock)
    sent_to(scorer, a, 1000)  # a second of prefill
    sent_to(scorer, a, 500)  # behind it: 1.5 s in all
    assert scorer.wait(a.address, 0.0) == pytest.approx(1.5)
    assert scorer.score(bare_context(), [a, b]) == [0.0, 1.0]
    clock.now = 1.2
    assert scorer.wait(a.address, 1.2) == pytest.approx(0.3)
    clock.now = 2.0  # done: a prompt sent now waits for nothing
    assert scorer.score(bare_context(), [a, b]) == [1.0, 1.0]
    sent_to(scorer, a, 100)
    assert scorer.wait(a.address, 2.0) == pytest.approx(0.1)


def answer(e: Endpoint, ttft: float, prompt: int, cached: int = 0, status: int = 200):
    info = ResponseInfo(e, status, prompt, 16)
    info.ttft, info.cached_tokens = ttft, cached
    return info


def test_seconds_a_token_are_learnt_from_answers_that_waited_for_no_prefill_of_ours():
    (a,) = Fleet(pods=1).endpoints()
    clock = SimClock()
    scorer = PrefillBacklogScorer("b", clock=clock)
    first = sent_to(scorer, a, 1000)  # nothing learnt yet: no backlog counted
    assert scorer.wait(a.address, 0.0) == 0.0
    second = sent_to(scorer, a, 1000)  # still alone: nothing ours is known to be ahead
    # Uncached tokens teach it: 0.3 s for 1,500 of 2,000 prompt tokens is 200 µs a token.
    scorer.post_response(first, answer(a, 0.3, 2000, cached=500))
    third = sent_to(scorer, a, 1000)
    assert scorer.wait(a.address, 0.0) == pytest.approx(0.2)
    # An answer that waited behind our own prefill would teach queueing: not learnt.
    scorer.post_response(sent_to(scorer, a, 1000), answer(a, 5.0, 1000))
    # Failed answers, short prompts and answers without a TTFT do not teach either.
    scorer.post_response(second, answer(a, 9.0, 1000, status=500))
    scorer.post_response(third, answer(a, 9.0, 10))
    clock.now = 10.0
    sent_to(scorer, a, 1000)
    assert scorer.wait(a.address, 10.0) == pytest.approx(0.2)
    # The next alone answer moves the average by a fifth of the difference.
    scorer.post_response(sent_to(scorer, a, 10), answer(a, 0.0, 0))  # 0 tokens: ignored
    clock.now = 20.0
    alone = sent_to(scorer, a, 1000)
    scorer.post_response(alone, answer(a, 0.7, 1000))
    assert scorer.per_token == pytest.approx(200e-6 + 0.2 * 500e-6)


@pytest.mark.parametrize("bad", [0, -1e-4, 2.0, float("nan"), float("inf"), "fast", True])
def test_seconds_per_token_must_be_a_positive_number_up_to_a_second(bad):
    with pytest.raises(ValueError, match="secondsPerToken"):
        PrefillBacklogScorer("b", {"secondsPerToken": bad})


def test_a_pod_that_leaves_is_forgotten():
    (a,) = Fleet(pods=1).endpoints()
    scorer = PrefillBacklogScorer("b", {"secondsPerToken": 1e-3}, clock=SimClock())
    sent_to(scorer, a, 1000)
    scorer.forget_server(a.address)
    assert scorer.wait(a.address, 0.0) == 0.0 and not scorer._done_at


def test_a_wait_counts_against_the_prompts_own_prefill_not_the_spread():
    a, b = Fleet(pods=2).endpoints()
    clock = SimClock()
    scorer = PrefillBacklogScorer("b", {"secondsPerToken": 1e-3}, clock=clock)
    sent_to(scorer, a, 100)  # 0.1 s
    clock.now = 0.095  # a is 5 ms from done; a 1,000-token prompt takes a second itself
    long_prompt = bare_context(prompt_text="w" * 4000)
    assert scorer.score(long_prompt, [a, b]) == pytest.approx([0.995, 1.0])
    # A prompt shorter than the wait: the wait itself is the scale.
    assert scorer.score(bare_context(prompt_text="w" * 4), [a, b]) == [0.0, 1.0]


@pytest.mark.parametrize("charge_cached", [True, False])
def test_a_pod_is_charged_every_prompt_token_or_only_those_it_did_not_hold(charge_cached):
    """chargeCachedTokens: false charges the share the prefix scorer saw the pod did not hold
    when it scored the request, not after its own pre_request recorded the prompt there."""
    clock = SimClock()
    prefix = PrefixCacheScorer("p")
    params = {"secondsPerToken": 1e-3, "chargeCachedTokens": charge_cached}
    backlog = PrefillBacklogScorer("b", params, clock=clock, plugins={"p": prefix})
    sched = scheduler([(prefix, 3), (backlog, 1)])  # prefix first: it records the prompt first
    eps = Fleet(pods=2).endpoints()
    prompt = "a system prompt every request shares " * 60
    first = send(sched, bare_context(prompt_text=prompt + "one?"), eps, 0.0)
    alone = backlog.wait(first.address, 0.0)  # nothing held: the whole prompt either way
    tokens = bare_context(prompt_text=prompt + "one?").request.approx_prompt_tokens
    assert alone == pytest.approx(tokens * 1e-3)
    second = send(sched, bare_context(prompt_text=prompt + "two?"), eps, 0.0)
    assert second is first  # affinity (3) over the backlog (1)
    added = backlog.wait(first.address, 0.0) - alone
    if charge_cached:
        assert added == pytest.approx(alone)
    else:
        assert 0 < added < 0.1 * alone  # the question and the last partial block
