"""A packed hash table of 64-bit keys: numpy arrays, no Python object per key.

The block index keeps one slot per request key here (kvindex.index): a Python dict costs
~100 bytes per key (the entry, the key's int object, its share of the table); this costs 16 bytes
per slot (the key, a 32-bit value, a 32-bit stamp for the caller's LRU) at a load between
GROW_LOAD and MAX_LOAD, so 20-27 bytes per key.

Open addressing over buckets of WAYS slots: a key's home bucket comes from the high 32 bits of
its mixed value times the bucket count (any count works, so the table grows by MAX_LOAD /
GROW_LOAD rather than doubling); a bucket with no empty slot sends a search on by a step taken
from the low bits (double hashing over a prime number of buckets: no clusters of full buckets).
A key takes the first free slot of the first bucket on its path with an empty one, and a
deleted key leaves DELETED, so a bucket's empty slots are always its last ones.

Speed comes from few numpy calls, not few operations: a numpy call costs ~1 µs whatever its
size, as much as ~20 key-by-key steps. A batch is found or inserted in rounds of a dozen calls
each, one bucket per key per round (wide buckets settle most keys in the first), and the last
few keys go on key by key over memoryviews of the same arrays; small batches go key by key.

Keys 0 and 1 mark empty and deleted slots, so the table cannot hold them: `find` reports them
absent and `upsert` refuses them (-1), a missed hit for 2 keys in 2**64.
Large arrays live in anonymous mmaps, so a resize gives the old ones back to the OS at once
(glibc may keep freed heap memory resident).
"""

from __future__ import annotations

import math
import mmap
import secrets
from array import array

import numpy as np

EMPTY, DELETED = 0, 1
WAYS = 32  # slots per bucket: 256 bytes of keys, four cache lines
MAX_LOAD = 0.8  # resize when live + deleted slots pass this share of the slots
GROW_LOAD = 0.6  # the live share right after a resize
MIN_BUCKETS = 2
MMAP_BYTES = 1 << 16  # arrays at least this big are mmapped (freed: back to the OS at once)
RESIZE_CHUNK = 1 << 16  # slots rehashed at a time

SMALL = 24  # batches up to this many keys go key by key
FEW = 8  # keys left after a numpy round go on key by key
_HIGH, _LOW = np.uint64(32), np.uint64(0xFFFFFFFF)
_M64 = (1 << 64) - 1


def as_keys(keys) -> np.ndarray:
    """A sequence of ints in [0, 2**64) as a uint64 array (through array.array: a third of
    numpy's cost for a list of Python ints)."""
    if isinstance(keys, np.ndarray):
        return keys.astype(np.uint64, copy=False)
    return np.frombuffer(array("Q", keys), np.uint64) if len(keys) else np.empty(0, np.uint64)


def _cut_after_miss(pos: np.ndarray, on: np.ndarray) -> None:
    """A prefix search: keys past the first one known absent need not be searched on."""
    first = ((pos < 0) > on).tobytes().find(1)
    if first >= 0:
        on[first:] = False


def _prime_at_least(n: int) -> int:
    """A prime bucket count makes every step reach every bucket."""
    while n < 2 or any(n % d == 0 for d in range(2, math.isqrt(n) + 1)):
        n += 1
    return n


def _zeros(n: int, dtype) -> np.ndarray:
    nbytes = n * np.dtype(dtype).itemsize
    if nbytes < MMAP_BYTES:
        return np.zeros(n, dtype)
    anon = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(anon, dtype)  # unmapped when the array is freed


