"""The storage floor of a one-table KV index (issue 15): a prototype, not a layout.

What a (block, pod) entry must keep, exactly: our request key (8 bytes: lookups), the engine's
block hash (8: BlockRemoved names blocks by it alone), the packed record (4: pod, tiers,
speculative bit) and the LRU stamp (4) — 24 bytes. Two ways in (by our key, by engine hash) need
two searchable structures over them. Kept in the index's own slots (kvindex.packed: a 24-byte
slot, 60-80 % load) plus a table of 4-byte positions keyed by engine hash, that is 28 bytes a slot,
35-47 bytes an entry: not under the issue's 32. The layout measured here is the floor: entries
packed densely (no load waste), appended in order, and two open-addressing tables of uint32
positions (position + 1; 0 is empty) over them, one probed by our key, one by engine hash,
each slot compared against the entry it points to: 24 + 8 / load bytes an entry (33-36 at
68-85 % load).

The probe loops are compiled by numba (not a dependency: install it to run this): in numpy, a
batch of 50 keys costs a dozen calls of ~1 µs per table per round, which alone is ~3 µs a
block, over the 2 µs a block that 500k blocks/s allows. Entries are inserted only (no removal,
no LRU): enough to measure bytes, insert rate, probe cost and the compiler's warm-up.

    infergate bench kvindex_floor [--entries N] [--batch B]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import secrets
import sys
import time
from array import array

import numpy as np

from infergw.api.cli_help import HelpFormatter

MAX_LOAD = 0.85  # a position table grows by GROWTH past this load (so 0.68-0.85)
GROWTH = 1.25


def _zeros(n: int, dtype) -> np.ndarray:
    """An array in an anonymous mmap: pages count in RSS only once written."""
    anon = mmap.mmap(-1, max(1, n * np.dtype(dtype).itemsize))
    return np.frombuffer(anon, dtype)


def _compile():
    """The compiled probe loops (numba imported here: it is optional)."""
    try:
        from numba import njit
    except ImportError:
        raise SystemExit("bench kvindex_floor needs numba (pip install numba)") from None

    @njit(cache=False)
    def home(k, mix, n):
        h = k * mix
        h ^= h >> np.uint64(32)
        h *= mix
        return (h >> np.uint64(32)) * n >> np.uint64(32)  # any table size, no modulo

    @njit(cache=False)
    def find(slots, src, ks, mix, out):
        n = np.uint64(slots.size)
        for i in range(ks.size):
            k = ks[i]
            j = home(k, mix, n)
            out[i] = -1
            while slots[j] != 0:
                if src[slots[j] - 1] == k:
                    out[i] = slots[j] - 1
                    break
                j += np.uint64(1)
                if j == n:
                    j = np.uint64(0)

    @njit(cache=False)
    def place(slots, src, ps, mix):
        n = np.uint64(slots.size)
        for p in ps:
            j = home(src[p], mix, n)
            while slots[j] != 0:
                j += np.uint64(1)
                if j == n:
                    j = np.uint64(0)
            slots[j] = p + 1

    return find, place


class PositionTable:
    """Entry positions, found by the value src[position] (linear probing)."""

    def __init__(self, src: np.ndarray, loops) -> None:
        self.src, self._find, self._place = src, *loops
        self.mix = np.uint64(secrets.randbits(64) | 1)
        self.live = 0
        self.slots = np.zeros(16, np.uint32)

    def find(self, ks: np.ndarray) -> np.ndarray:
        out = np.empty(len(ks), np.int64)
        self._find(self.slots, self.src, ks, self.mix, out)
        return out

    def place(self, ps: np.ndarray) -> None:
        """Entries at positions ps, whose values are absent."""
        size = self.slots.size
        while self.live + len(ps) > MAX_LOAD * size:
            size = int(size * GROWTH) + 1
        if size > self.slots.size:
            old = self.slots
            self.slots = _zeros(size, np.uint32)
            # Chunk by chunk: a whole-table temporary would be malloc'd, and glibc keeps
            # freed heap memory resident.
            for i in range(0, old.size, 1 << 16):
                part = old[i : i + (1 << 16)]
                self._place(self.slots, self.src, part[part != 0].astype(np.int64) - 1, self.mix)
        self._place(self.slots, self.src, ps, self.mix)
        self.live += len(ps)


class EntryTable:
    def __init__(self, capacity: int, loops) -> None:
        self.keys, self.tags = _zeros(capacity, np.uint64), _zeros(capacity, np.uint64)
        self.vals, self.stamps = _zeros(capacity, np.uint32), _zeros(capacity, np.uint32)
        self.n = 0
        self.by_key = PositionTable(self.keys, loops)
        self.by_tag = PositionTable(self.tags, loops)

    def add(self, keys: array, tags: array, val: int) -> None:
        """One event's blocks: our keys and the engine's hashes (new ones appended)."""
        ks, ts = np.frombuffer(keys, np.uint64), np.frombuffer(tags, np.uint64)
        new = self.by_key.find(ks) < 0
        if not new.all():
            ks, ts = ks[new], ts[new]
        a, m = self.n, len(ks)
        self.keys[a : a + m], self.tags[a : a + m] = ks, ts
        self.vals[a : a + m], self.stamps[a : a + m] = val, 0
        self.n += m
        ps = np.arange(a, a + m)
        self.by_key.place(ps)
        self.by_tag.place(ps)


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS"))


def run(entries: int, batch: int) -> dict:
    t0 = time.perf_counter()
    loops = _compile()
    warm = EntryTable(1024, loops)
    warm.add(array("Q", range(2, 52)), array("Q", range(100, 150)), 1)
    warm.by_tag.find(np.arange(5, dtype=np.uint64))
    warm_up = time.perf_counter() - t0
    rng = np.random.default_rng(3)
    table = EntryTable(50_000_000, loops)
    events = [
        tuple(array("Q", rng.integers(2, 2**64 - 1, batch, dtype=np.uint64).tolist()) for _ in "kt")
        for _ in range(entries // batch)
    ]
    before, c0 = _rss(), time.process_time()
    for i, (keys, tags) in enumerate(events):
        table.add(keys, tags, i % 16)
    cpu, after = time.process_time() - c0, _rss()
    n = table.n
    c0 = time.process_time()
    hit = table.by_key.find(table.keys[:n])
    hit_s = time.process_time() - c0
    c0 = time.process_time()
    miss = table.by_key.find(rng.integers(2, 2**64 - 1, 100_000, dtype=np.uint64))
    miss_s = time.process_time() - c0
    assert (hit == np.arange(n)).all() and (miss == -1).all()
    assert (table.by_tag.find(table.tags[:n]) == np.arange(n)).all()
    return {
        "entries": n,
        "batch": batch,
        "rss_bytes_per_entry": round((after - before) / n, 1),
        "entries_per_cpu_s": round(n / cpu),
        "find_hit_ns": round(1e9 * hit_s / n),
        "find_miss_ns": round(1e9 * miss_s / 100_000),
        "compile_s": round(warm_up, 2),
        "load": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="infergate bench kvindex_floor", description=__doc__, formatter_class=HelpFormatter
    )
    size = p.add_argument_group("Index size")
    size.add_argument("--entries", type=int, default=1_000_000, help="(block, pod) entries stored")
    size.add_argument("--batch", type=int, default=50, help="blocks an event (or a ZMQ batch)")
    args = p.parse_args(argv)
    print(json.dumps(run(args.entries, args.batch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
