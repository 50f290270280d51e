"""The README's metrics table and the Grafana dashboard against what the picker's code
registers (tests/metric_catalog.py builds a picker with every optional part on)."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from tests.metric_catalog import Row, full_registry, readme_table, rows, table
from tests.paths import FIXTURES, ROOT
from tests.promql_names import template_query, uses

HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> list[Row]:
    import asyncio

    registry = asyncio.run(full_registry(tmp_path_factory.mktemp("catalog")))
    return rows(registry)


def series_labels(found: list[Row]) -> dict[str, set[str]]:
    """Every series name a query may name → the labels it carries."""
    out: dict[str, set[str]] = {}
    for row in found:
        labels = set(row.labels)
        if row.type == "histogram":
            for suffix in HISTOGRAM_SERIES:
                out[row.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
        else:
            out[row.name] = labels
    return out


def test_the_readme_table_is_every_metric_the_picker_registers(exported):
    want = table(exported)
    have = readme_table((ROOT / "README.md").read_text())
    assert have == want, "README's metrics table is out of date; it should be:\n" + want


def test_the_catalog_sees_the_families_of_every_optional_part(exported):
    names = {r.name for r in exported}
    # one family of each part built only when asked for: a catalog missing a part would
    # let the README table and the dashboard check pass over it unseen
    for name in (
        "inference_objective_request_total",  # always
        "inference_extension_flow_control_queue_size",  # flow control
        "infergate_kvindex_messages_total",  # the KV-event index
        "infergate_epp_replica_sync_records_total",  # replica sync
        "infergate_kvindex_redis_errors_total",  # the Redis index
        "llm_d_epp_request_total",  # llm-d's names
    ):
        assert name in names, name
    counters = [r for r in exported if r.type == "counter"]
    assert all(r.name.endswith("_total") for r in counters)


def dashboard() -> dict:
    path = resources.files("infergw.gateway_manifests") / "observability/grafana-dashboard.json"
    return json.loads(path.read_text())


def queries(dash: dict) -> list[str]:
    out = []
    for panel in dash["panels"]:
        out += [t["expr"] for t in panel.get("targets", [])]
    return out


def test_every_dashboard_query_names_metrics_and_labels_the_picker_exports(exported):
    known = series_labels(exported)
    exprs = queries(dashboard())
    assert len(exprs) >= 20
    for expr in exprs:
        used = uses(expr)
        assert used.selectors, expr
        labels_in_expr: set[str] = set()
        for selector in used.selectors:
            assert selector.metric in known, f"{selector.metric} is not exported ({expr})"
            have = known[selector.metric]
            missing = set(selector.labels) - have
            assert not missing, f"{selector.metric} has no label {missing} ({expr})"
            labels_in_expr |= have
        grouped = set(used.groupings) - labels_in_expr
        assert not grouped, f"grouping by {grouped}, which no metric of {expr} has"


def test_every_dashboard_variable_reads_an_exported_label(exported):
    known = series_labels(exported)
    variables = [v for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    assert {v["name"] for v in variables} >= {"pool", "model"}
    for var in variables:
        query, label = template_query(var["query"]["query"])
        (selector,) = uses(query).selectors
        assert selector.metric in known
        assert label in known[selector.metric], var


def test_the_dashboard_covers_what_an_operator_asks(exported):
    """The issue's list: each of these families appears in some query."""
    text = "\n".join(queries(dashboard()))
    for family in (
        "inference_objective_request_total",
        "inference_objective_request_error_total",
        "inference_objective_request_ttft_seconds_bucket",
        "inference_objective_request_tpot_seconds_bucket",
        "llm_d_epp_request_streaming_itl_seconds_bucket",
        "inference_pool_per_pod_queue_size",
        "infergate_epp_pod_kv_cache_utilization",
        "inference_extension_scheduler_e2e_duration_seconds_bucket",
        "inference_extension_flow_control_queue_size",
        "inference_extension_flow_control_request_queue_duration_seconds_bucket",
        "infergate_kvindex_entries",
        "infergate_kvindex_messages_total",
        "inference_objective_prompt_cached_tokens_sum",
    ):
        assert family in text, family


@pytest.mark.parametrize(
    "expr, metrics, groupings",
    [
        ('sum by (a) (rate(x_total{b="1", c=~"$v"}[5m]))', {"x_total": ["b", "c"]}, ["a"]),
        (
            "histogram_quantile(0.9, sum by (le) (rate(h_bucket[$__rate_interval])))",
            {"h_bucket": []},
            ["le"],
        ),
        ("x / on (p) group_left (q) y offset 5m", {"x": [], "y": []}, ["p", "q"]),
        ('label_replace(up, "a", "$1", "b", "(.*)")', {"up": []}, []),
    ],
)
def test_the_promql_reader_finds_names_and_labels(expr, metrics, groupings):
    used = uses(expr)
    assert {s.metric: s.labels for s in used.selectors} == metrics
    assert used.groupings == groupings


# The picker's queries of the reference's own dashboard: an operator's existing dashboard
# keeps working against infergate. Labels Prometheus adds to every target are not the picker's.
REFERENCE_QUERIES = [
    line
    for line in (FIXTURES / "reference_dashboard_queries.txt").read_text().splitlines()
    if line and not line.startswith("#")
]
TARGET_LABELS = {"pod", "namespace", "instance", "job", "container", "service", "endpoint"}


@pytest.mark.parametrize("expr", REFERENCE_QUERIES)
def test_the_reference_dashboards_picker_queries_resolve(exported, expr):
    known = series_labels(exported)
    used = uses(expr)
    (selector,) = used.selectors
    assert selector.metric in known, selector.metric
    have = known[selector.metric] | TARGET_LABELS
    assert set(selector.labels) <= have and set(used.groupings) <= have, expr
