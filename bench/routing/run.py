"""One benchmark point: a fresh fleet, one router in front of it, one workload at one rate.

Requests that arrive during the warm-up are sent (they fill the caches) but not counted;
the pods' cache counters, the load samples and the router's CPU time cover only the
measured part. Failures are counted, never dropped.

Before any traffic, the router idles for `idle_s` (each pod scraped at the fast interval):
its CPU then, scaled to the measured window, is the part of its cost that is not per request
(scraping, health checks); the rest is charged to the requests. infergate's pickers also
count their scraping's CPU themselves (epp/scrape.py): the measured window's scraping is
taken out of the requests' CPU exactly, however the pace of scraping followed the load.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import dataclass, field

from infergw.bench.client import run_trace
from infergw.bench.common import percentile, process_cpu_seconds
from infergw.bench.routing.client import Outcome, send
from infergw.bench.routing.cpus import CpuSplit, pin
from infergw.bench.routing.fleet import PodWatch, new_stack, workdir
from infergw.bench.routing.routers import RouterUnavailable, Scraping
from infergw.bench.routing.slo import Slo, goodput


@dataclass(slots=True)
class Point:
    router: object  # InfergateRouter | ExternalRouter
    workload: object
    rate: float


@dataclass(slots=True)
class Settings:
    pods: int
    sim_args: list[str]
    warmup_s: float
    duration_s: float
    seed: int
    idle_s: float = 0.0  # 0: no idle baseline, all the router's CPU is charged to requests
    slo: Slo = field(default_factory=Slo)  # what goodput counts
    cpus: CpuSplit | None = None  # pods apart from router and client (routing/cpus.py)
    picker_args: list[str] = field(default_factory=list)  # every infergate picker's


# A point whose fleet or router fails to start (on a busy machine another process can take a
# port between choosing it and the server binding it) is started again on fresh ports: no
# request has been sent yet, so a second start measures the same thing.
START_ATTEMPTS = 3


class _StartFailed(Exception):
    """The fleet or the router did not come up; nothing was measured."""


def run_point(point: Point, s: Settings, on_request=None) -> dict:
    row = {"router": point.router.name, "workload": point.workload.name, "rate": point.rate}
    load_before = os.getloadavg()[0]
    failures: list[str] = []
    while True:
        try:
            row |= _run_once(point, s, on_request)
            break
        except _StartFailed as exc:
            failures.append(str(exc.__cause__ or exc))
            if len(failures) == START_ATTEMPTS:
                row["unavailable"] = f"failed to start {len(failures)} times: {failures[-1]}"
                break
        except RouterUnavailable as exc:
            row["unavailable"] = str(exc)
            break
        except (RuntimeError, OSError, TimeoutError) as exc:  # failed while measuring
            row["unavailable"] = f"failed: {exc}"
            break
    if failures:
        row["start_failures"] = failures
    # The machine's 1-minute load average at the point's start and end: other work on it.
    row["load_average"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    return row


def _run_once(point: Point, s: Settings, on_request) -> dict:
    row: dict = {}
    stack = new_stack(workdir(point.router.name), s.pods, s.sim_args, None, s.picker_args)
    own_cpus = os.sched_getaffinity(0)
    try:
        if s.cpus is not None:  # this process is the load generator
            pin([os.getpid()], s.cpus.router)
        try:
            stack.start_pods()
            url = point.router.start(stack)
            idle = point.router.idle_baseline(s.idle_s) if s.idle_s > 0 else None
        except RouterUnavailable:
            raise
        except (RuntimeError, OSError, TimeoutError) as exc:
            raise _StartFailed(f"{point.router.name} at {point.rate} req/s") from exc
        pods = [stack.procs[f"pod-{port}"].pid for port in stack.pod_ports]
        if s.cpus is not None:  # after the idle baseline: it restarts the picker
            row["pinned_threads"] = {
                "pods": pin(pods, s.cpus.pods),
                "router": pin(list(point.router.pids().values()), s.cpus.router),
            }
        trace = point.workload.trace(point.rate, s.warmup_s + s.duration_s, s.seed)
        measure = _measure(url, stack.pod_addresses, pods, trace, point, s, on_request)
        row |= asyncio.run(measure)
        if idle is not None:
            row |= split_cpu(row, {n: v / s.idle_s for n, v in idle.items()})
        return row
    finally:
        point.router.stop()
        stack.stop()
        if s.cpus is not None:
            pin([os.getpid()], frozenset(own_cpus))


async def _measure(url, pods, pod_pids, trace, point: Point, s: Settings, on_request) -> dict:
    async with PodWatch(pods) as watch:
        pids = point.router.pids()
        marks: dict[str, object] = {}

        async def at_warmup_end() -> None:
            await asyncio.sleep(s.warmup_s)
            marks["counters"] = await watch.counters()
            marks["cpu"] = {n: process_cpu_seconds(p) for n, p in pids.items()}
            marks["pods_cpu"] = sum(map(process_cpu_seconds, pod_pids))
            marks["scraping"] = point.router.scraping()
            marks["t"] = time.monotonic()
            watch.start_sampling()

        mark = asyncio.create_task(at_warmup_end())
        outcomes = await run_trace(url, trace, send, on_request)
        await mark
        end = time.monotonic()
        cpu = {n: process_cpu_seconds(p) - marks["cpu"][n] for n, p in pids.items()}
        pods_cpu = sum(map(process_cpu_seconds, pod_pids)) - marks["pods_cpu"]
        scraping = point.router.scraping()
        hits, queries = (
            b - a for a, b in zip(marks["counters"], await watch.counters(), strict=True)
        )
        await watch.stop_sampling()
        row = summarize(
            [o for o in outcomes if o.at >= s.warmup_s],
            seconds=end - marks["t"],
            hit_rate=hits / queries if queries else None,
            imbalance=watch.imbalance(),
            router_cpu_s=cpu,
            slo=s.slo,
        )
        row["measured_s"] = round(end - marks["t"], 2)
        row["router_cpu_s"] = {n: round(v, 3) for n, v in cpu.items()}
        # The pods' own CPU: what a router makes them spend (pages rendered for its scraping)
        # shows here, and on a split machine whether their CPUs were enough.
        row["pods_cpu_cores"] = round(pods_cpu / row["measured_s"], 3)
        row["pods_cpu_ms_per_request"] = per_request(pods_cpu, row["requests"] - row["errors"])
        if scraping is not None and marks["scraping"] is not None:
            row |= split_scraping(row, scraping.since(marks["scraping"]))
        return row


def split_scraping(row: dict, scraping: Scraping) -> dict:
    """The router's CPU per request apart from what its scraping took (the picker counts
    its scraping's CPU: epp/scrape.py), and the pages it fetched a second."""
    done = row["requests"] - row["errors"]
    out = {"scrape_pages_per_s": round(scraping.pages / row["measured_s"], 1)}
    if scraping.cpu_s is not None:
        total = sum(row["router_cpu_s"].values())
        out["router_cpu_ms_per_request_scraping"] = per_request(scraping.cpu_s, done)
        out["router_cpu_ms_per_request_without_scraping"] = per_request(
            total - scraping.cpu_s, done
        )
    return out


