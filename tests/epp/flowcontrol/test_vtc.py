"""The Virtual Token Counter's arithmetic: charges, weights, selection and the counter lift."""

from __future__ import annotations

import pytest

from infergw.epp.flowcontrol.vtc import VirtualTokenCounter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_defaults_are_the_papers_weights() -> None:
    vtc = VirtualTokenCounter()
    assert (vtc.input_weight, vtc.output_weight) == (1.0, 2.0)


def test_input_and_output_charges_add_weighted_tokens() -> None:
    vtc = VirtualTokenCounter(input_weight=1, output_weight=2)
    vtc.charge_input("a", 100)
    assert vtc.counter("a") == 100
    vtc.charge_output("a", 10)
    vtc.charge_output("a", 5)  # reports add up
    assert vtc.counter("a") == 100 + 2 * 15
    assert vtc.service("a") == 130
    assert vtc.counter("b") == 0


def test_custom_token_weights() -> None:
    vtc = VirtualTokenCounter(input_weight=0.5, output_weight=3)
    vtc.charge_input("a", 10)
    vtc.charge_output("a", 10)
    assert vtc.counter("a") == pytest.approx(5 + 30)


def test_flow_weight_divides_the_counter_but_not_the_service() -> None:
    vtc = VirtualTokenCounter(flow_weights={"gold": 4})
    vtc.charge_input("gold", 400)
    vtc.charge_input("plain", 400)
    assert vtc.counter("gold") == 100
    assert vtc.counter("plain") == 400
    assert vtc.service("gold") == vtc.service("plain") == 400
    assert vtc.weight("gold") == 4 and vtc.weight("plain") == 1


def test_refund_undoes_an_input_charge() -> None:
    vtc = VirtualTokenCounter()
    vtc.charge_input("a", 50)
    vtc.refund_input("a", 50)
    assert vtc.counter("a") == 0


def test_select_picks_the_smallest_counter_among_backlogged_flows() -> None:
    vtc = VirtualTokenCounter()
    assert vtc.select() is None
    for flow in ("a", "b", "c"):
        vtc.activate(flow)
    vtc.charge_input("a", 30)
    vtc.charge_input("b", 10)
    vtc.charge_input("c", 20)
    assert vtc.select() == "b"
    vtc.deactivate("b")  # no longer backlogged: never selected, however small
    assert vtc.select() == "c"


def test_ties_go_to_the_flow_backlogged_first() -> None:
    vtc = VirtualTokenCounter()
    vtc.activate("late")
    vtc.deactivate("late")
    vtc.activate("x")
    vtc.activate("y")
    assert vtc.select() == "x"


def test_lift_to_the_minimum_counter_of_the_backlogged_flows() -> None:
    vtc = VirtualTokenCounter()
    vtc.activate("a")
    vtc.activate("b")
    vtc.charge_input("a", 500)
    vtc.charge_input("b", 300)
    vtc.activate("new")  # it had been idle at 0: no credit for the idle time
    assert vtc.counter("new") == 300


def test_lift_never_lowers_a_counter() -> None:
    vtc = VirtualTokenCounter()
    vtc.charge_input("heavy", 1000)  # served while nobody else wanted anything
    vtc.activate("a")
    vtc.charge_input("a", 10)
    vtc.activate("heavy")
    assert vtc.counter("heavy") == 1000  # its debt is kept


def test_lift_to_the_last_flow_that_left_when_none_is_backlogged() -> None:
    vtc = VirtualTokenCounter()
    vtc.activate("a")
    vtc.charge_input("a", 700)
    vtc.deactivate("a")
    vtc.charge_output("a", 50)  # still being served after leaving the queue
    vtc.activate("b")  # the queue is empty: the paper lifts to the last client that left
    assert vtc.counter("b") == 800


def test_first_ever_activation_starts_at_zero() -> None:
    vtc = VirtualTokenCounter()
    vtc.activate("a")
    assert vtc.counter("a") == 0 and vtc.active == ["a"]


def test_activating_a_backlogged_flow_again_changes_nothing() -> None:
    vtc = VirtualTokenCounter()
    vtc.activate("a")
    vtc.activate("b")
    vtc.charge_input("b", 100)
    vtc.activate("b")
    assert vtc.counter("b") == 100
    assert vtc.is_active("b")


def test_returning_flow_loses_its_banked_credit() -> None:
    """b is idle while a is served 10,000 tokens; back, b competes from a's level."""
    vtc = VirtualTokenCounter()
    vtc.activate("a")
    vtc.activate("b")
    vtc.charge_input("a", 100)
    vtc.charge_input("b", 100)
    vtc.deactivate("b")
    for _ in range(100):
        vtc.charge_input("a", 100)
    vtc.activate("b")
    assert vtc.counter("b") == vtc.counter("a") == 10_100


def test_forget_idle_drops_only_idle_flows() -> None:
    clock = Clock()
    vtc = VirtualTokenCounter(clock=clock)
    vtc.charge_input("idle", 10)
    vtc.activate("busy")
    clock.now = 100
    vtc.charge_input("recent", 5)
    clock.now = 350
    assert vtc.forget_idle(300) == 1
    assert vtc.counters() == {"busy": 0.0, "recent": 5.0}


def test_forgetting_the_last_left_flow_keeps_its_counter_as_the_floor() -> None:
    clock = Clock()
    vtc = VirtualTokenCounter(clock=clock)
    vtc.activate("a")
    vtc.charge_input("a", 250)
    vtc.deactivate("a")
    clock.now = 1000
    vtc.forget_idle(300)
    assert "a" not in vtc.counters()
    vtc.activate("b")
    assert vtc.counter("b") == 250
