"""Requests per second through one Envoy with 1, 2, 4 picker processes (active-active).

Each count gets a fresh stack: simulator pods with a fast latency model (--sim-time-scale 0.1,
so the gateway's own cost shows), the quickstart's scheduling (precise prefix scorer with its
tokenizer, queue, KV-cache and in-flight scorers), every picker subscribed to every pod's KV
events (per pod), Envoy spreading ext_proc streams over the pickers, and C closed-loop clients
for D seconds. With `--kv-index memory,redis` each count runs twice, side by side: every picker
ingesting every pod's events into its own index (memory), and one shared index in a
redis-server the stack starts, each pod's events ingested by one picker (redis: sharded,
epp/kv_shards.py; one picker alone subscribes to all). With `--scrapes shared,each` each count
also runs twice: each pod's /metrics scraped by its owner and shared (the default,
epp/scrape_shares.py), and by every picker (`--no-share-scrapes`). It reports req/s, latency,
and the CPU per request of all pickers together and of Envoy, from /proc. Each picker also
works with no traffic (scraping every pod every 50 ms, its KV-event subscriptions): that idle
CPU is measured first, for IDLE_SECONDS, and taken out of the per-request figure. From both
comes what the count would serve on a machine with a core for each picker: N × (1 − idle share)
/ CPU per request, while Envoy and the pods keep up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from infergw.api.cli_help import HelpFormatter
from infergw.bench.common import machine, percentile, process_cpu_seconds, write_json
from infergw.bench.loadgen import run_load
from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.ports import free_port, free_stack_ports

MODEL = "infergate-sim"
IDLE_SECONDS = 3.0


def measure(
    pickers: int,
    pods: int,
    concurrency: int,
    duration: float,
    max_tokens: int,
    kv_index: str,
    scrapes: str = "shared",
) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-pickers-"))
    stack = LocalStack(
        StackConfig(
            workdir=workdir,
            pods=pods,
            ports=free_stack_ports(pods, per_pod_kv=True, pickers=pickers),
            pod_ports=[free_port() for _ in range(pods)],
            pickers=pickers,
            sim_args=["--sim-time-scale", "0.1", "--log-level", "warning"],
            picker_args=["--log-level", "warning"]
            + (["--no-share-scrapes"] if scrapes == "each" else []),
            kv_index=kv_index,
        )
    ).start()
    try:
        url = stack.url + "/v1/completions"

        def body(i: int, n: int) -> dict:
            return {
                "model": MODEL,
                "prompt": f"client {i} request {n}: " + "hello " * 50,
                "max_tokens": max_tokens,
                "ignore_eos": True,
            }

        pids = {
            name: stack.procs[name].pid
            for name in [*map(stack.picker_name, stack.picker_indexes), "envoy"]
        }
        names = [stack.picker_name(i) for i in stack.picker_indexes]
        idle0 = {name: process_cpu_seconds(pids[name]) for name in names}
        time.sleep(IDLE_SECONDS)
        idle = {
            name: (process_cpu_seconds(pids[name]) - idle0[name]) / IDLE_SECONDS for name in names
        }
        received0 = kv_messages(stack)
        cpu0 = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
        t0 = time.monotonic()
        res = asyncio.run(run_load(url, body, concurrency, duration))
        wall = time.monotonic() - t0
        cpu = {name: process_cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
        received = kv_messages(stack) - received0
    finally:
        stack.stop()
    # CPU covers the whole run (warm-up included): per request of the whole run.
    per_request = 1e6 / max(res.requests + res.errors, 1) * (res.wall / wall)
    pickers_cpu = sum(v for k, v in cpu.items() if k != "envoy")
    idle_cpu = sum(idle.values())  # cores' worth, all pickers, with no traffic
    picker_us = max(pickers_cpu - idle_cpu * wall, 0.0) * per_request
    idle_share = idle_cpu / pickers  # of each picker's core
    return {
        "pickers": pickers,
        "kv_index": kv_index,
        "scrapes": scrapes,
        "requests": res.requests,
        "errors": res.errors,
        "throughput_rps": round(res.requests / res.wall, 2),
        "p50_ms": round(1000 * percentile(res.latencies, 50), 2),
        "p99_ms": round(1000 * percentile(res.latencies, 99), 2),
        "pickers_cpu_us_per_request": round(picker_us, 1),
        "idle_cpu_percent_per_picker": round(100 * idle_share, 1),
        "envoy_cpu_us_per_request": round(cpu["envoy"] * per_request, 1),
        # KV-event messages all pickers together ingested per request: N × the pods' with
        # every picker subscribing, 1 × sharded.
        "kv_messages_per_request": round(received / max(res.requests + res.errors, 1), 2),
        # Each picker's share of the CPU: how evenly Envoy spread the streams.
        "picker_cpu_shares": [
            round(cpu[stack.picker_name(i)] / max(pickers_cpu, 1e-9), 3) for i in range(pickers)
        ],
        # With a core per picker, what is left after idle work / CPU per request, if Envoy
        # and the pods keep up.
        "pickers_bound_rps": round(pickers * (1 - idle_share) * 1e6 / max(picker_us, 1e-9), 1),
    }


def kv_messages(stack: LocalStack) -> float:
    """KV-event messages every picker received so far, summed (from their /metrics)."""
    series = 'infergate_kvindex_messages_total{outcome="received"} '
    total = 0.0
    for i in stack.picker_indexes:
        url = f"http://127.0.0.1:{stack.picker_ports(i).metrics}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(series):
                    total += float(line.rsplit(" ", 1)[1])
    return total


def markdown(out: dict) -> str:
    m = out["machine"]
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, load average "
        f"{out['load_before']} before), {out['pods']} simulator pods (time scale 0.1, "
        f"{out['max_tokens']} output tokens), {out['concurrency']} closed-loop clients, "
        f"{out['duration_s']:.0f} s per count, quickstart scheduling.",
        "",
        "| pickers | KV index | scraping | req/s | vs 1 | p50 ms | p99 ms "
        "| pickers' CPU µs/req (idle work out) | KV messages ingested per req (all pickers) "
        "| idle CPU per picker | Envoy CPU µs/req "
        "| CPU share per picker | bound with a core per picker (req/s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = out["runs"][0]["throughput_rps"]
    for r in out["runs"]:
        kv = "Redis, sharded" if r["kv_index"] == "redis" and r["pickers"] > 1 else r["kv_index"]
        lines.append(
            f"| {r['pickers']} | {kv} | {r.get('scrapes', 'each')} | {r['throughput_rps']:.0f} | "
            f"{r['throughput_rps'] / base:.2f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['pickers_cpu_us_per_request']:.0f} | "
            f"{r['kv_messages_per_request']:.2f} | "
            f"{r['idle_cpu_percent_per_picker']:.0f} % | "
            f"{r['envoy_cpu_us_per_request']:.0f} | "
            f"{' / '.join(f'{s:.2f}' for s in r['picker_cpu_shares'])} | "
            f"{r['pickers_bound_rps']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="infergate bench pickers", description=__doc__, formatter_class=HelpFormatter
    )
    load = p.add_argument_group("Fleet and load")
    pickers = p.add_argument_group("Pickers")
    load.add_argument("--counts", default="1,2,4", help="picker counts, comma-separated")
    load.add_argument("--pods", type=int, default=4, help="simulator pods")
    load.add_argument("--concurrency", type=int, default=32, help="clients sending at once")
    load.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    load.add_argument("--max-tokens", type=int, default=16, help="output tokens a request")
    pickers.add_argument(
        "--kv-index",
        default="memory",
        help="memory, redis or both (comma-separated: each count runs with each, in turn)",
    )
    pickers.add_argument(
        "--scrapes",
        default="shared",
        help="shared (each pod scraped by its owner, epp/scrape_shares.py), each (every picker "
        "scrapes every pod), or both: each count runs with each, in turn",
    )
    args = p.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    if not counts or min(counts) < 1:
        p.error("--counts: positive integers")
    kv_indexes = args.kv_index.split(",")
    if not kv_indexes or not set(kv_indexes) <= {"memory", "redis"}:
        p.error("--kv-index: memory, redis or memory,redis")
    scrape_modes = args.scrapes.split(",")
    if not scrape_modes or not set(scrape_modes) <= {"shared", "each"}:
        p.error("--scrapes: shared, each or shared,each")
    load_before = round(os.getloadavg()[0], 2)
    runs = []
    for n in counts:
        for kv in kv_indexes:
            for scrapes in scrape_modes:
                r = measure(
                    n, args.pods, args.concurrency, args.duration, args.max_tokens, kv, scrapes
                )
                print(json.dumps(r), flush=True)
                runs.append(r)
    out = {
        "benchmark": "pickers",
        "machine": machine(),
        "load_before": load_before,
        "load_after": round(os.getloadavg()[0], 2),
        "pods": args.pods,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "max_tokens": args.max_tokens,
        "runs": runs,
    }
    print("wrote", write_json("pickers", out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
