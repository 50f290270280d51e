"""Property tests of the clear pacing and the fault log (kvindex/clear_pace.py, fault_log.py)
under any interleaving of clears, due-checks and time: a pod is never cleared twice within a
period, a deferred clear always runs once its period ends, and a flood logs one line per
(pod, kind) per interval however many faults it counts."""

from __future__ import annotations

import itertools
import logging

from hypothesis import given, settings
from hypothesis import strategies as st

from infergw.kvindex.clear_pace import ClearPace
from infergw.kvindex.fault_log import LOG_EVERY, FaultLog

EVERY = 1.0
PODS = ("a", "b", "c")

ops = st.lists(
    st.one_of(
        st.tuples(st.just("clear"), st.sampled_from(PODS)),
        st.tuples(st.just("due"), st.none()),
        st.tuples(st.just("wait"), st.floats(min_value=0, max_value=2.5)),
    ),
    max_size=80,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@settings(max_examples=300, deadline=None)
@given(ops)
def test_clears_are_paced_and_none_is_lost(steps):
    clock = Clock()
    pace = ClearPace(FaultLog(logging.getLogger("test.clear_pace"), clock), clock, EVERY)
    cleared: dict[str, list[float]] = {p: [] for p in PODS}  # when each pod was cleared
    owed: set[str] = set()  # pods whose last clear request has not run yet
    for op, arg in steps:
        if op == "wait":
            clock.now += arg
            continue
        if op == "clear":
            if pace.now_or_later(arg):
                cleared[arg].append(clock.now)
                owed.discard(arg)
            else:
                owed.add(arg)
        for pod in pace.due():
            cleared[pod].append(clock.now)
            owed.discard(pod)
    for times in cleared.values():
        assert all(b - a >= EVERY for a, b in itertools.pairwise(times)), times
    clock.now += EVERY  # a period later, every deferred clear is due
    assert set(pace.due()) == owed
    assert pace.due() == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(PODS), st.sampled_from(("skip", "refused")), st.floats(0, 60)),
        max_size=200,
    )
)
def test_a_flood_logs_once_per_pod_and_kind_per_interval(faults):
    clock = Clock()
    log = FaultLog(logging.getLogger("test.fault_log"), clock)
    logged: dict[tuple[str, str], list[float]] = {}
    for pod, kind, gap in faults:
        clock.now += gap
        if log.note(pod, kind, "bad"):
            logged.setdefault((pod, kind), []).append(clock.now)
    for times in logged.values():
        assert all(b - a >= LOG_EVERY for a, b in itertools.pairwise(times))
    assert set(logged) == {(p, k) for p, k, _ in faults}  # each (pod, kind)'s first is logged
