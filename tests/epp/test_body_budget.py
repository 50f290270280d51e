"""epp/body_budget.py: the shared budget, one stream's share of it, and the body accumulator
the picker and the body-based router both gather request bodies with."""

from __future__ import annotations

import pytest

from infergw.epp.body_budget import BodyAccumulator, BodyBudget, BudgetShare
from infergw.epp.errors import PickerError


def test_a_share_settles_to_what_it_keeps_and_gives_everything_back():
    budget = BodyBudget(100)
    share = BudgetShare(budget)
    share.take(60)
    share.settle(20)  # parsing done: the request keeps less than it briefly held
    assert (share.held, budget.held) == (20, 20)
    share.settle(35)
    assert (share.held, budget.held) == (35, 35)
    share.release()
    assert (share.held, budget.held) == (0, 0)


def test_the_accumulator_refuses_a_chunk_past_the_limit_before_holding_it():
    budget = BodyBudget(1000)
    body = BodyAccumulator(BudgetShare(budget), limit=10)
    body.add(b"12345678")
    with pytest.raises(PickerError) as info:
        body.add(b"abc")
    assert info.value.status == 413 and "limit of 10 bytes" in info.value.message
    assert len(body) == 8 and budget.held == 8


def test_the_accumulator_charges_each_chunk_and_the_copy_before_it_is_made():
    budget = BodyBudget(1000)
    share = BudgetShare(budget)
    body = BodyAccumulator(share, limit=100)
    body.add(b"ab")
    body.add(b"cd")
    assert share.held == 4
    assert body.take_all(charge_per_byte=3) == b"abcd"
    assert share.held == 4 + 3 * 4 and len(body) == 0


def test_a_copy_the_budget_cannot_carry_is_429_and_not_made():
    budget = BodyBudget(10)
    share = BudgetShare(budget)
    body = BodyAccumulator(share, limit=100)
    body.add(b"x" * 6)
    with pytest.raises(PickerError) as info:
        body.take_all()
    assert info.value.status == 429 and info.value.headers["retry-after"]
    assert len(body) == 6 and share.held == 6  # nothing copied, nothing more taken
    share.release()
    assert budget.held == 0
