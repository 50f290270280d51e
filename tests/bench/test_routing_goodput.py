"""bench/routing's goodput and mean TTFT: counted on outcomes built here, the TPOT they rest
on measured from a real stream, and both in the table, the JSON row and the plots."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from infergw.bench.routing.client import Outcome, send
from infergw.bench.routing.plots import plot
from infergw.bench.routing.report import COLUMNS, markdown
from infergw.bench.routing.run import summarize
from infergw.bench.routing.slo import Slo, goodput
from infergw.bench.routing.workloads import Arrival
from infergw.bench.workload import completion
from infergw.stack.ports import free_port


def _done(ttft: float, tpot: float | None) -> Outcome:
    return Outcome(at=10.0, ok=True, ttft=ttft, tpot=tpot, tokens=16)


# (outcome, meets TTFT ≤ 1 s and TPOT ≤ 50 ms)
CASES = [
    (_done(0.2, 0.010), True),
    (_done(1.0, 0.050), True),  # both bounds are inclusive
    (_done(1.001, 0.010), False),  # first token late
    (_done(0.2, 0.051), False),  # decode too slow
    (_done(2.0, 0.200), False),
    (_done(0.5, None), True),  # one token: no TPOT to miss
    (Outcome(at=10.0, ok=False, status=503), False),  # a failure never meets it
    (Outcome(at=10.0, ok=False, ttft=0.1, tpot=0.01), False),  # started, then broke
]


def test_goodput_counts_exactly_the_requests_meeting_both_bounds():
    slo = Slo(ttft_s=1.0, tpot_s=0.050)
    assert [slo.met_by(o) for o, _ in CASES] == [want for _, want in CASES]
    per_s, share = goodput([o for o, _ in CASES], seconds=2.0, slo=slo)
    assert per_s == pytest.approx(3 / 2.0) and share == pytest.approx(3 / 8)
    assert goodput([], 2.0, slo) == (0.0, None)
    # A looser SLO counts more of the same requests.
    assert goodput([o for o, _ in CASES], 2.0, Slo(2.0, 0.2))[0] == pytest.approx(6 / 2.0)


def test_a_row_reports_mean_ttft_and_goodput_of_the_measured_requests():
    outcomes = [o for o, _ in CASES]
    row = summarize(
        outcomes,
        seconds=4.0,
        hit_rate=None,
        imbalance=None,
        router_cpu_s={},
        slo=Slo(),
    )
    ttfts = [0.2, 1.0, 1.001, 0.2, 2.0, 0.5]  # the six that finished
    assert row["ttft_mean_ms"] == pytest.approx(1000 * sum(ttfts) / len(ttfts), abs=0.05)
    assert row["requests"] == 8 and row["errors"] == 2
    assert row["goodput_per_s"] == 0.75 and row["slo_met_share"] == 0.375
    assert row["requests_per_s"] == 1.5
    json.dumps(row)  # the JSON results hold it as it is


def test_tpot_is_measured_from_the_streamed_tokens():
    """A local server streams 6 tokens 40 ms apart after a 150 ms wait, then usage: TTFT is
    the wait, TPOT the gap. A second stream sends two tokens a chunk and says so in its
    usage: TPOT counts tokens, not chunks."""
    gap, wait = 0.04, 0.15
    served = []

    async def stream(request: web.Request) -> web.StreamResponse:
        served.append(request)
        per_chunk = len(served)  # the first answer one token a chunk, the second two
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(wait)
        for i in range(6):
            if i:
                await asyncio.sleep(gap * per_chunk)
            chunk = {"choices": [{"index": 0, "text": "ab" * per_chunk}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"prompt_tokens": 5, "completion_tokens": 6 * per_chunk}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def run() -> tuple[Outcome, Outcome]:
        app = web.Application()
        app.router.add_post("/v1/completions", stream)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with aiohttp.ClientSession() as session:
                arrival = Arrival(0.0, "completions", completion("hi", 6))
                one = await send(session, f"http://127.0.0.1:{port}", arrival)
                two = await send(session, f"http://127.0.0.1:{port}", arrival)
                return one, two
        finally:
            await runner.cleanup()

    one, two = asyncio.run(run())
    assert one.ok and one.tokens == 6 and one.prompt_tokens == 5
    # Upper bounds wide enough for a busy machine's late wake-ups, narrow enough to tell
    # tokens from chunks (and n - 1 gaps from n).
    assert wait <= one.ttft < wait + 0.25
    assert gap <= one.tpot < 1.6 * gap
    # 6 chunks, 12 tokens, 80 ms between chunks: 5 × 80 ms over 11 tokens, not 5 × 80 / 5.
    assert two.ok and two.tokens == 6
    assert 5 * 2 * gap / 11 <= two.tpot < 1.6 * 5 * 2 * gap / 11


def test_tpot_counts_the_tokens_the_usage_reports_not_the_chunks():
    from infergw.bench.routing.client import tpot

    assert tpot(1.0, 1.5, 6) == pytest.approx(0.1)
    assert tpot(1.0, 1.5, 11) == pytest.approx(0.05)  # five chunks of two tokens after the first
    assert tpot(1.0, 1.0, 1) is None


def _out(rows: list[dict]) -> dict:
    return {
        "machine": {"date": "d", "cpu": "c", "cores": 2, "memory_gib": 1},
        "settings": {
            "pods": 2,
            "warmup_s": 1.0,
            "duration_s": 3.0,
            "seed": 1,
            "slo": Slo(0.5, 0.03).describe(),
        },
        "workloads": [{"name": "w", "groups": 2}],
        "rows": rows,
        "oracle": [
            {
                "workload": "w",
                "rate": 4.0,
                "hit_rate": 0.5,
                "ttft_mean_ms": 11.0,
                "ttft_p50_ms": 10.0,
                "ttft_p90_ms": 20.0,
                "ttft_p99_ms": 30.0,
            }
        ],
    }


ROW = {
    "router": "r",
    "workload": "w",
    "rate": 4.0,
    "ttft_mean_ms": 123.4,
    "ttft_p90_ms": 200.0,
    "goodput_per_s": 3.5,
    "slo_met_share": 0.875,
    "requests_per_s": 4.0,
    "cached_share": 0.4,
    "prefix_hit_rate": 0.4,
}


def test_the_table_shows_mean_ttft_goodput_and_which_slo():
    table = markdown(_out([ROW]))
    assert "Goodput: requests per second with TTFT ≤ 500 ms and TPOT ≤ 30 ms." in table
    header = next(line for line in table.splitlines() if line.startswith("| router"))
    assert "TTFT mean ms" in header and "goodput req/s" in header
    row = next(line for line in table.splitlines() if line.startswith("| r |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    names = [h for _, h in COLUMNS]
    assert cells[names.index("TTFT mean ms")] == "123.4"
    assert cells[names.index("goodput req/s")] == "3.5"
    oracle = next(line for line in table.splitlines() if line.startswith("| *oracle"))
    cells = [c.strip() for c in oracle.strip("|").split("|")]
    assert len(cells) == len(COLUMNS)
    assert cells[names.index("TTFT mean ms")] == "11.0"
    assert cells[names.index("cached on admission")] == "0.5"


def test_the_plots_include_goodput_per_router(tmp_path):
    paths = plot(_out([ROW, ROW | {"router": "s", "goodput_per_s": 1.0}]), tmp_path)
    assert [p.name for p in paths] == [
        "routing-ttft.png",
        "routing-hits.png",
        "routing-goodput.png",
    ]
    assert all(p.stat().st_size > 1000 for p in paths)
