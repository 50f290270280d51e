"""epp/engine_metrics.py: the few model-server metrics the picker needs, per engine."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infergw.api.engines import ENGINE_TYPES, METRIC_VOCABULARY, metrics_path
from infergw.epp.engine_metrics import (
    ENGINES,
    InvalidMetricValue,
    MetricsParseError,
    parse,
    sample_lines,
    vocabulary,
)
from tests.engine_metric_names import WANTED
from tests.paths import TINY

VLLM_TEXT = (TINY / "metrics.txt").read_text()

VLLM_MIN = """\
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="0",model_name="m"} 5.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
"""


# ---- real vLLM output ---------------------------------------------------------------------


def test_real_vllm_scrape():
    m = parse(VLLM_TEXT, "vllm", now=123.0)
    assert m.waiting == 0.0
    assert m.running == 0.0
    assert m.kv_usage == 0.0
    assert m.block_size == 32  # --block-size 32
    assert m.num_blocks == 80  # --num-gpu-blocks-override 80
    assert m.running_loras == frozenset()
    assert m.waiting_loras == frozenset()
    assert m.max_loras is None
    assert m.updated_at == 123.0


def test_real_vllm_scrape_with_load_reads_the_right_lines():
    text = VLLM_TEXT
    for old, new in [
        ("vllm:num_requests_waiting{", "4.0"),
        ("vllm:num_requests_running{", "2.0"),
        ("vllm:kv_cache_usage_perc{", "0.625"),
        ("vllm:num_requests_waiting_by_reason{", "9.0"),
    ]:
        line = next(x for x in text.splitlines() if x.startswith(old))
        text = text.replace(line, line.rsplit(" ", 1)[0] + " " + new)
    m = parse(text, "vllm")
    # waiting_by_reason shares a prefix with num_requests_waiting and must not be counted.
    assert (m.waiting, m.running, m.kv_usage) == (4.0, 2.0, 0.625)


def test_updated_at_defaults_to_the_monotonic_clock():
    before = time.monotonic()
    m = parse(VLLM_MIN, "vllm")
    assert before <= m.updated_at <= time.monotonic()


# ---- other engines ------------------------------------------------------------------------


def test_sglang_names():
    text = """\
# HELP sglang:num_queue_reqs The number of requests in the waiting queue
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m",engine_type="unified",tp_rank="0"} 6.0
sglang:num_running_reqs{model_name="m",engine_type="unified",tp_rank="0"} 2.0
sglang:token_usage{model_name="m",engine_type="unified",tp_rank="0"} 0.4
sglang:cache_config_info{page_size="64",num_pages="1000",model_name="m"} 1.0
vllm:num_requests_waiting{engine="0"} 99
"""
    m = parse(text, "sglang", now=1.0)
    assert (m.waiting, m.running, m.kv_usage) == (6.0, 2.0, 0.4)
    assert (m.block_size, m.num_blocks) == (64, 1000)


def test_trtllm_serve_names():
    text = """\
