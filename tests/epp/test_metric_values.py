"""epp/metric_values.py: the picker's cheap metrics are exposed exactly as prometheus_client's
own — the same text, sample for sample — whatever they observe, and stay consistent when
other threads write them."""

from __future__ import annotations

import re
import threading

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from infergw.epp.metric_values import FastCounter, FastHistogram, LocalTally, LoopTally
from infergw.epp.metrics import EXTPROC_MESSAGE_KINDS, LATENCY_BUCKETS, PickerMetrics
from tests.fuzzing import fuzz_settings

CREATED = re.compile(rb"(_created(?:\{[^}]*\})?) [0-9.e+]+")


def exposition(registry: CollectorRegistry) -> tuple[bytes, bytes]:
    """Both text formats, the creation times (which differ by construction) blanked."""
    return tuple(
        CREATED.sub(rb"\1 T", generate(registry))
        for generate in (generate_latest, generate_openmetrics)
    )


amounts = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([*LATENCY_BUCKETS, 0.0, -1.0, 1e-9, 3600.0001]),
)


@fuzz_settings(300)
@given(observed=st.lists(st.tuples(st.sampled_from("ab"), amounts), max_size=30))
@example(observed=[("a", float("nan")), ("b", float("inf")), ("b", 0.005), ("a", -1.0)])
def test_a_fast_histogram_is_exposed_as_a_histogram(observed):
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastHistogram("h_seconds", "help", ("m",), buckets=LATENCY_BUCKETS, registry=ours)
    plain = Histogram("h_seconds", "help", ("m",), buckets=LATENCY_BUCKETS, registry=theirs)
    unlabelled = (
        FastHistogram("u", "help", buckets=(1, 2), registry=ours),
        Histogram("u", "help", buckets=(1, 2), registry=theirs),
    )
    for label, amount in observed:
        fast.labels(label).observe(amount)
        plain.labels(label).observe(amount)
        for h in unlabelled:
            h.observe(amount)
    assert exposition(ours) == exposition(theirs)


# Sums of these are exact in any order, so the merged sum is the observed one to the bit
# (bucket bounds among them: 1.0, 2, 3, ...).
dyadic = st.one_of(
    st.integers(0, 2**20).map(lambda n: n / 1024),
    st.sampled_from([1.0, 2.0, 3600.0, float("inf")]),
)


@fuzz_settings(60)
@given(requests=st.lists(st.tuples(st.sampled_from("ab"), st.lists(dyadic, max_size=20))))
def test_merged_tallies_are_exposed_as_each_observation_would_be(requests):
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastHistogram("h_seconds", "help", ("m",), buckets=LATENCY_BUCKETS, registry=ours)
    plain = Histogram("h_seconds", "help", ("m",), buckets=LATENCY_BUCKETS, registry=theirs)
    for label, amounts in requests:
        tally = LocalTally(LATENCY_BUCKETS)
        child = plain.labels(label)  # an empty tally still makes its series
        for amount in amounts:
            tally.add(amount)
            child.observe(amount)
        fast.labels(label).merge(tally)
    assert exposition(ours) == exposition(theirs)
    with pytest.raises(ValueError):
        fast.merge(LocalTally(LATENCY_BUCKETS))  # a labelled parent is not observable


@fuzz_settings(200)
@given(
    increments=st.lists(
        st.tuples(st.sampled_from("ab"), st.one_of(st.integers(0, 10**6), st.floats(0, 1e9)))
    )
)
def test_a_fast_counter_is_exposed_as_a_counter(increments):
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastCounter("c_total", "help", ("m",), registry=ours)
    plain = Counter("c_total", "help", ("m",), registry=theirs)
    for label, amount in increments:
        fast.labels(label).inc(amount)
        plain.labels(label).inc(amount)
    assert exposition(ours) == exposition(theirs)


def test_a_fast_counter_refuses_what_a_counter_refuses():
    fast = FastCounter("c_total", "help", ("m",), registry=CollectorRegistry())
    with pytest.raises(ValueError):
        fast.labels("a").inc(-1)
    with pytest.raises(ValueError):
        fast.inc()  # a labelled parent is not observable
    with pytest.raises(ValueError):
        FastHistogram("h", "help", ("m",), registry=CollectorRegistry()).observe(1)


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


def test_observations_from_many_threads_are_all_counted():
    registry = CollectorRegistry()
    h = FastHistogram("h", "help", ("m",), buckets=(1, 2), registry=registry).labels("a")
    c = FastCounter("c_total", "help", ("m",), registry=registry).labels("a")

    def work():
        for i in range(20_000):
            h.observe(i % 3)
            c.inc()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert registry.get_sample_value("h_count", {"m": "a"}) == 80_000
    assert registry.get_sample_value("h_bucket", {"m": "a", "le": "1.0"}) == 4 * 13_334
    assert registry.get_sample_value("h_sum", {"m": "a"}) == 4 * (6_667 * 1 + 6_666 * 2)
    assert registry.get_sample_value("c_total", {"m": "a"}) == 80_000


def test_the_pickers_metrics_keep_their_names_labels_and_buckets():
    m = PickerMetrics()
    m.duration.labels("a", "a").observe(0.3)
    m.plugin_duration.labels("Scorer", "t", "n").observe(0.0004)
    m.requests.labels("a", "a", "0").inc()
    text = generate_latest(m.registry).decode()
    assert 'inference_objective_request_duration_seconds_bucket{le="0.4",model_name="a",' in text
    assert 'inference_extension_plugin_duration_seconds_bucket{extension_point="Scorer",' in text
    total = 'request_total{model_name="a",priority="0",target_model_name="a"} 1.0'
    assert f"inference_objective_{total}" in text
    assert f"llm_d_epp_{total}" in text  # llm-d's name for it, the same series
    for kind in EXTPROC_MESSAGE_KINDS:
        assert f'infergate_epp_extproc_messages_total{{kind="{kind}"}} 0.0' in text
        assert f'infergate_epp_extproc_messages_created{{kind="{kind}"}}' in text
