"""`infergate bench routing`: every router, workload and rate on the same fleet and seed."""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

from infergw.api.cli_help import HelpFormatter
from infergw.bench.common import PLOTS, RESULTS, machine, positive_number, rate_list, write_json
from infergw.bench.routing.arrivals import ARRIVALS
from infergw.bench.routing.catalog import plan, with_arrivals
from infergw.bench.routing.cpus import parse_split
from infergw.bench.routing.oracle import oracle
from infergw.bench.routing.plots import plot
from infergw.bench.routing.report import markdown
from infergw.bench.routing.routers import (
    COMPARISON_PROFILES,
    EXTERNAL_ROUTERS,
    INFERGATE_PROFILES,
    PICKER_VARIANTS,
    InfergateRouter,
)
from infergw.bench.routing.run import Point, Settings, run_point
from infergw.bench.routing.slo import Slo
from infergw.epp.scrape_pace import (
    DEFAULT_IDLE_INTERVAL,
    DEFAULT_QUIET_INTERVAL,
    DEFAULT_REFRESH_INTERVAL,
)
from infergw.simulator.latency_profiles import PROFILES

# Prefill of uncached tokens dominates TTFT (150 µs a token: ~0.3 s for a 2k-token
# prompt); each pod's cache has room for about three of the group prefixes.
BLOCK_SIZE = 16
CACHE_BLOCKS = 320
PREFILL_US = 150.0
CACHE_ARGS = [
    "--block-size",
    str(BLOCK_SIZE),
    "--num-gpu-blocks-override",
    str(CACHE_BLOCKS),
    "--max-num-seqs",
    "64",
]
SIM_ARGS = ["--sim-prefill-us-per-token", str(PREFILL_US), *CACHE_ARGS]


def latency(profile: str | None, time_scale: float = 1.0) -> tuple[list[str], float]:
    """The pods' simulator flags and the prefill µs a token the oracle assumes: the bench's
    own model (150 µs a token), or a named latency profile (simulator/latency_profiles.py)
    whose prefill then stands (the oracle ignores its attention term, step overhead and
    weight-read floor, so it slightly underestimates TTFT); both `time_scale` times slower."""
    if profile is None:
        args, prefill_us = SIM_ARGS, PREFILL_US
    else:
        model = PROFILES[profile].model
        args = ["--sim-latency-profile", profile, *CACHE_ARGS]
        prefill_us = model.prefill_s_per_token * 1e6
    if time_scale != 1.0:
        args = [*args, "--sim-time-scale", str(time_scale)]
    return args, prefill_us * time_scale


def scaled_scraping(time_scale: float) -> list[str]:
    """The picker's scrape intervals in the pods' time: with pods S× slower, S× longer, so
    the picker reads a pod as often a simulated second as unscaled. Rendering a page costs the
    simulator's one event loop real CPU (4 ms), where vLLM renders in its API server beside
    the engine; unscaled intervals at S = 4 cost the pods 4× their share of it and slowed
    their steps under infergate alone."""
    if time_scale == 1.0:
        return []
    return [
        "--refresh-metrics-interval",
        f"{DEFAULT_REFRESH_INTERVAL * time_scale:g}",
        "--quiet-metrics-interval",
        f"{DEFAULT_QUIET_INTERVAL * time_scale:g}",
        "--idle-metrics-interval",
        f"{DEFAULT_IDLE_INTERVAL * time_scale:g}",
    ]


# Two picker replicas behind one Envoy, against one picker: what active-active costs in
# routing quality. Run when named (--routers), not by default.
def replicated_routers() -> list[InfergateRouter]:
    return [InfergateRouter("precise", pickers=2), InfergateRouter("approximate", pickers=2)]


REPLICATED = tuple(r.name for r in replicated_routers())


def all_routers() -> dict:
    routers = {f"infergate-{c}": InfergateRouter(c) for c in INFERGATE_PROFILES}
    routers |= {r.name: r for r in EXTERNAL_ROUTERS()}
    routers |= {r.name: r for r in replicated_routers()}
    return routers


def variants() -> dict:
    """Pickers run only when named: each profile under each set of other flags, and the
    comparison profiles."""
    flagged = (InfergateRouter(c, v) for c in INFERGATE_PROFILES for v in PICKER_VARIANTS)
    compared = (InfergateRouter(c) for c in COMPARISON_PROFILES)
    return {r.name: r for r in (*flagged, *compared)}