trtllm_num_requests_waiting{model_name="m"} 1
trtllm_num_requests_running{model_name="m"} 8
trtllm_kv_cache_utilization{model_name="m"} 0.9
"""
    m = parse(text, "trtllm-serve", now=1.0)
    assert (m.waiting, m.running, m.kv_usage) == (1.0, 8.0, 0.9)
    assert m.block_size is None and m.num_blocks is None


def test_known_engines():
    assert {"vllm", "sglang", "trtllm-serve"} <= set(ENGINES)


@pytest.mark.parametrize("engine_type", ENGINE_TYPES)
def test_every_engine_type_labels_its_pods_with_a_vocabulary_the_picker_reads(engine_type):
    """The controllers label a Model's pods METRIC_VOCABULARY[engine type]; a label the picker
    does not know drops every pod of that engine from the pool (TRTLLM's `trtllm` once did)."""
    label = METRIC_VOCABULARY[engine_type]
    assert vocabulary(label).engine == label
    assert metrics_path(label).startswith("/")


def test_trtllm_serve_is_scraped_at_its_prometheus_path():
    assert metrics_path(METRIC_VOCABULARY["TRTLLM"]) == "/prometheus/metrics"
    assert metrics_path(METRIC_VOCABULARY["vLLM"]) == "/metrics"
    assert metrics_path("unknown") == "/metrics"


def test_unknown_engine_is_a_parse_error():
    with pytest.raises(MetricsParseError, match="unknown engine"):
        parse(VLLM_MIN, "tgi")


def test_another_engines_metrics_do_not_count():
    with pytest.raises(MetricsParseError):
        parse(VLLM_MIN, "sglang")


# ---- LoRA ---------------------------------------------------------------------------------


def lora(ts: float, running: str, waiting: str, max_lora: str = "4") -> str:
    return (
        f'vllm:lora_requests_info{{max_lora="{max_lora}",running_lora_adapters="{running}",'
        f'waiting_lora_adapters="{waiting}"}} {ts}\n'
    )


def test_lora_info_is_read():
    m = parse(VLLM_MIN + lora(1.7e9, "a,b", "c"), "vllm")
    assert m.running_loras == frozenset({"a", "b"})
    assert m.waiting_loras == frozenset({"c"})
    assert m.max_loras == 4


def test_lora_info_newest_timestamp_wins_whatever_the_order():
    newer = lora(1_700_000_100.0, "new", "", "2")
    older = lora(1_700_000_000.0, "old", "w", "8")
    for text in (VLLM_MIN + newer + older, VLLM_MIN + older + newer):
        m = parse(text, "vllm")
        assert m.running_loras == frozenset({"new"})
        assert m.waiting_loras == frozenset()
        assert m.max_loras == 2


def test_lora_info_with_empty_adapters():
    m = parse(VLLM_MIN + lora(5.0, "", ""), "vllm")
    assert m.running_loras == frozenset() and m.waiting_loras == frozenset()


# ---- several engines (data-parallel ranks) in one scrape ----------------------------------


def test_multiple_engines_sum_queues_and_take_the_fullest_cache():
    text = """\
vllm:num_requests_waiting{engine="0",model_name="m"} 3
vllm:num_requests_waiting{engine="1",model_name="m"} 4
vllm:num_requests_running{engine="0",model_name="m"} 1
vllm:num_requests_running{engine="1",model_name="m"} 2
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.7
"""
    m = parse(text, "vllm")
    assert (m.waiting, m.running) == (7.0, 3.0)
    assert m.kv_usage == 0.7


# ---- legacy KV name -----------------------------------------------------------------------

BASE = """\
vllm:num_requests_waiting 0
vllm:num_requests_running 0
"""


def test_legacy_gpu_cache_usage_used_when_the_new_name_is_absent():
    assert parse(BASE + "vllm:gpu_cache_usage_perc 0.5\n", "vllm").kv_usage == 0.5


def test_legacy_gpu_cache_usage_ignored_when_the_new_name_is_present():
    for order in (
        "vllm:gpu_cache_usage_perc 0.9\nvllm:kv_cache_usage_perc 0.1\n",
        "vllm:kv_cache_usage_perc 0.1\nvllm:gpu_cache_usage_perc 0.9\n",
    ):
        assert parse(BASE + order, "vllm").kv_usage == 0.1


def test_kv_usage_is_zero_when_not_reported():
    assert parse(BASE, "vllm").kv_usage == 0.0


# ---- text format details ------------------------------------------------------------------


def test_comments_blank_lines_and_timestamps():
    text = """\
# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge

vllm:num_requests_waiting 2 1700000000000
vllm:num_requests_running{engine="0"} 1.5e0 1700000000000
"""
    m = parse(text, "vllm")
    assert (m.waiting, m.running) == (2.0, 1.5)


def test_label_values_with_escapes_and_braces():
    text = BASE + (
        'vllm:lora_requests_info{max_lora="3",running_lora_adapters="x}y,z",'
        'waiting_lora_adapters="q\\"r"} 10\n'
    )
    m = parse(text, "vllm")
    assert m.running_loras == frozenset({"x}y", "z"})
    assert m.max_loras == 3


def test_cache_info_with_unusable_numbers():
    text = BASE + 'vllm:cache_config_info{block_size="None",num_gpu_blocks="lots"} 1\n'
    m = parse(text, "vllm")
    assert m.block_size is None and m.num_blocks is None


def test_malformed_lines_of_other_metrics_are_not_looked_at():
    text = VLLM_MIN + "vllm:something_else{unbalanced 1\nsome_counter not-a-number\n"
    assert parse(text, "vllm").waiting == 3.0


# ---- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# only comments\n",
        "vllm:num_requests_running 1\n",
        "vllm:num_requests_waiting 1\n",
        "vllm:kv_cache_usage_perc 0.5\n",
    ],
)
def test_missing_required_metrics_raise(text):
    with pytest.raises(MetricsParseError, match="lack"):
        parse(text, "vllm")


@pytest.mark.parametrize(
    "line",
    [
        "vllm:num_requests_waiting",
        "vllm:num_requests_waiting ",
        "vllm:num_requests_waiting abc",
        'vllm:num_requests_waiting{engine="0"}',
        'vllm:num_requests_waiting{engine="0" 1',
        'vllm:num_requests_waiting{engine="0"} one',
    ],
)
def test_malformed_wanted_lines_raise(line):
    with pytest.raises(MetricsParseError):
        parse(line + "\nvllm:num_requests_running 1\n", "vllm")


def test_metrics_parse_error_is_a_value_error():
    assert issubclass(MetricsParseError, ValueError)


# ---- impossible values: the whole page is refused -------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "vllm:num_requests_waiting NaN",  # NaN waiting once disabled the queue scorer
        "vllm:num_requests_waiting -5",  # a negative queue once attracted all traffic
        "vllm:num_requests_waiting +Inf",
        "vllm:num_requests_waiting -Inf",
        "vllm:num_requests_running NaN",
        "vllm:num_requests_running -1",
        "vllm:kv_cache_usage_perc 1.5",
        "vllm:kv_cache_usage_perc -0.1",
        "vllm:kv_cache_usage_perc NaN",
        "vllm:gpu_cache_usage_perc 7",
    ],
)
def test_impossible_values_refuse_the_page(line):
    text = "vllm:num_requests_waiting 1\nvllm:num_requests_running 1\n" + line + "\n"
    with pytest.raises(InvalidMetricValue):
        parse(text, "vllm")


