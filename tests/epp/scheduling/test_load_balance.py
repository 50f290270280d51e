"""Load balance (issue 16): never worse than round robin with no reuse. The replays run the
real plugins against fleet_sim's pods."""

from __future__ import annotations

import pytest

from infergw.epp.context import RequestContext
from infergw.epp.datastore import Endpoint
from infergw.epp.scheduling.framework import Profile, Scheduler, WeightedScorer
from infergw.epp.scheduling.plugins.kv_cache_utilization import KVCacheUtilizationScorer
from infergw.epp.scheduling.plugins.least_request import LeastRequestScorer
from infergw.epp.scheduling.plugins.pickers import MaxScorePicker
from infergw.epp.scheduling.plugins.profile_handlers import SingleProfileHandler
from infergw.epp.scheduling.plugins.queue import QueueScorer
from tests.epp.scheduling.fleet_sim import (
    Fleet,
    SimClock,
    no_reuse,
    replay,
    round_robin,
    scheduler_route,
)
from tests.request_fixtures import bare_context


def load_profile(clock, recent=None, weight: float = 1):
    """bench/routing's `load` profile (the precise one's load part, at weight 2)."""
    params = None if recent is None else {"recentSeconds": recent}
    return [
        (QueueScorer("q"), weight),
        (KVCacheUtilizationScorer("kv"), weight),
        (LeastRequestScorer("lr", params, clock=clock), weight),
    ]


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
