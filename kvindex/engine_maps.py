"""One pod's engine block hash → request keys map, for kvindex.translate, in two layouts.

vLLM names blocks by its own hashes; the index is keyed by ours (kvindex.keys). Per pod the
translator maps each engine hash (with its KV-cache group) to the request keys of the index
blocks it stored, oldest first, at most MAX_KEYS_PER_HASH (the newest): vLLM maps one hash to
one content, so only a hostile publisher or a mid-stream join gives a hash several keys, and
an engine block longer than the index block gives it one key per index block inside it.

- `DictEngineMap`: dicts of Python ints, sharded by low bits so no one dict grows huge (its
  resize copies it all at once). The dict index's companion: fast, ~115 bytes an entry.
- `PackedEngineMap`: a kvindex.packed.KeyTable keyed by the engine hash, the request key in
  the slot's two 32-bit words (value: low half, stamp: high half), 16 bytes a slot, 19-26 an
  entry. Hashes the table cannot hold as one key — several keys, or a hash that folds onto the
  table's two reserved keys — live in a dict beside it, so answers stay exact.

Both answer alike (tests/kvindex/test_engine_maps.py runs them side by side).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import numpy as np

from infergw.kvindex.index import approx_bytes, walk_bytes
from infergw.kvindex.packed import DELETED, SMALL, KeyTable, as_keys

# One engine block covers engine block size / index block size keys (16 for 256 / 16).
MAX_KEYS_PER_HASH = 64
SWEEP_SLOTS = 4096  # packed slots checked per sweep step (short pauses)

_M64 = (1 << 64) - 1
_LO = np.uint64(0xFFFFFFFF)
_HI = np.uint64(32)

Holds = Callable[[Sequence[int]], bool]  # whether the pod still holds any of these keys


def _slots(rs) -> tuple[int, ...]:
    return (rs,) if rs.__class__ is int else rs


def appended(old, k: int):
    """old's keys with k last (bounded), or None if k is among them already."""
    rs = _slots(old)
    if k in rs:
        return None
    return (*rs[1 - MAX_KEYS_PER_HASH :], k)


class EngineMap(Protocol):
    def resolve(self, hashes: Sequence[int], group: int) -> list[tuple[int, ...] | None]:
        """Each hash's keys (oldest first), None for a hash not mapped."""
        ...

    def last(self, h: int, group: int) -> int | None:
        """The newest key of one hash (a store's parent), None if not mapped."""
        ...

    def put(self, hashes: Sequence[int], keys: Sequence[int], group: int) -> None:
        """Map hashes[i] to keys[i] too (appended, bounded); equal lengths."""
        ...

    def forget(self, hashes: Iterable[int], group: int, gone: set[int]) -> None:
        """Drop each hash all of whose keys are in `gone` (the pod holds none of them)."""
        ...

    def keys(self) -> Iterable[int]:
        """Every key mapped (those the pod may hold)."""
        ...

    def __len__(self) -> int: ...

    def sweep(self, holds: Holds, cursor: int) -> int | None:
        """Drop a part of the hashes none of whose keys the pod holds, from `cursor` (0 at the
        start); the next cursor, None when done."""
        ...

    def approx_bytes(self) -> int: ...
    def memory_bytes(self, seen: set[int]) -> int: ...


