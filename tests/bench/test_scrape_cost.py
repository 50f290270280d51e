"""bench/scrape_cost: one pod, each setting measured, and the table names them all."""

from __future__ import annotations

import pytest

from infergw.bench.scrape_cost import markdown, run_fleet


@pytest.mark.slow
def test_one_pod_is_measured_alone_scraped_fast_and_resting():
    rows = run_fleet(1, recorded_page=False, seconds=1.0)
    assert [r["setting"] for r in rows] == [
        "pods alone",
        "scraped every 50ms",
        "idle pods rest (default)",
    ]
    assert rows[0]["picker_cpu_pct"] is None
    assert all(r["picker_cpu_pct"] is not None and r["picker_cpu_pct"] >= 0 for r in rows[1:])
    out = {
        "machine": {"date": "d", "cpu": "c", "cores": 2},
        "load_before": "1 1 1",
        "settings": {"pods": 1, "seconds": 1.0},
        "rows": rows,
    }
    assert "| simulator | scraped every 50ms |" in markdown(out)
