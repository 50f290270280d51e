"""bench/routing: traces are deterministic and router-independent, the oracle counts what an
LRU cache would hold, the client reads both SSE shapes, and one real point runs end to end."""

from __future__ import annotations

import itertools
import os

import pytest

from infergw.bench.client import parse_chunk, text_of
from infergw.bench.routing.cpus import auto_split
from infergw.bench.routing.fleet import PodWatch
from infergw.bench.routing.oracle import _PodCache, block_hashes, oracle
from infergw.bench.routing.report import markdown
from infergw.bench.routing.routers import InfergateRouter, Scraping
from infergw.bench.routing.run import Point, Settings, run_point, split_cpu, split_scraping
from infergw.bench.routing.workloads import Arrival, MultiTurn, NoReuse, SharedPrefix
from infergw.bench.workload import completion


def test_traces_repeat_exactly_for_a_seed_and_differ_across_seeds():
    for wl in (SharedPrefix(groups=4, users=3, prefix_words=50), MultiTurn(), NoReuse(50)):
        a, b = wl.trace(5.0, 20.0, seed=1), wl.trace(5.0, 20.0, seed=1)
        assert a == b and a, wl.name
        assert wl.trace(5.0, 20.0, seed=2) != a
        assert all(x.at <= y.at for x, y in itertools.pairwise(a))
        assert all(0 <= x.at < 20.0 for x in a)


def test_poisson_rate_is_roughly_the_asked_one():
    trace = NoReuse(10).trace(8.0, 200.0, seed=3)
    assert 0.9 * 1600 < len(trace) < 1.1 * 1600


def test_shared_prefix_requests_share_their_groups_prefix():
    wl = SharedPrefix(groups=2, users=2, prefix_words=30)
    prompts = [a.body["prompt"] for a in wl.trace(20.0, 5.0, seed=1)]
    assert {p.split("\n")[0] for p in prompts} == set(wl.prefixes)


def test_multi_turn_resends_the_growing_history():
    trace = MultiTurn(turns=3, think_s=0.1).trace(3.0, 30.0, seed=5)
    by_chat: dict[str, list[list[dict]]] = {}
    for a in trace:
        by_chat.setdefault(a.body["messages"][0]["content"], []).append(a.body["messages"])
    complete = [turns for turns in by_chat.values() if len(turns) == 3]
    assert complete
    for turns in complete:
        for earlier, later in itertools.pairwise(turns):
            assert later[: len(earlier)] == earlier  # the history is a prefix of the next turn
            assert len(later) == len(earlier) + 2  # the fixed answer and a new question


def test_block_hashes_chain_and_leave_the_last_token_uncached():
    a = block_hashes(list(range(33)), 16)
    assert len(a) == 2  # 33 tokens: the 33rd is always computed
    assert len(block_hashes(list(range(32)), 16)) == 1
    b = block_hashes([99, *range(1, 33)], 16)
    assert a[0] != b[0] and a[1] != b[1]  # a different first block changes every later key


def test_pod_cache_evicts_least_recently_used_blocks():
    c = _PodCache(capacity=3)
    c.store([1, 2])
    c.store([3])
    c.store([1])  # touch 1: 2 is now the oldest
    c.store([4])
    assert set(c.blocks) == {1, 3, 4}
    assert c.matched([1, 3, 9]) == 2 and c.matched([2, 1]) == 0


def test_oracle_sends_repeats_to_the_pod_that_holds_them():
    prompt = "word " * 200
    trace = [Arrival(float(i), "completions", completion(prompt, 4)) for i in range(4)]
    result = oracle(
        trace,
        pods=2,
        capacity_blocks=100,
        block_size=16,
        prefill_us_per_token=100,
        measured_from=1.0,
    )
    assert result.hit_rate > 0.9  # the three measured repeats find the whole prefix
    cold = oracle(
        trace, pods=2, capacity_blocks=1, block_size=16, prefill_us_per_token=100, measured_from=1.0
    )
    assert cold.hit_rate < 0.1 and cold.ttft_p50_ms > result.ttft_p50_ms


