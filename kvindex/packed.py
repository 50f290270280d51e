"""A packed hash table of 64-bit keys: numpy arrays, no Python object per key.

The block index keeps one slot per request key here (kvindex.index): a Python dict costs
~100 bytes per key (the entry, the key's int object, its share of the table); this costs 16 bytes
per slot (the key, a 32-bit value, a 32-bit stamp for the caller's LRU) at a load between
GROW_LOAD and MAX_LOAD, so 19-27 bytes per key.

Open addressing over buckets of WAYS slots: a key's home bucket comes from its high 32 bits times
the bucket count (any count works, so the table grows by ~1/0.6 rather than doubling); a bucket
with no empty slot sends a search on to the next bucket. Batches of keys are found and inserted
with a few numpy operations per bucket step (most keys are settled in the first).

Keys 0 and 1 mark empty and deleted slots, so the table cannot hold them: `find` reports them
absent and `upsert` refuses them (-1), a missed hit for 2 keys in 2**64.
Large arrays live in anonymous mmaps, so a resize gives the old ones back to the OS at once
(glibc may keep freed heap memory resident).
"""

from __future__ import annotations

import math
import mmap

import numpy as np

EMPTY, DELETED = 0, 1
WAYS = 8  # slots per bucket: 64 bytes of keys, one cache line
MAX_LOAD = 0.85  # resize when live + deleted slots pass this share of the slots
GROW_LOAD = 0.6  # the live share right after a resize
MIN_BUCKETS = 2
MMAP_BYTES = 1 << 20  # arrays at least this big are mmapped

_HIGH = np.uint64(32)


def _zeros(n: int, dtype) -> np.ndarray:
    nbytes = n * np.dtype(dtype).itemsize
    if nbytes < MMAP_BYTES:
        return np.zeros(n, dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype)  # unmapped when the array is freed


class KeyTable:
    """uint64 key → a slot position; per slot a uint32 value and a uint32 stamp (the caller's)."""

    def __init__(self) -> None:
        self.live = 0  # slots holding a key
        self.deleted = 0  # slots marked DELETED (they still lengthen searches)
        self._alloc(MIN_BUCKETS)

    def _alloc(self, buckets: int) -> None:
        self.buckets = buckets
        self.keys = _zeros(buckets * WAYS, np.uint64)
        self._rows = self.keys.reshape(buckets, WAYS)
        self.vals = _zeros(buckets * WAYS, np.uint32)
        self.stamps = _zeros(buckets * WAYS, np.uint32)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.vals.nbytes + self.stamps.nbytes

    def _home(self, ks: np.ndarray) -> np.ndarray:
        return ((ks >> _HIGH) * np.uint64(self.buckets) >> _HIGH).astype(np.int64)

    def find(self, ks: np.ndarray) -> np.ndarray:
        """Each key's position (int64), -1 where absent."""
        pos = np.full(len(ks), -1, np.int64)
        idx = np.flatnonzero(ks > DELETED) if self.live else ()
        if not len(idx):
            return pos
        k = ks[idx]
        b = self._home(k)
        for _ in range(self.buckets):
            rows = self._rows[b]
            eq = rows == k[:, None]
            hit = eq.any(1)
            if hit.any():
                pos[idx[hit]] = b[hit] * WAYS + eq[hit].argmax(1)
            on = ~hit & ~(rows == EMPTY).any(1)  # a full bucket: the key may lie further on
            if not on.any():
                break
            idx, k, b = idx[on], k[on], (b[on] + 1) % self.buckets
        return pos

    def upsert(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(each key's position, whether its slot is new), inserting absent keys with value 0
        and stamp 0; -1 for the reserved keys. May resize first: positions found before a
        call are stale after it."""
        uniq, inverse = np.unique(ks, return_inverse=True)
        pos = self.find(uniq)
        new = np.flatnonzero((pos < 0) & (uniq > DELETED))
        if len(new):
            if self.live + self.deleted + len(new) > MAX_LOAD * self.buckets * WAYS:
                self._resize(self.live + len(new))
                pos = self.find(uniq)
            pos[new] = self._place(uniq[new])
            self.live += len(new)
        fresh = np.zeros(len(uniq), bool)
        fresh[new] = True
        return pos[inverse], fresh[inverse]

    def _place(self, ks: np.ndarray) -> np.ndarray:
        """Put distinct absent keys into free slots; their positions."""
        pos = np.empty(len(ks), np.int64)
        idx = np.arange(len(ks))
        b = self._home(ks)
        while len(idx):
            free = self._rows[b] <= DELETED
            has = free.any(1)
            slot = b * WAYS + free.argmax(1)
            cand = np.flatnonzero(has)
            _, first = np.unique(slot[cand], return_index=True)
            win = cand[first]  # one key per free slot this round; the others look again
            s = slot[win]
            self.deleted -= int(np.count_nonzero(self.keys[s] == DELETED))
            self.keys[s] = ks[idx[win]]
            self.vals[s] = 0
            self.stamps[s] = 0
            pos[idx[win]] = s
            again = np.ones(len(idx), bool)
            again[win] = False
            b = np.where(has, b, (b + 1) % self.buckets)
            idx, b = idx[again], b[again]
        return pos

    def delete(self, pos) -> None:
        """Free the slots at `pos` (distinct live positions). May shrink the table: positions
        are stale after it."""
        pos = np.asarray(pos, np.int64)
        if not len(pos):
            return
        self.keys[pos] = DELETED
        self.live -= len(pos)
        self.deleted += len(pos)
        if self.buckets > MIN_BUCKETS and self.live < 0.25 * GROW_LOAD * self.buckets * WAYS:
            self._resize(self.live)

    def live_positions(self) -> np.ndarray:
        return np.flatnonzero(self.keys > DELETED)

    def _resize(self, live: int) -> None:
        keep = self.live_positions()
        ks, vs, ss = self.keys[keep], self.vals[keep], self.stamps[keep]
        self._alloc(max(MIN_BUCKETS, math.ceil(live / (GROW_LOAD * WAYS))))
        self.deleted = 0
        pos = self._place(ks)
        self.vals[pos] = vs
        self.stamps[pos] = ss
