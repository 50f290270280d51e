"""bench/pd: the trace is deterministic and the same for every mode, the fleets keep their
examples' engines with 4 pods each, the client's timings and the report add up, and a quick
run of both main modes writes its JSON and PNG."""

from __future__ import annotations

import itertools
import json

import pytest
import yaml

from infergw.bench.pd.cli import main
from infergw.bench.pd.client import Outcome
from infergw.bench.pd.fleet import EXAMPLES, Tuning, copy_example
from infergw.bench.pd.report import markdown, plot
from infergw.bench.pd.run import latency, summarize
from infergw.bench.pd.workload import DECODE, LONG, Mix
from infergw.epp.scheduling.config import load_config


def test_the_trace_repeats_for_a_seed_and_mixes_both_kinds():
    mix = Mix()
    a, b = mix.trace(6.0, 20.0, seed=1), mix.trace(6.0, 20.0, seed=1)
    assert a == b and a
    assert mix.trace(6.0, 20.0, seed=2) != a
    assert all(x.at <= y.at for x, y in itertools.pairwise(a))
    assert {r.kind for r in a} == {LONG, DECODE}
    for r in a:
        long = r.kind == LONG
        assert r.body["max_tokens"] == (16 if long else 128)
        assert r.body["stream"] and r.body["ignore_eos"]
        assert len(r.body["prompt"].split()) == 2 + (1300 if long else 100)
    # every prompt starts with its own tag: no two requests share a KV block
    assert len({r.body["prompt"][:16] for r in a}) == len(a)


@pytest.mark.parametrize(
    ("mode", "groups", "roles"),
    [
        ("aggregated", 4, None),
        ("disaggregated", 2, (1, 1)),
        ("disaggregated-1-group", 1, (2, 2)),
    ],
)
def test_each_mode_is_its_example_on_four_pods(tmp_path, mode, groups, roles):
    example = copy_example(mode, tmp_path)
    assert example.pod_count() == 4
    spec = example.model["spec"]
    assert spec["replicas"] == groups
    source = yaml.safe_load((EXAMPLES[mode] / "model.yaml").read_text())
    if roles:
        b = spec["backend"]
        assert (b["prefill"]["replicas"], b["decode"]["replicas"]) == roles
        assert b["kvConnector"] == {"type": "nixl"}
    # the example's engine arguments (KV events are the controllers': to the stack's picker),
    # and quieter logs
    assert spec["engine"]["args"] == [*source["spec"]["engine"]["args"], "--log-level=warning"]
    assert example.picker_config.read_text() == (EXAMPLES[mode] / "epp-config.yaml").read_text()
    assert example.auth is None  # no SecurityPolicy copied


def test_a_tuning_sets_the_profile_and_the_handlers_parameters(tmp_path):
    params = {"decodeBatchWeight": 0.1, "prefillQueueWeight": 32}
    tuning = Tuning("llama-3.1-8b-h100", params)
    example = copy_example("disaggregated", tmp_path / "pd", tuning)
    args = example.model["spec"]["engine"]["args"]
    assert args[-1] == "--sim-latency-profile=llama-3.1-8b-h100"
    config = yaml.safe_load(example.picker_config.read_text())
    [handler] = [p for p in config["plugins"] if p["type"] == "pd-profile-handler"]
    assert handler["parameters"] == {"nonCachedTokens": 64, **params}  # the example's kept
    load_config(example.picker_config.read_text())  # a config the picker accepts
    # the aggregated example has no handler: only the profile changes
    agg = copy_example("aggregated", tmp_path / "agg", tuning)
    assert agg.picker_config.read_text() == (EXAMPLES["aggregated"] / "epp-config.yaml").read_text()


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--pd-params", "{decodeBatchWeight: -1}"], "decodeBatchWeight"),
        (["--pd-params", "{prefillQueueWeight: .nan}"], "prefillQueueWeight"),
        (["--pd-params", "{minNonCachedTokens: 128}"], "must lie between"),  # the example's 64
        (["--pd-params", "{decodeBatchWieght: 0.1}"], "unknown parameter"),
        (["--pd-params", "[1, 2]"], "a YAML mapping"),
        (["--rates", "6,abc"], "not a number"),
        (["--rates", "0"], "positive finite"),
        (["--duration", "nan"], "positive finite"),
        (["--rates", "1e5", "--duration", "60"], "1,000,000 requests"),
        (["--long-share", "1.5"], "--long-share"),
        (["--long-prompt-words", "1000000000"], "--long-prompt-words takes 1..100,000"),
        (["--decode-output-tokens", "0"], "--decode-output-tokens"),
    ],
)
def test_bad_arguments_are_refused_before_any_fleet_starts(tmp_path, capsys, argv, names):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--output-dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert names in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing ran