class DictEngineMap:
    def __init__(self, shards: int) -> None:
        self._mask = shards - 1
        self._maps: list[dict[int, int | tuple[int, ...]]] = [{} for _ in range(shards)]

    def resolve(self, hashes: Sequence[int], group: int) -> list[tuple[int, ...] | None]:
        maps, m, g, out = self._maps, self._mask, group << 64, []
        for h in hashes:
            rs = maps[h & m].get(h | g)
            out.append(None if rs is None else _slots(rs))
        return out

    def last(self, h: int, group: int) -> int | None:
        rs = self._maps[h & self._mask].get(h | group << 64)
        return None if rs is None else _slots(rs)[-1]

    def put(self, hashes: Sequence[int], keys: Sequence[int], group: int) -> None:
        maps, m, g = self._maps, self._mask, group << 64
        for h, k in zip(hashes, keys, strict=True):
            d = maps[h & m]
            e = h | g
            old = d.setdefault(e, k)
            if old is not k and old != k:
                rs = appended(old, k)
                if rs is not None:
                    d[e] = rs

    def forget(self, hashes: Iterable[int], group: int, gone: set[int]) -> None:
        maps, m, g = self._maps, self._mask, group << 64
        for h in hashes:
            d = maps[h & m]
            rs = d.get(h | g)
            if rs is not None and all(k in gone for k in _slots(rs)):
                del d[h | g]

    def keys(self) -> Iterable[int]:
        return (k for d in self._maps for rs in d.values() for k in _slots(rs))

    def __len__(self) -> int:
        return sum(map(len, self._maps))

    def sweep(self, holds: Holds, cursor: int) -> int | None:
        # A new dict, because a dict does not shrink when emptied.
        self._maps[cursor] = {e: rs for e, rs in self._maps[cursor].items() if holds(_slots(rs))}
        return cursor + 1 if cursor < self._mask else None

    def approx_bytes(self) -> int:
        return approx_bytes(self._maps)

    def memory_bytes(self, seen: set[int]) -> int:
        return walk_bytes(self._maps, seen)


# splitmix64's multipliers: odd, well mixed.
_MIX_A, _MIX_B = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


