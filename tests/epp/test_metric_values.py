"""epp/metric_values.py: the picker's cheap metrics are exposed exactly as prometheus_client's
own — the same text, sample for sample — whatever they observe, and stay consistent when
other threads write them."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from infergw.epp.metric_values import LoopTally
from infergw.epp.metrics import EXTPROC_MESSAGE_KINDS, PickerMetrics

CREATED = re.compile(rb"(_created(?:\{[^}]*\})?) [0-9.e+]+")


def exposition(registry: CollectorRegistry) -> tuple[bytes, bytes]:
    """Both text formats, the creation times (which differ by construction) blanked."""
    return tuple(
        CREATED.sub(rb"\1 T", generate(registry))
        for generate in (generate_latest, generate_openmetrics)
    )


def test_a_loop_tally_is_exposed_as_a_counter_with_its_labels_made_at_once():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    tally = LoopTally("m_total", "ext_proc messages.", "kind", EXTPROC_MESSAGE_KINDS, ours)
    plain = Counter("m_total", "ext_proc messages.", ("kind",), registry=theirs)
    children = {kind: plain.labels(kind) for kind in EXTPROC_MESSAGE_KINDS}
    for i, kind in enumerate(EXTPROC_MESSAGE_KINDS * 3):
        for _ in range(i):
            tally.counts[kind] += 1
            children[kind].inc()
    assert exposition(ours) == exposition(theirs)
    assert ours.get_sample_value("m_total", {"kind": "response_body"}) == 4 + 10 + 16


def test_the_pickers_metrics_keep_their_names_labels_and_buckets():
    m = PickerMetrics()
    m.duration.labels("a", "a").observe(0.3)
    m.plugin_duration.labels("Scorer", "t", "n").observe(0.0004)
    m.requests.labels("a", "a").inc()
    text = generate_latest(m.registry).decode()
    assert 'inference_objective_request_duration_seconds_bucket{le="0.4",model_name="a",' in text
    assert 'inference_extension_plugin_duration_seconds_bucket{extension_point="Scorer",' in text
    assert 'inference_objective_request_total{model_name="a",target_model_name="a"} 1.0' in text
    for kind in EXTPROC_MESSAGE_KINDS:
        assert f'infergate_epp_extproc_messages_total{{kind="{kind}"}} 0.0' in text
        assert f'infergate_epp_extproc_messages_created{{kind="{kind}"}}' in text
