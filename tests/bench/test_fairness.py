"""bench/fairness: the service gap and VTC's bound are computed from what clients were
billed, the table and plot render, the example copy without flow control differs only in
that, and a quick run of both modes writes its JSON and PNG."""

from __future__ import annotations

import json

import pytest
import yaml

from infergw.bench.fairness.cli import main
from infergw.bench.fairness.load import Result, Run, prompt, weighted_tokens
from infergw.bench.fairness.report import markdown
from infergw.bench.fairness.scenario import SLOTS, Measurement
from infergw.bench.fairness.stack import EXAMPLE, copy_example


def answer(tenant: str, start: float, end: float, p: int = 10, c: int = 32) -> Result:
    return Result(tenant, start, end - start, 200, p, c)


def test_weighted_tokens_count_output_twice():
    assert weighted_tokens(answer("a", 0, 1, p=10, c=32)) == 10 + 64


def test_service_gap_follows_completions_inside_the_window():
    run = Run(
        [
            answer("tenant-a", 0.0, 0.5),  # before warm-up ended: not counted
            answer("tenant-a", 0.5, 1.5),
            answer("tenant-a", 1.0, 2.0),
            answer("tenant-c", 1.0, 2.5),
            answer("tenant-c", 2.0, 9.0),  # after sending stopped: not counted
            Result("tenant-c", 1.0, 1.0, 429),  # refused: no tokens
        ]
    )
    m = Measurement(Run(), run, warmup_s=1.0, duration_s=5.0)
    per_request = 10 + 2 * 32
    assert m.service_gap() == 2 * per_request  # A's two answers before C's first
    assert [r.end for r in m.served("tenant-c")] == [2.5]


def test_vtc_bound_is_the_theorem_plus_what_counting_at_completion_adds():
    run = Run([answer("tenant-a", 0, 1, p=50, c=32), answer("tenant-c", 0, 1, p=20, c=8)])
    m = Measurement(Run(), run, warmup_s=0.0, duration_s=5.0)
    assert m.longest() == (50, 32)
    theorem = 2 * max(50, 2 * SLOTS * (50 + 32))
    assert m.vtc_bound() == theorem + 2 * (SLOTS + 1) * (50 + 2 * 32)


def test_prompts_differ_per_tenant_and_request():
    assert len({prompt(t, n, 16) for t in ("a", "b") for n in range(50)}) == 100


def test_the_copy_without_flow_control_loses_only_that_section(tmp_path):
    on = copy_example(tmp_path / "on")
    off = copy_example(tmp_path / "off", flow_control=False)
    a = yaml.safe_load(on.picker_config.read_text())
    b = yaml.safe_load(off.picker_config.read_text())
    assert "flowControl" in a and "flowControl" not in b
    a.pop("flowControl")
    assert a == b
    assert off.model == on.model and {p.name for p in off.documents} == {
        p.name for p in EXAMPLE.glob("*.yaml")
    }


def test_markdown_has_a_row_per_mode_and_tenant():
    tenant = {
        "requests": 3,
        "p50_s": 1.0,
        "p90_s": 2.0,
        "p99_s": 3.0,
        "served_requests": 2,
        "prompt_tokens": 20,
        "completion_tokens": 64,
        "weighted_tokens": 148.0,
    }
    result = {
        "tenants": {"tenant-a": tenant, "tenant-b": tenant},
        "b_alone": {"requests": 5, "p50_s": 0.7, "p90_s": 0.8},
        "b_p90_ratio": 2.5,
        "service_gap_a_c": 100.0,
        "vtc_bound": 1000.0,
        "sheddable_status": 429,
        "series": {},
    }
    out = {
        "machine": {"date": "d", "cpu": "c", "cores": 2, "memory_gib": 24},
        "settings": {
            "slots": 16,
            "alone_s": 4.0,
            "duration_s": 10.0,
            "warmup_s": 2.0,
            "tenants": {"tenant-a": "floods", "tenant-b": "steady"},
        },
        "modes": {"off": result, "on": result},
    }
    table = markdown(out)
    assert (
        table.count("| tenant-a |") == 2 and "| on | 0.7 / 0.8 | 2.5x | 100 | 1000 | 429 |" in table
    )
    assert "| 50% |" in table


@pytest.mark.slow
def test_a_quick_run_of_both_modes_writes_json_and_plot(tmp_path):
    assert main(["--quick", "--duration", "6", "--output-dir", str(tmp_path)]) == 0
    [path] = tmp_path.glob("fairness-*-quick.json")
    out = json.loads(path.read_text())
    assert set(out["modes"]) == {"off", "on"}
    for mode in out["modes"].values():
        assert mode["errors"] == 0
        assert set(mode["tenants"]) == {"tenant-a", "tenant-b", "tenant-c"}
        assert all(t["requests"] > 0 for t in mode["tenants"].values())
        assert mode["series"]["tenant-b"]
    # The sheddable `batch` request: refused during the flood either way; with flow control
    # because requests queue in the picker, without because the pod is saturated (the
    # reference picker's admission sheds sheddable requests then too).
    assert out["modes"]["on"]["sheddable_status"] == 429
    assert out["modes"]["off"]["sheddable_status"] == 429
    assert (tmp_path / "fairness-quick.png").stat().st_size > 10_000
