"""How many concurrent streams and output tokens per second one simulator process sustains.

A simulator runs as its own process with the default latency model; this process drives it
with C concurrent streaming clients (each request: a ~256-token prompt, 128 output tokens,
ignore_eos) for a fixed window per level, and reads the simulator's CPU time from /proc.
"Sustained" means the simulator stayed under 90% of one core and its engine steps ran less
than 10% longer than the latency model asked for (infergate_sim:step_busy_seconds against
infergate_sim:step_modeled_seconds), i.e. the
Python process was not what set the pace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

import aiohttp

from infergw.api.cli_help import HelpFormatter
from infergw.api.lifetime import spawn
from infergw.bench.common import (
    PLOTS,
    machine,
    percentile,
    process_cpu_seconds,
    write_json,
)
from infergw.simulator.config import LatencyModel
from infergw.stack.ports import free_port
from infergw.stack.readiness import wait_http

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def prompt(rng: random.Random, n_words: int = 200) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


async def stream_one(session, url, body, window, stats) -> None:
    start = time.monotonic()
    last = None
    async with session.post(url, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            now = time.monotonic()
            if b'"text":""' in line:
                continue
            if last is None:
                stats["ttft"].append(now - start)
            elif window[0] <= now <= window[1]:
                stats["itl"].append(now - last)
            if window[0] <= now <= window[1]:
                stats["tokens"] += 1
            last = now
    if window[0] <= time.monotonic() <= window[1]:
        stats["requests"] += 1


async def drive(
    base: str, concurrency: int, duration: float, warmup: float, max_tokens: int
) -> dict:
    stats = {"ttft": [], "itl": [], "tokens": 0, "requests": 0}
    now = time.monotonic()
    window = (now + warmup, now + warmup + duration)
    url = base + "/v1/completions"
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

        async def worker(i: int) -> None:
            rng = random.Random(i)
            await asyncio.sleep(rng.uniform(0, 1.0))  # stagger, or every stream moves in step
            while time.monotonic() < window[1]:
                body = {
                    "prompt": prompt(rng),
                    "max_tokens": max_tokens,
                    "stream": True,
                    "ignore_eos": True,
                }
                await stream_one(session, url, body, window, stats)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return stats


async def sim_counters(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with session.get(base + "/metrics") as resp:
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("infergate_sim:"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def run_level(base: str, pid: int, concurrency: int, duration: float, max_tokens: int) -> dict:
    warmup = 2.0

    async def measured() -> dict:
        task = asyncio.create_task(drive(base, concurrency, duration, warmup, max_tokens))
        async with aiohttp.ClientSession() as session:
            await asyncio.sleep(warmup)
            cpu0, t0, c0 = (
                process_cpu_seconds(pid),
                time.monotonic(),
                await sim_counters(session, base),
            )
            await asyncio.sleep(duration)
            cpu1, t1, c1 = (
                process_cpu_seconds(pid),
                time.monotonic(),
                await sim_counters(session, base),
            )
        stats = await task
        stats["cpu_s"], stats["wall_s"] = cpu1 - cpu0, t1 - t0
        stats["busy_s"] = (
            c1["infergate_sim:step_busy_seconds_total"]
            - c0["infergate_sim:step_busy_seconds_total"]
        )
        stats["modeled_s"] = (
            c1["infergate_sim:step_modeled_seconds_total"]
            - c0["infergate_sim:step_modeled_seconds_total"]
        )
        return stats

    s = asyncio.run(measured())
    expected_itl = LatencyModel().step_seconds(0, concurrency)
    itl_mean = sum(s["itl"]) / len(s["itl"]) if s["itl"] else float("nan")
    cpu_frac = s["cpu_s"] / s["wall_s"]
    lag_ratio = s["busy_s"] / s["modeled_s"] - 1 if s["modeled_s"] else float("nan")
    return {
        "concurrency": concurrency,
        "output_tokens_per_s": round(s["tokens"] / s["wall_s"], 1),
        "requests_per_s": round(s["requests"] / s["wall_s"], 2),
        "sim_cpu_cores": round(cpu_frac, 3),
        "sim_cpu_ms_per_request": (
            round(1000 * s["cpu_s"] / s["requests"], 2) if s["requests"] else None
        ),
        "sim_cpu_us_per_token": round(1e6 * s["cpu_s"] / max(s["tokens"], 1), 1),
        "ttft_p50_ms": round(1000 * percentile(s["ttft"], 50), 1),
        "itl_mean_ms": round(1000 * itl_mean, 2),
        "itl_p99_ms": round(1000 * percentile(s["itl"], 99), 2),
        "model_decode_step_ms": round(1000 * expected_itl, 2),
        "step_lag_ratio": round(lag_ratio, 3),
        "sustained": cpu_frac < 0.9 and lag_ratio < 0.1,
    }


def plot(results: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [r["concurrency"] for r in results]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(c, [r["output_tokens_per_s"] for r in results], "o-", label="output tokens/s")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("concurrent streams")
    ax1.set_ylabel("output tokens/s")
    ax2 = ax1.twinx()
    ax2.plot(
        c,
        [100 * r["sim_cpu_cores"] for r in results],
        "s--",
        color="tab:red",
        label="simulator CPU %",
    )
    ax2.set_ylabel("simulator CPU (% of one core)")
    ax1.set_title("One simulator process (default latency model)")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def run_series(
    time_scale: float, levels: list[int], duration: float, max_tokens: int
) -> tuple[str, list[dict]]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "infergw.simulator",
        "--port",
        str(port),
        "--max-num-seqs",
        "512",
        "--num-gpu-blocks-override",
        "65536",
        "--log-level",
        "warning",
        "--sim-time-scale",
        str(time_scale),
    ]
    proc = spawn(cmd)
    results = []
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health", 30, proc)
        for c in levels:
            r = run_level(base, proc.pid, c, duration, max_tokens)
            if time_scale == 0:  # no model to keep pace with: the process is the limit
                r["step_lag_ratio"] = None
                r["sustained"] = None
            print(json.dumps(r), flush=True)
            results.append(r)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return " ".join(cmd[1:]), results


def markdown(out: dict) -> str:
    """The README table for a result file."""
    m = out["machine"]
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB), "
        f"Python {m['python']}.",
        "",
        "| streams | output tok/s | req/s | simulator CPU (cores) | CPU µs/token | "
        "TTFT p50 ms | ITL mean ms | model step ms | steps over model | sustained |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["levels"]:
        lag = r["step_lag_ratio"]
        lines.append(
            f"| {r['concurrency']} | {r['output_tokens_per_s']:.0f} | {r['requests_per_s']} | "
            f"{r['sim_cpu_cores']:.3f} | {r['sim_cpu_us_per_token']:.0f} | {r['ttft_p50_ms']:.0f} "
            f"| {r['itl_mean_ms']:.1f} | {r['model_decode_step_ms']:.1f} | "
            f"{100 * lag:.1f}% | {'yes' if r['sustained'] else 'no'} |"
        )
    for r in out.get("ceiling", []):
        lines.append(
            f"| {r['concurrency']}, time scale 0 | {r['output_tokens_per_s']:.0f} | "
            f"{r['requests_per_s']} | {r['sim_cpu_cores']:.3f} | {r['sim_cpu_us_per_token']:.0f}"
            f" | {r['ttft_p50_ms']:.0f} | {r['itl_mean_ms']:.2f} | — | — | (ceiling) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="infergate bench simulator", description=__doc__, formatter_class=HelpFormatter
    )
    load = p.add_argument_group("Load")
    output = p.add_argument_group("Output")
    load.add_argument(
        "--concurrency", default="1,8,32,64,128,256", help="the levels of concurrent streams run"
    )
    load.add_argument(
        "--ceiling-concurrency",
        default="8,64",
        help="levels run with --sim-time-scale 0 (as fast as the process can go)",
    )
    load.add_argument("--duration", type=float, default=10.0, help="seconds measured per level")
    load.add_argument("--max-tokens", type=int, default=128, help="output tokens a request")
    output.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    ceiling_levels = [int(x) for x in args.ceiling_concurrency.split(",") if x]
    cmd, results = run_series(1.0, levels, args.duration, args.max_tokens)
    _, ceiling = run_series(0.0, ceiling_levels, args.duration, args.max_tokens)
    sustained = [r["concurrency"] for r in results if r["sustained"]]
    out = {
        "benchmark": "simulator",
        "machine": machine(),
        "command": cmd,
        "max_tokens": args.max_tokens,
        "duration_s": args.duration,
        "max_sustained_streams": max(sustained) if sustained else 0,
        "levels": results,
        "ceiling": ceiling,
    }
    print("wrote", write_json("simulator", out))
    print(markdown(out))
    if not args.no_plot:
        plot(results, PLOTS / "simulator.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
