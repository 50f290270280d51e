"""The KV-cache index under load: ingestion rate, lookup latency, memory, tokenization.

Synthetic vLLM events (BlockStored of 16-token blocks, the way a pod reports a prompt) are fed
through kvindex.translate.EventTranslator into kvindex.index.KVBlockIndex for P pods; then
prompts of 1k, 8k and 32k tokens are looked up over 16 and 256 pods, half of which hold the
prompt's first half. Tokenization uses the simulator's bundled tokenizer through
kvindex.tokenize, with and without the prefix cache.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from infergw.bench.common import machine, percentile, write_json
from infergw.kvindex.events import BlockStored
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.keys import prompt_keys
from infergw.kvindex.translate import EventTranslator

BLOCK = 16
MODEL = "bench-model"
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "simulator" / "default_model"


def _stored(rng: random.Random, tokens: list[int], start_hash: int) -> BlockStored:
    n = len(tokens) // BLOCK
    return BlockStored(
        block_hashes=tuple(start_hash + i for i in range(n)),
        parent_block_hash=None,
        token_ids=tuple(tokens[: n * BLOCK]),
        block_size=BLOCK,
    )


def ingest_rate(pods: int, prompts_per_pod: int, prompt_tokens: int) -> dict:
    rng = random.Random(1)
    sink = EventTranslator(KVBlockIndex(block_size=BLOCK, max_entries=50_000_000))
    events = []
    h = 1
    for p in range(pods):
        for _ in range(prompts_per_pod):
            tokens = [rng.randrange(8192) for _ in range(prompt_tokens)]
            events.append((f"10.0.{p // 250}.{p % 250}:8000", _stored(rng, tokens, h)))
            h += prompt_tokens
    blocks = sum(len(e.block_hashes) for _, e in events)
    t0 = time.perf_counter()
    for pod, ev in events:
        sink.apply(pod, MODEL, ev)
    seconds = time.perf_counter() - t0
    return {
        "pods": pods,
        "blocks": blocks,
        "seconds": round(seconds, 3),
        "blocks_per_s": round(blocks / seconds),
        "events_per_s": round(len(events) / seconds),
        "entries": sink.stats().get("entries"),
        "bytes_per_entry": round(sink.bytes_per_entry(), 1),
    }


def lookup_latency(pods: int, prompt_tokens: int, repeats: int = 200) -> dict:
    rng = random.Random(2)
    index = KVBlockIndex(block_size=BLOCK, max_entries=50_000_000)
    sink = EventTranslator(index)
    prompt = [rng.randrange(8192) for _ in range(prompt_tokens)]
    names = [f"10.1.{p // 250}.{p % 250}:8000" for p in range(pods)]
    half = prompt[: (prompt_tokens // 2) // BLOCK * BLOCK]
    for i, pod in enumerate(names):
        if i % 2 == 0:
            sink.apply(pod, MODEL, _stored(rng, half, 10_000_000 * (i + 1)))
        # everyone holds some unrelated blocks too
        other = [rng.randrange(8192) for _ in range(2048)]
        sink.apply(pod, MODEL, _stored(rng, other, 10_000_000 * (i + 1) + 5_000_000))
    keys = prompt_keys(prompt, BLOCK, MODEL)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        scores = index.lookup(keys, names)
        times.append(time.perf_counter() - t0)
    assert max(scores.values()) == len(half) // BLOCK, "lookup must find the held half"
    key_times = []
    for _ in range(20):
        t0 = time.perf_counter()
        prompt_keys(prompt, BLOCK, MODEL)
        key_times.append(time.perf_counter() - t0)
    return {
        "pods": pods,
        "prompt_tokens": prompt_tokens,
        "lookup_p50_us": round(1e6 * percentile(times, 50), 1),
        "lookup_p99_us": round(1e6 * percentile(times, 99), 1),
        "hashing_us": round(1e6 * statistics.median(key_times), 1),
    }


def tokenization(prompt_tokens_target: int) -> dict:
    from infergw.kvindex.tokenize import PromptTokenizer

    words = (Path(__file__).read_text() * 50).split()
    system = " ".join(words[:prompt_tokens_target])
    cold = PromptTokenizer.from_dir(DEFAULT_MODEL)
    n = len(cold.tokens_for("completions", {"prompt": system}))
    times_cold = []
    for i in range(5):
        fresh = PromptTokenizer.from_dir(DEFAULT_MODEL)
        t0 = time.perf_counter()
        fresh.tokens_for("completions", {"prompt": system + f" question {i}?"})
        times_cold.append(time.perf_counter() - t0)
    warm = PromptTokenizer.from_dir(DEFAULT_MODEL)
    warm.tokens_for("completions", {"prompt": system + " warm up?"})
    times_warm = []
    for i in range(20):
        t0 = time.perf_counter()
        warm.tokens_for("completions", {"prompt": system + f" question {i}?"})
        times_warm.append(time.perf_counter() - t0)
    return {
        "prompt_tokens": n,
        "uncached_ms": round(1000 * statistics.median(times_cold), 2),
        "shared_prefix_cached_ms": round(1000 * statistics.median(times_warm), 2),
    }


def markdown(out: dict) -> str:
    m = out["machine"]
    lines = [
        f"Measured {m['date']} on {m['cpu']}, Python {m['python']}, one core.",
        "",
        "| ingestion | blocks | blocks/s | bytes per indexed (block, pod) |",
        "|---|---|---|---|",
    ]
    for r in out["ingest"]:
        lines.append(
            f"| {r['pods']} pods | {r['blocks']} | {r['blocks_per_s']:,} | {r['bytes_per_entry']} |"
        )
    lines += [
        "",
        "| lookup | pods | p50 µs | p99 µs | hashing the prompt µs |",
        "|---|---|---|---|---|",
    ]
    for r in out["lookup"]:
        lines.append(
            f"| {r['prompt_tokens']} tokens | {r['pods']} | {r['lookup_p50_us']} | "
            f"{r['lookup_p99_us']} | {r['hashing_us']} |"
        )
    lines += [
        "",
        "| tokenization | prompt tokens | uncached ms | shared prefix cached ms |",
        "|---|---|---|---|",
    ]
    for r in out["tokenize"]:
        lines.append(
            f"| completions | {r['prompt_tokens']} | {r['uncached_ms']} | "
            f"{r['shared_prefix_cached_ms']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="infergate bench kvindex", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller ingestion for a fast check")
    args = p.parse_args(argv)
    ingest = [
        ingest_rate(16, 20 if args.quick else 200, 1024),
        ingest_rate(256, 2 if args.quick else 20, 1024),
    ]
    for r in ingest:
        print(json.dumps(r), flush=True)
    lookup = [lookup_latency(pods, tokens) for pods in (16, 256) for tokens in (1024, 8192, 32768)]
    for r in lookup:
        print(json.dumps(r), flush=True)
    tok = [tokenization(n) for n in (1000, 8000)]
    for r in tok:
        print(json.dumps(r), flush=True)
    out = {
        "benchmark": "kvindex",
        "machine": machine(),
        "ingest": ingest,
        "lookup": lookup,
        "tokenize": tok,
    }
    print("wrote", write_json("kvindex", out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