def test_client_reads_completion_and_chat_chunks():
    assert text_of(parse_chunk(b'{"choices":[{"index":0,"text":"hi"}]}')) == "hi"
    assert text_of(parse_chunk(b'{"choices":[{"delta":{"content":"yo"}}]}')) == "yo"
    assert text_of(parse_chunk(b'{"choices":[{"delta":{"role":"assistant"}}]}')) == ""
    assert text_of(parse_chunk(b'{"choices":[],"usage":{"prompt_tokens":3}}')) == ""
    assert text_of(parse_chunk(b"{broken")) == ""


def test_split_cpu_charges_requests_only_what_idling_would_not_have_spent():
    row = {
        "requests": 11,
        "errors": 1,
        "measured_s": 10.0,
        "router_cpu_s": {"picker": 1.5, "envoy": 0.2},
    }
    split = split_cpu(row, {"picker": 0.05, "envoy": 0.03})
    assert split["router_idle_cpu_pct"] == {"picker": 5.0, "envoy": 3.0}
    # picker: 1.5 - 0.5 s idle-equivalent; envoy: 0.2 - 0.3, never below zero.
    assert split["router_cpu_ms_per_request_above_idle_by_process"] == {
        "picker": 100.0,
        "envoy": 0.0,
    }
    assert split["router_cpu_ms_per_request_above_idle"] == 100.0


def test_scraping_is_taken_out_of_the_requests_cpu_when_the_picker_counts_it():
    row = {"requests": 11, "errors": 1, "measured_s": 10.0}
    row["router_cpu_s"] = {"picker": 1.5, "envoy": 0.2}
    split = split_scraping(row, Scraping(cpu_s=0.7, pages=400.0))
    assert split == {
        "scrape_pages_per_s": 40.0,
        "router_cpu_ms_per_request_scraping": 70.0,
        "router_cpu_ms_per_request_without_scraping": 100.0,
    }
    # A picker from before the count (--baseline): pages only.
    assert split_scraping(row, Scraping(cpu_s=None, pages=400.0)) == {"scrape_pages_per_s": 40.0}
    assert Scraping(2.0, 10).since(Scraping(0.5, 4)) == Scraping(1.5, 6)
    assert Scraping(2.0, 10).since(Scraping(None, 4)) == Scraping(None, 6)


def test_imbalance_is_max_over_mean_and_skips_idle_samples():
    w = PodWatch([])
    w.samples = [[2, 2], [0, 0], [4, 0]]
    assert w.imbalance() == pytest.approx((1.0 + 2.0) / 2)
    w.samples = [[0, 0]]
    assert w.imbalance() is None


@pytest.mark.slow
def test_one_point_runs_through_a_real_fleet_and_router():
    settings = Settings(
        pods=2,
        sim_args=["--sim-time-scale", "0.2", "--num-gpu-blocks-override", "128"],
        warmup_s=1.0,
        duration_s=3.0,
        seed=1,
        idle_s=1.0,
        cpus=auto_split(os.sched_getaffinity(0)),  # None on one CPU
    )
    wl = SharedPrefix(groups=2, users=2, prefix_words=100)
    before = os.sched_getaffinity(0)
    row = run_point(Point(InfergateRouter("precise"), wl, 4.0), settings)
    assert os.sched_getaffinity(0) == before  # the load generator's CPUs given back
    if settings.cpus is not None:  # both pods' threads, the picker's and Envoy's
        assert row["pinned_threads"]["pods"] >= 2 and row["pinned_threads"]["router"] >= 2
    assert row["pods_cpu_ms_per_request"] > 0 and len(row["load_average"]) == 2
    assert row["router"] == "infergate-precise" and row["errors"] == 0
    assert row["requests"] > 3 and row["ttft_p90_ms"] > 0
    assert 0 < row["ttft_mean_ms"] <= row["ttft_p99_ms"] * 1.5
    assert 0 <= row["goodput_per_s"] <= row["requests_per_s"]
    assert 0 < row["prefix_hit_rate"] <= 1  # two groups repeat within seconds
    assert row["router_cpu_ms_per_request"] > 0
    assert set(row["router_idle_cpu_pct"]) == {"picker", "envoy"}
    assert 0 <= row["router_cpu_ms_per_request_above_idle"] <= row["router_cpu_ms_per_request"]
    # The picker counted its scraping: some of its CPU, not all of it, and pages were read.
    assert row["scrape_pages_per_s"] > 0
    scraping = row["router_cpu_ms_per_request_scraping"]
    assert 0 < scraping < row["router_cpu_ms_per_request"]
    assert row["router_cpu_ms_per_request_without_scraping"] == pytest.approx(
        row["router_cpu_ms_per_request"] - scraping, abs=0.02
    )
    out = {
        "machine": {"date": "d", "cpu": "c", "cores": 2, "memory_gib": 1},
        "settings": {"pods": 2, "warmup_s": 1.0, "duration_s": 3.0, "seed": 1},
        "workloads": [wl.describe()],
        "rows": [row, {"router": "x", "workload": wl.name, "rate": 4.0, "unavailable": "no"}],
        "oracle": [],
    }
    table = markdown(out)
    assert "| infergate-precise | 4.0 |" in table and "not run: no" in table


