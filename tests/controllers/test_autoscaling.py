"""controllers/autoscaling.py: recommendation and tolerance, panic entry and exit, stable
mode rate limits and stabilization windows, clamping, the cost-aware split, the P/D ratio."""

from __future__ import annotations

import pytest

from infergw.controllers.autoscaling import (
    CostTarget,
    PanicPolicy,
    Policy,
    Scaler,
    StepPolicy,
    enforce_ratio,
    recommend,
    split_by_cost,
)

RUNNING = {"running": 10.0}  # target: 10 running requests per replica


def policy(**kw) -> Policy:
    kw.setdefault("targets", RUNNING)
    return Policy(**kw)


def test_recommendation_is_the_ceiling_of_sum_over_target_and_the_largest_metric_wins():
    p = policy(targets={"running": 10.0, "waiting": 2.0})
    assert recommend({"running": 41, "waiting": 1}, p, current=2) == 5
    assert recommend({"running": 10, "waiting": 9}, p, current=2) == 5  # waiting dominates


def test_within_tolerance_the_size_stays():
    p = policy(tolerance=0.1)
    assert recommend({"running": 42}, p, current=4) == 4  # 5% over the target: stay
    assert recommend({"running": 46}, p, current=4) == 5  # 15% over: move
    assert recommend({"running": 0}, p, current=0) == 0


def test_panic_scales_up_fast_never_down_and_ends_after_the_hold():
    p = policy(
        panic=PanicPolicy(threshold_percent=200, percent=100, period=10, hold=30),
        up=StepPolicy(instances=1, period=60),
        down=StepPolicy(percent=100, period=10, window=10),
    )
    s = Scaler(p, min_replicas=1, max_replicas=100)
    assert s.step(0, {"running": 80}, current=2) == 4  # rec 8 ≥ 2×200%: panic, at most ×2
    assert s.panicking(0)
    assert s.step(5, {"running": 80}, current=4) == 4  # base is still 2 within the period
    assert s.step(15, {"running": 80}, current=4) == 8  # new period: base 4, ×2
    assert s.step(20, {"running": 5}, current=8) == 8  # in panic: never down
    assert s.panicking(40) and not s.panicking(51)  # last trigger at 15 + hold 30
    # after the hold, stable mode takes over and may scale down
    down = s.step(60, {"running": 5}, current=8)
    assert down < 8


def test_stable_scale_up_is_limited_per_period_with_or_and_and():
    base = {"panic": None, "tolerance": 0.0}
    loose = Scaler(
        policy(up=StepPolicy(instances=2, percent=50, period=60, select="Or"), **base),
        max_replicas=100,
    )
    tight = Scaler(
        policy(up=StepPolicy(instances=2, percent=50, period=60, select="And"), **base),
        max_replicas=100,
    )
    # rec 20 from 10: Or allows max(10+2, 15) = 15, And allows min(12, 15) = 12
    assert loose.step(0, {"running": 200}, current=10) == 15
    assert tight.step(0, {"running": 200}, current=10) == 12


def test_scale_down_waits_for_the_stabilization_window():
    p = policy(panic=None, tolerance=0.0, down=StepPolicy(percent=100, period=1, window=60))
    s = Scaler(p, min_replicas=1, max_replicas=50)
    assert s.step(0, {"running": 100}, current=10) == 10
    # load drops: the window still remembers a recommendation of 10
    assert s.step(30, {"running": 20}, current=10) == 10
    assert s.step(59, {"running": 20}, current=10) == 10
    assert s.step(61, {"running": 20}, current=10) == 2  # the high sample left the window


def test_scale_down_rate_limit():
    p = policy(panic=None, tolerance=0.0, down=StepPolicy(instances=3, period=60, window=0))
    s = Scaler(p, min_replicas=1, max_replicas=50)
    assert s.step(0, {"running": 10}, current=10) == 7  # at most 3 fewer per period


def test_clamped_to_min_and_max():
    s = Scaler(
        policy(panic=None, up=StepPolicy(percent=1000, period=1)), min_replicas=2, max_replicas=5
    )
    assert s.step(0, {"running": 1000}, current=3) == 5
    s = Scaler(
        policy(panic=None, down=StepPolicy(percent=100, period=1)), min_replicas=2, max_replicas=5
    )
    assert s.step(0, {"running": 0}, current=3) == 2