def with_baselines(chosen: list, commits: list[str]) -> list:
    """Each infergate router followed by its twin at every commit (its picker from
    bench/checkout.py), so the two run back to back on the same workload and rate."""
    if not commits:
        return chosen
    from infergw.bench import checkout

    work = Path(tempfile.mkdtemp(prefix="bench-routing-checkout-"))
    paths = {c: checkout.importable(c, work / c.replace("/", "_")) for c in commits}
    out = []
    for router in chosen:
        out.append(router)
        if isinstance(router, InfergateRouter):
            out += [dataclasses.replace(router, commit=c, checkout=paths[c]) for c in commits]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="infergate bench routing", description=__doc__, formatter_class=HelpFormatter
    )
    run = p.add_argument_group("Run")
    fleet = p.add_argument_group("Fleet")
    compared = p.add_argument_group("Routers and workloads")
    slos = p.add_argument_group("SLOs")
    comparison = p.add_argument_group("Comparison")
    run.add_argument("--quick", action="store_true", help="4 pods, one workload and rate (< 3 min)")
    compared.add_argument(
        "--routers",
        default=None,
        help="comma-separated names (default: all but the -x2 replicas)",
    )
    fleet.add_argument("--pods", type=int, default=None, help="simulator pods")
    compared.add_argument(
        "--workloads",
        default=None,
        help="comma-separated: "
        + ", ".join(w.name for w, _ in plan(False, 1))
        + " (default: all; --quick runs shared-prefix only unless asked)",
    )
    run.add_argument(
        "--arrivals",
        choices=sorted(ARRIVALS),
        default="poisson",
        help="every chosen workload's arrival process (bursty: on-off bursts at "
        f"{ARRIVALS['bursty'].peak_factor:g}× the mean rate; the workload's name gets "
        "+bursty); the bursty workload is always bursty",
    )
    slos.add_argument(
        "--slo-ttft-ms",
        type=float,
        default=1000 * Slo().ttft_s,
        help="goodput counts requests whose first token came within this (default %(default)g)",
    )
    slos.add_argument(
        "--slo-tpot-ms",
        type=float,
        default=1000 * Slo().tpot_s,
        help="... and whose later tokens came this far apart or less on average "
        "(default %(default)g)",
    )
    run.add_argument("--duration", type=float, default=None, help="measured seconds per point")
    run.add_argument(
        "--rates",
        type=rate_list,
        default=None,
        help="comma-separated request rates for every workload (default: each workload's own); "
        "a low rate keeps a shared machine's CPU out of a routing-quality comparison",
    )
    run.add_argument("--seed", type=int, default=7, help="random seed of the workload")
    comparison.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="COMMIT",
        help="also run each chosen infergate router with this commit's picker, right after "
        "it (infergate-precise@COMMIT): before/after in one run (repeatable)",
    )
    run.add_argument(
        "--idle",
        type=float,
        default=None,
        help="seconds each router idles before the traffic, to tell its per-request CPU "
        "from scraping and housekeeping (default 4, 0: off)",
    )
    fleet.add_argument(
        "--sim-latency-profile",
        choices=sorted(PROFILES),
        default=None,
        help="the pods' latency profile (default: the bench's own, 150 µs a prefill token); "
        "a calibrated one prefills ~4× faster, so rates may need raising",
    )
    fleet.add_argument(
        "--sim-time-scale",
        type=positive_number,
        default=1.0,
        help="the pods' simulated time runs this many times slower (4: every step and prefill "
        "4× as long) and the SLOs stretch with it; divide --rates by it for the same load a "
        "pod for 1/S of the CPU, so a busy machine's contention weighs less (default 1)",
    )
    fleet.add_argument(
        "--cpu-split",
        default="auto",
        metavar="auto|off|PODS/ROUTER",
        help="the pods on one set of CPUs, the router under test and the load generator on "
        "the other, as a fleet and its router never share CPUs (auto: a quarter, at least one, "
        "for the router; 0/1: CPU 0 for the pods, 1 for the router; off: all share all). "
        "Recorded in the JSON's settings (default %(default)s)",
    )
    run.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where the JSON and PNGs go (default: bench/results/ and docs/benchmarks/, "
        "whose plots the README shows: a partial run belongs elsewhere)",
    )
    args = p.parse_args(argv)
    try:
        cpus = parse_split(args.cpu_split, os.sched_getaffinity(0))
    except ValueError as exc:
        p.error(str(exc))
    pods = args.pods or (4 if args.quick else 8)
    scale = args.sim_time_scale
    sim_args, prefill_us = latency(args.sim_latency_profile, scale)
    settings = Settings(
        pods=pods,
        sim_args=sim_args,
        warmup_s=4.0 if args.quick else 5.0,
        duration_s=args.duration or (10.0 if args.quick else 18.0),
        seed=args.seed,
        idle_s=4.0 if args.idle is None else args.idle,
        slo=Slo(scale * args.slo_ttft_ms / 1000, scale * args.slo_tpot_ms / 1000),
        cpus=cpus,
        picker_args=scaled_scraping(scale),
    )
    routers = all_routers()
    chosen = (
        args.routers.split(",") if args.routers else [r for r in routers if r not in REPLICATED]
    )
    routers |= variants()
    unknown = [r for r in chosen if r not in routers]
    if unknown:
        p.error(f"unknown routers {unknown}; known: {', '.join(routers)}")
    work = plan(args.quick, pods)
    names = [w.name for w, _ in work]
    wanted = args.workloads.split(",") if args.workloads else names[:1] if args.quick else names
    if set(wanted) - set(names):
        p.error(f"unknown workloads {sorted(set(wanted) - set(names))}; known: {names}")
    work = [(with_arrivals(w, args.arrivals), rates) for w, rates in work if w.name in wanted]
    if args.rates:
        work = [(w, args.rates) for w, _ in work]
    chosen = with_baselines([routers[r] for r in chosen], args.baseline)
    points = [Point(r, wl, rate) for wl, rates in work for rate in rates for r in chosen]
    rows = _run_with_progress(points, settings)
    oracles = [
        {"workload": wl.name, "rate": rate}
        | vars_of(
            oracle(
                wl.trace(rate, settings.warmup_s + settings.duration_s, settings.seed),
                pods=pods,
                capacity_blocks=CACHE_BLOCKS - 1,  # block 0 is vLLM's null block
                block_size=BLOCK_SIZE,
                prefill_us_per_token=prefill_us,
                measured_from=settings.warmup_s,
            )
        )
        for wl, rates in work
        for rate in rates
    ]
    out = {
        "benchmark": "routing",
        "machine": machine(),
        "settings": vars_of(settings)
        | {"slo": settings.slo.describe(), "cpus": cpus.describe() if cpus else None},
        "workloads": [wl.describe() for wl, _ in work],
        "rows": rows,
        "oracle": oracles,
    }
    name = f"routing-{out['machine']['date']}" + ("-quick" if args.quick else "")
    print("wrote", write_json(name, out, args.output_dir or RESULTS))
    for path in plot(out, args.output_dir or PLOTS):
        print("wrote", path)
    print(markdown(out))
    return 0