def test_the_default_run_leaves_the_replicated_pickers_out() -> None:
    """Two-replica routers run only when named: their names are the routers' own."""
    from infergw.bench.routing import cli

    routers = cli.all_routers()
    assert set(cli.REPLICATED) <= set(routers)
    assert all(routers[name].pickers == 2 for name in cli.REPLICATED)


def test_comparison_profiles_run_only_when_named_and_lack_only_their_setting() -> None:
    from infergw.bench.routing import cli, routers

    assert "infergate-precise-with-backlog" not in cli.all_routers()
    assert cli.variants()["infergate-precise-with-backlog"].config == "precise-with-backlog"
    precise = routers.INFERGATE_PROFILES["precise"]
    for name in ("precise-with-backlog", "precise-backlog-uncached"):
        more = routers.COMPARISON_PROFILES[name]
        assert more[: len(precise)] == precise and len(more) == len(precise) + 1
        assert more[-1][0] == "prefill-backlog-scorer"


def test_every_profile_is_a_config_the_picker_builds() -> None:
    from infergw.bench.routing import routers
    from infergw.epp.scheduling.config import load_config

    profiles = routers.INFERGATE_PROFILES | routers.COMPARISON_PROFILES
    for name, plugins in profiles.items():
        picker = routers.PROFILE_PICKERS.get(name, "max-score-picker")
        config = load_config(routers.picker_config(plugins, picker))
        built = config.profiles["default"].scorers
        assert [(ws.scorer.type_name, ws.weight) for ws in built] == [
            (t, w) for t, w, *_ in plugins
        ], name
    built = load_config(routers.picker_config(profiles["precise-backlog-uncached"])).profiles
    (backlog,) = [
        ws.scorer for ws in built["default"].scorers if ws.scorer.type_name.startswith("prefill")
    ]
    assert backlog.charge_cached is False  # its parameters reached the plugin


def test_a_baseline_twin_runs_right_after_its_router_with_that_commits_picker(monkeypatch):
    """--baseline COMMIT: each infergate router is followed by its twin whose picker is that
    commit's (bench/checkout.py's folder first on PYTHONPATH while it starts); other routers
    get none."""
    import os
    from pathlib import Path

    from infergw.bench import checkout
    from infergw.bench.routing import cli, routers

    monkeypatch.setattr(checkout, "importable", lambda commit, dest: Path(f"/x/{commit}"))
    table = cli.all_routers()
    chosen = [table["infergate-precise"], table["vllm-router-kv_aware"]]
    out = cli.with_baselines(chosen, ["abc123"])
    assert [r.name for r in out] == [
        "infergate-precise",
        "infergate-precise@abc123",
        "vllm-router-kv_aware",
    ]
    assert out[1].config == "precise" and out[1].checkout == Path("/x/abc123")
    monkeypatch.setenv("PYTHONPATH", "/before")
    with routers._pythonpath(out[1].checkout):
        assert os.environ["PYTHONPATH"] == "/x/abc123"
    assert os.environ["PYTHONPATH"] == "/before"
    with routers._pythonpath(None):
        assert os.environ["PYTHONPATH"] == "/before"


