"""The load, latency and LoRA plugins, the test filter and the single-profile handler."""

from __future__ import annotations

import pytest

from infergw.epp.context import RequestContext
from infergw.epp.datastore import Endpoint, EndpointMetrics
from infergw.epp.errors import PickerError
from infergw.epp.scheduling.framework import Profile, ProfileResult
from infergw.epp.scheduling.plugins.header_filter import HEADER, HeaderBasedTestingFilter
from infergw.epp.scheduling.plugins.kv_cache_utilization import KVCacheUtilizationScorer
from infergw.epp.scheduling.plugins.least_latency import LeastLatencyScorer
from infergw.epp.scheduling.plugins.least_request import LeastRequestScorer, LowQueueFilter
from infergw.epp.scheduling.plugins.lora_affinity import LoraAffinityFilter, LoraAffinityScorer
from infergw.epp.scheduling.plugins.profile_handlers import SingleProfileHandler
from infergw.epp.scheduling.plugins.queue import QueueScorer
from infergw.epp.scheduling.plugins.random_scorer import RandomScorer
from infergw.epp.scheduling.plugins.running_requests import RunningRequestsScorer
from tests.request_fixtures import bare_context


def ep(i: int = 0, *, stale: bool = False, port: int = 8000, **metrics) -> Endpoint:
    e = Endpoint(name=f"p{i}-rank-0", pod=f"p{i}", address=f"10.0.0.{i}:{port}")
    e.metrics = EndpointMetrics(updated_at=1.0, **metrics)
    e.stale = stale
    return e


def req(target_model: str = "m", max_tokens: int | None = None, headers=None) -> RequestContext:
    return bare_context(target_model=target_model, max_tokens=max_tokens, headers=headers or {})


# ---- queue-scorer and running-requests-scorer ---------------------------------------------


@pytest.mark.parametrize(
    ("cls", "field"), [(QueueScorer, "waiting"), (RunningRequestsScorer, "running")]
)
class TestLowerIsBetterMetric:
    def test_min_max_normalized(self, cls, field):
        eps = [ep(0, **{field: 0}), ep(1, **{field: 5}), ep(2, **{field: 10})]
        assert cls("s").score(req(), eps) == pytest.approx([1.0, 0.5, 0.0])

    def test_all_equal_score_one(self, cls, field):
        eps = [ep(0, **{field: 7}), ep(1, **{field: 7})]
        assert cls("s").score(req(), eps) == [1.0, 1.0]

    def test_single_endpoint_scores_one(self, cls, field):
        assert cls("s").score(req(), [ep(0, **{field: 100})]) == [1.0]

    def test_stale_endpoint_scores_zero_and_does_not_skew_the_others(self, cls, field):
        eps = [ep(0, **{field: 2}), ep(1, stale=True, **{field: 0}), ep(2, **{field: 4})]
        assert cls("s").score(req(), eps) == pytest.approx([1.0, 0.0, 0.0])

    def test_all_stale_score_zero(self, cls, field):
        eps = [ep(0, stale=True), ep(1, stale=True)]
        assert cls("s").score(req(), eps) == [0.0, 0.0]

    def test_no_endpoints(self, cls, field):
        assert cls("s").score(req(), []) == []


def test_queue_and_running_scorers_read_their_own_metric():
    eps = [ep(0, waiting=0, running=9), ep(1, waiting=9, running=0)]
    assert QueueScorer("q").score(req(), eps) == [1.0, 0.0]
    assert RunningRequestsScorer("r").score(req(), eps) == [0.0, 1.0]


# ---- kv-cache-utilization-scorer ----------------------------------------------------------


def test_kv_scorer_is_one_minus_usage():
    eps = [ep(0, kv_usage=0.0), ep(1, kv_usage=0.25), ep(2, kv_usage=1.0)]
    assert KVCacheUtilizationScorer("kv").score(req(), eps) == pytest.approx([1.0, 0.75, 0.0])


