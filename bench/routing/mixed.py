"""A reusable workload mixed with traffic that shares nothing (a one-off summarisation, a
batch job's unique documents): what prefix-aware routing is worth when only part of the
traffic can reuse a cache, and whether the rest crowds the reusable prefixes out.

The two parts are independent traces at rate × (1 − fraction) and rate × fraction, merged
in time; each gets its own seed drawn from the trace's, so the mix stays reproducible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

from infergw.bench.routing.workloads import Arrival


class Workload(Protocol):
    name: str

    def trace(self, rate: float, duration: float, seed: int) -> list[Arrival]: ...

    def describe(self) -> dict: ...


@dataclass(slots=True)
class Mixed:
    reusable: Workload
    no_reuse: Workload
    fraction: float = 0.5  # share of requests that reuse nothing
    name: str = "mixed"

    def trace(self, rate: float, duration: float, seed: int) -> list[Arrival]:
        rng = random.Random(seed)
        seeds = rng.getrandbits(32), rng.getrandbits(32)
        parts = []
        if self.fraction < 1:
            parts += self.reusable.trace(rate * (1 - self.fraction), duration, seeds[0])
        if self.fraction > 0:
            parts += self.no_reuse.trace(rate * self.fraction, duration, seeds[1])
        return sorted(parts, key=lambda a: a.at)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "no_reuse_fraction": self.fraction,
            "reusable": self.reusable.describe(),
            "no_reuse": self.no_reuse.describe(),
        }
