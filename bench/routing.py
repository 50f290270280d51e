"""Routing quality: the same fleet, workload and seed through different routers.

A fleet of simulator pods with finite KV caches and a latency model in which prefill of
uncached tokens dominates time to first token serves an open-loop Poisson stream of
shared-prefix requests (G groups × U users: a long group prefix and a short question) at
several rates. Each router gets a fresh fleet (cold caches). Measured per router and rate:
TTFT p50/p90/p99, time per output token, output tokens/s, request throughput, the pods'
prefix-cache hit rate, and errors.

So far the routers are infergate's own configurations (precise, approximate, load-only,
random); vllm-router, sglang-router and the oracle bound are still to come (issue 5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.common import PLOTS, free_port, machine, percentile, write_json
from infergate.stack import LocalStack, StackConfig, StackPorts

MODEL = "infergate-sim"

ROUTERS = {
    "precise": [
        ("precise-prefix-cache-scorer", 3),
        ("queue-scorer", 2),
        ("kv-cache-utilization-scorer", 2),
    ],
    "approximate": [
        ("prefix-cache-scorer", 3),
        ("queue-scorer", 2),
        ("kv-cache-utilization-scorer", 2),
    ],
    "load": [("queue-scorer", 1), ("kv-cache-utilization-scorer", 1), ("least-request", 1)],
    "random": [("random-scorer", 1)],
}


def picker_config(plugins: list[tuple[str, float]]) -> str:
    lines = [
        "apiVersion: inference.networking.x-k8s.io/v1alpha1",
        "kind: EndpointPickerConfig",
        "plugins:",
    ]
    lines += [f"- type: {t}" for t, _ in plugins] + ["- type: max-score-picker"]
    lines += ["schedulingProfiles:", "- name: default", "  plugins:"]
    lines += [f"  - {{pluginRef: {t}, weight: {w}}}" for t, w in plugins]
    lines += ["  - {pluginRef: max-score-picker}"]
    return "\n".join(lines) + "\n"


@dataclass(slots=True)
class Workload:
    groups: int
    users: int
    prefix_words: int
    question_words: int
    output_tokens: int
    seed: int = 7
    prefixes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        vocab = [f"{a}{b}" for a in "bcdfghklmnprstvz" for b in ("a", "e", "i", "o", "u", "ar")]
        self.prefixes = [
            f"Group {g} context: " + " ".join(rng.choice(vocab) for _ in range(self.prefix_words))
            for g in range(self.groups)
        ]

    def request(self, rng: random.Random) -> dict:
        g, u = rng.randrange(self.groups), rng.randrange(self.users)
        question = " ".join(f"q{u}x{rng.randrange(1000)}" for _ in range(self.question_words))
        return {
            "model": MODEL,
            "prompt": f"{self.prefixes[g]}\nUser {u} asks: {question}",
            "max_tokens": self.output_tokens,
            "ignore_eos": True,
            "stream": True,
        }


@dataclass(slots=True)
class Outcome:
    ttft: float | None = None
    tpot: float | None = None
    tokens: int = 0
    ok: bool = False


async def one(session: aiohttp.ClientSession, url: str, body: dict) -> Outcome:
    out = Outcome()
    t0 = time.monotonic()
    first = last = None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                return out
            async for line in resp.content:
                if line.startswith(b"data: {") and b'"text":"' in line:
                    now = time.monotonic()
                    first = first or now
                    last = now
                    out.tokens += 1
        out.ok = True
    except (TimeoutError, aiohttp.ClientError):
        return out
    if first is not None:
        out.ttft = first - t0
        if out.tokens > 1:
            out.tpot = (last - first) / (out.tokens - 1)
    return out


async def open_loop(
    url: str, workload: Workload, rate: float, duration: float, seed: int
) -> tuple[list[Outcome], float]:
    rng = random.Random(seed)
    tasks = []
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        start = time.monotonic()
        t = 0.0
        while t < duration:
            t += rng.expovariate(rate)
            delay = start + t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, url, workload.request(rng))))
        results = await asyncio.gather(*tasks)
        wall = time.monotonic() - start
    return list(results), wall


def pod_hit_rate(stack: LocalStack) -> tuple[float, float]:
    import urllib.request

    hits = queries = 0.0
    for address in stack.pod_addresses:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("vllm:prefix_cache_hits_total{"):
                    hits += float(line.rsplit(" ", 1)[1])
                elif line.startswith("vllm:prefix_cache_queries_total{"):
                    queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


def run_router(
    name: str,
    workload: Workload,
    rates: list[float],
    duration: float,
    pods: int,
    sim_args: list[str],
    seed: int,
) -> list[dict]:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-routing-{name}-"))
    cfg = workdir / "epp-config.yaml"
    cfg.write_text(picker_config(ROUTERS[name]))
    rows = []
    for rate in rates:
        ports = StackPorts(
            envoy=free_port(),
            envoy_admin=free_port(),
            picker=free_port(),
            picker_health=free_port(),
            picker_metrics=free_port(),
            kv_events=free_port(),
        )
        stack = LocalStack(
            StackConfig(
                workdir=workdir / f"rate-{rate}",
                pods=pods,
                ports=ports,
                pod_ports=[free_port() for _ in range(pods)],
                picker_config=cfg,
                sim_args=[*sim_args, "--log-level", "warning"],
                picker_args=["--log-level", "warning"],
            )
        ).start()
        try:
            h0, q0 = pod_hit_rate(stack)
            results, wall = asyncio.run(
                open_loop(stack.url + "/v1/completions", workload, rate, duration, seed)
            )
            h1, q1 = pod_hit_rate(stack)
        finally:
            stack.stop()
        done = [r for r in results if r.ok and r.ttft is not None]
        ttfts = [r.ttft for r in done]
        tpots = [r.tpot for r in done if r.tpot is not None]
        rows.append(
            {
                "router": name,
                "rate": rate,
                "requests": len(results),
                "errors": len(results) - len(done),
                "ttft_p50_ms": round(1000 * percentile(ttfts, 50), 1),
                "ttft_p90_ms": round(1000 * percentile(ttfts, 90), 1),
                "ttft_p99_ms": round(1000 * percentile(ttfts, 99), 1),
                "tpot_p50_ms": round(1000 * percentile(tpots, 50), 2),
                "output_tokens_per_s": round(sum(r.tokens for r in done) / wall, 1),
                "requests_per_s": round(len(done) / wall, 2),
                "prefix_hit_rate": round((h1 - h0) / (q1 - q0), 3) if q1 > q0 else None,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(out: dict) -> str:
    m, w = out["machine"], out["workload"]
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores): {out['pods']} simulator "
        f"pods, {w['groups']} groups × {w['users']} users, ~{w['prefix_words']}-word "
        f"prefixes, {w['output_tokens']} output tokens, {out['duration_s']:.0f} s of "
        "Poisson arrivals per rate, fresh pods per router.",
        "",
        "| router | rate req/s | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | TPOT p50 ms | "
        "output tok/s | hit rate | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['router']} | {r['rate']} | {r['ttft_p50_ms']} | {r['ttft_p90_ms']} "
            f"| {r['ttft_p99_ms']} | {r['tpot_p50_ms']} | {r['output_tokens_per_s']} | "
            f"{r['prefix_hit_rate']} | {r['errors']} |"
        )
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name in ROUTERS:
        rows = [r for r in out["rows"] if r["router"] == name]
        if not rows:
            continue
        a.plot([r["rate"] for r in rows], [r["ttft_p90_ms"] for r in rows], "o-", label=name)
        b.plot(
            [r["rate"] for r in rows], [r["prefix_hit_rate"] or 0 for r in rows], "o-", label=name
        )
    a.set_xlabel("request rate (req/s)")
    a.set_ylabel("TTFT p90 (ms)")
    a.set_yscale("log")
    b.set_xlabel("request rate (req/s)")
    b.set_ylabel("pods' prefix-cache hit rate")
    a.legend()
    a.set_title("Shared-prefix workload")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="infergate bench routing", description=__doc__)
    p.add_argument("--quick", action="store_true", help="4 pods, 2 rates, 15 s each (~3 min)")
    p.add_argument("--routers", default=",".join(ROUTERS))
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    quick = args.quick
    pods = 4 if quick else 8
    rates = [4.0, 10.0] if quick else [4.0, 8.0, 12.0, 16.0]
    duration = 15.0 if quick else 40.0
    # Six groups a pod against room for about three ~2k-token prefixes in each cache:
    # evictions happen, which is where knowing (precise) beats remembering (approximate).
    workload = Workload(
        groups=pods * 6, users=5, prefix_words=1200, question_words=8, output_tokens=16
    )
    # Prefill dominates TTFT: 150 µs per uncached token.
    sim_args = [
        "--sim-prefill-us-per-token",
        "150",
        "--block-size",
        "16",
        "--num-gpu-blocks-override",
        "320",
        "--max-num-seqs",
        "64",
    ]
    rows = []
    for name in args.routers.split(","):
        rows += run_router(name, workload, rates, duration, pods, sim_args, args.seed)
    out = {
        "benchmark": "routing",
        "machine": machine(),
        "pods": pods,
        "duration_s": duration,
        "workload": {
            "groups": workload.groups,
            "users": workload.users,
            "prefix_words": workload.prefix_words,
            "output_tokens": workload.output_tokens,
            "seed": args.seed,
        },
        "sim_args": sim_args,
        "rows": rows,
    }
    name = f"routing-{out['machine']['date']}" + ("-quick" if quick else "")
    print("wrote", write_json(name, out))
    plot(out, PLOTS / "routing.png")
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