def vars_of(obj) -> dict:
    return {k: getattr(obj, k) for k in obj.__slots__}


def _run_with_progress(points: list[Point], settings: Settings) -> list[dict]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    rows = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns) as progress:
        overall = progress.add_task("points", total=len(points))
        for point in points:
            label = f"{point.router.name} · {point.workload.name} · {point.rate} req/s"
            expected = len(
                point.workload.trace(
                    point.rate, settings.warmup_s + settings.duration_s, settings.seed
                )
            )
            task = progress.add_task(label, total=expected)
            t0 = time.monotonic()
            row = run_point(point, settings, on_request=lambda _o, t=task: progress.advance(t))
            row["seconds"] = round(time.monotonic() - t0, 1)
            rows.append(row)
            progress.remove_task(task)
            progress.advance(overall)
            progress.console.print(_one_line(row))
    return rows


def _one_line(row: dict) -> str:
    head = f"{row['router']:<26} {row['workload']:<14} {row['rate']:>5}"
    if "unavailable" in row:
        return f"{head}  not run: {row['unavailable']}"
    return (
        f"{head}  TTFT p90 {row['ttft_p90_ms']:>7} ms  goodput {row['goodput_per_s']}/s"
        f"  hit {row['prefix_hit_rate']}  imbalance {row['load_imbalance']}  errors {row['errors']}"
        f"  TPOT p50 {row['tpot_p50_ms']} ms  pods' CPU {row['pods_cpu_cores']} cores"
        f"  load {row['load_average']}"
    )