def test_kv_scorer_stale_is_treated_as_full():
    eps = [ep(0, kv_usage=0.0, stale=True), ep(1, kv_usage=0.5)]
    assert KVCacheUtilizationScorer("kv").score(req(), eps) == [0.0, 0.5]


def test_a_fresh_endpoint_is_stale_until_scraped():
    never_scraped = Endpoint(name="n", pod="n", address="10.0.0.9:8000")
    assert KVCacheUtilizationScorer("kv").score(req(), [never_scraped]) == [0.0]
    assert QueueScorer("q").score(req(), [never_scraped]) == [0.0]


# ---- least-request ------------------------------------------------------------------------


def test_least_request_counts_in_flight_requests():
    eps = [ep(0), ep(1), ep(2)]
    for e, n in zip(eps, (4, 0, 2), strict=True):
        e.inflight_requests = n
    assert LeastRequestScorer("lr").score(req(), eps) == pytest.approx([0.0, 1.0, 0.5])


def test_least_request_ignores_staleness():
    # The picker's own counts are fresh even when a scrape is late.
    eps = [ep(0, stale=True), ep(1)]
    eps[1].inflight_requests = 3
    assert LeastRequestScorer("lr").score(req(), eps) == [1.0, 0.0]


def test_least_request_by_tokens():
    eps = [ep(0), ep(1)]
    eps[0].inflight_requests, eps[0].inflight_tokens = 1, 10_000
    eps[1].inflight_requests, eps[1].inflight_tokens = 5, 100
    assert LeastRequestScorer("lr", {"by": "tokens"}).score(req(), eps) == [0.0, 1.0]
    assert LeastRequestScorer("lr", {"by": "requests"}).score(req(), eps) == [1.0, 0.0]


def test_least_request_all_idle_scores_one():
    assert LeastRequestScorer("lr").score(req(), [ep(0), ep(1)]) == [1.0, 1.0]


def test_least_request_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="parameter by: invalid enum value 'bytes'"):
        LeastRequestScorer("lr", {"by": "bytes"})


# ---- low-queue-filter ---------------------------------------------------------------------


def test_low_queue_filter_drops_long_queues_and_stale_metrics():
    eps = [ep(0, waiting=3), ep(1, waiting=4), ep(2, waiting=0, stale=True), ep(3, waiting=1)]
    kept = LowQueueFilter("f", {"threshold": 3}).filter(req(), eps)
    assert kept == [eps[0], eps[3]]


def test_low_queue_filter_default_threshold():
    eps = [ep(0, waiting=128), ep(1, waiting=129)]
    assert LowQueueFilter("f").filter(req(), eps) == [eps[0]]


def test_low_queue_filter_keeps_everyone_when_everyone_would_go():
    eps = [ep(0, waiting=50), ep(1, stale=True)]
    assert LowQueueFilter("f", {"threshold": 1}).filter(req(), eps) == eps


# ---- least-latency-scorer -----------------------------------------------------------------


def with_latency(i: int, ttft: float | None, tpot: float | None = None) -> Endpoint:
    e = ep(i)
    e.ttft_ewma, e.tpot_ewma = ttft, tpot
    return e


def test_least_latency_without_history_scores_one():
    assert LeastLatencyScorer("ll").score(req(), [ep(0), ep(1)]) == [1.0, 1.0]


def test_least_latency_lower_expected_latency_wins():
    eps = [with_latency(0, 0.5, 0.01), with_latency(1, 0.1, 0.01), with_latency(2, 0.3, 0.01)]
    assert LeastLatencyScorer("ll").score(req(max_tokens=10), eps) == pytest.approx([0.0, 1.0, 0.5])