def test_finite_values_that_sum_past_the_largest_float_are_refused():
    text = "".join(f'vllm:num_requests_waiting{{engine="{i}"}} 1e308\n' for i in range(3))
    with pytest.raises(InvalidMetricValue):
        parse(text + "vllm:num_requests_running 0\n", "vllm")


def test_the_edges_of_the_ranges_are_accepted():
    text = (
        "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\nvllm:kv_cache_usage_perc 1.0\n"
    )
    assert parse(text, "vllm").kv_usage == 1.0


def test_negative_counts_in_labels_are_unknown():
    text = (
        "vllm:num_requests_waiting 0\nvllm:num_requests_running 0\n"
        'vllm:cache_config_info{block_size="-16",num_gpu_blocks="-1"} 1\n'
        'vllm:lora_requests_info{max_lora="-3",running_lora_adapters="",'
        'waiting_lora_adapters=""} 1\n'
    )
    m = parse(text, "vllm")
    assert (m.block_size, m.num_blocks, m.max_loras) == (None, None, None)


# ---- properties ---------------------------------------------------------------------------

PIECES = st.one_of(
    st.sampled_from(WANTED),
    st.sampled_from(["{", "}", '"', "=", ",", " ", "\n", "#", "\\", "1", "-2.5e3", "NaN", "+Inf"]),
    st.sampled_from(['max_lora="', 'running_lora_adapters="', 'block_size="', 'num_gpu_blocks="']),
    st.text(max_size=8),
)


@settings(max_examples=400, deadline=None)
@given(text=st.text(max_size=300), engine=st.sampled_from(["vllm", "sglang", "trtllm-serve"]))
def test_random_text_raises_only_parse_errors(text, engine):
    try:
        parse(text, engine)
    except MetricsParseError:
        pass


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(PIECES, max_size=40))
def test_metric_like_text_raises_only_parse_errors(pieces):
    try:
        m = parse("".join(pieces), "vllm")
    except MetricsParseError:
        return
    assert isinstance(m.waiting, float) and isinstance(m.running, float)


@settings(max_examples=200, deadline=None)
@given(
    waiting=st.lists(st.integers(0, 10_000), min_size=1, max_size=4),
    running=st.lists(st.integers(0, 10_000), min_size=1, max_size=4),
    kv=st.lists(st.floats(0, 1), min_size=1, max_size=4),
)
def test_well_formed_scrapes_parse_to_sums_and_max(waiting, running, kv):
    lines = [f'vllm:num_requests_waiting{{engine="{i}"}} {v}' for i, v in enumerate(waiting)]
    lines += [f'vllm:num_requests_running{{engine="{i}"}} {v}' for i, v in enumerate(running)]
    lines += [f'vllm:kv_cache_usage_perc{{engine="{i}"}} {v!r}' for i, v in enumerate(kv)]
    m = parse("\n".join(lines), "vllm")
    assert m.waiting == sum(waiting)
    assert m.running == sum(running)
    assert m.kv_usage == max(kv)


# ---- the line filter ----------------------------------------------------------------------


def full_split_lines(text: str, wanted: tuple[str, ...]) -> tuple[str, ...]:
    """The lines the parser looked at before sample_lines: every line split off, its name
    taken up to "{" or the first space; grouped by wanted name as sample_lines groups them."""
    named = []
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if line and line[0] != "#":
            end = line.find("{")
            named.append((line[:end] if end >= 0 else line.partition(" ")[0], line))
    return tuple(line for name in wanted for n, line in named if n == name)


def test_sample_lines_of_a_real_page_are_the_few_the_picker_reads():
    wanted = vocabulary("vllm").wanted
    lines = sample_lines(VLLM_TEXT, wanted)
    assert lines == full_split_lines(VLLM_TEXT, wanted)
    # A page of 650 lines, five of them read: the *_by_reason family shares a prefix only.
    assert len(VLLM_TEXT.splitlines()) > 600 and len(lines) == 4
    assert not any("by_reason" in line for line in lines)


def test_sample_lines_at_the_page_edges_and_with_crlf():
    wanted = ("a", "b")
    assert sample_lines("a 1", wanted) == ("a 1",)
    assert sample_lines('a 1\r\nb{x="1"} 2\r\n', wanted) == ("a 1", 'b{x="1"} 2')
    assert sample_lines("# a 1\nab 2\n a 3\nb", wanted) == ("b",)
    assert sample_lines("", wanted) == ()


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(PIECES, max_size=40), engine=st.sampled_from(sorted(ENGINES)))
def test_sample_lines_select_what_a_full_split_selects(pieces, engine):
    text = "".join(pieces)
    wanted = vocabulary(engine).wanted
    assert sample_lines(text, wanted) == full_split_lines(text, wanted)