def split_cpu(row: dict, idle_cores: dict[str, float]) -> dict:
    """The router's CPU per request above what it spends idle (scraping, health checks) over
    the same window; `idle_cores`: CPU seconds per second of each process, idle."""
    done = row["requests"] - row["errors"]
    seconds = row["measured_s"]
    above = {
        n: max(0.0, total - idle_cores.get(n, 0.0) * seconds)
        for n, total in row["router_cpu_s"].items()
    }
    return {
        "router_idle_cpu_pct": {n: round(100 * v, 2) for n, v in idle_cores.items()},
        "router_cpu_ms_per_request_above_idle": per_request(sum(above.values()), done),
        "router_cpu_ms_per_request_above_idle_by_process": {
            n: per_request(v, done) for n, v in above.items()
        },
    }


def summarize(
    measured: list[Outcome],
    *,
    seconds: float,
    hit_rate: float | None,
    imbalance: float | None,
    router_cpu_s: dict[str, float],
    slo: Slo,
) -> dict:
    """One point's row; failed requests count in `requests`, `errors` and against goodput."""
    done = [o for o in measured if o.ok]
    ttfts = [o.ttft for o in done if o.ttft is not None]
    tpots = [o.tpot for o in done if o.tpot is not None]
    prompt = sum(o.prompt_tokens for o in done)
    cached = sum(o.cached_tokens for o in done)
    ms = lambda v: round(1000 * v, 1)  # noqa: E731
    good_per_s, good_share = goodput(measured, seconds, slo)
    return {
        "requests": len(measured),
        "errors": len(measured) - len(done),
        "ttft_mean_ms": ms(statistics.fmean(ttfts)) if ttfts else None,
        "ttft_p50_ms": ms(percentile(ttfts, 50)),
        "ttft_p90_ms": ms(percentile(ttfts, 90)),
        "ttft_p99_ms": ms(percentile(ttfts, 99)),
        "tpot_p50_ms": round(1000 * percentile(tpots, 50), 2),
        "output_tokens_per_s": round(sum(o.tokens for o in done) / seconds, 1),
        "requests_per_s": round(len(done) / seconds, 2),
        "goodput_per_s": round(good_per_s, 2),
        "slo_met_share": round(good_share, 3) if good_share is not None else None,
        "prefix_hit_rate": round(hit_rate, 3) if hit_rate is not None else None,
        "cached_share": round(cached / prompt, 3) if prompt else None,
        "load_imbalance": imbalance,
        "router_cpu_ms_per_request": per_request(sum(router_cpu_s.values()), len(done)),
        "router_cpu_ms_per_request_by_process": {
            n: per_request(v, len(done)) for n, v in router_cpu_s.items()
        },
    }


def per_request(seconds: float, requests: int) -> float | None:
    return round(1000 * seconds / requests, 2) if requests else None
