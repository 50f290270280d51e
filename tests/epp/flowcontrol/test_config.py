"""The flowControl section: defaults, parsing, and precise errors."""

from __future__ import annotations

import pytest
import yaml

from infergw.epp.flowcontrol import config as config_module
from infergw.epp.flowcontrol.config import (
    DEFAULT_BAND_MAX_BYTES,
    BandConfig,
    FlowControlConfig,
    FlowControlConfigError,
)


def test_defaults() -> None:
    c = FlowControlConfig()
    assert c == FlowControlConfig.from_dict(None) == FlowControlConfig.from_dict({})
    assert (c.max_requests, c.max_bytes) == (0, 0)
    assert c.default_request_ttl == 60
    assert c.flow_gc_timeout == 300
    assert c.saturation.queue_depth_threshold == 5
    assert c.saturation.kv_cache_util_threshold == 0.8
    assert c.saturation.metrics_staleness == 0.2
    assert (c.fairness.input_token_weight, c.fairness.output_token_weight) == (1, 2)
    assert c.default_band.max_bytes == DEFAULT_BAND_MAX_BYTES == 1_000_000_000


def test_the_documented_example_parses() -> None:
    doc = config_module.__doc__
    example = doc[doc.index("flowControl:") : doc.index("Where the defaults")]
    raw = yaml.safe_load(example)["flowControl"]
    c = FlowControlConfig.from_dict(raw)
    assert c.saturation.metrics_staleness == pytest.approx(0.2)
    assert c.recheck_interval == pytest.approx(0.05)
    assert c.fairness.flow_weights == {"tenant-a": 2.0}
    assert c.bands == (BandConfig(priority=10, max_requests=500, max_bytes=100_000_000),)


def test_full_section() -> None:
    c = FlowControlConfig.from_dict(
        {
            "maxRequests": 100,
            "maxBytes": 1 << 20,
            "defaultRequestTTL": "30s",
            "recheckInterval": 0.01,
            "retryAfter": {"min": 2, "max": 10},
            "flowGCTimeout": "1m",
            "saturation": {"queueDepthThreshold": 8, "kvCacheUtilThreshold": 0.9},
            "fairness": {"inputTokenWeight": 0.5, "outputTokenWeight": 4},
            "defaultPriorityBand": {"maxRequests": 7},
            "priorityBands": [{"priority": 1, "maxBytes": 0}, {"priority": -1}],
        }
    )
    assert (c.max_requests, c.max_bytes, c.default_request_ttl) == (100, 1 << 20, 30)
    assert (c.retry_after_min, c.retry_after_max, c.flow_gc_timeout) == (2, 10, 60)
    assert c.saturation.queue_depth_threshold == 8
    assert c.saturation.metrics_staleness == 0.2  # untouched keys keep their defaults
    assert c.fairness.output_token_weight == 4
    assert c.band(1) == BandConfig(1, 0, 0)
    assert c.band(-1) == BandConfig(-1, 0, DEFAULT_BAND_MAX_BYTES)
    assert c.band(3) == BandConfig(3, 7, DEFAULT_BAND_MAX_BYTES)  # from the template


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"maxRequest": 1}, "flowControl: unknown key(s) 'maxRequest'; allowed: maxRequests"),
        ({"saturation": {"queueDepth": 1}}, "flowControl.saturation: unknown key(s) 'queueDepth'"),
        ({"priorityBands": [{"priority": 1, "maxByte": 1}]}, "flowControl.priorityBands[0]"),
        ({"defaultPriorityBand": {"priority": 3}}, "defaultPriorityBand: unknown key(s)"),
        ({"retryAfter": {"seconds": 1}}, "flowControl.retryAfter: unknown key(s) 'seconds'"),
        ({"fairness": {"weights": {}}}, "flowControl.fairness: unknown key(s) 'weights'"),
    ],
)
def test_unknown_keys_are_rejected_with_their_path(raw, message) -> None:
    with pytest.raises(FlowControlConfigError) as err:
        FlowControlConfig.from_dict(raw)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "flowControl must be a map"),
        ({"maxRequests": -1}, "flowControl.maxRequests must be >= 0"),
        ({"maxRequests": True}, "flowControl.maxRequests must be an integer"),
        ({"maxBytes": 1.5}, "flowControl.maxBytes must be an integer"),
        ({"defaultRequestTTL": "soon"}, "must be a duration"),
        ({"defaultRequestTTL": -1}, "must be >= 0"),
        ({"recheckInterval": 0}, "flowControl.recheckInterval must be > 0"),
        ({"saturation": {"kvCacheUtilThreshold": 1.5}}, "must be in (0, 1]"),
        ({"saturation": {"queueDepthThreshold": 0}}, "queueDepthThreshold must be > 0"),
        ({"saturation": {"queueDepthThreshold": "5"}}, "must be a number"),
        ({"fairness": {"flowWeights": {"a": 0}}}, "flowWeights['a'] must be > 0"),
        ({"fairness": {"flowWeights": ["a"]}}, "flowWeights must be a map"),
        ({"fairness": {"inputTokenWeight": 0, "outputTokenWeight": 0}}, "are both 0"),
        ({"priorityBands": {"priority": 1}}, "priorityBands must be a list"),
        ({"priorityBands": [{"maxBytes": 1}]}, "priorityBands[0]: 'priority' is required"),
        ({"priorityBands": [{"priority": 1}, {"priority": 1}]}, "priority 1 appears twice"),
        ({"retryAfter": {"min": 5, "max": 2}}, "min (5) exceeds max (2)"),
        ({"retryAfter": {"min": 0}}, "retryAfter.min must be > 0"),
    ],
)
def test_bad_values_are_rejected(raw, message) -> None:
    with pytest.raises(FlowControlConfigError) as err:
        FlowControlConfig.from_dict(raw)
    assert message in str(err.value)


def test_durations_accept_units() -> None:
    for text, seconds in (("200ms", 0.2), ("2s", 2), ("1.5m", 90), ("1h", 3600), ("3", 3)):
        c = FlowControlConfig.from_dict({"defaultRequestTTL": text})
        assert c.default_request_ttl == pytest.approx(seconds)
    assert FlowControlConfig.from_dict({"defaultRequestTTL": 0}).default_request_ttl == 0
