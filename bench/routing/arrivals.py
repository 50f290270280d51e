"""When requests (or sessions) arrive: the arrival processes a workload's trace draws from.

Each draws from the trace's own random stream, so arrival times too depend only on the
workload, the rate, the duration and the seed. `rate` is always the long-run mean.

- poisson: exponential gaps, the coefficient of variation (CV) of gaps is 1.
- on-off (bursty): a Markov-modulated Poisson process with a silent state — exponential
  on and off periods, Poisson arrivals at about `rate × (on + off) / on` while on, none
  while off.
  Its gaps are a mix of short in-burst gaps and long silences: CV > 1, the shape of traffic
  that arrives in bursts (a batch job, a retry storm, a product launch).
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol

from infergw.bench.workload import poisson


class ArrivalProcess(Protocol):
    name: str

    def times(self, rng: random.Random, rate: float, duration: float) -> list[float]:
        """Sorted offsets in [0, duration) of arrivals at a mean of `rate` per second."""
        ...

    def describe(self) -> dict: ...


@dataclass(slots=True, frozen=True)
class Poisson:
    name: str = "poisson"

    def times(self, rng: random.Random, rate: float, duration: float) -> list[float]:
        return poisson(rng, rate, duration)

    def describe(self) -> dict:
        return {"arrivals": self.name}


@dataclass(slots=True, frozen=True)
class OnOff:
    on_s: float = 1.0  # mean length of a burst
    off_s: float = 2.0  # mean silence between bursts: bursts run at about 3× the mean rate
    name: str = "on-off"

    @property
    def peak_factor(self) -> float:
        return (self.on_s + self.off_s) / self.on_s

    def times(self, rng: random.Random, rate: float, duration: float) -> list[float]:
        bursts = self.bursts(rng, duration)
        on = sum(end - start for start, end in bursts)
        if not on:
            return []
        # A short trace has few bursts, and their chance total length would swing its load
        # two-fold: the burst rate is set so that this trace's mean is the asked rate.
        peak = rate * duration / on
        return [start + x for start, end in bursts for x in poisson(rng, peak, end - start)]

    def bursts(self, rng: random.Random, duration: float) -> list[tuple[float, float]]:
        """(start, end) of each burst: exponential on and off periods."""
        # Start in the state the process spends that share of its time in, so the first
        # seconds are not always a burst.
        on = rng.random() < self.on_s / (self.on_s + self.off_s)
        out, t = [], 0.0
        while t < duration:
            end = min(t + rng.expovariate(1 / (self.on_s if on else self.off_s)), duration)
            if on:
                out.append((t, end))
            t, on = end, not on
        return out

    def describe(self) -> dict:
        return {
            "arrivals": self.name,
            "burst_s": self.on_s,
            "silence_s": self.off_s,
            "peak_x_mean": round(self.peak_factor, 2),
        }


ARRIVALS: dict[str, ArrivalProcess] = {"poisson": Poisson(), "bursty": OnOff()}


def gap_cv(times: list[float]) -> float:
    """Coefficient of variation of the gaps between arrivals (1 for Poisson)."""
    gaps = [b - a for a, b in pairwise(times)]
    return statistics.pstdev(gaps) / statistics.fmean(gaps)
