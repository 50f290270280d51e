"""Token buckets: exact admission within one refill, continuous refill, debt, units."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infergw.epp.ratelimit.buckets import TokenBuckets, parse_unit


@pytest.mark.parametrize(
    ("unit", "seconds"),
    [("second", 1), ("minute", 60), ("hour", 3600), ("day", 86400), (None, 1)],
)
def test_parse_unit(unit, seconds):
    assert parse_unit(unit) == seconds


@pytest.mark.parametrize("unit", ["week", "month", "Minute", "", "1m", 60])
def test_parse_unit_rejects_what_the_crd_rejects(unit):
    with pytest.raises(ValueError, match="must be one of second, minute, hour, day"):
        parse_unit(unit)


def test_hundred_per_minute_admits_exactly_a_hundred_at_once():
    b = TokenBuckets(100, 60)
    assert all(b.try_take("r", 1, now=0.0).allowed for _ in range(100))
    denied = b.try_take("r", 1, now=0.0)
    assert not denied.allowed
    # 100 tokens a minute refill one token every 0.6 s.
    assert denied.retry_after == pytest.approx(0.6)
    assert not b.try_take("r", 1, now=0.599).allowed
    assert b.try_take("r", 1, now=0.6).allowed
    assert not b.try_take("r", 1, now=0.6).allowed


def test_a_denied_take_spends_nothing_and_waits_for_the_missing_tokens():
    b = TokenBuckets(100, 60)
    assert b.try_take("r", 90, now=0.0).allowed
    denied = b.try_take("r", 20, now=0.0)  # 10 left, 10 missing: 6 s
    assert not denied.allowed and denied.retry_after == pytest.approx(6.0)
    assert b.level("r", now=0.0) == pytest.approx(10)
    assert b.try_take("r", 20, now=6.0).allowed


def test_refill_is_continuous_and_capped_at_capacity():
    b = TokenBuckets(100, 60)
    b.try_take("r", 100, now=0.0)
    assert b.level("r", now=30.0) == pytest.approx(50)
    assert b.level("r", now=45.0) == pytest.approx(75)
    assert b.level("r", now=3600.0) == 100  # an idle hour stores no more than one burst
    assert all(b.try_take("r", 1, now=3600.0).allowed for _ in range(100))
    assert not b.try_take("r", 1, now=3600.0).allowed


def test_more_than_the_capacity_can_never_be_taken():
    b = TokenBuckets(100, 60)
    t = b.try_take("r", 101, now=0.0)
    assert not t.allowed and math.isinf(t.retry_after)
    assert b.level("r", now=0.0) == 100  # and it took nothing


def test_charge_drives_the_bucket_negative_and_a_later_request_waits():
    b = TokenBuckets(10, 1)  # 10 tokens a second
    assert b.charge("r", 25, now=0.0) == pytest.approx(-15)
    wait = b.available("r", 1, now=0.0)
    assert not wait.allowed and wait.retry_after == pytest.approx(1.6)  # 16 tokens to refill
    assert not b.available("r", 1, now=1.5).allowed
    assert b.available("r", 1, now=1.6).allowed
    assert b.level("r", now=10.0) == 10


def test_available_spends_nothing():
    b = TokenBuckets(5, 1)
    for _ in range(10):
        assert b.available("r", 5, now=0.0).allowed
    assert b.level("r", now=0.0) == 5


def test_keys_are_independent():
    b = TokenBuckets(3, 60)
    assert b.try_take("a", 3, now=0.0).allowed
    assert not b.try_take("a", 1, now=0.0).allowed
    assert b.try_take("b", 3, now=0.0).allowed
    assert b.try_take(("r", "u1"), 3, now=0.0).allowed


def test_a_clock_stepping_back_neither_refills_nor_drains():
    b = TokenBuckets(10, 1)
    b.try_take("r", 10, now=100.0)
    assert not b.try_take("r", 1, now=50.0).allowed
    assert b.level("r", now=50.0) == 0
    assert b.try_take("r", 1, now=100.1).allowed


def test_negative_amounts_are_refused():
    b = TokenBuckets(10, 1)
    with pytest.raises(ValueError):
        b.try_take("r", -1, now=0.0)
    with pytest.raises(ValueError):
        b.charge("r", -1, now=0.0)


@pytest.mark.parametrize(("capacity", "unit"), [(0, 1), (10, 0)])
def test_bad_shapes_are_refused(capacity, unit):
    with pytest.raises(ValueError):
        TokenBuckets(capacity, unit)


def test_full_buckets_are_pruned_so_memory_follows_active_keys():
    b = TokenBuckets(10, 1)
    for i in range(5000):
        b.try_take(f"user-{i}", 10, now=float(i) / 1000)  # each key drained once
    # Buckets refill to full after one second; the bucket set was pruned on the way.
    assert len(b) < 2 * TokenBuckets.PRUNE_FLOOR + 1000
    b.prune(now=10_000.0)
    assert len(b) == 0
    b.try_take("x", 4, now=10_000.0)
    assert b.prune(now=10_000.0) == 0 and len(b) == 1  # not full: kept


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(1, 500),
    unit=st.sampled_from([1, 60, 3600]),
    steps=st.lists(st.tuples(st.floats(0, 5, allow_nan=False), st.integers(0, 600)), max_size=200),
)
def test_admitted_never_exceeds_one_burst_plus_the_refill(capacity, unit, steps):
    b = TokenBuckets(capacity, unit)
    now = admitted = 0.0
    for dt, n in steps:
        now += dt
        if b.try_take("k", n, now=now).allowed:
            admitted += n
        assert admitted <= capacity + now * capacity / unit + 1e-6
