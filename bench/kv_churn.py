"""What the picker spends ingesting the KV events of one request, for commits side by side.

`bench routing`'s shared-prefix workload has 8 pods with 320-block caches and prompts of ~94
blocks: every request stores its uncached blocks (one BlockStored) and evicts as many (vLLM
sends one BlockRemoved per evicted block: ~70 events a request). This generates that stream
per pod — groups of prompts sharing a long prefix, each pod an LRU of engine blocks, events as
vLLM's map-format msgpack batches — and times the picker's subscriber path on it (decode,
translate, index: what runs on the event loop for every message), in a child process per
commit (`--commit`, repeatable; `HEAD` is the installed code, others come from
bench/checkout.py), commits taking turns for R rounds. CPU µs per request, median and best.

python -m infergw.bench.kv_churn --commit 7097309 --commit HEAD [--requests 2000 --rounds 5]
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import msgspec

from infergw.bench import checkout

BLOCK = 16
MODEL = "m"

# Run by the child: argv[1] is the events file; prints CPU seconds of the whole replay.
CHILD = r"""
import pickle, sys, time
from infergw.kvindex.dict_index import DictBlockIndex
from infergw.kvindex.subscriber import KVEventSubscriber, _PodState
from infergw.kvindex.translate import EventTranslator

pods, messages = pickle.load(open(sys.argv[1], "rb"))
sub = KVEventSubscriber(EventTranslator(DictBlockIndex(block_size=16)), model_for=lambda p: "m")
for pod in pods:
    sub._pods.setdefault(pod, _PodState()).socket = object()  # per-pod mode, as the picker
t0 = time.process_time()
for pod, frames in messages:
    sub._on_frames(frames, pod)
print(time.process_time() - t0)
"""


def churn(requests: int, pods: int, capacity: int, groups: int, seed: int) -> list:
    """(pod, [topic, seq, payload]) per batch: a request's store, then its evictions."""
    rng = random.Random(seed)
    prefixes = [[rng.getrandbits(62) for _ in range(90)] for _ in range(groups)]
    caches = [OrderedDict() for _ in range(pods)]  # engine hash -> None, in LRU order
    seqs = [0] * pods
    enc = msgspec.msgpack.Encoder()
    out = []
    for _ in range(requests):
        g = rng.randrange(groups)
        p = g % pods if rng.random() < 0.7 else rng.randrange(pods)  # mostly its group's pod
        chain = prefixes[g] + [rng.getrandbits(62) for _ in range(4)]
        cache = caches[p]
        held = 0
        while held < len(chain) and chain[held] in cache:
            cache.move_to_end(chain[held])
            held += 1
        new = chain[held:]
        events = [
            {
                "type": "BlockStored",
                "block_hashes": new,
                "parent_block_hash": chain[held - 1] if held else None,
                "token_ids": [rng.randrange(50_000) for _ in range(BLOCK * len(new))],
                "block_size": BLOCK,
                "lora_id": None,
                "medium": "GPU",
                "lora_name": None,
                "extra_keys": [None] * len(new),
                "group_idx": 0,
                "kv_cache_spec_kind": "full_attention",
            }
        ]
        for h in new:
            cache[h] = None
        while len(cache) > capacity:
            h, _ = cache.popitem(last=False)
            events.append({"type": "BlockRemoved", "block_hashes": [h], "medium": "GPU"})
        payload = enc.encode([time.time(), events, 0])
        out.append((f"10.0.0.{p}:8000", [b"", seqs[p].to_bytes(8, "big"), payload]))
        seqs[p] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infergw.bench.kv_churn", description=__doc__)
    ap.add_argument("--commit", action="append", default=[], help="repeatable; HEAD: this code")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pods", type=int, default=8)
    ap.add_argument("--capacity", type=int, default=320, help="engine blocks per pod")
    ap.add_argument("--groups", type=int, default=48)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    commits = args.commit or ["HEAD"]
    work = Path(tempfile.mkdtemp(prefix="bench-kv-churn-"))
    messages = churn(args.requests, args.pods, args.capacity, args.groups, args.seed)
    events = sum(len(msgspec.msgpack.decode(m[1][2])[1]) for m in messages)
    path = work / "events.pkl"
    pods = sorted({pod for pod, _ in messages})
    path.write_bytes(pickle.dumps((pods, messages)))
    paths = {c: None if c == "HEAD" else checkout.importable(c, work / c) for c in commits}
    runs: dict[str, list[float]] = {c: [] for c in commits}
    for _ in range(args.rounds):
        for c in commits:
            env = dict(os.environ)
            if paths[c] is not None:
                env["PYTHONPATH"] = str(paths[c])
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(path)],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            )
            runs[c].append(1e6 * float(done.stdout.split()[-1]) / args.requests)
    print(f"{args.requests} requests, {events / args.requests:.1f} KV events a request")
    print("| commit | ingest CPU µs per request, median (best) | runs |")
    print("|---|---|---|")
    for c in commits:
        r = runs[c]
        listed = ", ".join(f"{x:.0f}" for x in r)
        print(f"| {c} | {statistics.median(r):.0f} ({min(r):.0f}) | {listed} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