class PackedEngineMap:
    def __init__(self) -> None:
        self._t = KeyTable()
        # Table key of (hash, group): the hash XOR a secret (the table's keys 0 and 1 are
        # reserved; whoever picks the hashes cannot aim at them), the group folded in.
        self._salt = secrets.randbits(64)
        self._fold = secrets.randbits(64) | 1
        self._spill: dict[int, int | tuple[int, ...]] = {}  # (hash | group << 64) -> keys

    def _mix(self, group: int) -> int:
        # A keyed xorshift-multiply of the group, not a plain product: with (group * fold) the
        # groups 1 and 2**64-1 differed by fold ^ -fold = ~1 whatever the secret, so hash 1 of
        # one and hash 2**64-1 of the other shared a table key.
        m = (group ^ self._fold) * _MIX_A & _M64
        m = (m ^ m >> 29) * _MIX_B & _M64
        return self._salt ^ m ^ m >> 32

    def _find(self, hashes: Sequence[int], group: int) -> tuple[np.ndarray, list[int]]:
        """(table keys as uint64, each one's slot or -1)."""
        ks = np.array(hashes, np.uint64) ^ np.uint64(self._mix(group))
        t = self._t
        pos = t.find_small(ks.tolist()) if len(ks) <= SMALL else t.find(ks).tolist()
        return ks, pos

    def _values(self, pos: list[int]) -> list[int]:
        t = self._t
        at = np.array(pos, np.int64)
        return (t.vals[at].astype(np.uint64) | t.stamps[at].astype(np.uint64) << _HI).tolist()

    def resolve(self, hashes: Sequence[int], group: int) -> list[tuple[int, ...] | None]:
        _, pos = self._find(hashes, group)
        hit = [j for j in pos if j >= 0]
        vals = iter(self._values(hit)) if hit else iter(())
        out: list[tuple[int, ...] | None] = [(next(vals),) if j >= 0 else None for j in pos]
        if self._spill:
            g, spill = group << 64, self._spill
            for i, h in enumerate(hashes):
                if out[i] is None and (rs := spill.get(h | g)) is not None:
                    out[i] = _slots(rs)
        return out

    def last(self, h: int, group: int) -> int | None:
        rs = self.resolve((h,), group)[0]
        return None if rs is None else rs[-1]

    def put(self, hashes: Sequence[int], keys: Sequence[int], group: int) -> None:
        if not hashes:
            return
        g, spill = group << 64, self._spill
        if len(set(hashes)) != len(hashes) or (spill and any((h | g) in spill for h in hashes)):
            for h, k in zip(hashes, keys, strict=True):  # rare: one by one
                self._put_one(h, k, group)
            return
        t = self._t
        ks = as_keys(hashes) ^ np.uint64(self._mix(group))
        if len(ks) <= SMALL:
            pos, fresh = t.upsert_small(ks.tolist())
            new = [i for i, f in enumerate(fresh) if f]
        else:  # distinct: only a reserved table key (2 in 2**64) needs upsert's checks
            if ks.min() > DELETED:
                p, f = t.upsert_distinct(ks, zero=False)  # new slots are written below
            else:
                p, f, _ = t.upsert(ks)
            if np.count_nonzero(f) == len(f):  # the usual batch: every hash new
                vs = as_keys(keys)
                t.vals[p] = vs & _LO
                t.stamps[p] = vs >> _HI
                return
            pos, new = p.tolist(), np.flatnonzero(f).tolist()
        if new:
            at = np.array([pos[i] for i in new], np.int64)
            vs = np.array([keys[i] for i in new], np.uint64)
            t.vals[at] = vs & _LO
            t.stamps[at] = vs >> _HI
        if len(new) < len(hashes):  # mapped already, or a reserved table key
            fresh_set = set(new)
            for i, h in enumerate(hashes):
                if i not in fresh_set:
                    self._put_one(h, keys[i], group)

    def _put_one(self, h: int, k: int, group: int) -> None:
        e, spill = h | group << 64, self._spill
        old = spill.get(e)
        if old is not None:
            rs = appended(old, k)
            if rs is not None:
                spill[e] = rs
            return
        _, (j,) = self._find((h,), group)
        if j < 0:
            tk = (h ^ self._mix(group)) & _M64
            if tk <= DELETED:
                spill[e] = k  # the table cannot hold this key
                return
            (j,), _ = self._t.upsert_small([tk])
            self._t.vals[j], self._t.stamps[j] = k & 0xFFFFFFFF, k >> 32
            return
        (v,) = self._values([j])
        if v != k:  # a second key: the hash moves to the spill dict
            spill[e] = (v, k)
            self._t.delete([j])

    def forget(self, hashes: Iterable[int], group: int, gone: set[int]) -> None:
        hashes = list(hashes)
        if not hashes:
            return
        _, pos = self._find(hashes, group)
        hit = sorted({j for j in pos if j >= 0})
        if hit:
            drop = [j for j, v in zip(hit, self._values(hit), strict=True) if v in gone]
            self._t.delete(drop)
        if self._spill:
            g, spill = group << 64, self._spill
            for h in hashes:
                rs = spill.get(h | g)
                if rs is not None and all(k in gone for k in _slots(rs)):
                    del spill[h | g]

    def keys(self) -> Iterable[int]:
        live = self._t.live_positions()
        yield from self._values(live.tolist()) if len(live) else ()
        for rs in self._spill.values():
            yield from _slots(rs)

    def __len__(self) -> int:
        return self._t.live + len(self._spill)

    def sweep(self, holds: Holds, cursor: int) -> int | None:
        t = self._t
        end = min(cursor + SWEEP_SLOTS, len(t.keys))
        live = (np.flatnonzero(t.keys[cursor:end] > DELETED) + cursor).tolist()
        if live:
            drop = [j for j, v in zip(live, self._values(live), strict=True) if not holds((v,))]
            buckets = t.buckets
            t.delete(drop)
            if t.buckets != buckets:  # it shrank (to a quarter at most): positions moved
                return 0
        if end < len(t.keys):
            return end
        self._spill = {e: rs for e, rs in self._spill.items() if holds(_slots(rs))}
        return None

    def approx_bytes(self) -> int:
        return self._t.nbytes + approx_bytes([self._spill])

    def memory_bytes(self, seen: set[int]) -> int:
        return self._t.nbytes + walk_bytes([self._spill], seen)


LAYOUTS: dict[str, Callable[[int], EngineMap]] = {
    "dict": DictEngineMap,
    "packed": lambda shards: PackedEngineMap(),
}
