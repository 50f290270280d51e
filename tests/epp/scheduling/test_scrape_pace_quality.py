"""Routing with fewer scrapes (epp/scrape_pace.py, issue 15): a busy pod the picker sends
nothing is scraped at the quiet pace, and the replays of bench/routing's no-reuse and
shared-prefix workloads route as well as with every pod scraped at the fast interval, with
a fraction of the pages. The replays run the real pace policy and the real plugins against
fleet_sim's pods."""

from __future__ import annotations

import pytest

from infergw.epp.scheduling.plugins.prefix_cache import PrefixCacheScorer
from tests.epp.scheduling.fleet_sim import (
    Fleet,
    SimClock,
    load_profile,
    no_reuse,
    replay,
    scheduler_route,
    shared_prefix,
)

FAST = 0.05
QUIET = 0.15  # the default quiet pace under the default staleness bounds
IDLE = 1.0


def approximate_profile(clock):
    """bench/routing's `approximate` profile: prefix affinity at 3, the load scorers at 2."""
    return [(PrefixCacheScorer("p"), 3), *load_profile(clock, weight=2)]


def run(profile, arrivals, quiet: float):
    clock = SimClock()
    fleet = Fleet(pods=8, quiet_interval=quiet, idle_interval=IDLE if quiet else 0.0)
    return replay(fleet, arrivals, scheduler_route(profile(clock)), clock)


CASES = {
    "no-reuse": (lambda clock: load_profile(clock, weight=2), no_reuse),
    "shared-prefix": (approximate_profile, shared_prefix),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("rate", [12.0, 20.0])
@pytest.mark.parametrize("seed", [7, 8])
def test_the_quiet_pace_routes_as_well_with_fewer_pages(case, rate, seed):
    profile, workload = CASES[case]
    arrivals = workload(rate, 20.0, seed)
    fast = run(profile, arrivals, 0.0)
    paced = run(profile, arrivals, QUIET)
    print(
        f"{case} {rate} req/s seed {seed}: p90 {fast.p(0.9) * 1000:.0f} -> "
        f"{paced.p(0.9) * 1000:.0f} ms, p50 {fast.p(0.5) * 1000:.0f} -> "
        f"{paced.p(0.5) * 1000:.0f}, pages {fast.scrapes} -> {paced.scrapes}"
    )
    assert paced.scrapes < 0.6 * fast.scrapes
    assert paced.p(0.9) <= 1.05 * fast.p(0.9)
    assert paced.p(0.5) <= 1.05 * fast.p(0.5)
