"""random-scorer: a uniform random score, to break ties or spread load blindly."""

from __future__ import annotations

import random

from epp.scheduling.framework import Scorer


class RandomScorer(Scorer):
    type_name = "random-scorer"

    def __init__(self, name, params=None):
        super().__init__(name, params)
        self._rng = random.Random(self.params.get("seed"))

    def score(self, req, endpoints):
        return [self._rng.random() for _ in endpoints]
