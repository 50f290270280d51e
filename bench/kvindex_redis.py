"""The shared KV index in Redis against the in-memory index, side by side in one run
(`infergate bench kvindex --redis`, or `infergate bench kvindex_redis`).

A real redis-server (Debian's) is started on a free 127.0.0.1 port. The same synthetic vLLM
events as bench/kvindex (BlockStored of 16-token blocks) go through kvindex.translate into
(a) kvindex.index.KVBlockIndex and (b) kvindex.redis_index.RedisIndexWriter over one (the
local index plus the mirror to Redis, flushed every `--flush-every` events and at the end:
the rate counts the flush). Lookups: half of the pods hold a prompt's first half; the
in-memory lookup is timed against the shared one (the script's round trip on loopback, then
the scoring from its answer), one at a time. Redis's memory per (block, pod) is its
`used_memory` growth over the entries written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis

from infergw.bench.common import machine, percentile, write_json
from infergw.bench.kvindex import BLOCK, MODEL, _stored
from infergw.bench.redis_server import RedisServer, which_redis_server
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.keys import prompt_keys
from infergw.kvindex.redis_index import RedisIndexWriter, RedisPrefixIndex
from infergw.kvindex.translate import EventTranslator
from infergw.stack.ports import free_port


def _events(pods: int, prompts_per_pod: int, prompt_tokens: int):
    rng = random.Random(1)
    events, h = [], 1
    for p in range(pods):
        for _ in range(prompts_per_pod):
            tokens = [rng.randrange(8192) for _ in range(prompt_tokens)]
            events.append((f"10.0.{p // 250}.{p % 250}:8000", _stored(rng, tokens, h)))
            h += prompt_tokens
    return events


async def _used_memory(client: Redis) -> int:
    return int((await client.info("memory"))["used_memory"])


async def ingest(client: Redis, pods: int, prompts_per_pod: int, flush_every: int) -> dict:
    events = _events(pods, prompts_per_pod, 1024)
    blocks = sum(len(e.block_hashes) for _, e in events)
    memory = EventTranslator(KVBlockIndex(block_size=BLOCK, max_entries=50_000_000))
    t0 = time.perf_counter()
    for pod, ev in events:
        memory.apply(pod, MODEL, ev)
    memory_s = time.perf_counter() - t0

    await client.flushall()
    before = await _used_memory(client)
    writer = RedisIndexWriter(
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
        if i % flush_every == 0:
            t1 = time.perf_counter()
            assert await writer.flush(), "a flush failed"
            flush_s += time.perf_counter() - t1
    t1 = time.perf_counter()
    assert await writer.flush(), "a flush failed"
    flush_s += time.perf_counter() - t1
    redis_s = time.perf_counter() - t0
    entries = memory.stats()["entries"]
    return {
        "pods": pods,
        "blocks": blocks,
        "memory_blocks_per_s": round(blocks / memory_s),
        "redis_blocks_per_s": round(blocks / redis_s),
        "redis_flush_share": round(flush_s / redis_s, 2),
        "redis_bytes_per_entry": round((await _used_memory(client) - before) / max(1, entries)),
    }


async def lookup(client: Redis, pods: int, prompt_tokens: int, repeats: int) -> dict:
    await client.flushall()
    rng = random.Random(2)
    local = KVBlockIndex(block_size=BLOCK, max_entries=50_000_000)
    writer = RedisIndexWriter(
        KVBlockIndex(block_size=BLOCK, max_entries=50_000_000), client, timeout=60.0
    )
    sinks = (EventTranslator(local), EventTranslator(writer))
    prompt = [rng.randrange(8192) for _ in range(prompt_tokens)]
    names = [f"10.1.{p // 250}.{p % 250}:8000" for p in range(pods)]
    half = prompt[: (prompt_tokens // 2) // BLOCK * BLOCK]
    for i, pod in enumerate(names):
        evs = [_stored(rng, [rng.randrange(8192) for _ in range(2048)], 10**7 * (i + 1) + 5**9)]
        if i % 2 == 0:
            evs.append(_stored(rng, half, 10_000_000 * (i + 1)))
        for ev in evs:
            for sink in sinks:
                sink.apply(pod, MODEL, ev)
    assert await writer.flush()
    keys = prompt_keys(prompt, BLOCK, MODEL)
    reader = RedisPrefixIndex(client, block_size=BLOCK, timeout=5.0)
    mem_t, redis_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        want = local.lookup(keys, names)
        mem_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        got = (await reader.fetch(keys)).lookup(keys, names)
        redis_t.append(time.perf_counter() - t0)
    assert got == want, "the shared index must answer as the in-memory one"
    return {
        "pods": pods,
        "prompt_tokens": prompt_tokens,
        "memory_p50_us": round(1e6 * percentile(mem_t, 50), 1),
        "memory_p99_us": round(1e6 * percentile(mem_t, 99), 1),
        "redis_p50_us": round(1e6 * percentile(redis_t, 50), 1),
        "redis_p99_us": round(1e6 * percentile(redis_t, 99), 1),
    }


def markdown(out: dict) -> str:
    m = out["machine"]
    lines = [
        f"Measured {m['date']} on {m['cpu']}, Python {m['python']}; redis-server on "
        f"loopback, same machine; load average before: {out['load']}.",
        "",
        "| ingestion | blocks | memory blocks/s | Redis blocks/s | of it flushing | "
        "Redis bytes per (block, pod) |",
        "|---|---|---|---|---|---|",
    ]
    for r in out["ingest"]:
        lines.append(
            f"| {r['pods']} pods | {r['blocks']:,} | {r['memory_blocks_per_s']:,} | "
            f"{r['redis_blocks_per_s']:,} | {r['redis_flush_share']:.0%} | "
            f"{r['redis_bytes_per_entry']} |"
        )
    lines += [
        "",
        "| lookup | pods | memory p50 / p99 µs | Redis p50 / p99 µs |",
        "|---|---|---|---|",
    ]
    for r in out["lookup"]:
        lines.append(
            f"| {r['prompt_tokens']} tokens | {r['pods']} | {r['memory_p50_us']} / "
            f"{r['memory_p99_us']} | {r['redis_p50_us']} / {r['redis_p99_us']} |"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace, port: int) -> dict:
    client = Redis(host="127.0.0.1", port=port, socket_timeout=60)
    try:
        per_pod = 20 if args.quick else 100
        ing = [await ingest(client, 16, per_pod, args.flush_every)]
        print(json.dumps(ing[-1]), flush=True)
        ing.append(await ingest(client, 256, max(1, per_pod // 16), args.flush_every))
        print(json.dumps(ing[-1]), flush=True)
        look = []
        for pods in (16, 256):
            for tokens in (1024, 8192):
                look.append(await lookup(client, pods, tokens, 50 if args.quick else 300))
                print(json.dumps(look[-1]), flush=True)
        return {"ingest": ing, "lookup": look}
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="infergate bench kvindex_redis", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer events and lookups")
    p.add_argument("--flush-every", type=int, default=64, help="events between flushes")
    args = p.parse_args(argv)
    binary = which_redis_server()
    if binary is None:
        print("redis-server is not installed (Debian: apt-get install redis-server)")
        return 2
    load = Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(binary, free_port(), Path(tmp))
        server.start()
        try:
            results = asyncio.run(run(args, server.port))
        finally:
            server.stop()
    out = {"benchmark": "kvindex_redis", "machine": machine(), "load": " ".join(load), **results}
    print("wrote", write_json("kvindex_redis", out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
