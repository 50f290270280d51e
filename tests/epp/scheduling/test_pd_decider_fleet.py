"""The adaptive P/D decider against never, always and the fixed threshold, in the simulated
fleet (pd_fleet_sim.py: the real pd-profile-handler over engines timed by the calibrated
llama-3.1-8b-h100 profile). Deterministic: seeded traces, simulated time.

The claim (issue 16): adaptive is never worse than the better of always/never-disaggregate by
more than noise, and better than the fixed threshold somewhere. Noise here is the spread
between seeds of the same point, a few percent of goodput (pd_grid.py over seeds 1, 5, 6: worst
2 %); the margin is 5 %.
"""

from __future__ import annotations

import pytest

from tests.epp.scheduling.pd_fleet_sim import Decider, Fleet, Mix, replay
from tests.epp.scheduling.pd_grid import ADAPTIVE, ALWAYS, FIXED, MIXES, NEVER

MARGIN = 0.05
SECONDS = 12.0
SEED = 3  # not one of the seeds the weights were chosen on

BENCH, LONG, RAG = MIXES.values()
POINTS = [
    # (mix, rate, prefill pods, decode pods): light and heavy load, each P:D split
    (BENCH, 20.0, 2, 2),
    (BENCH, 50.0, 1, 3),
    (BENCH, 80.0, 3, 1),
    (LONG, 6.0, 1, 3),
    (LONG, 12.0, 3, 1),
    (RAG, 16.0, 2, 2),
    (RAG, 24.0, 1, 3),
]


def goodput(fleet: Fleet, decider: Decider, mix: Mix, rate: float) -> float:
    return replay(fleet, decider, mix.trace(rate, SECONDS, SEED)).goodput


@pytest.mark.parametrize(("mix", "rate", "prefill", "decode"), POINTS)
def test_adaptive_is_never_worse_than_the_better_of_never_and_always(mix, rate, prefill, decode):
    fleet = Fleet(prefill=prefill, decode=decode, both=0)
    best = max(goodput(fleet, NEVER, mix, rate), goodput(fleet, ALWAYS, mix, rate))
    assert goodput(fleet, ADAPTIVE, mix, rate) >= (1 - MARGIN) * best


def test_adaptive_beats_the_fixed_threshold_where_the_prefill_pod_saturates():
    # One prefill pod for three decode pods: the fixed threshold keeps sending it every long
    # prompt and its queue grows without bound; adaptive prefills on the decode pods instead.
    fleet = Fleet(prefill=1, decode=3, both=0)
    fixed = goodput(fleet, FIXED, BENCH, 50.0)
    adaptive = goodput(fleet, ADAPTIVE, BENCH, 50.0)
    assert adaptive >= 1.3 * fixed


def test_the_fixed_threshold_decides_by_the_prompt_alone_whatever_the_load():
    """No weights: every 2,000-token prompt is disaggregated and no 150-token one, even with
    the one prefill pod far behind (as before the adaptive terms)."""
    fleet = Fleet(prefill=1, decode=3, both=0)
    reqs = replay(fleet, FIXED, BENCH.trace(50.0, 4.0, SEED)).reqs
    assert all((r.prefill_pod is not None) == r.arrival.long for r in reqs)
    adaptive = replay(fleet, ADAPTIVE, BENCH.trace(50.0, 4.0, SEED)).reqs
    assert any(r.arrival.long and r.prefill_pod is None for r in adaptive)  # load moved some
