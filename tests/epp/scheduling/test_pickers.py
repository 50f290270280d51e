"""Pickers: scored endpoints → an ordered list, primary first (max-score, weighted, random)."""

from __future__ import annotations

from collections import Counter

import pytest

from infergw.epp.datastore import Endpoint
from infergw.epp.scheduling.plugins.pickers import (
    MaxScorePicker,
    RandomPicker,
    RoundRobinPicker,
    WeightedRandomPicker,
)
from tests.request_fixtures import bare_context

REQ = bare_context()


def eps(n: int) -> list[Endpoint]:
    return [Endpoint(name=f"p{i}", pod=f"p{i}", address=f"10.0.0.{i}:8000") for i in range(n)]


def scored(*scores: float) -> list[tuple[Endpoint, float]]:
    return list(zip(eps(len(scores)), scores, strict=True))


def names(picked: list[Endpoint]) -> list[str]:
    return [e.name for e in picked]


ALL_PICKERS = [MaxScorePicker, WeightedRandomPicker, RandomPicker]


@pytest.mark.parametrize("cls", ALL_PICKERS)
@pytest.mark.parametrize(("count", "expected"), [(0, 0), (1, 1), (3, 3), (10, 4)])
def test_count_is_honored_without_duplicates(cls, count, expected):
    picked = cls("p", {"seed": 1}).pick(REQ, scored(0.1, 0.5, 0.0, 0.9), count)
    assert len(picked) == expected
    assert len(set(names(picked))) == expected


@pytest.mark.parametrize("cls", ALL_PICKERS)
def test_empty_input(cls):
    assert cls("p").pick(REQ, [], 3) == []


@pytest.mark.parametrize("cls", ALL_PICKERS)
def test_input_is_not_modified(cls):
    items = scored(0.3, 0.1, 0.2)
    before = list(items)
    cls("p", {"seed": 3}).pick(REQ, items, 3)
    assert items == before


@pytest.mark.parametrize("cls", ALL_PICKERS)
def test_same_seed_same_choice(cls):
    items = scored(0.3, 0.3, 0.3, 0.5, 0.1)
    first = [names(cls("p", {"seed": 42}).pick(REQ, items, 3)) for _ in range(3)]
    assert first[0] == first[1] == first[2]


# ---- max-score-picker ---------------------------------------------------------------------


def test_max_score_orders_best_first():
    picked = MaxScorePicker("m").pick(REQ, scored(0.2, 0.9, 0.5, 0.7), 4)
    assert names(picked) == ["p1", "p3", "p2", "p0"]


def test_max_score_ties_all_come_before_lower_scores():
    items = scored(1.0, 0.5, 1.0, 1.0, 0.9)
    for seed in range(50):
        picked = MaxScorePicker("m", {"seed": seed}).pick(REQ, items, 4)
        assert set(names(picked[:3])) == {"p0", "p2", "p3"}
        assert names(picked)[3] == "p4"


def test_max_score_ties_are_broken_at_random():
    items = scored(1.0, 1.0, 1.0, 0.0)
    picker = MaxScorePicker("m", {"seed": 0})
    firsts = Counter(names(picker.pick(REQ, items, 1))[0] for _ in range(600))
    assert set(firsts) == {"p0", "p1", "p2"}
    assert all(n > 120 for n in firsts.values())  # each ~200 of 600


# ---- weighted-random-picker ---------------------------------------------------------------


def test_weighted_random_zero_scores_go_last():
    items = scored(0.0, 0.3, 0.0, 0.01, 1.0)
    for seed in range(100):
        picked = names(WeightedRandomPicker("w", {"seed": seed}).pick(REQ, items, 5))
        assert set(picked[:3]) == {"p1", "p3", "p4"}
        assert set(picked[3:]) == {"p0", "p2"}


def test_weighted_random_all_zero_is_uniform():
    items = scored(0.0, 0.0, 0.0)
    picker = WeightedRandomPicker("w", {"seed": 5})
    firsts = Counter(names(picker.pick(REQ, items, 1))[0] for _ in range(600))
    assert set(firsts) == {"p0", "p1", "p2"}
    assert all(n > 120 for n in firsts.values())


def test_weighted_random_higher_score_is_picked_more_often():
    items = scored(0.9, 0.1)
    picker = WeightedRandomPicker("w", {"seed": 1234})
    draws = 10_000
    firsts = Counter(names(picker.pick(REQ, items, 1))[0] for _ in range(draws))
    # A-Res: P(first) = score / total, so about 90%.
    assert 0.85 < firsts["p0"] / draws < 0.95


def test_weighted_random_proportions_over_three_endpoints():
    items = scored(0.6, 0.3, 0.1)
    picker = WeightedRandomPicker("w", {"seed": 99})
    draws = 10_000
    firsts = Counter(names(picker.pick(REQ, items, 1))[0] for _ in range(draws))
    assert firsts["p0"] > firsts["p1"] > firsts["p2"] > 0
    assert 0.5 < firsts["p0"] / draws < 0.7
    assert 0.05 < firsts["p2"] / draws < 0.15


def test_weighted_random_works_with_weighted_totals_above_one():
    # Profile totals are Σ score × weight, so they can exceed 1.
    items = scored(6.0, 2.0)
    picker = WeightedRandomPicker("w", {"seed": 7})
    firsts = Counter(names(picker.pick(REQ, items, 1))[0] for _ in range(4000))
    assert 0.68 < firsts["p0"] / 4000 < 0.82  # 6 / 8 = 0.75


# ---- random-picker ------------------------------------------------------------------------


def test_random_picker_ignores_scores():
    items = scored(1.0, 0.0, 0.0, 0.0)
    picker = RandomPicker("r", {"seed": 11})
    firsts = Counter(names(picker.pick(REQ, items, 1))[0] for _ in range(2000))
    assert set(firsts) == {"p0", "p1", "p2", "p3"}
    assert all(350 < n < 650 for n in firsts.values())  # each ~500


def test_random_picker_without_seed_still_works():
    assert len(RandomPicker("r").pick(REQ, scored(0.1, 0.2), 2)) == 2


# ---- round-robin-picker -------------------------------------------------------------------


def test_round_robin_takes_the_candidates_in_turn_whatever_their_scores():
    picker = RoundRobinPicker("rr")
    items = scored(1.0, 0.0, 0.5, 0.2)
    firsts = [names(picker.pick(REQ, list(reversed(items)), 2)) for _ in range(8)]
    assert [f[0] for f in firsts] == ["p0", "p1", "p2", "p3"] * 2
    assert all(len(set(f)) == 2 for f in firsts)  # the fallback is the next in turn
    assert firsts[0] == ["p0", "p1"]


def test_round_robin_goes_on_after_the_last_when_the_candidates_change():
    picker = RoundRobinPicker("rr")
    all4 = scored(0, 0, 0, 0)
    assert names(picker.pick(REQ, all4, 1)) == ["p0"]
    assert names(picker.pick(REQ, all4, 1)) == ["p1"]
    # p2 filtered out for this request: the turn passes to p3, then wraps.
    assert names(picker.pick(REQ, [all4[0], all4[1], all4[3]], 1)) == ["p3"]
    assert names(picker.pick(REQ, all4, 1)) == ["p0"]
    assert picker.pick(REQ, [], 1) == []
