"""The sidecar's decision (runtime/reconcile.py): what one pass does from what it sees."""

from __future__ import annotations

from infergw.api.lora_adapters import Adapter, Refused
from infergw.runtime.reconcile import (
    FAILED,
    LOADED,
    MAX_BACKOFF,
    PENDING,
    State,
    Step,
    decide,
    statuses,
)

A = Adapter("a", "hf://org/a", "/models/lora/a", download=True)
B = Adapter("b", "file:///adapters/b", "/adapters/b")


def test_loads_what_is_missing_and_downloads_first_what_is_not_present() -> None:
    steps = decide({"a": A, "b": B}, set(), set(), State(), now=0)
    assert steps == [Step("download", "a"), Step("load", "b")]
    assert decide({"a": A}, set(), {"a"}, State(), now=0) == [Step("load", "a")]


def test_nothing_to_do_when_the_engine_serves_what_is_wanted() -> None:
    assert decide({"a": A, "b": B}, {"a", "b"}, {"a"}, State(), now=0) == []


def test_unloads_what_is_served_and_not_wanted() -> None:
    assert decide({"a": A}, {"a", "old"}, {"a"}, State(), now=0) == [Step("unload", "old")]
    assert decide({}, {"a", "b"}, set(), State(), now=0) == [
        Step("unload", "a"),
        Step("unload", "b"),
    ]


def test_an_adapter_whose_source_changed_is_unloaded_then_loaded_again() -> None:
    state = State(loaded={"a": A})
    moved = Adapter("a", "hf://org/a2", "/models/lora/a", download=True)
    assert decide({"a": moved}, {"a"}, {"a"}, state, now=0) == [Step("unload", "a")]
    state.loaded.pop("a")  # what a successful unload does
    assert decide({"a": moved}, set(), {"a"}, state, now=0) == [Step("load", "a")]


def test_an_adapter_served_before_the_sidecar_started_is_adopted() -> None:
    """Loaded by an earlier incarnation of the sidecar: nothing recorded, nothing done."""
    assert decide({"a": A}, {"a"}, set(), State(), now=0) == []


def test_failures_back_off_per_adapter_doubling_up_to_the_cap() -> None:
    state = State()
    waits = []
    for _ in range(9):
        attempts = state.of("a")
        attempts.failed("LoadFailed", "the engine answered 400: rank too large", 100.0, MAX_BACKOFF)
        waits.append(attempts.retry_at - 100.0)
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert decide({"a": B, "b": B}, set(), set(), state, now=159) == [Step("load", "b")]
    assert Step("load", "a") in decide({"a": B}, set(), set(), state, now=160)
    state.succeeded("a")
    assert "a" not in state.attempts


def test_an_engine_that_restarted_forgets_what_was_loaded() -> None:
    state = State(loaded={"a": A, "b": B})
    state.forget_unserved({"b"})
    assert state.loaded == {"b": B}


def test_statuses_say_loaded_pending_or_failed_with_the_reason() -> None:
    state = State()
    state.of("b").failed("SourceNotFound", "org/b: HTTP 404", 0, MAX_BACKOFF)
    c = Adapter("c", "hf://org/c", "/models/lora/c", download=True)
    out = statuses({"a": A, "b": B, "c": c}, {"a"}, [Refused("../x", "bad name")], state)
    assert [(s.name, s.state, s.reason) for s in out] == [
        ("a", LOADED, None),
        ("b", FAILED, "SourceNotFound"),
        ("c", PENDING, None),
        ("../x", FAILED, "InvalidAdapter"),
    ]
    assert out[1].message == "org/b: HTTP 404" and out[1].failures == 1


def test_an_adapter_failing_for_days_keeps_its_capped_back_off() -> None:
    """Past ~1024 failures 2**n no longer fits a float: the back-off must stay at the cap
    (it raised, so the adapter was retried on every pass and each pass logged a traceback)."""
    attempts = State().of("a")
    for _ in range(5000):
        attempts.failed("LoadFailed", "no such file", 100.0, MAX_BACKOFF)
    assert attempts.retry_at == 100.0 + MAX_BACKOFF and attempts.failures == 5000
