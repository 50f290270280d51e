"""Pickers: turn scored endpoints into an ordered list (primary first, then fallbacks)."""

from __future__ import annotations

import random

from infergw.epp.scheduling.framework import Picker
from infergw.epp.scheduling.params import PluginParams, Seed, parse_params


class SeedParams(PluginParams):
    seed: Seed | None = None  # fixed for reproducible picks; none: random


class MaxScorePicker(Picker):
    """Highest score first; ties broken at random so equal pods share the load."""

    type_name = "max-score-picker"
    params_type = SeedParams

    def __init__(self, name, params=None):
        super().__init__(name, params)
        self._rng = random.Random(parse_params(self.params_type, self.params).seed)

    def pick(self, ctx, scored, count):
        shuffled = list(scored)
        self._rng.shuffle(shuffled)
        shuffled.sort(key=lambda es: es[1], reverse=True)  # stable: shuffle decides ties
        return [e for e, _ in shuffled[:count]]


class WeightedRandomPicker(Picker):
    """Random in proportion to score (A-Res: key = U^(1/score)); zero scores go last."""

    type_name = "weighted-random-picker"
    params_type = SeedParams

    def __init__(self, name, params=None):
        super().__init__(name, params)
        self._rng = random.Random(parse_params(self.params_type, self.params).seed)

    def pick(self, ctx, scored, count):
        if all(s <= 0 for _, s in scored):
            keyed = [(self._rng.random(), e) for e, _ in scored]
        else:
            keyed = [(self._rng.random() ** (1.0 / s) if s > 0 else -1.0, e) for e, s in scored]
        keyed.sort(key=lambda ke: ke[0], reverse=True)
        return [e for _, e in keyed[:count]]


class RandomPicker(Picker):
    type_name = "random-picker"
    params_type = SeedParams

    def __init__(self, name, params=None):
        super().__init__(name, params)
        self._rng = random.Random(parse_params(self.params_type, self.params).seed)

    def pick(self, ctx, scored, count):
        endpoints = [e for e, _ in scored]
        self._rng.shuffle(endpoints)
        return endpoints[:count]


class RoundRobinPicker(Picker):
    """The candidates in turn, by address, scores ignored: what a plain load balancer does,
    through the picker — the baseline that tells the picker's own latency from its choices
    (bench/routing's infergate-round-robin against vllm-router's round_robin)."""

    type_name = "round-robin-picker"

    def __init__(self, name, params=None):
        super().__init__(name, params)
        self._last = ""  # the address chosen last: the next is the first one after it

    def pick(self, ctx, scored, count):
        endpoints = sorted((e for e, _ in scored), key=lambda e: e.address)
        if not endpoints:
            return []
        start = next((i for i, e in enumerate(endpoints) if e.address > self._last), 0)
        ordered = endpoints[start:] + endpoints[:start]
        self._last = ordered[0].address
        return ordered[:count]
