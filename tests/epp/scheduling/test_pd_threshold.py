"""The P/D decider's adaptive threshold (pd_threshold.py): its formula, and the fixed threshold
whenever an input cannot be trusted."""

from __future__ import annotations

import math

import pytest

from infergw.epp.datastore import Endpoint, EndpointMetrics
from infergw.epp.scheduling.params import MAX_TOKENS
from infergw.epp.scheduling.plugins.pd_threshold import AdaptiveThreshold, backlog, batch


def ep(running: float = 0, waiting: float = 0, sent: int = 0, *, fresh: bool = True) -> Endpoint:
    e = Endpoint(name="p-rank-0", pod="p", address="10.0.0.1:8000")
    e.metrics = EndpointMetrics(waiting=waiting, running=running, updated_at=5.0 if fresh else 0)
    e.stale = not fresh
    e.sent_since_scrape = sent
    return e


ADAPTIVE = AdaptiveThreshold(256, decode_batch_weight=0.1, prefill_queue_weight=1.0)


def test_the_formula():
    # b = 20 + 5 + 5 = 30, q = 1 + 2 + 0 = 3: 256 × (1 + 3) / (1 + 3) = 256
    assert ADAPTIVE.tokens(ep(20, 5, 5), ep(1, 2)) == 256
    # a busy decode pod (b = 30), an idle prefill pod: 256 / 4 = 64
    assert ADAPTIVE.tokens(ep(30), ep()) == 64
    # an idle decode pod, 3 prompts ahead on the prefill pod: 256 × 4
    assert ADAPTIVE.tokens(ep(), ep(0, 3)) == 1024
    # not a whole number of tokens: rounded up (a request at the threshold disaggregates)
    assert ADAPTIVE.tokens(ep(2), ep()) == math.ceil(256 / 1.2)


def test_zero_weights_are_the_fixed_threshold_whatever_the_load():
    fixed = AdaptiveThreshold(256)
    for decode, prefill in ((ep(500), ep()), (ep(), ep(0, 500)), (ep(fresh=False), ep())):
        assert fixed.tokens(decode, prefill) == 256
        assert fixed.lowest(decode) == 256


def test_zero_base_never_disaggregates():
    off = AdaptiveThreshold(0, decode_batch_weight=1.0, prefill_queue_weight=1.0)
    assert off.tokens(ep(1000), ep()) == 0
    assert off.lowest(ep(1000)) == 0


def test_clamped_to_the_bounds():
    t = AdaptiveThreshold(256, 1.0, 1.0, minimum=32, maximum=2048)
    assert t.tokens(ep(10_000), ep()) == 32
    assert t.tokens(ep(), ep(10_000)) == 2048
    assert AdaptiveThreshold(256, 1.0, 0.0).tokens(ep(10**9), ep()) == 1  # default minimum


def test_huge_loads_and_weights_do_not_overflow():
    t = AdaptiveThreshold(MAX_TOKENS, 1e6, 1e6)
    assert t.tokens(ep(), ep(1e300, 1e300)) == MAX_TOKENS
    assert t.tokens(ep(1e300), ep()) == 1


@pytest.mark.parametrize(
    "bad",
    [
        ep(fresh=False),  # never scraped / stale
        ep(float("nan")),
        ep(float("inf")),
        ep(-1),
        ep(0, float("nan")),
        ep(0, -3),
    ],
)
def test_metrics_it_cannot_trust_give_the_fixed_threshold(bad):
    assert batch(bad) is None and backlog(bad) is None
    assert ADAPTIVE.tokens(bad, ep()) == 256  # the decode pod's
    assert ADAPTIVE.tokens(ep(30), bad) == 256  # the prefill pod's
    assert ADAPTIVE.lowest(bad) == 256


def test_a_term_without_weight_does_not_need_its_pods_metrics():
    decode_only = AdaptiveThreshold(256, decode_batch_weight=0.1)
    assert decode_only.tokens(ep(30), ep(fresh=False)) == 64
    queue_only = AdaptiveThreshold(256, prefill_queue_weight=1.0)
    assert queue_only.tokens(ep(fresh=False), ep(0, 3)) == 1024
    assert queue_only.lowest(ep(fresh=False)) == 256


def test_stale_flag_alone_counts_as_missing():
    e = ep(30)
    e.stale = True  # scraped once, but too long ago
    assert ADAPTIVE.tokens(e, ep()) == 256


def test_lowest_is_the_threshold_for_an_idle_prefill_pod_never_above_the_fixed_one():
    assert ADAPTIVE.lowest(ep(30)) == 64 == ADAPTIVE.tokens(ep(30), ep())
    assert ADAPTIVE.lowest(ep()) == 256
    assert AdaptiveThreshold(256, 0.1, 1.0, minimum=256).lowest(ep(30)) == 256


@pytest.mark.parametrize(
    "bounds",
    [
        {"minimum": 64, "maximum": 32},  # empty
        {"minimum": 512},  # above nonCachedTokens: an idle fleet's threshold would be 512, not 256
        {"maximum": 128},  # below it
    ],
)
def test_bounds_that_do_not_bracket_the_threshold_are_refused(bounds):
    with pytest.raises(ValueError, match="NonCachedTokens"):
        AdaptiveThreshold(256, 0.1, 1.0, **bounds)


def test_bounds_need_not_bracket_a_threshold_that_turns_pd_off():
    assert AdaptiveThreshold(0, 0.1, 1.0, minimum=64).tokens(ep(30), ep()) == 0


def test_sent_since_scrape_counts_as_load():
    assert batch(ep(2, 1, 4)) == 7
    assert backlog(ep(1, 1, 2)) == 4


def test_a_decode_pod_with_a_queue_past_the_limit_gets_no_raise_from_the_prefill_queue():
    limited = AdaptiveThreshold(256, 0.1, 1.0, decode_queue_limit=8)
    # 3 prompts ahead on the prefill pod: raised to 1024 while the decode pod has room ...
    assert limited.tokens(ep(0, 8), ep(0, 3)) == math.ceil(256 * 4 / 1.8)
    # ... and no higher than the fixed threshold once it has more than 8 waiting of its own,
    assert limited.tokens(ep(0, 9), ep(0, 3)) == 256
    # while its batch still lowers it: b = 30 + 9, 256 / 4.9.
    assert limited.tokens(ep(30, 9), ep()) == math.ceil(256 / 4.9)
    # A waiting count it cannot trust is no reason to cap; the batch term then falls back.
    assert limited.tokens(ep(0, float("nan")), ep(0, 3)) == 256
    assert AdaptiveThreshold(256, 0.1, 1.0).tokens(ep(0, 9), ep(0, 3)) > 256  # no limit


@pytest.mark.parametrize("bad", [-1, 1.5, "8", float("nan"), True])
def test_the_decode_queue_limit_is_a_count(bad):
    from infergw.epp.scheduling.plugins.pd_profile_handler import PDProfileHandler

    with pytest.raises(ValueError, match="decodeQueueLimit"):
        PDProfileHandler("pd", {"nonCachedTokens": 256, "decodeQueueLimit": bad})
    assert PDProfileHandler("pd", {"nonCachedTokens": 256}).adaptive.decode_queue_limit is None