def test_least_latency_weighs_tpot_by_expected_output():
    fast_start = with_latency(0, ttft=0.1, tpot=0.01)  # 0.1 + 0.01 n
    fast_decode = with_latency(1, ttft=0.5, tpot=0.001)  # 0.5 + 0.001 n
    scorer = LeastLatencyScorer("ll", {"maxOutputTokens": 1000})
    assert scorer.score(req(max_tokens=10), [fast_start, fast_decode]) == [1.0, 0.0]
    assert scorer.score(req(max_tokens=1000), [fast_start, fast_decode]) == [0.0, 1.0]


def test_least_latency_output_is_capped_by_max_output_tokens():
    fast_start = with_latency(0, ttft=0.1, tpot=0.01)
    fast_decode = with_latency(1, ttft=0.5, tpot=0.001)
    capped = LeastLatencyScorer("ll", {"maxOutputTokens": 10})
    assert capped.score(req(max_tokens=1000), [fast_start, fast_decode]) == [1.0, 0.0]


def test_least_latency_default_output_without_max_tokens():
    fast_start = with_latency(0, ttft=0.1, tpot=0.01)  # 2.66 s at 256 tokens
    fast_decode = with_latency(1, ttft=0.5, tpot=0.001)  # 0.756 s
    assert LeastLatencyScorer("ll").score(req(), [fast_start, fast_decode]) == [0.0, 1.0]


def test_least_latency_new_endpoints_get_tried():
    eps = [with_latency(0, 0.2), with_latency(1, None), with_latency(2, 0.4)]
    assert LeastLatencyScorer("ll").score(req(), eps) == [1.0, 1.0, 0.0]


def test_least_latency_missing_tpot_counts_as_zero():
    eps = [with_latency(0, 0.2, None), with_latency(1, 0.1, 0.01)]
    assert LeastLatencyScorer("ll").score(req(max_tokens=100), eps) == [1.0, 0.0]


# ---- LoRA affinity ------------------------------------------------------------------------


def lora_ep(i, running=(), waiting=(), max_loras=2) -> Endpoint:
    return ep(
        i,
        running_loras=frozenset(running),
        waiting_loras=frozenset(waiting),
        max_loras=max_loras,
    )


ACTIVE = lora_ep(0, running={"ad"})  # 1.0
FREE_SLOT = lora_ep(1, running={"x"})  # 0.8
WAITING = lora_ep(2, running={"x"}, waiting={"ad"})  # 0.6 (no free slot: x + ad = 2)
FULL = lora_ep(3, running={"x", "y"})  # 0.0


def test_lora_affinity_tiers():
    scores = LoraAffinityScorer("l").score(req("ad"), [ACTIVE, FREE_SLOT, WAITING, FULL])
    assert scores == [1.0, 0.8, 0.6, 0.0]


def test_lora_active_beats_everything_even_when_full():
    full_but_active = lora_ep(0, running={"ad", "x"}, waiting={"y"})
    assert LoraAffinityScorer("l").score(req("ad"), [full_but_active]) == [1.0]


def test_lora_free_slot_counts_running_and_waiting_adapters():
    one_slot_left = lora_ep(0, running={"x"}, waiting={"y"}, max_loras=3)
    no_slot = lora_ep(1, running={"x"}, waiting={"y"}, max_loras=2)
    assert LoraAffinityScorer("l").score(req("ad"), [one_slot_left, no_slot]) == [0.8, 0.0]


def test_lora_unknown_capacity_counts_as_free():
    assert LoraAffinityScorer("l").score(req("ad"), [lora_ep(0, max_loras=None)]) == [0.8]


def test_lora_uses_the_target_model():
    assert LoraAffinityScorer("l").score(req("x"), [WAITING]) == [1.0]


@pytest.mark.parametrize(
    ("eps", "kept"),
    [
        ([FULL, WAITING, ACTIVE, FREE_SLOT], [ACTIVE]),
        ([FULL, WAITING, FREE_SLOT], [FREE_SLOT]),
        ([FULL, WAITING], [WAITING]),
        ([FULL], [FULL]),
        ([], []),
    ],
)
def test_lora_filter_keeps_the_best_non_empty_tier(eps, kept):
    assert LoraAffinityFilter("f").filter(req("ad"), eps) == kept


