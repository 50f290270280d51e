"""`infergate bench fairness`: three tenants contend for the one pod of examples/fairness,
without flow control and with it (a fresh stack each), through Envoy and the picker.

Per tenant: requests answered, latency p50/p90/p99 and tokens served (prompt, output and
VTC-weighted, from the answers' usage); B's p90 under load over its p90 alone; the largest
gap in weighted tokens between the two backlogged tenants A and C against VTC's bound.
Writes bench/results/fairness-<date>[-quick].json and docs/benchmarks/fairness[-quick].png.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from infergw.api.cli_help import HelpFormatter
from infergw.bench.common import machine, save_results
from infergw.bench.fairness.report import markdown, plot
from infergw.bench.fairness.scenario import SLOTS, TENANTS, Measurement, measure
from infergw.bench.fairness.stack import fairness_stack

QUICK = {"alone_s": 4.0, "duration_s": 10.0, "warmup_s": 2.0}
FULL = {"alone_s": 10.0, "duration_s": 60.0, "warmup_s": 5.0}


def describe(tenant) -> str:
    if tenant.mode == "flood":
        return f"floods, {tenant.concurrency} outstanding"
    return f"1 request every {tenant.interval:g} s"


def series(m: Measurement) -> dict[str, list[list[float]]]:
    """Per tenant, [sent at, latency] of every answered request, for the plot."""
    out: dict[str, list[list[float]]] = {t.name: [] for t in TENANTS}
    for r in sorted(m.contention.results, key=lambda r: r.start):
        if r.ok:
            out[r.tenant].append([round(r.start, 3), round(r.latency, 3)])
    return out


def run_mode(flow_control: bool, settings: dict, workdir: Path) -> dict:
    with fairness_stack(workdir, flow_control=flow_control) as stack:
        m = measure(stack.url, **settings)
    return m.summary() | {"series": series(m)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="infergate bench fairness", description=__doc__, formatter_class=HelpFormatter
    )
    run = p.add_argument_group("Run")
    output = p.add_argument_group("Output")
    run.add_argument("--quick", action="store_true", help="short phases (about a minute in all)")
    run.add_argument("--duration", type=float, default=None, help="seconds the tenants contend")
    run.add_argument("--modes", default="off,on", help="comma-separated: off (no flow control), on")
    output.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where the JSON and PNG go (default: bench/results/ and docs/benchmarks/)",
    )
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if not modes or set(modes) - {"off", "on"}:
        p.error("--modes takes off, on or both")
    settings = dict(QUICK if args.quick else FULL)
    if args.duration is not None:
        settings["duration_s"] = args.duration
    out = {
        "benchmark": "fairness",
        "machine": machine(),
        "settings": settings
        | {
            "slots": SLOTS,
            "tenants": {t.name: describe(t) for t in TENANTS},
            "max_tokens": TENANTS[0].max_tokens,
            "prompt_words": TENANTS[0].prompt_words,
        },
        "modes": {},
    }
    with tempfile.TemporaryDirectory(prefix="infergate-bench-fairness-") as tmp:
        for mode in modes:
            t0 = time.monotonic()
            print(f"flow control {mode}: running ...", flush=True)
            result = run_mode(mode == "on", settings, Path(tmp) / mode)
            out["modes"][mode] = result
            print(
                f"flow control {mode}: B p90 {result['tenants']['tenant-b']['p90_s']} s "
                f"({result['b_p90_ratio']}x alone), gap A-C {result['service_gap_a_c']:.0f} "
                f"(bound {result['vtc_bound']:.0f}), {time.monotonic() - t0:.0f} s",
                flush=True,
            )
    save_results(
        "fairness",
        out,
        quick=args.quick,
        output_dir=args.output_dir,
        plot=plot,
        markdown=markdown,
    )
    return 0