@pytest.mark.parametrize("profile", [None, "llama-3.1-8b-h100"])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_the_pods_and_the_oracle_assume_the_same_prefill_cost(profile, scale) -> None:
    """`--sim-latency-profile` and `--sim-time-scale`: the simulator parses the pods' flags
    into the latency model whose prefill cost the oracle is given, with the bench's cache
    sizes either way."""
    from infergw.bench.routing import cli
    from infergw.simulator.config import parse_config

    sim_args, prefill_us = cli.latency(profile, scale)
    cfg = parse_config(sim_args)
    scaled = cfg.latency.prefill_s_per_token * cfg.latency.time_scale
    assert scaled * 1e6 == pytest.approx(prefill_us)
    assert cfg.latency.time_scale == scale
    assert cfg.block_size == cli.BLOCK_SIZE
    if profile is not None:  # calibrated: prefill much cheaper than the bench's 150 µs
        assert prefill_us / scale < cli.PREFILL_US / 2 and cfg.latency.roofline


def test_output_dir_takes_the_json_and_the_plots(monkeypatch, tmp_path) -> None:
    """--output-dir: a partial run (one workload, a few routers) writes there, leaving the
    README's plots in docs/benchmarks/ and the day's default result alone. The points
    themselves (a real fleet each) and the drawing are not what this tests: neither runs."""
    from infergw.bench.common import PLOTS, RESULTS
    from infergw.bench.routing import cli

    monkeypatch.setattr(cli, "_run_with_progress", lambda points, settings: [])
    plotted = []  # matplotlib would take most of the test's time: where it is asked to draw
    monkeypatch.setattr(cli, "plot", lambda out, directory: plotted.append(directory) or [])
    before = {p: p.stat().st_mtime_ns for d in (PLOTS, RESULTS) for p in d.glob("routing*")}
    argv = ["--routers", "vllm-router-round_robin", "--workloads", "no-reuse", "--rates", "2"]
    assert cli.main([*argv, "--duration", "2", "--output-dir", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == [f"routing-{cli.machine()['date']}.json"]
    assert plotted == [tmp_path]
    after = {p: p.stat().st_mtime_ns for d in (PLOTS, RESULTS) for p in d.glob("routing*")}
    assert after == before


@pytest.mark.parametrize(("rates", "said"), [("6,abc", "not a number"), ("0", "positive finite")])
def test_bad_rates_are_a_usage_error_before_anything_starts(tmp_path, capsys, rates, said):
    from infergw.bench.routing.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--rates", rates, "--output-dir", str(tmp_path)])
    assert exit_.value.code == 2 and said in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_time_scale_slows_the_pods_and_stretches_the_slos(monkeypatch, tmp_path) -> None:
    from infergw.bench.routing import cli

    seen = []
    monkeypatch.setattr(cli, "_run_with_progress", lambda points, s: seen.append(s) or [])
    monkeypatch.setattr(cli, "plot", lambda out, directory: [])
    argv = ["--routers", "vllm-router-round_robin", "--workloads", "no-reuse", "--rates", "1"]
    assert cli.main([*argv, "--sim-time-scale", "4", "--output-dir", str(tmp_path)]) == 0
    (settings,) = seen
    assert settings.sim_args[-2:] == ["--sim-time-scale", "4.0"]
    assert (settings.slo.ttft_s, settings.slo.tpot_s) == pytest.approx((4.0, 0.2))
    # The picker reads a pod as often a simulated second as unscaled: its intervals 4x.
    asked = dict(zip(settings.picker_args[::2], settings.picker_args[1::2], strict=True))
    assert asked == {
        "--refresh-metrics-interval": "0.2",
        "--quiet-metrics-interval": "1",
        "--idle-metrics-interval": "4",
    }


@pytest.mark.parametrize("scale", ["0", "-2", "nan", "slow"])
def test_a_time_scale_that_is_not_a_positive_number_is_a_usage_error(tmp_path, capsys, scale):
    from infergw.bench.routing.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--sim-time-scale", scale, "--output-dir", str(tmp_path)])
    assert exit_.value.code == 2 and "--sim-time-scale" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
