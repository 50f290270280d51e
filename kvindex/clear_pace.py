"""How often a pod's entries may be cleared. A clear (AllBlocksCleared, an engine restart) is
a pass over the whole index (neither layout keeps a list of a pod's keys): one message of 500
[store, clear] pairs from a broken or hostile engine was 500 passes, 6 s of the picker's CPU
over 1.6 M entries. So a pod is cleared at most once per `CLEAR_EVERY` seconds; a clear within
that period waits for its end (`due()`, asked by the translator at each batch of any pod), and
what the pod stored meanwhile goes with it: missed hits for a moment, as late events give.
"""

from __future__ import annotations

import time

from infergw.kvindex.fault_log import FaultLog
from infergw.kvindex.unresolved import MAX_PODS

CLEAR_EVERY = 1.0  # seconds between two passes over the index clearing one pod


class ClearPace:
    """`every` 0: every clear at once (tests that compare the index with an exact model of
    the engine's cache)."""

    def __init__(self, faults: FaultLog, clock=time.monotonic, every: float = CLEAR_EVERY) -> None:
        self._faults = faults
        self._clock = clock
        self.every = every
        self._cleared_at: dict[str, float] = {}  # pod → when its entries were last cleared
        self._due: dict[str, float] = {}  # pod → when its deferred clear may run

    def now_or_later(self, pod: str) -> bool:
        """Whether `pod` may be cleared now (then it counts as cleared now); else its clear
        is deferred to the end of its period, counted and logged as `clears_deferred`."""
        now = self._clock()
        last = self._cleared_at.get(pod)
        if last is not None and now - last < self.every:
            self._due.setdefault(pod, last + self.every)
            self._faults.note(
                pod,
                "clears_deferred",
                f"cleared again within {self.every:g} s (AllBlocksCleared or a restart): the "
                "clear waits for the period's end",
            )
            return False
        self._due.pop(pod, None)
        if len(self._cleared_at) >= MAX_PODS and pod not in self._cleared_at:
            del self._cleared_at[next(iter(self._cleared_at))]
        self._cleared_at[pod] = now
        return True

    def due(self) -> list[str]:
        """The pods whose deferred clear may run now (each then counts as cleared now)."""
        if not self._due:
            return []
        now = self._clock()
        pods = [p for p, at in self._due.items() if at <= now]
        for pod in pods:
            del self._due[pod]
            self._cleared_at[pod] = now
        return pods

    def forget(self, pod: str) -> None:
        """`pod`'s deferred clear is moot (its entries went another way)."""
        self._due.pop(pod, None)
