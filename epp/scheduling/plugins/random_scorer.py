"""random-scorer: a uniform random score, to break ties or spread load blindly."""

from __future__ import annotations

import random

from infergw.epp.scheduling.framework import Scorer
from infergw.epp.scheduling.params import parse_params
from infergw.epp.scheduling.plugins.pickers import SeedParams


class RandomScorer(Scorer):
    type_name = "random-scorer"
    params_type = SeedParams

    def __init__(self, name, params=None):
        super().__init__(name, params)
        self._rng = random.Random(parse_params(self.params_type, self.params).seed)

    def score(self, ctx, endpoints):
        return [self._rng.random() for _ in endpoints]