def test_cost_aware_split_fills_minimums_then_cheapest_packages():
    targets = [
        CostTarget("a100", min_replicas=1, max_replicas=6, cost=10),
        CostTarget("l4", min_replicas=0, max_replicas=6, cost=3),
    ]
    assert split_by_cost(1, targets, expansion_percent=200) == {"a100": 1, "l4": 0}
    # packages: l4 1,2,3 (cost 3,6,9), a100 1,2,2 (cost 10,20,20): cheapest first
    assert split_by_cost(4, targets, expansion_percent=200) == {"a100": 1, "l4": 3}
    assert split_by_cost(7, targets, expansion_percent=200) == {"a100": 1, "l4": 6}
    assert split_by_cost(8, targets, expansion_percent=200) == {"a100": 2, "l4": 6}
    assert split_by_cost(100, targets, expansion_percent=200) == {"a100": 6, "l4": 6}


@pytest.mark.parametrize(
    ("given", "kept"),
    [((1, 4), (2, 4)), ((6, 2), (6, 3)), ((3, 4), (3, 4))],
)
def test_prefill_decode_ratio_raises_the_short_role(given, kept):
    assert enforce_ratio(*given, low=0.5, high=2.0) == kept


# ---- demand: requests the pickers hold for want of a ready pod (scale from zero) ------------


def zero_to_ten(**kw) -> Scaler:
    kw.setdefault("up", StepPolicy(percent=100.0, period=15.0, window=60.0))
    kw.setdefault("down", StepPolicy(percent=100.0, period=15.0, window=60.0))
    return Scaler(policy(**kw), min_replicas=0, max_replicas=10)


def test_demand_starts_the_first_replica_at_once_whatever_the_up_window():
    s = zero_to_ten()
    assert s.step(0.0, {}, 0) == 0  # idle at zero stays at zero
    assert s.step(1.0, {}, 0, demand=3) == 1  # the up window holds a 0, demand does not wait
    s = zero_to_ten(up=StepPolicy(percent=100.0, period=15.0), panic=None)
    assert s.step(0.0, {}, 0, demand=1) == 1  # 100% of nothing is still one pod


def test_held_requests_keep_the_size_and_metrics_still_scale_up():
    s = zero_to_ten(down=StepPolicy(percent=100.0, period=15.0))
    assert s.step(0.0, {"running": 0.0}, 3, demand=2) == 3  # pods starting: do not shrink
    assert s.step(100.0, {"running": 0.0}, 3) == 0  # no demand, no window: down
    assert zero_to_ten().step(0.0, {"running": 40.0}, 1, demand=1) >= 2


def test_scale_to_zero_comes_a_down_window_after_the_last_demand():
    s = zero_to_ten(panic=None)
    assert s.step(0.0, {}, 0, demand=1) == 1
    assert s.step(15.0, {"running": 0.0}, 1) == 1  # idle, but the window remembers demand
    assert s.step(45.0, {"running": 0.0}, 1) == 1
    assert s.step(61.0, {"running": 0.0}, 1) == 0  # 60 s window past the last demand
    assert Scaler(policy(), min_replicas=1).step(0.0, {}, 1) == 1  # minReplicas still holds


# ---- why a step chose its size (the binding's status.targets[].reason) --------------------


def test_each_step_says_what_it_read_and_why_it_chose_its_size():
    s = Scaler(
        policy(
            up=StepPolicy(instances=2, period=15.0),
            down=StepPolicy(percent=100.0, period=15.0, window=60.0),
            panic=PanicPolicy(threshold_percent=400.0, percent=100.0, period=10.0, hold=30.0),
        ),
        min_replicas=1,
        max_replicas=6,
    )

    def step(t, running, current, demand=0.0):
        size = s.step(t, {"running": running}, current, demand)
        assert s.last.desired == size and s.last.current == current
        assert s.last.metrics == {"running": running} and s.last.demand == demand
        return size, s.last.recommended, s.last.reason

    assert step(0, 20, 2) == (2, 2, "WithinTolerance")
    assert step(1, 50, 2) == (4, 5, "RateLimited")  # 5 wanted, 2 more per period
    assert step(20, 50, 4) == (5, 5, "ScaleUp")
    assert step(21, 10, 5) == (5, 1, "StabilizationWindow")  # the window remembers 5
    assert step(30, 300, 5) == (6, 30, "MaxReplicas")  # panic (30 ≥ 5 × 400%), capped at 6
    assert s.panicking(30)
    assert step(100, 0, 0, demand=2) == (1, 1, "HeldRequests")  # from zero for a held request