def test_goodput_counts_answers_within_both_slos():
    fast = Outcome(DECODE, 1.0, status=200, ttft=0.2, token_times=[0.0, 0.01, 0.02])
    slow_first = Outcome(DECODE, 1.0, status=200, ttft=1.5, token_times=[0.0, 0.01, 0.02])
    slow_tokens = Outcome(DECODE, 1.0, status=200, ttft=0.2, token_times=[0.0, 0.1, 0.2])
    one_token = Outcome(LONG, 1.0, status=200, ttft=0.3, token_times=[0.0])
    failed = Outcome(DECODE, 1.0, status=500, error="boom")
    row = summarize([fast, slow_first, slow_tokens, one_token, failed], seconds=2.0)
    assert row["goodput_per_s"] == 1.0  # fast and one_token, over 2 s


def test_latency_counts_gaps_and_errors():
    steady = Outcome(DECODE, 1.0, status=200, ttft=0.05, token_times=[0.0, 0.01, 0.02, 0.03])
    stalled = Outcome(DECODE, 1.0, status=200, ttft=0.2, token_times=[0.0, 0.01, 0.13, 0.14])
    failed = Outcome(DECODE, 1.0, status=500, error="boom")
    out = latency([steady, stalled, failed])
    assert (out["requests"], out["errors"]) == (3, 1)
    assert steady.tpot == pytest.approx(0.01) and stalled.tpot == pytest.approx(0.14 / 3)
    assert max(stalled.gaps) == pytest.approx(0.12)
    assert out["worst_gap_p50_ms"] == pytest.approx(65.0)  # between 10 and 120 ms
    assert out["ttft_p50_ms"] == pytest.approx(125.0)


def row(mode: str, rate: float, ttft: float, tpot: float) -> dict:
    kind = {
        "ttft_p50_ms": ttft,
        "tpot_p50_ms": tpot,
        "tpot_p90_ms": tpot + 1,
        "tpot_p99_ms": tpot + 2,
        "itl_p99_ms": 15.0,
        "worst_gap_p50_ms": 20.0,
        "worst_gap_p90_ms": 25.0,
    }
    return {
        "mode": mode,
        "rate": rate,
        "ttft_p50_ms": ttft,
        "ttft_p90_ms": ttft * 2,
        "ttft_p99_ms": ttft * 3,
        "output_tokens_per_s": 100.0,
        "errors": 0,
        "engine_utilization": {"prefill": 0.2, "decode": 0.9},
        "engine_lag": {"prefill": 0.01},
        "by_kind": {LONG: dict(kind), DECODE: dict(kind)},
    }


def test_markdown_and_plot(tmp_path):
    out = {
        "machine": {"date": "d", "cpu": "c", "cores": 2, "memory_gib": 24},
        "settings": {
            "pods": 4,
            "warmup_s": 3.0,
            "duration_s": 8.0,
            "seed": 7,
            "workload": Mix().describe(),
        },
        "rows": [row("aggregated", r, 30.0, 10.0) for r in (2.0, 6.0)]
        + [row("disaggregated", r, 40.0, 9.5) for r in (2.0, 6.0)],
    }
    table = markdown(out)
    assert table.count("| aggregated |") == 2 and table.count("| disaggregated |") == 2
    assert "| 30 / 30 | 10 | 11 | 12 | 15 | 20 |" in table
    assert "prefill 20%, decode 90%" in table and "largest lag behind it: 1%" in table
    assert plot(out, tmp_path / "pd.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_quick_run_of_both_modes_writes_json_and_plot(tmp_path):
    assert main(["--quick", "--duration", "5", "--output-dir", str(tmp_path)]) == 0
    [path] = tmp_path.glob("pd-*-quick.json")
    out = json.loads(path.read_text())
    rows = {r["mode"]: r for r in out["rows"]}
    assert set(rows) == {"aggregated", "disaggregated"}
    for r in rows.values():
        assert r["errors"] == 0 and r["requests"] > 0, r.get("error_samples")
        assert r["ttft_p50_ms"] > 0 and r["by_kind"][DECODE]["tpot_p50_ms"] > 0
    # every measured request of the disaggregated fleet took the two-leg path: the decode
    # engines pulled all but the last prompt token; the aggregated pods computed them
    assert rows["disaggregated"]["cached_share"] > 0.99
    assert rows["aggregated"]["cached_share"] == 0
    pd = rows["disaggregated"]["pd"]
    assert pd["pd_disaggregated"] > 0 and pd["fallbacks"] == pd["connector_errors"] == 0
    assert set(rows["disaggregated"]["engine_utilization"]) == {"prefill", "decode"}
    assert (tmp_path / "pd-quick.png").stat().st_size > 10_000