def test_lora_filter_keeps_every_endpoint_of_the_best_tier():
    other_active = lora_ep(5, running={"ad"})
    eps = [ACTIVE, FREE_SLOT, other_active]
    assert LoraAffinityFilter("f").filter(req("ad"), eps) == [ACTIVE, other_active]


# ---- random-scorer ------------------------------------------------------------------------


def test_random_scorer_gives_scores_in_range():
    scores = RandomScorer("r").score(req(), [ep(i) for i in range(50)])
    assert len(scores) == 50
    assert all(0.0 <= s < 1.0 for s in scores)
    assert len(set(scores)) > 1


def test_random_scorer_with_a_seed_is_reproducible():
    eps = [ep(i) for i in range(5)]
    a = RandomScorer("r", {"seed": 7}).score(req(), eps)
    b = RandomScorer("r", {"seed": 7}).score(req(), eps)
    assert a == b


# ---- header-based-testing-filter ----------------------------------------------------------


def test_header_filter_without_the_header_keeps_all():
    eps = [ep(0), ep(1)]
    assert HeaderBasedTestingFilter("h").filter(req(), eps) == eps
    assert HeaderBasedTestingFilter("h").filter(req(headers={HEADER: ""}), eps) == eps


def test_header_filter_by_ip_keeps_every_port_of_that_pod():
    eps = [ep(1, port=8000), ep(1, port=8002), ep(2, port=8000)]
    kept = HeaderBasedTestingFilter("h").filter(req(headers={HEADER: "10.0.0.1"}), eps)
    assert kept == eps[:2]


def test_header_filter_by_ip_port_is_exact():
    eps = [ep(1, port=8000), ep(1, port=8002), ep(2, port=8000)]
    kept = HeaderBasedTestingFilter("h").filter(req(headers={HEADER: "10.0.0.1:8002"}), eps)
    assert kept == [eps[1]]


def test_header_filter_mixed_list_with_spaces():
    eps = [ep(1, port=8000), ep(1, port=8002), ep(2, port=8000), ep(3, port=8000)]
    value = " 10.0.0.2 , 10.0.0.1:8000,,"
    kept = HeaderBasedTestingFilter("h").filter(req(headers={HEADER: value}), eps)
    assert kept == [eps[0], eps[2]]


def test_header_filter_unknown_address_keeps_nothing():
    eps = [ep(1)]
    assert HeaderBasedTestingFilter("h").filter(req(headers={HEADER: "10.9.9.9"}), eps) == []


def test_header_filter_ip_is_not_a_prefix_match():
    eps = [ep(1), Endpoint(name="x", pod="x", address="10.0.0.11:8000")]
    kept = HeaderBasedTestingFilter("h").filter(req(headers={HEADER: "10.0.0.1"}), eps)
    assert kept == [eps[0]]


# ---- single-profile-handler ---------------------------------------------------------------


def test_single_profile_handler_runs_the_one_profile_once():
    h = SingleProfileHandler("h")
    profiles = {"p": Profile("p")}
    assert h.pick_profiles(req(), profiles, {}) == [profiles["p"]]
    done = {"p": ProfileResult([ep(0)])}
    assert h.pick_profiles(req(), profiles, done) == []
    result = h.process_results(req(), done)
    assert result.primary == "p"
    assert result.targets == done["p"].targets


def test_single_profile_handler_needs_exactly_one_profile():
    h = SingleProfileHandler("h")
    for profiles in ({}, {"a": Profile("a"), "b": Profile("b")}):
        with pytest.raises(PickerError) as info:
            h.pick_profiles(req(), profiles, {})
        assert info.value.status == 500


@pytest.mark.parametrize("result", [None, ProfileResult([])])
def test_single_profile_handler_no_targets_is_429(result):
    with pytest.raises(PickerError) as info:
        SingleProfileHandler("h").process_results(req(), {"p": result})
    assert info.value.status == 429
