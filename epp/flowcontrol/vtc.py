"""The Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language Models", OSDI '24).

Each flow has a counter of the weighted tokens it was served, divided by its weight:
input tokens count `w_in` each and are charged when a request is dispatched; output tokens
count `w_out` each and are charged as they are reported. The backlogged flow with the smallest
counter goes next.

The counter lift is what keeps an idle flow from banking credit: when a flow becomes backlogged
again (no queued request → one), its counter rises to the smallest counter among the other
backlogged flows, or, when none is backlogged, to the counter of the flow that left the queue
last. `max` never lowers a counter, so a flow that overspent keeps its debt.

One instance serves one priority band; nothing here is async or allocates per token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


class VirtualTokenCounter:
    def __init__(
        self,
        input_weight: float = 1.0,
        output_weight: float = 2.0,
        flow_weights: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.flow_weights = dict(flow_weights or {})
        self.clock = clock
        self._counters: dict[str, float] = {}
        self._service: dict[str, float] = {}  # weighted tokens served, without lifts or weights
        self._touched: dict[str, float] = {}
        self._active: dict[str, int] = {}  # backlogged flow → activation order (tie-break)
        self._seq = 0
        self._last_left: str | None = None
        self._last_left_counter = 0.0  # its counter, once that flow is garbage-collected

    # ---- reads -------------------------------------------------------------------------------

    def weight(self, flow: str) -> float:
        return self.flow_weights.get(flow, 1.0)

    def counter(self, flow: str) -> float:
        return self._counters.get(flow, 0.0)

    def service(self, flow: str) -> float:
        """w_in·input + w_out·output tokens charged to the flow (not divided by its weight)."""
        return self._service.get(flow, 0.0)

    def is_active(self, flow: str) -> bool:
        return flow in self._active

    @property
    def active(self) -> list[str]:
        return list(self._active)

    def counters(self) -> dict[str, float]:
        return dict(self._counters)

    def in_order(self) -> list[str]:
        """Backlogged flows, the one `select` would pick first."""
        counters = self._counters
        return sorted(self._active, key=lambda f: (counters.get(f, 0.0), self._active[f]))

    def select(self) -> str | None:
        """The backlogged flow with the smallest counter; ties go to the earliest backlogged."""
        if not self._active:
            return None
        counters = self._counters
        return min(self._active, key=lambda f: (counters.get(f, 0.0), self._active[f]))

    # ---- backlog transitions -----------------------------------------------------------------

    def activate(self, flow: str) -> None:
        """The flow got its first queued request: lift its counter, then mark it backlogged."""
        if flow in self._active:
            return
        current = self._counters.get(flow, 0.0)
        if self._active:
            floor = min(self._counters.get(f, 0.0) for f in self._active)
        elif self._last_left is not None:
            floor = self._counters.get(self._last_left, 0.0)
        else:
            floor = self._last_left_counter
        self._counters[flow] = max(current, floor)
        self._seq += 1
        self._active[flow] = self._seq
        self._touched[flow] = self.clock()

    def deactivate(self, flow: str) -> None:
        """The flow has no queued request left (dispatched, expired or cancelled)."""
        if self._active.pop(flow, None) is not None:
            self._last_left = flow
            self._touched[flow] = self.clock()

    # ---- charges -----------------------------------------------------------------------------

    def charge_input(self, flow: str, tokens: float) -> None:
        self._charge(flow, self.input_weight * tokens)

    def charge_output(self, flow: str, tokens: float) -> None:
        self._charge(flow, self.output_weight * tokens)

    def refund_input(self, flow: str, tokens: float) -> None:
        """Undo a dispatch charge for a request that never ran (its client left at once)."""
        self._charge(flow, -self.input_weight * tokens)

    def _charge(self, flow: str, cost: float) -> None:
        if cost == 0:
            return
        self._counters[flow] = self._counters.get(flow, 0.0) + cost / self.weight(flow)
        self._service[flow] = self._service.get(flow, 0.0) + cost
        self._touched[flow] = self.clock()

    # ---- housekeeping ------------------------------------------------------------------------

    def forget_idle(self, idle_after: float, now: float | None = None) -> int:
        """Drop flows neither backlogged nor charged for `idle_after` seconds.

        Safe for fairness: a returning flow starts at 0 and is lifted on activation.
        """
        now = self.clock() if now is None else now
        stale = [
            f for f, t in self._touched.items() if f not in self._active and now - t >= idle_after
        ]
        for f in stale:
            if f == self._last_left:
                self._last_left_counter = self._counters.get(f, 0.0)
                self._last_left = None
            self._counters.pop(f, None)
            self._service.pop(f, None)
            del self._touched[f]
        return len(stale)