class KeyTable:
    """uint64 key → a slot position; per slot a uint32 value and a uint32 stamp (the caller's)."""

    def __init__(self) -> None:
        self.live = 0  # slots holding a key
        self.deleted = 0  # slots marked DELETED (they still lengthen searches)
        self._mix_int = secrets.randbits(64) | 1
        self._mix = np.uint64(self._mix_int)
        self._alloc(MIN_BUCKETS)

    def _alloc(self, buckets: int) -> None:
        self.buckets = buckets
        self._nb = np.uint64(buckets)
        self.keys = _zeros(buckets * WAYS, np.uint64)
        self._rows = self.keys.reshape(buckets, WAYS)
        self.vals = _zeros(buckets * WAYS, np.uint32)
        self.stamps = _zeros(buckets * WAYS, np.uint32)
        # Item views for the key-by-key paths: a Python int per item, no numpy scalar.
        self._km, self._vm, self._sm = map(memoryview, (self.keys, self.vals, self.stamps))

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.vals.nbytes + self.stamps.nbytes

    def _mixed(self, ks: np.ndarray) -> np.ndarray:
        """Keys mixed by a secret bijection (times a secret odd number, xor the high half into
        the low, times it again): whoever chooses the tokens cannot aim keys at a few
        buckets, and keys in a run (k, k + 1, ...) spread whatever the number drawn."""
        h = ks * self._mix
        h ^= h >> _HIGH
        h *= self._mix
        return h

    def _bucket(self, ks: np.ndarray) -> np.ndarray:
        """Each key's first bucket (int64)."""
        h = self._mixed(ks)
        h >>= _HIGH
        h *= self._nb
        h >>= _HIGH
        return h.view(np.int64)

    def _step(self, ks: np.ndarray) -> np.ndarray:
        """Each key's step from one bucket to the next on its path, 1 .. buckets - 1 (double
        hashing: keys that share a bucket go on to different ones)."""
        h = self._mixed(ks)
        h &= _LOW
        h *= self._nb - np.uint64(1)
        h >>= _HIGH
        return h.view(np.int64) + 1

    def _home(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(each key's first bucket, its step): the path _path walks key by key."""
        return self._bucket(ks), self._step(ks)

    def _round(self, ks: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One probe of bucket b[i] for key ks[i]: (the key's slot there or -1, whether the
        search must go on: not there and the bucket has no empty slot). A bucket's empty
        slots are its last ones (a key takes the first free slot, a deleted key leaves
        DELETED), so its last slot says whether it has one."""
        rows = self._rows.take(b, 0)
        p = (rows == ks[:, None]).argmax(1)
        p += b * WAYS
        miss = self.keys.take(p) != ks
        p[miss] = -1
        on = rows[:, -1] != EMPTY
        on &= miss
        return p, on

    def _search(self, ks: np.ndarray, prefix=False) -> np.ndarray:
        """Each key's position or -1, for keys that are not reserved. prefix: only up to the
        first absent key (positions past it are -1 or right)."""
        b = self._bucket(ks)
        pos, on = self._round(ks, b)
        if not np.count_nonzero(on):
            return pos
        if prefix:
            _cut_after_miss(pos, on)
        idx = on.nonzero()[0]
        k = ks[idx]
        b = b[idx]
        step = None
        for _ in range(self.buckets):
            if len(idx) <= FEW:  # the last few: key by key is cheaper
                pos[idx] = self.find_small(k.tolist())
                break
            if step is None:
                step = self._step(k)
            b += step
            b[b >= self.buckets] -= self.buckets
            p, on = self._round(k, b)
            pos[idx] = p
            if prefix:
                _cut_after_miss(p, on)
            if not np.count_nonzero(on):
                break
            idx, k, step, b = idx[on], k[on], step[on], b[on]
        return pos

    def find(self, ks: np.ndarray) -> np.ndarray:
        """Each key's position (int64), -1 where absent."""
        if not self.live or not len(ks):
            return np.full(len(ks), -1, np.int64)
        ok = ks > DELETED
        if np.count_nonzero(ok) == len(ks):
            return self._search(ks)
        pos = np.full(len(ks), -1, np.int64)
        pos[ok] = self._search(ks[ok])
        return pos

    def find_prefix(self, ks: np.ndarray) -> np.ndarray:
        """Positions of ks[0], ks[1], ... up to the first absent key; -1 from there on."""
        n = len(ks)
        if not self.live or not n:
            return np.full(n, -1, np.int64)
        reserved = (ks <= DELETED).tobytes().find(1)
        if reserved >= 0:
            pos = np.full(n, -1, np.int64)
            pos[:reserved] = self.find_prefix(ks[:reserved])
            return pos
        pos = self._search(ks, prefix=True)
        miss = (pos < 0).tobytes().find(1)
        if miss >= 0:
            pos[miss:] = -1
        return pos

    def upsert(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """(each key's position, whether its slot is new, whether the keys were distinct and
        none reserved), inserting absent keys with value 0 and stamp 0; -1 for the reserved
        keys. May resize first: positions found before a call are stale after it."""
        srt = np.sort(ks)
        if len(srt) and (srt[0] <= DELETED or np.count_nonzero(srt[1:] == srt[:-1])):
            return self._upsert_unique(ks)
        return (*self.upsert_distinct(ks), True)

    def upsert_distinct(self, ks: np.ndarray, zero: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """upsert for keys the caller knows distinct and not reserved: (positions, whether
        each slot is new). zero=False leaves a new slot's value and stamp as they were (the
        caller writes both). In rounds, one bucket per key each: a key found there is done;
        one absent (the bucket has an empty slot) takes the bucket's first free slot; one
        not there in a full bucket goes on along its path. Keys that raced for one slot
        are checked after the write: the losers try their bucket again. The last few keys
        go key by key."""
        self._room_for(len(ks))
        n = len(ks)
        if n > self.buckets >> 2:  # several keys per bucket: slots in turn, not in races
            return self._upsert_dense(ks)
        pos = fresh = None
        b, k, idx, step = self._bucket(ks), ks, None, None
        keys = self.keys
        for _ in range(self.buckets + n):
            rows = self._rows.take(b, 0)
            base = b * WAYS
            p = (rows == k[:, None]).argmax(1)
            p += base
            hit = keys.take(p) == k
            claim = rows[:, -1] == EMPTY  # not found, and the search ends here: absent
            nhit = np.count_nonzero(hit)
            if nhit:
                claim &= ~hit
            m = len(k)
            ncl = np.count_nonzero(claim)
            won = hit
            if ncl:
                free = rows <= DELETED if self.deleted else rows == EMPTY
                slot = free.argmax(1)
                slot += base
                every = ncl == m
                new, nk = (slot, k) if every else (slot[claim], k[claim])
                was_deleted = keys.take(new) == DELETED if self.deleted else None
                keys[new] = nk
                ok = keys.take(new) == nk  # not taken by another key of this batch
                nok = np.count_nonzero(ok)
                if nok < ncl:
                    claim[claim] = ok
                    every = False
                    new = new[ok]
                    if was_deleted is not None:
                        was_deleted = was_deleted[ok]
                if was_deleted is not None:
                    self.deleted -= int(np.count_nonzero(was_deleted))
                if zero:
                    self.vals[new] = 0
                    self.stamps[new] = 0
                self.live += nok
                if every:  # every key new and placed: the usual batch of new blocks
                    p, won = slot, claim
                else:
                    np.copyto(p, slot, where=claim)
                    won = hit | claim
            elif not nhit:
                won = None  # nothing settled this round
            nwon = nhit + (nok if ncl else 0)
            if idx is None:  # the first round: its positions stand where settled
                if nwon == m:
                    return p, claim
                pos, fresh = p, claim
                rest = hit | claim
                np.logical_not(rest, out=rest)
                if m - nwon <= FEW:  # the last few: key by key is cheaper
                    at = rest.nonzero()[0]
                    pos[at], fresh[at] = self._upsert_keys(ks[at].tolist())
                    return pos, fresh
                step = self._step(ks)
                idx = rest.nonzero()[0]
                on = rows[:, -1] != EMPTY  # not in this full bucket: the next one on its path
                b = b + step * on
                b[b >= self.buckets] -= self.buckets
                k, b, step = ks[idx], b[idx], step[idx]
                continue
            if nwon:
                at = idx[won]
                pos[at] = p[won]
                fresh[at] = claim[won]
                if nwon == m:
                    break
                rest = ~won
            else:
                rest = np.ones(m, bool)
            if m - nwon <= FEW:  # the last few: key by key is cheaper
                at = rest.nonzero()[0]
                p, f = self._upsert_keys(k[at].tolist())
                at = idx[at]
                pos[at] = p
                fresh[at] = f
                break
            on = rows[:, -1] != EMPTY  # not in this full bucket: the next one on its path
            on &= rest
            b = b + step * on
            b[b >= self.buckets] -= self.buckets
            idx, k, b, step = idx[rest], k[rest], b[rest], step[rest]
        return pos, fresh

    def _upsert_dense(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """upsert_distinct for a batch with several keys per bucket: new keys take the free
        slots in turn (sorted by bucket), not in races."""
        pos = self.find(ks)
        fresh = pos < 0
        if np.count_nonzero(fresh):
            if self.deleted:
                pos[fresh] = self._place(ks[fresh])
            else:  # every free slot is empty (and zeroed): fill counts will do
                pos[fresh] = self._rehash(ks[fresh])
            self.live += int(np.count_nonzero(fresh))
        return pos, fresh

    def _upsert_unique(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """upsert for keys with repeats or reserved keys among them."""
        uniq, inverse = np.unique(ks, return_inverse=True)
        pos = np.full(len(uniq), -1, np.int64)
        fresh = np.zeros(len(uniq), bool)
        ok = np.flatnonzero(uniq > DELETED)
        if len(ok):
            pos[ok], fresh[ok] = self.upsert_distinct(uniq[ok])
        return pos[inverse], fresh[inverse], False

    def _room_for(self, n: int) -> None:
        if self.live + self.deleted + n > MAX_LOAD * self.buckets * WAYS:
            self._resize(self.live + n)

    def _place(self, ks: np.ndarray) -> np.ndarray:
        """Put distinct absent keys into the first free slots on their search paths; their
        positions. Keys bound for one bucket take its free slots in turn."""
        b, step = self._home(ks)
        pos = np.empty(len(ks), np.int64)
        idx = np.arange(len(ks))
        while len(idx):
            order = np.argsort(b, kind="stable")
            bs = b[order]
            n = np.arange(len(bs))
            first = np.ones(len(bs), bool)
            first[1:] = bs[1:] != bs[:-1]
            rank = n - np.maximum.accumulate(np.where(first, n, 0))  # among keys for its bucket
            free = self._rows[bs] <= DELETED
            fits = rank < free.sum(1)
            nth = (np.cumsum(free, 1) == rank[:, None] + 1) & free
            s = bs[fits] * WAYS + nth[fits].argmax(1)
            if self.deleted:
                self.deleted -= int(np.count_nonzero(self.keys[s] == DELETED))
            put = idx[order[fits]]
            self.keys[s] = ks[put]
            self.vals[s] = 0
            self.stamps[s] = 0
            pos[put] = s
            rest = order[~fits]  # the bucket is full: the next one on the key's path
            idx, step = idx[rest], step[rest]
            b = (bs[~fits] + step) % self.buckets
        return pos

    def _rehash(self, ks: np.ndarray, fill: np.ndarray | None = None) -> np.ndarray:
        """_place where no slot is deleted. `fill`, for a table being rebuilt, holds each
        bucket's keys so far (so its next free slot): the buckets' slots are not looked at;
        without it, the rows of the buckets a round touches are counted (not the whole
        table's: a batch of new keys costs what it touches)."""
        n = len(ks)
        pos = np.empty(n, np.int64)
        b, k, idx, step = self._bucket(ks), ks, None, None
        while n:
            order = np.argsort(b, kind="stable")
            bs = b[order]
            first = np.empty(n, bool)
            first[0] = True
            np.not_equal(bs[1:], bs[:-1], out=first[1:])
            starts = np.flatnonzero(first)
            counts = np.diff(np.append(starts, n))
            g = bs[starts]
            used = fill[g] if fill is not None else np.count_nonzero(self._rows[g] != EMPTY, 1)
            at = np.repeat(used - starts, counts) + np.arange(n)  # the slot in its bucket
            fits = at < WAYS
            put = order[fits]
            s = bs[fits] * WAYS + at[fits]
            self.keys[s] = k[put]
            pos[put if idx is None else idx[put]] = s
            if fill is not None:
                fill[g] = np.minimum(fill[g] + counts, WAYS)
            rest = order[~fits]  # the bucket is full: the next one on the key's path
            n = len(rest)
            if step is None:
                step, idx = self._step(ks), np.arange(len(ks))
            idx, k, step = idx[rest], k[rest], step[rest]
            b = bs[~fits] + step
            b[b >= self.buckets] -= self.buckets
        return pos

    # --- key by key, for small batches (a numpy call costs as much as ~20 of these steps)

    def _path(self, k: int):
        """The first slots of the buckets along k's search path (the path _home gives)."""
        mix = self._mix_int
        m = k * mix & _M64
        m = (m ^ m >> 32) * mix & _M64
        nb = self.buckets
        b = (m >> 32) * nb >> 32
        yield b * WAYS
        step = ((m & 0xFFFFFFFF) * (nb - 1) >> 32) + 1
        for _ in range(nb - 1):
            b += step
            if b >= nb:
                b -= nb
            yield b * WAYS

    def find_small(self, keys) -> list[int]:
        """find, key by key: each key's position or -1."""
        out, km = [], self._km
        for k in keys:
            j = -1
            if k > DELETED and self.live:
                for base in self._path(k):
                    row = km[base : base + WAYS].tolist()
                    if k in row:
                        j = base + row.index(k)
                        break
                    if row[-1] == EMPTY:  # empty slots are a bucket's last: the search ends
                        break
            out.append(j)
        return out

    def upsert_small(self, keys) -> tuple[list[int], list[bool]]:
        """upsert, key by key: (positions, whether each slot is new); repeats allowed."""
        self._room_for(len(keys))
        return self._upsert_keys(keys)

    def _upsert_keys(self, keys) -> tuple[list[int], list[bool]]:
        """upsert_small once there is room."""
        out, fresh, km = [], [], self._km
        mix, nb = self._mix_int, self.buckets
        for k in keys:
            if k <= DELETED:
                out.append(-1)
                fresh.append(False)
                continue
            m = k * mix & _M64
            m = (m ^ m >> 32) * mix & _M64
            b = (m >> 32) * nb >> 32
            step, free = 0, -1
            while True:  # the path _path walks, inline: this is the batches' tail
                base = b * WAYS
                row = km[base : base + WAYS].tolist()
                if k in row:
                    out.append(base + row.index(k))
                    fresh.append(False)
                    break
                if free < 0 and self.deleted and DELETED in row:
                    free = base + row.index(DELETED)
                if row[-1] == EMPTY:
                    if free < 0:
                        free = base + row.index(EMPTY)
                    else:
                        self.deleted -= 1
                    km[free] = k
                    self._vm[free] = self._sm[free] = 0
                    self.live += 1
                    out.append(free)
                    fresh.append(True)
                    break
                if not step:
                    step = ((m & 0xFFFFFFFF) * (nb - 1) >> 32) + 1
                b += step
                if b >= nb:
                    b -= nb
        return out, fresh

    def get_vals(self, pos: list[int]) -> list[int]:
        if len(pos) <= SMALL:
            vm = self._vm
            return [vm[j] for j in pos]
        return self.vals[pos].tolist()

    def set_vals(self, pos: list[int], vals: list[int]) -> None:
        if len(pos) <= SMALL:
            vm = self._vm
            for j, v in zip(pos, vals, strict=True):
                vm[j] = v
        else:
            self.vals[pos] = vals

    def set_stamps(self, pos: list[int], first: int) -> None:
        """Stamps first, first + 1, ... in order of pos (a repeated position keeps its last)."""
        if len(pos) <= SMALL:
            sm = self._sm
            for i, j in enumerate(pos):
                sm[j] = first + i
        else:
            self.stamps[pos] = np.arange(first, first + len(pos), dtype=np.uint32)

    def delete(self, pos) -> None:
        """Free the slots at `pos` (distinct live positions). May shrink the table: positions
        are stale after it."""
        if not len(pos):
            return
        if len(pos) <= SMALL:
            km = self._km
            for j in pos:
                km[j] = DELETED
        else:
            self.keys[np.asarray(pos, np.int64)] = DELETED
        self.live -= len(pos)
        self.deleted += len(pos)
        if self.buckets > MIN_BUCKETS and self.live < 0.25 * GROW_LOAD * self.buckets * WAYS:
            self._resize(self.live)

    def live_positions(self) -> np.ndarray:
        return np.flatnonzero(self.keys > DELETED)

    def _resize(self, live: int) -> None:
        old_keys, old_vals, old_stamps = self.keys, self.vals, self.stamps
        self._alloc(_prime_at_least(max(MIN_BUCKETS, math.ceil(live / (GROW_LOAD * WAYS)))))
        self.deleted = 0
        fill = np.zeros(self.buckets, np.uint8)
        # Chunk by chunk: whole-table temporaries would be malloc'd, and glibc keeps freed
        # heap memory resident (its trim threshold grows with the largest block freed).
        for i in range(0, len(old_keys), RESIZE_CHUNK):
            ks = old_keys[i : i + RESIZE_CHUNK]
            keep = np.flatnonzero(ks > DELETED)
            ks = ks[keep]
            pos = self._rehash(ks, fill)
            self.vals[pos] = old_vals[i : i + RESIZE_CHUNK][keep]
            self.stamps[pos] = old_stamps[i : i + RESIZE_CHUNK][keep]
