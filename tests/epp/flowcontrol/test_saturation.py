"""Saturation per endpoint and per candidate set, with GIE's thresholds as defaults."""

from __future__ import annotations

import pytest

from infergw.epp.datastore import Endpoint, EndpointMetrics
from infergw.epp.flowcontrol.config import SaturationConfig
from infergw.epp.flowcontrol.saturation import SaturationDetector

NOW = 1000.0


def endpoint(waiting: float = 0, kv: float = 0.0, age: float | None = 0.01, **kw) -> Endpoint:
    updated = 0.0 if age is None else NOW - age
    metrics = EndpointMetrics(waiting=waiting, kv_usage=kv, updated_at=updated)
    return Endpoint(name="p", pod="p", address="10.0.0.1:8000", metrics=metrics, **kw)


@pytest.fixture
def detector() -> SaturationDetector:
    return SaturationDetector(clock=lambda: NOW)


def test_defaults_are_gies() -> None:
    c = SaturationConfig()
    assert (c.queue_depth_threshold, c.kv_cache_util_threshold, c.metrics_staleness) == (
        5,
        0.8,
        0.2,
    )


@pytest.mark.parametrize(
    ("waiting", "kv", "saturated"),
    [
        (0, 0.0, False),
        (5, 0.8, False),  # at the thresholds still has capacity (GIE compares with <=)
        (6, 0.0, True),
        (0, 0.81, True),
        (10, 0.95, True),
    ],
)
def test_endpoint_thresholds(detector, waiting, kv, saturated) -> None:
    assert detector.endpoint_saturated(endpoint(waiting, kv)) is saturated


def test_stale_or_never_scraped_or_unreachable_counts_as_saturated(detector) -> None:
    assert not detector.endpoint_saturated(endpoint(age=0.19))
    assert detector.endpoint_saturated(endpoint(age=0.21))
    assert detector.endpoint_saturated(endpoint(age=None))
    assert detector.endpoint_saturated(endpoint(reachable=False))


def test_candidates_saturated_only_when_every_one_is(detector) -> None:
    busy = endpoint(waiting=9)
    stale = endpoint(age=5)
    free = endpoint(waiting=1, kv=0.3)
    assert detector.saturated([busy, stale])
    assert not detector.saturated([busy, stale, free])
    assert detector.saturated([])  # nowhere to send it


def test_custom_thresholds() -> None:
    d = SaturationDetector(SaturationConfig(2, 0.5, 1.0), clock=lambda: NOW)
    assert d.endpoint_saturated(endpoint(waiting=3))
    assert d.endpoint_saturated(endpoint(kv=0.6))
    assert not d.endpoint_saturated(endpoint(waiting=2, kv=0.5, age=0.9))


def test_utilization_is_the_most_constrained_resource(detector) -> None:
    assert detector.utilization(endpoint(waiting=1, kv=0.4)) == pytest.approx(0.5)
    assert detector.utilization(endpoint(waiting=10, kv=0.4)) == pytest.approx(2.0)
    assert detector.utilization(endpoint(age=None)) == 1.0
    pool = [endpoint(waiting=0, kv=0.0), endpoint(age=None)]
    assert detector.pool_utilization(pool) == pytest.approx(0.5)
    assert detector.pool_utilization([]) == 1.0


def test_uses_the_monotonic_clock_by_default() -> None:
    import time

    ep = endpoint()
    ep.metrics.updated_at = time.monotonic()
    assert not SaturationDetector().endpoint_saturated(ep)
