"""The shared KV index in Redis against the in-memory index, side by side in one run
(`infergate bench kvindex_redis`).

A real redis-server (Debian's) is started on a free 127.0.0.1 port. The same synthetic vLLM
events as bench/kvindex (BlockStored of 16-token blocks) go through kvindex.translate into
(a) kvindex.index.KVBlockIndex and (b) kvindex.redis_index.RedisIndexWriter over one (the
local index plus the mirror to Redis, flushed every `--flush-every` events and at the end:
the rate counts the flush). Lookups of one prompt over 16, 64 and 256 pods, in two shapes:
`half` (half of the pods hold the prompt's first half) and `all` (every pod holds all of it:
a long shared system prompt, the costliest case); the in-memory lookup is timed against the
shared one (the script's round trip on loopback, then the scoring from its answer), one at a
time, and their answers are checked equal. Redis's memory per (block, pod) is its
`used_memory` growth over the entries written.

`--baseline FILE` measures another version of kvindex/redis_index.py in the same run, beside
this one (e.g. the previous layout: `git show dee42f8:kvindex/redis_index.py > /tmp/v1.py`);
it must take the same constructor arguments. Its keys must not collide with this version's
(layouts are versioned by key prefix).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis

from infergw.api.cli_help import HelpFormatter
from infergw.bench.common import machine, percentile, write_json
from infergw.bench.kvindex import BLOCK, MODEL, _stored
from infergw.kvindex import redis_index
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.keys import prompt_keys
from infergw.kvindex.redis_layout import LAYOUT_VERSION
from infergw.kvindex.translate import EventTranslator
from infergw.stack.ports import free_port
from infergw.stack.redis_server import RedisServer, which_redis_server


def _events(pods: int, prompts_per_pod: int, prompt_tokens: int, same: bool = False):
    """Each pod stores its own random prompts, or (`same`) every pod the same ones."""
    rng = random.Random(1)
    shared = [[rng.randrange(8192) for _ in range(prompt_tokens)] for _ in range(prompts_per_pod)]
    events, h = [], 1
    for p in range(pods):
        for i in range(prompts_per_pod):
            tokens = shared[i] if same else [rng.randrange(8192) for _ in range(prompt_tokens)]
            events.append((f"10.0.{p // 250}.{p % 250}:8000", _stored(rng, tokens, h)))
            h += prompt_tokens
    return events


async def _used_memory(client: Redis) -> int:
    return int((await client.info("memory"))["used_memory"])


async def ingest(
    client: Redis, impls: dict, pods: int, prompts_per_pod: int, every: int, same: bool
) -> dict:
    events = _events(pods, prompts_per_pod, 1024, same)
    blocks = sum(len(e.block_hashes) for _, e in events)
    memory = EventTranslator(KVBlockIndex(block_size=BLOCK, max_entries=50_000_000))
    t0 = time.perf_counter()
    for pod, ev in events:
        memory.apply(pod, MODEL, ev)
    memory_s = time.perf_counter() - t0
    entries = memory.stats()["entries"]
    out = {
        "pods": pods,
        "same_prompts": same,
        "blocks": blocks,
        "memory_blocks_per_s": round(blocks / memory_s),
    }
    for label, impl in impls.items():
        await client.flushall()
        before = await _used_memory(client)
        writer = impl.RedisIndexWriter(
            KVBlockIndex(block_size=BLOCK, max_entries=50_000_000),
            client,
            timeout=60.0,
            max_pending=50_000_000,
        )
        shared = EventTranslator(writer)
        flush_s = 0.0
        t0 = time.perf_counter()
        for i, (pod, ev) in enumerate(events, 1):
            shared.apply(pod, MODEL, ev)
            if i % every == 0:
                t1 = time.perf_counter()
                assert await writer.flush(), "a flush failed"
                flush_s += time.perf_counter() - t1
        t1 = time.perf_counter()
        assert await writer.flush(), "a flush failed"
        flush_s += time.perf_counter() - t1
        redis_s = time.perf_counter() - t0
        growth = await _used_memory(client) - before
        out[label] = {
            "blocks_per_s": round(blocks / redis_s),
            "flush_share": round(flush_s / redis_s, 2),
            "bytes_per_entry": round(growth / max(1, entries)),
        }
    return out


async def lookup(
    client: Redis, impls: dict, pods: int, prompt_tokens: int, share: str, repeats: int
) -> dict:
    """`share`: "half" (half the pods hold the prompt's first half) or "all" (all, all of it)."""
    await client.flushall()
    rng = random.Random(2)
    local = KVBlockIndex(block_size=BLOCK, max_entries=50_000_000)
    writers = [
        impl.RedisIndexWriter(
            KVBlockIndex(block_size=BLOCK, max_entries=50_000_000), client, timeout=60.0
        )
        for impl in impls.values()
    ]
    sinks = [EventTranslator(local), *map(EventTranslator, writers)]
    prompt = [rng.randrange(8192) for _ in range(prompt_tokens)]
    names = [f"10.1.{p // 250}.{p % 250}:8000" for p in range(pods)]
    held = prompt if share == "all" else prompt[: (prompt_tokens // 2) // BLOCK * BLOCK]
    for i, pod in enumerate(names):
        evs = [_stored(rng, [rng.randrange(8192) for _ in range(2048)], 10**7 * (i + 1) + 5**9)]
        if share == "all" or i % 2 == 0:
            evs.append(_stored(rng, held, 10_000_000 * (i + 1)))
        for ev in evs:
            for sink in sinks:
                sink.apply(pod, MODEL, ev)
    for writer in writers:
        assert await writer.flush()
    keys = prompt_keys(prompt, BLOCK, MODEL)
    readers = {
        label: impl.RedisPrefixIndex(client, block_size=BLOCK, timeout=5.0)
        for label, impl in impls.items()
    }
    times: dict[str, list[float]] = {"memory": [], **{label: [] for label in readers}}
    want = local.lookup(keys, names)
    for _ in range(repeats):
        t0 = time.perf_counter()
        local.lookup(keys, names)
        times["memory"].append(time.perf_counter() - t0)
        for label, reader in readers.items():
            t0 = time.perf_counter()
            got = (await reader.fetch(keys)).lookup(keys, names)
            times[label].append(time.perf_counter() - t0)
            assert got == want, f"{label}: the shared index must answer as the in-memory one"
    out = {"pods": pods, "prompt_tokens": prompt_tokens, "share": share}
    for label, t in times.items():
        out[label] = {
            "p50_us": round(1e6 * percentile(t, 50), 1),
            "p99_us": round(1e6 * percentile(t, 99), 1),
        }
    return out


def markdown(out: dict) -> str:
    m, labels = out["machine"], out["layouts"]
    lines = [
        f"Measured {m['date']} on {m['cpu']}, Python {m['python']}; redis-server on "
        f"loopback, same machine; load average before: {out['load']}, after: "
        f"{out['load_after']}.",
        "",
        "| ingestion | blocks | memory blocks/s | "
        + " | ".join(f"{x} blocks/s (flushing) | {x} bytes per (block, pod)" for x in labels)
        + " |",
        "|---|---|---|" + "---|---|" * len(labels),
    ]
    for r in out["ingest"]:
        cells = [
            f"{r[x]['blocks_per_s']:,} ({r[x]['flush_share']:.0%}) | {r[x]['bytes_per_entry']}"
            for x in labels
        ]
        what = "the same prompts" if r["same_prompts"] else "own prompts"
        lines.append(
            f"| {r['pods']} pods, {what} | {r['blocks']:,} | {r['memory_blocks_per_s']:,} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "| lookup | pods | holding | memory p50 / p99 µs | "
        + " | ".join(f"{x} p50 / p99 µs" for x in labels)
        + " |",
        "|---|---|---|---|" + "---|" * len(labels),
    ]
    for r in out["lookup"]:
        cells = [f"{r[x]['p50_us']:,.0f} / {r[x]['p99_us']:,.0f}" for x in ("memory", *labels)]
        holding = "all of it" if r["share"] == "all" else "half: first half"
        lines.append(
            f"| {r['prompt_tokens']} tokens | {r['pods']} | {holding} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def load_baseline(path: Path):
    """Another version of kvindex/redis_index.py, imported from a file."""
    spec = importlib.util.spec_from_file_location("kvindex_redis_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def run(args: argparse.Namespace, port: int, impls: dict) -> dict:
    client = Redis(host="127.0.0.1", port=port, socket_timeout=60)
    try:
        per_pod = 20 if args.quick else 100
        ing = []
        for pods, same in ((16, False), (256, False), (256, True)):
            per = max(1, per_pod * 16 // pods)
            ing.append(await ingest(client, impls, pods, per, args.flush_every, same))
            print(json.dumps(ing[-1]), flush=True)
        look = []
        for share in ("half", "all"):
            for pods in (16, 64, 256):
                for tokens in (1024, 8192):
                    repeats = 50 if args.quick else 300
                    look.append(await lookup(client, impls, pods, tokens, share, repeats))
                    print(json.dumps(look[-1]), flush=True)
        return {"ingest": ing, "lookup": look}
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="infergate bench kvindex_redis", description=__doc__, formatter_class=HelpFormatter
    )
    run = p.add_argument_group("Run")
    comparison = p.add_argument_group("Comparison")
    run.add_argument("--quick", action="store_true", help="fewer events and lookups")
    run.add_argument("--flush-every", type=int, default=64, help="events between flushes")
    comparison.add_argument(
        "--baseline",
        type=Path,
        help="another version of kvindex/redis_index.py to measure beside this one",
    )
    args = p.parse_args(argv)
    impls = {LAYOUT_VERSION: redis_index}
    if args.baseline is not None:
        impls["baseline"] = load_baseline(args.baseline)
    binary = which_redis_server()
    if binary is None:
        print("redis-server is not installed (Debian: apt-get install redis-server)")
        return 2
    load = Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(binary, free_port(), Path(tmp))
        server.start()
        try:
            results = asyncio.run(run(args, server.port, impls))
        finally:
            server.stop()
    out = {
        "benchmark": "kvindex_redis",
        "machine": machine(),
        "load": " ".join(load),
        "load_after": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "layouts": list(impls),
        **results,
    }
    print("wrote", write_json("kvindex_redis", out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
