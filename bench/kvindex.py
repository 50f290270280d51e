"""The KV-cache index under load: ingestion rate, lookup latency, memory, tokenization.

Three layouts side by side: the packed one (kvindex.index.KVBlockIndex) and the previous dicts of
Python ints (kvindex.dict_index.DictBlockIndex), both keyed by token ids through the event
translator's engine-hash maps; and "engine": the packed index keyed by the engines' own block
hashes (--kv-index-keys engine: kvindex.engine_translate, no maps; each event's first block a
real hash, so the translator's check of a request's first block runs as it would).

Resident memory is measured from outside: a child process ingests 16 pods × 62,500 distinct
blocks, each held by one pod, and the parent reads the child's VmRSS before and after; once
straight into the index (`add`), once through the event translator (batches of 8 events, as
the subscriber hands them over), whose engine-hash maps are part of the picker's memory too
(kvindex.engine_maps: dicts beside the dict index, a packed key table beside the packed one).

Synthetic vLLM events (BlockStored of 16-token blocks, the way a pod reports a prompt) are fed
through kvindex.translate.EventTranslator into each layout for P pods — one event a call, and
in batches of 8 (`apply_events`, as the subscriber: a run of stores is one add) — and the same
blocks' keys straight into the index (rates per wall second and per CPU second); then
prompts of 1k, 8k and 32k tokens are looked up over 16 and 256 pods, half of which hold the
prompt's first half. Tokenization uses the simulator's bundled tokenizer through
kvindex.tokenize, with and without the prefix cache.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import msgspec

from infergw.api.cli_help import HelpFormatter
from infergw.bench.common import machine, percentile, write_json
from infergw.kvindex.dict_index import DictBlockIndex
from infergw.kvindex.engine_hashing import EngineHashing, EngineKeys
from infergw.kvindex.engine_translate import EngineKeyTranslator
from infergw.kvindex.events import BlockRemoved, BlockStored, decode_batch
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.keys import block_keys, model_root, prompt_keys
from infergw.kvindex.translate import EventTranslator
from infergw.stack.resources import DEFAULT_MODEL_DIR

BLOCK = 16
MODEL = "bench-model"


ENGINE = EngineKeys(EngineHashing(block_size=BLOCK))  # vLLM's default hashing


def _stored(rng: random.Random, tokens: list[int], start_hash: int) -> BlockStored:
    """A request's first store: its first block hashed as vLLM hashes it, the rest numbered
    on (what the engine-keys mode checks is the first)."""
    n = len(tokens) // BLOCK
    first = ENGINE.first_block(tokens, None)
    return BlockStored(
        block_hashes=(first, *(start_hash + i for i in range(1, n))),
        parent_block_hash=None,
        token_ids=tuple(tokens[: n * BLOCK]),
        block_size=BLOCK,
    )


LAYOUTS = {"packed": KVBlockIndex, "dict": DictBlockIndex}
SINKS = (*LAYOUTS, "engine")  # "engine": packed, keyed by engine hashes


def _sink(layout: str, max_entries: int = 50_000_000) -> EventTranslator | EngineKeyTranslator:
    """The event sink of a layout, over an empty index."""
    if layout == "engine":
        return EngineKeyTranslator(KVBlockIndex(block_size=BLOCK, max_entries=max_entries), ENGINE)
    return EventTranslator(LAYOUTS[layout](block_size=BLOCK, max_entries=max_entries))


RSS_PODS, RSS_BLOCKS, RSS_EVENT_BLOCKS = 16, 62_500, 50
EVENTS_PER_BATCH = 8  # events a msgpack batch, as vLLM sends them


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes: all resident pages, and those that are not code or files."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            fields[name] = value
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["RssAnon"].split()[0]) * 1024


def _rss_child(layout: str, path: str) -> None:
    """The child: build an empty index, say so, ingest, say so, wait for the parent."""
    import numpy as np

    sink = _sink(layout)
    index = sink.index
    rng = np.random.default_rng(3)
    keys = tokens = batch = None
    # Run every path once on a throwaway index first, so the code they page in is not counted.
    scratch = _sink(layout, 5_000_000)
    for _ in range(200):
        warm = rng.integers(2, 2**64 - 1, RSS_EVENT_BLOCKS, dtype=np.uint64).tolist()
        scratch.index.add("warm:1", warm, "gpu")
        scratch.index.lookup(warm)
        scratch.index.remove("warm:1", warm[:10], "gpu")
    tokens = rng.integers(0, 50_000, RSS_EVENT_BLOCKS * BLOCK, dtype=np.uint32).tolist()
    # A request's first block hashed as the engine would: the engine mode checks it.
    warm = (ENGINE.first_block(tokens, None), *range(8, 7 + RSS_EVENT_BLOCKS))
    scratch.apply("warm:1", MODEL, BlockStored(warm, None, tuple(tokens), BLOCK))
    run = [BlockStored((h,), None, tuple(tokens[:BLOCK]), BLOCK) for h in (3, 4, 5, 6)]
    scratch.apply_events("warm:1", MODEL, run)
    scratch.apply("warm:1", MODEL, BlockRemoved(warm[:10]))
    scratch = warm = tokens = None
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    for p in range(RSS_PODS):
        pod = f"10.2.0.{p}:8000"
        batch = []
        for e in range(RSS_BLOCKS // RSS_EVENT_BLOCKS):
            if path == "index":
                keys = rng.integers(2, 2**64 - 1, RSS_EVENT_BLOCKS, dtype=np.uint64).tolist()
                index.add(pod, keys, "gpu")
                continue
            n = RSS_EVENT_BLOCKS * BLOCK
            tokens = rng.integers(0, 50_000, n, dtype=np.uint32).tolist()
            h = (p << 40) + e * RSS_EVENT_BLOCKS + 2
            # The first block hashed as the engine would (the engine mode checks it).
            hashes = (ENGINE.first_block(tokens, None), *range(h + 1, h + RSS_EVENT_BLOCKS))
            batch.append(BlockStored(hashes, None, tuple(tokens), BLOCK))
            if len(batch) == EVENTS_PER_BATCH:  # as the subscriber hands over a message's events
                sink.apply_events(pod, MODEL, batch)
                batch = []
        if batch:
            sink.apply_events(pod, MODEL, batch)
    seconds = time.perf_counter() - t0
    keys = tokens = batch = None  # only the index's own memory stays
    print(json.dumps({"entries": index.stats()["entries"], "seconds": seconds}), flush=True)
    sys.stdin.readline()


def resident_growth(layout: str, path: str) -> dict:
    """RSS growth per (block, pod), read from outside a child that ingests them."""
    code = f"from infergw.bench.kvindex import _rss_child; _rss_child({layout!r}, {path!r})"
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        before = _rss(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        done = json.loads(child.stdout.readline())
        after = _rss(child.pid)
        child.stdin.write("bye\n")
        child.stdin.flush()
    finally:
        child.wait(60)
    n = done["entries"]
    return {
        "layout": layout,
        "path": path,
        "entries": n,
        "rss_bytes_per_entry": round((after[0] - before[0]) / n, 1),
        "anon_bytes_per_entry": round((after[1] - before[1]) / n, 1),
        "blocks_per_s": round(n / done["seconds"]),
    }


def add_rate_interleaved(events: int, chunk: int = 250) -> dict:
    """Both layouts take the same events straight into the index (`add`, 16 pods, 50 fresh
    keys an event, from empty), in alternating chunks: load that comes and goes on a shared
    machine falls on both alike, so their ratio holds where their rates do not."""
    import numpy as np

    rng = np.random.default_rng(4)
    batches = rng.integers(2, 2**64 - 1, (events, RSS_EVENT_BLOCKS), dtype=np.uint64).tolist()
    pods = [f"10.3.0.{p}:8000" for p in range(RSS_PODS)]
    indexes = {name: cls(block_size=BLOCK, max_entries=50_000_000) for name, cls in LAYOUTS.items()}
    seconds = dict.fromkeys(LAYOUTS, 0.0)
    for lo in range(0, events, chunk):
        order = list(indexes.items())
        for name, index in order if lo // chunk % 2 else order[::-1]:  # who goes first alternates
            t0 = time.perf_counter()
            for i in range(lo, min(lo + chunk, events)):
                index.add(pods[i * RSS_PODS // events], batches[i], "gpu")
            seconds[name] += time.perf_counter() - t0
    blocks = events * RSS_EVENT_BLOCKS
    out = {f"{name}_blocks_per_s": round(blocks / s) for name, s in seconds.items()}
    out["blocks"] = blocks
    out["packed_over_dict"] = round(seconds["dict"] / seconds["packed"], 2)
    return out


def _wire(ev: BlockStored) -> dict:
    """A BlockStored as vLLM (>= 0.26) sends it."""
    return {
        "type": "BlockStored",
        "block_hashes": list(ev.block_hashes),
        "parent_block_hash": ev.parent_block_hash,
        "token_ids": list(ev.token_ids),
        "block_size": ev.block_size,
        "lora_id": None,
        "medium": "GPU",
    }


def ingest_rate(
    pods: int, prompts_per_pod: int, prompt_tokens: int, layout: str, path: str
) -> dict:
    """Blocks per second into `layout`: through the translator (BlockStored events: hashing,
    engine-hash maps, index; one event a call, or batches of 8), from msgpack payloads of 8
    events (decoding, then the translator), or straight into the index (index.add of keys
    hashed before).
    Per wall second and per CPU second of this process (what one core does when others
    compete for the machine)."""
    rng = random.Random(1)
    sink = _sink(layout)
    events = []
    h = 1
    for p in range(pods):
        for _ in range(prompts_per_pod):
            tokens = [rng.randrange(8192) for _ in range(prompt_tokens)]
            events.append((f"10.0.{p // 250}.{p % 250}:8000", _stored(rng, tokens, h)))
            h += prompt_tokens
    blocks = sum(len(e.block_hashes) for _, e in events)
    # As the subscriber gets them: batches of 8 events, each batch one pod's.
    batches = []
    for i in range(0, len(events), EVENTS_PER_BATCH):
        chunk = events[i : i + EVENTS_PER_BATCH]
        for pod in dict.fromkeys(pod for pod, _ in chunk):
            batches.append((pod, [ev for p, ev in chunk if p == pod]))
    if path == "payload":  # msgpack payloads, decoded as the subscriber decodes them
        payloads = [
            (pod, msgspec.msgpack.encode([time.time(), [_wire(ev) for ev in evs], 0]))
            for pod, evs in batches
        ]
        apply, tokens = sink.apply_events, layout != "engine"
        c0, t0 = time.process_time(), time.perf_counter()
        for pod, payload in payloads:  # engine keys: token ids counted, not decoded
            apply(pod, MODEL, decode_batch(payload, tokens=tokens).events)
    elif path == "index":
        root, add = model_root(MODEL), sink.index.add
        if layout == "engine":  # keyed by the events' hashes themselves
            keyed = [(pod, list(ev.block_hashes)) for pod, ev in events]
        else:
            keyed = [(pod, block_keys(ev.token_ids, BLOCK, parent=root)) for pod, ev in events]
        c0, t0 = time.process_time(), time.perf_counter()
        for pod, keys in keyed:
            add(pod, keys, "gpu")
    elif path == "event":  # one event a call (the translator's per-event path)
        apply = sink.apply
        c0, t0 = time.process_time(), time.perf_counter()
        for pod, ev in events:
            apply(pod, MODEL, ev)
    else:
        apply = sink.apply_events
        c0, t0 = time.process_time(), time.perf_counter()
        for pod, evs in batches:
            apply(pod, MODEL, evs)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "layout": layout,
        "path": path,
        "pods": pods,
        "blocks": blocks,
        "seconds": round(seconds, 3),
        "blocks_per_s": round(blocks / seconds),
        "blocks_per_cpu_s": round(blocks / cpu),
        "events_per_s": round(len(events) / seconds),
        "entries": sink.stats().get("entries"),
        "bytes_per_entry": round(sink.bytes_per_entry(), 1),
    }


def lookup_latency(pods: int, prompt_tokens: int, layout: str, repeats: int = 200) -> dict:
    rng = random.Random(2)
    sink = _sink(layout)
    index = sink.index
    prompt = [rng.randrange(8192) for _ in range(prompt_tokens)]
    names = [f"10.1.{p // 250}.{p % 250}:8000" for p in range(pods)]
    half = prompt[: (prompt_tokens // 2) // BLOCK * BLOCK]

    def stored(tokens: list[int], start: int) -> BlockStored:
        if layout != "engine":
            return _stored(rng, tokens, start)
        return BlockStored(tuple(ENGINE.keys(tokens)), None, tuple(tokens), BLOCK)

    for i, pod in enumerate(names):
        if i % 2 == 0:
            sink.apply(pod, MODEL, stored(half, 10_000_000 * (i + 1)))
        # everyone holds some unrelated blocks too
        other = [rng.randrange(8192) for _ in range(2048)]
        sink.apply(pod, MODEL, stored(other, 10_000_000 * (i + 1) + 5_000_000))
    if layout == "engine":

        def hashed() -> list[int]:
            return ENGINE.keys(prompt)
    else:

        def hashed() -> list[int]:
            return prompt_keys(prompt, BLOCK, MODEL)

    keys = hashed()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        scores = index.lookup(keys, names)
        times.append(time.perf_counter() - t0)
    assert max(scores.values()) == len(half) // BLOCK, "lookup must find the held half"
    key_times = []
    for _ in range(20):
        t0 = time.perf_counter()
        hashed()
        key_times.append(time.perf_counter() - t0)
    return {
        "layout": layout,
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
    cold = PromptTokenizer.from_dir(DEFAULT_MODEL_DIR)
    n = len(cold.tokens_for("completions", {"prompt": system}))
    times_cold = []
    for i in range(5):
        fresh = PromptTokenizer.from_dir(DEFAULT_MODEL_DIR)
        t0 = time.perf_counter()
        fresh.tokens_for("completions", {"prompt": system + f" question {i}?"})
        times_cold.append(time.perf_counter() - t0)
    warm = PromptTokenizer.from_dir(DEFAULT_MODEL_DIR)
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


_PATHS = {
    "index": "index.add",
    "event": "events one a call → translator → index",
    "translator": "batches of 8 events → translator → index",
    "payload": "msgpack → decode → translator → index",
}


def markdown(out: dict) -> str:
    m = out["machine"]
    lines = [
        f"Measured {m['date']} on {m['cpu']}, Python {m['python']}, one core; load average "
        f"{out['load']} at the start (other work shared the machine).",
        "",
        f"| resident growth, {RSS_PODS} pods × {RSS_BLOCKS:,} blocks | layout | "
        "VmRSS bytes per (block, pod) | of which anonymous | blocks/s |",
        "|---|---|---|---|---|",
    ]
    for r in out["rss"]:
        path = "index.add" if r["path"] == "index" else _PATHS["translator"]
        if r["layout"] == "engine":
            path = "batches of 8 events → index (engine keys)"
        lines.append(
            f"| {path} | {r['layout']} | {r['rss_bytes_per_entry']} | "
            f"{r['anon_bytes_per_entry']} | {r['blocks_per_s']:,} |"
        )
    a = out["add_interleaved"]
    lines += [
        "",
        "| index.add, both layouts in alternating chunks | blocks | packed blocks/s | "
        "dict blocks/s | packed / dict |",
        "|---|---|---|---|---|",
        f"| 16 pods, events of {RSS_EVENT_BLOCKS} new blocks | {a['blocks']:,} | "
        f"{a['packed_blocks_per_s']:,} | {a['dict_blocks_per_s']:,} | {a['packed_over_dict']} |",
    ]
    lines += [
        "",
        "| ingestion, 64-block events | pods | layout | blocks | blocks/s | blocks per CPU s | "
        "bytes per (block, pod), by getsizeof |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in out["ingest"]:
        lines.append(
            f"| {_PATHS[r['path']]} | {r['pods']} | {r['layout']} | {r['blocks']} | "
            f"{r['blocks_per_s']:,} | {r['blocks_per_cpu_s']:,} | {r['bytes_per_entry']} |"
        )
    lines += [
        "",
        "| lookup | pods | layout | p50 µs | p99 µs | hashing the prompt µs |",
        "|---|---|---|---|---|---|",
    ]
    for r in out["lookup"]:
        lines.append(
            f"| {r['prompt_tokens']} tokens | {r['pods']} | {r['layout']} | {r['lookup_p50_us']} | "
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
    p = argparse.ArgumentParser(
        prog="infergate bench kvindex", description=__doc__, formatter_class=HelpFormatter
    )
    run = p.add_argument_group("Run")
    run.add_argument("--quick", action="store_true", help="smaller ingestion for a fast check")
    run.add_argument("--no-rss", action="store_true", help="skip the resident-memory children")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    rss = []
    if not args.no_rss:
        for path in ("index", "translator"):
            for layout in LAYOUTS if path == "index" else SINKS:  # engine's index is packed's
                rss.append(resident_growth(layout, path))
                print(json.dumps(rss[-1]), flush=True)
    interleaved = add_rate_interleaved(4_000 if args.quick else 20_000)
    print(json.dumps(interleaved), flush=True)
    ingest = []
    for path in ("index", "event", "translator", "payload"):
        for layout in SINKS:
            ingest += [
                ingest_rate(16, 20 if args.quick else 200, 1024, layout, path),
                ingest_rate(256, 2 if args.quick else 20, 1024, layout, path),
            ]
    for r in ingest:
        print(json.dumps(r), flush=True)
    lookup = [
        lookup_latency(pods, tokens, layout)
        for pods in (16, 256)
        for tokens in (1024, 8192, 32768)
        for layout in SINKS
    ]
    for r in lookup:
        print(json.dumps(r), flush=True)
    tok = [tokenization(n) for n in (1000, 8000)]
    for r in tok:
        print(json.dumps(r), flush=True)
    out = {
        "benchmark": "kvindex",
        "machine": machine(),
        "load": round(load, 2),
        "rss": rss,
        "add_interleaved": interleaved,
        "ingest": ingest,
        "lookup": lookup,
        "tokenize": tok,
    }
    print("wrote", write_json("kvindex", out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
