"""The global KV-cache block index: which pod holds how many leading blocks of a prompt.

Keyed by request keys (kvindex.keys), which the picker computes from a prompt's tokens; vLLM's
block hashes it cannot compute. The index takes keys only: kvindex.translate turns vLLM's KV
events into add / remove / clear_pod calls (it keeps the engine-hash → request-keys maps).

The packed layout (`--kv-index-layout packed`; kvindex.dict_index keeps the same index in dicts):
- Every key has a slot in a numpy key table (kvindex.packed) whose 32-bit value packs the
  record of a key one pod holds: pod index, GPU and CPU copies, a speculative bit. A key held by
  several pods (or by a pod numbered past 32,767, or with more copies than the value holds)
  keeps its exact record in `_wide`, in slot form (`pod << 41 | SPEC | cpu << 20 | gpu`,
  counts saturating at 2**20 - 1; slot ints interned, the interning table bounded).
- Batches go through numpy in a few calls each: an add, removal, speculative batch or expiry
  whose keys are new or held by that pod alone is one probe and a few array steps; anything
  else (shared keys, repeats, huge counts) takes the general path, key by key.
- A lookup walks a shared prefix (a system prompt many pods hold) in `_wide`, in dict
  look-ups, and probes the table only from the first key not there: its first key alone, then
  chunks that double, so a prompt nobody holds costs one look.
- LRU by a 32-bit stamp per slot (one tick per key used); eviction takes the oldest stamps.
  Uses of keys whose slots a lookup did not probe (those found in `_wide`) are stamped later,
  in one probe, before anything reads the stamps.
- Per pod: request key → expiry of a speculative entry, with a FIFO of expiries.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, compress, islice
from typing import Literal

import numpy as np

from infergw.kvindex.packed import DELETED, SMALL, KeyTable, as_keys

Tier = Literal["gpu", "cpu"]

_GPU, _CPU, _SPEC = 1, 1 << 20, 1 << 40
_POD = 41  # slot >> _POD is the pod index
_COUNT = (1 << 20) - 1
_GPU_MASK, _CPU_MASK = _COUNT, _COUNT << 20
_HELD = _GPU_MASK | _CPU_MASK  # held for real, in some tier
_ON_GPU = _GPU_MASK | _SPEC  # held on GPU, for real or speculatively
_FIELDS = (1 << _POD) - 1
_TIERS: dict[str, int] = {"gpu": _GPU, "cpu": _CPU}
MAX_INTERNED_SLOTS = 1 << 16  # distinct slot values interned at once
DEFAULT_TIER_WEIGHTS = {"gpu": 1.0, "cpu": 0.8}


def _slots(rec) -> tuple[int, ...]:
    return (rec,) if rec.__class__ is int else rec


def _fields(rec, p: int) -> int:
    """Pod p's fields in a key's record (0 if it holds nothing there)."""
    if rec is None:
        return 0
    if rec.__class__ is int:
        return rec & _FIELDS if rec >> _POD == p else 0
    for s in rec:
        if s >> _POD == p:
            return s & _FIELDS
    return 0


def _weight(f: int, weights) -> float:
    # weights: (none, gpu only, cpu only, both); a key scores its best tier.
    return weights[(f & _ON_GPU != 0) | (f & _CPU_MASK != 0) << 1]


# A key's record in the table's 32-bit value: one pod's slot packed small, or _WIDE (the
# record, in slot form, is in _wide: several pods, a pod index or a copy count too big).
_WIDE = 1 << 31
_V_POD, _V_SPEC, _V_CPU, _V_GPU = 16, 1 << 15, 0x7F00, 0xFF
_V_MAX_POD = 0x7FFF
_V_ON_GPU = _V_GPU | _V_SPEC
_V_TIER_MASK = {None: 0xFFFF, "gpu": _V_GPU | _V_SPEC, "cpu": _V_CPU}
_V_TIERS = {_GPU: (0, 0xFF), _CPU: (8, 0x7F)}  # tier → (shift, largest count) in a value
_V_FIELDS = 0xFFFF  # a packed value's fields (pod above them)
_V_HELD = _V_GPU | _V_CPU
_STAMP_LIMIT = (1 << 32) - 1
_U64 = np.uint64
BATCH = 8  # batches of more keys than this go through numpy (below, key by key)
PENDING_TOUCHES = 1 << 15  # keys whose LRU use is recorded before their slots are stamped

# A packed value's low 16 bits → which tiers it holds: 0 none, 1 GPU (or speculative),
# 2 CPU, 3 both: the weights' index (64 KiB, so a walk weighs a run of values in one step).
_V_CLASS = np.arange(1 << 16, dtype=np.uint32)
_V_CLASS = (((_V_CLASS & _V_ON_GPU) != 0) | ((_V_CLASS & _V_CPU) != 0) << 1).astype(np.uint8)


def _unpack(v: int) -> int:
    """A packed value → its slot."""
    return (v >> _V_POD) << _POD | (v & _V_SPEC) << 25 | (v >> 8 & 0x7F) << 20 | (v & _V_GPU)


def _pack(s: int) -> int:
    """A slot → its packed value, or 0 if it does not fit."""
    gpu, cpu, p = s & _COUNT, s >> 20 & _COUNT, s >> _POD
    if p > _V_MAX_POD or gpu > 0xFF or cpu > 0x7F:
        return 0
    return p << _V_POD | (s >> 25 & _V_SPEC) | cpu << 8 | gpu


def _array(keys) -> np.ndarray:
    return as_keys(keys)


def _distinct_plain(keys: Sequence[int]) -> bool:
    """No key twice and none reserved (what the batch paths assume)."""
    return min(keys) > DELETED and len(set(keys)) == len(keys)


def _first_false(mask: np.ndarray) -> int:
    """The index of mask's first False (len(mask) if none)."""
    i = mask.tobytes().find(0)  # one pass in C, without numpy's reduction overhead
    return len(mask) if i < 0 else i


def _run(recs: list, i: int, q: int, weights, score):
    """Extend pod q's match from recs[i]; returns (score, keys matched)."""
    memo = {}  # record -> weight: slots are interned, so few distinct ones recur
    for rec in islice(recs, i, None):
        w = memo.get(rec)
        if w is None:
            f = _fields(rec, q)
            if not f:
                break
            w = _weight(f, weights)
            if rec.__class__ is int:
                memo[rec] = w
        score += w
        i += 1
    return score, i


class KVBlockIndex:
    def __init__(
        self,
        block_size: int = 16,
        max_entries: int = 5_000_000,
        speculative_ttl: float = 2.0,
        clock=time.monotonic,
        *,
        shards: int | None = None,
    ) -> None:
        if block_size < 1 or max_entries < 1:
            raise ValueError("block_size and max_entries must be >= 1")
        n_shards = shards or 1 << min(6, (max_entries >> 16).bit_length())
        if n_shards & (n_shards - 1) or n_shards > max_entries:
            raise ValueError("shards must be a power of two, at most max_entries")
        self.block_size = block_size
        self.max_entries = max_entries
        self.speculative_ttl = speculative_ttl
        self._clock = clock
        self._shards = n_shards
        # Evict down to a little below the bound, so the O(keys) pass is paid once per batch.
        slack = max_entries >> 8 if max_entries < 1 << 16 else max_entries >> 5
        self._evict_to = max_entries - slack
        self._table = KeyTable()
        self._wide: dict[int, int | tuple[int, ...]] = {}  # key → record, for _WIDE values
        self._stamp = 0  # the LRU clock: one tick per key used
        # Uses of keys whose slots a lookup did not probe (keys several pods hold: their
        # records are in _wide), as (keys, stamp of the last): stamped in one probe later.
        self._pending: list[tuple[Sequence[int], int]] = []
        self._pending_n = 0
        self._n = 0  # (key, pod) entries
        self._pod_idx: dict[str, int] = {}
        self._names: list[str] = []
        self._pod_n: list[int] = []  # per pod: entries,
        self._specs: list[dict[int, float]] = []  # speculative key -> expiry
        self._spec_q: deque[tuple[float, int, tuple[int, ...]]] = deque()
        self._evicted_from: dict[int, int] = {}  # pod -> entries evicted since take_evictions
        self._canon: dict[int, int] = {}
        self._evicted = 0

    # --- records

    def _pod(self, pod: str) -> int:
        p = self._pod_idx.get(pod)
        if p is None:
            p = self._pod_idx[pod] = len(self._names)
            self._names.append(pod)
            self._pod_n.append(0)
            self._specs.append({})
        return p

    def _rec(self, k: int, v: int):
        if not v:
            return None
        return self._wide[k] if v & _WIDE else _unpack(v)

    def _find(self, keys: Sequence[int]) -> list[int]:
        t = self._table
        return t.find_small(keys) if len(keys) <= SMALL else t.find(_array(keys)).tolist()

    def _upsert(self, keys: Sequence[int]) -> list[int]:
        t = self._table
        return t.upsert_small(keys)[0] if len(keys) <= SMALL else t.upsert(_array(keys))[0].tolist()

    def _records(self, keys: Sequence[int], pos: list[int]) -> list:
        vals = self._table.get_vals(pos)
        rec = self._rec
        return [rec(k, v) if j >= 0 else None for k, j, v in zip(keys, pos, vals, strict=True)]

    def _touch(self, pos) -> None:
        """Mark the keys at `pos` (a list or an array) used, pos[0] last (the newest)."""
        pos = pos[pos >= 0] if isinstance(pos, np.ndarray) else [j for j in pos if j >= 0]
        n = len(pos)
        if self._stamp + n >= _STAMP_LIMIT:
            self._restamp()
        # Stamped in reverse so that, for a key listed twice, its first place wins.
        self._table.set_stamps(pos[::-1], self._stamp + 1)
        self._stamp += n

    def _stamp_batch(self, pos: np.ndarray) -> None:
        """_touch for live positions (an array), pos[0] the newest."""
        n = len(pos)
        if self._stamp + n >= _STAMP_LIMIT:
            self._restamp()
        # Written in reverse so that, for a key listed twice, its first place wins.
        first = self._stamp + 1
        self._table.stamps[pos[::-1]] = np.arange(first, first + n, dtype=np.uint32)
        self._stamp += n

    def _touch_later(self, keys: Sequence[int]) -> None:
        """Mark keys used, keys[0] last (the newest), without probing for their slots now:
        stamps are taken now and written by _flush_touches, before anything reads them."""
        n = len(keys)
        if not n:
            return
        if self._stamp + n >= _STAMP_LIMIT:
            self._restamp()
        self._pending.append((keys, self._stamp + 1))
        self._stamp += n
        self._pending_n += n
        if self._pending_n > PENDING_TOUCHES:
            self._flush_touches()

    def _flush_touches(self) -> None:
        """Write the pending uses' stamps. A slot keeps the newest stamp it was given: the
        clock only goes up, so that is the stamp the last use would have written (a key
        gone meanwhile is not found; one added back since was stamped newer by its add)."""
        if not self._pending:
            return
        pending, self._pending, self._pending_n = self._pending, [], 0
        t = self._table
        pos = t.find(_array(list(chain.from_iterable(k for k, _ in pending))))
        stamps = np.concatenate(
            [np.arange(s + len(k) - 1, s - 1, -1, dtype=np.uint32) for k, s in pending]
        )
        found = pos >= 0
        np.maximum.at(t.stamps, pos[found], stamps[found])

    def _restamp(self) -> None:
        """The clock nears 2**32: renumber the live keys' stamps by rank (once in 4G uses)."""
        self._flush_touches()
        t = self._table
        live = t.live_positions()
        t.stamps[live[np.argsort(t.stamps[live], kind="stable")]] = np.arange(1, len(live) + 1)
        self._stamp = len(live)

    def _edit(self, keys: Sequence[int], pos: list[int], p: int, change) -> None:
        """Give pod p's slot of each key (in order) the fields change(k, f) returns (0 removes
        it); one read of the table and one write back. A key the table cannot hold (pos -1)
        is seen as holding nothing, and what change returns for it is dropped."""
        t, cur, at = self._table, {}, {}
        vals = t.get_vals(pos)
        canon, delta = self._canon, 0
        for k, j, v in zip(keys, pos, vals, strict=True):
            if j < 0:
                change(k, 0)
                continue
            rec = cur[j] if j in cur else self._rec(k, v)
            old = () if rec is None else _slots(rec)
            f = 0
            for s in old:
                if s >> _POD == p:
                    f = s & _FIELDS
            nf = change(k, f)
            if nf == f and rec is not None:
                continue
            rest = tuple(s for s in old if s >> _POD != p)
            delta += (nf != 0) - (len(rest) != len(old))
            if nf:
                if len(canon) >= MAX_INTERNED_SLOTS:
                    canon.clear()
                s = p << _POD | nf
                rest += (canon.setdefault(s, s),)
            cur[j], at[j] = (rest[0] if len(rest) == 1 else rest) if rest else None, k
        self._n += delta
        self._pod_n[p] += delta
        gone, put, vs = [], [], []
        for j, rec in cur.items():
            k = at[j]
            v = 0 if rec is None else _pack(rec) if rec.__class__ is int else 0
            if v or rec is None:
                self._wide.pop(k, None)
            else:
                v, self._wide[k] = _WIDE, rec
            (put if v else gone).append(j)
            if v:
                vs.append(v)
        t.set_vals(put, vs)
        t.delete(gone)

    def _evict(self) -> None:
        need = self._n - self._evict_to
        if self._n <= self.max_entries or need <= 0:
            return
        self._flush_touches()
        t = self._table
        live = t.live_positions()
        stamps = t.stamps[live]
        if need < len(live):
            live = live[np.argpartition(stamps, need - 1)[:need]]
            stamps = t.stamps[live]
        cand = live[np.argsort(stamps, kind="stable")]  # least recently used first
        vals, keys = t.vals[cand], t.keys[cand]
        wide = np.flatnonzero(vals & _WIDE)
        entries = np.ones(len(cand), np.int64)
        for i, k in zip(wide.tolist(), keys[wide].tolist(), strict=True):
            entries[i] = len(_slots(self._wide[k]))
        m = int(np.searchsorted(np.cumsum(entries), need)) + 1  # the fewest keys that will do
        evicted: Counter[int] = Counter()
        inline = vals[:m][(vals[:m] & _WIDE) == 0] >> _V_POD
        for q, n in enumerate(np.bincount(inline).tolist()):
            if n:
                evicted[q] += n
        for k in keys[wide[wide < m]].tolist():
            evicted.update(s >> _POD for s in _slots(self._wide.pop(k)))
        for q, n in evicted.items():
            self._pod_n[q] -= n
            self._evicted_from[q] = self._evicted_from.get(q, 0) + n
        n = sum(evicted.values())
        self._n -= n
        self._evicted += n
        t.delete(cand[:m])

    # --- keys in, keys out

    @property
    def shard_count(self) -> int:
        """How many maps a user of the index spreads its own per-key maps over (by low bits)."""
        return self._shards

    def add(self, pod: str, keys: Sequence[int], tier: Tier, copies: int = 1) -> None:
        """`pod` stored `copies` more copies of each key in `tier`. Keys go in tail first, so the
        head ends up newest: eviction trims chains from the tail."""
        p, t = self._pod(pod), _TIERS[tier]
        if copies < 1 or not keys:
            return
        pos = None
        if len(keys) > BATCH and p <= _V_MAX_POD and _distinct_plain(keys):
            pos = self._add_batch(p, t, copies, keys)
            if pos is None:
                self._evict()
                return
            pos = pos.tolist()
        elif len(keys) > SMALL:
            pos = self._table.upsert(_array(keys))[0].tolist()
        else:
            pos = self._table.upsert_small(keys)[0]
        spec = self._specs[p]

        def change(k: int, f: int) -> int:
            if t == _GPU and f & _SPEC:  # a speculative entry confirmed: it becomes real
                f -= _SPEC
                spec.pop(k, None)
            held = f // t & _COUNT
            return f + (min(_COUNT, held + copies) - held) * t  # saturate, never carry

        self._edit(keys[::-1], pos[::-1], p, change)
        self._touch(pos)
        self._evict()

    def _add_batch(self, p: int, t: int, copies: int, keys: Sequence[int]):
        """add's common case in one probe and a few array steps: every key new or held by
        pod p alone, the counts still fitting a packed value (keys distinct, none reserved,
        p packable). Done: None (keys stamped too). Not that case: the keys' positions, all
        in the table, for the general path."""
        tab = self._table
        shift, top = _V_TIERS[t]
        pos, fresh = tab.upsert_distinct(_array(keys), zero=False)
        n = len(pos)
        if copies <= top and np.count_nonzero(fresh) == n:  # the usual case: new blocks
            tab.vals[pos] = p << _V_POD | copies << shift
        else:
            v = tab.vals[pos]
            v[fresh] = 0
            count = (v >> shift & top) + copies
            others = np.count_nonzero((v >> _V_POD == p) | fresh) < len(v)  # or _WIDE values
            if copies > top or others or np.count_nonzero(count > top):
                tab.vals[pos[fresh]] = 0
                tab.stamps[pos[fresh]] = 0
                return pos
            if t == _GPU and np.count_nonzero(v & _V_SPEC):  # speculative ones confirmed
                spec = self._specs[p]
                for k in compress(keys, ((v & _V_SPEC) != 0).tolist()):
                    spec.pop(k, None)
                v &= ~np.uint32(_V_SPEC)
            tab.vals[pos] = v & ~np.uint32(top << shift) | count << shift | p << _V_POD
            n = int(np.count_nonzero(fresh))
        self._n += n
        self._pod_n[p] += n
        self._stamp_batch(pos)
        return None

    def _write_packed(self, p: int, pos: np.ndarray, v: np.ndarray, nv: np.ndarray) -> None:
        """Pod p's keys at `pos`, each held by p alone in a packed value v, now hold nv: the
        changed ones are written, those left with no fields lose their slot."""
        changed = nv != v
        if not np.count_nonzero(changed):
            return
        pos, nv = pos[changed], nv[changed]
        empty = (nv & _V_FIELDS) == 0
        keep = ~empty
        tab = self._table
        tab.vals[pos[keep]] = nv[keep]
        if np.count_nonzero(empty):
            n = int(np.count_nonzero(empty))
            self._n -= n
            self._pod_n[p] -= n
            tab.delete(pos[empty])

    def _mine_packed(self, p: int, keys: Sequence[int]):
        """For a batch path over pod p's keys (distinct, any): (positions, values, whether p
        alone holds each in a packed value), or None if some key is held by several pods
        (its record is in _wide) or p is not packable."""
        if p > _V_MAX_POD or len(set(keys)) != len(keys):
            return None
        tab = self._table
        pos = tab.find(_array(keys))
        v = tab.vals[pos]
        v[pos < 0] = 0
        if np.count_nonzero(v >= _WIDE):
            return None
        return pos, v, (v >> _V_POD == p) & (v != 0)

    def remove(self, pod: str, keys: Sequence[int], tier: Tier) -> list[int]:
        """`pod` dropped one copy of each key from `tier`; returns the keys it no longer holds
        in any tier (speculative entries do not count as held)."""
        p = self._pod_idx.get(pod)
        if p is None or not keys:
            return list(keys)
        mask, t, gone = _COUNT * _TIERS[tier], _TIERS[tier], []
        if len(keys) > BATCH:
            found = self._mine_packed(p, keys)
            if found is not None:
                pos, v, mine = found
                shift, top = _V_TIERS[t]
                drop = mine & ((v >> shift & top) != 0)
                nv = v - (drop.astype(np.uint32) << shift)
                self._write_packed(p, pos[mine], v[mine], nv[mine])
                held = mine & ((nv & _V_HELD) != 0)
                return list(compress(keys, (~held).tolist()))

        def change(k: int, f: int) -> int:
            if f & mask:
                f -= t
            if not f & _HELD:
                gone.append(k)
            return f

        self._edit(keys, self._find(keys), p, change)
        return gone

    def holds_any(self, pod: str, keys: Iterable[int]) -> bool:
        """Whether `pod` holds any of `keys` for real, in some tier."""
        p = self._pod_idx.get(pod)
        keys = list(keys)
        if p is None or not keys:
            return False
        recs = self._records(keys, self._find(keys))
        return any(_fields(rec, p) & _HELD for rec in recs)

    def take_evictions(self) -> dict[str, int]:
        """Per pod, the entries the LRU evicted since the last call (for whoever maps
        engine hashes to keys: those mappings went stale)."""
        out = {self._names[q]: n for q, n in self._evicted_from.items()}
        self._evicted_from.clear()
        return out

    def clear_pod(self, pod: str, keys: Iterable[int] = ()) -> None:
        """Drop every entry of `pod` (engine restart, reset, pod gone). `keys` (those the
        caller knows it holds) are not needed: one pass over the table finds them all."""
        p = self._pod_idx.get(pod)
        if p is None:
            return
        self._specs[p] = {}
        self._evicted_from.pop(p, None)
        if not self._pod_n[p]:
            return
        t = self._table
        live = t.live_positions()
        v = t.vals[live]
        mine = live[((v & _WIDE) == 0) & (v >> _V_POD == p)]
        self._n -= len(mine)
        self._pod_n[p] -= len(mine)
        t.delete(mine)
        shared = [k for k, rec in self._wide.items() if _fields(rec, p)]
        if shared:
            self._edit(shared, self._find(shared), p, lambda k, f: 0)

    # --- speculative entries

    def add_speculative(self, pod: str, keys: list[int]) -> None:
        """Insert GPU entries for a routing decision before its BlockStored events arrive;
        they vanish after `speculative_ttl` seconds unless a BlockStored confirms them."""
        now = self._clock()
        self._expire(now)
        p, exp = self._pod(pod), now + self.speculative_ttl
        if keys:
            spec, pos, done = self._specs[p], None, False
            if len(keys) > BATCH and p <= _V_MAX_POD and _distinct_plain(keys):
                pos = self._speculate_batch(p, keys, exp)
                done = pos is None
            if not done:

                def change(k: int, f: int) -> int:
                    if f & _GPU_MASK:
                        return f  # already real
                    spec[k] = exp
                    return f | _SPEC

                pos = self._upsert(keys) if pos is None else pos.tolist()
                self._edit(keys[::-1], pos[::-1], p, change)
                self._touch(pos)
        self._spec_q.append((exp, p, tuple(keys)))
        self._evict()

    def _speculate_batch(self, p: int, keys: list[int], exp: float):
        """add_speculative's common case in array steps: every key new or held by p alone
        in a packed value. Done: None (stamped too); else the keys' positions."""
        tab = self._table
        pos, fresh = tab.upsert_distinct(_array(keys), zero=False)
        spec = self._specs[p]
        if np.count_nonzero(fresh) == len(pos):
            tab.vals[pos] = p << _V_POD | _V_SPEC
            spec.update(dict.fromkeys(keys, exp))
            n = len(pos)
        else:
            v = tab.vals[pos]
            v[fresh] = 0
            if np.count_nonzero((v >> _V_POD == p) | fresh) < len(v):
                tab.vals[pos[fresh]] = 0
                tab.stamps[pos[fresh]] = 0
                return pos
            real = (v & _V_GPU) != 0  # held on GPU already: left as it is
            tab.vals[pos] = np.where(real, v, v | (p << _V_POD | _V_SPEC))
            spec.update(dict.fromkeys(compress(keys, (~real).tolist()), exp))
            n = int(np.count_nonzero(fresh))
        self._n += n
        self._pod_n[p] += n
        self._stamp_batch(pos)
        return None

    def _expire(self, now: float) -> None:
        q = self._spec_q
        while q and q[0][0] <= now:
            exp, p, keys = q.popleft()
            spec = self._specs[p]
            due = [k for k in keys if spec.get(k) == exp]  # neither confirmed nor renewed since
            for k in due:
                del spec[k]
            if not due:
                continue
            found = self._mine_packed(p, due) if len(due) > BATCH else None
            if found is not None:
                pos, v, mine = found
                self._write_packed(p, pos[mine], v[mine], v[mine] & ~np.uint32(_V_SPEC))
            else:
                self._edit(due, self._find(due), p, lambda k, f: f & ~_SPEC)

    # --- queries

    def lookup(
        self,
        keys: list[int],
        pods: Iterable[str] | None = None,
        *,
        tier_weights: dict[str, float] = DEFAULT_TIER_WEIGHTS,
    ) -> dict[str, float]:
        """Per pod, the weighted number of consecutive keys from keys[0] it holds (each key
        weighs its best tier). With `pods`, exactly those pods (0.0 if they hold none);
        without, the pods holding keys[0]. Hits count as uses for the LRU."""
        wg = tier_weights.get("gpu", DEFAULT_TIER_WEIGHTS["gpu"])
        wc = tier_weights.get("cpu", DEFAULT_TIER_WEIGHTS["cpu"])
        return self._walk(keys, pods, (0.0, wg, wc, max(wg, wc)), True)

    def match_lengths(self, keys: list[int], pods: Iterable[str] | None = None) -> dict[str, int]:
        """Per pod, the unweighted number of consecutive keys held; not an LRU use."""
        return self._walk(keys, pods, (0, 1, 1, 1), False)

    def _walk(self, keys, pods, weights, touch: bool) -> dict:
        self._expire(self._clock())
        out, allowed = {}, None
        if pods is not None:
            out = dict.fromkeys(pods, weights[0])
            allowed = {self._pod_idx[x] for x in out if x in self._pod_idx}
        if not keys:
            return out
        # Keys several pods hold have their records in _wide: a shared prefix (a system
        # prompt) is walked there, in dict look-ups, and the table probed only past it.
        recs, wide = [], self._wide
        if wide:
            get = wide.get
            for k in keys:
                rec = get(k)
                if rec is None:
                    break
                recs.append(rec)
        if recs:
            score, i, alive = self._walk_records(recs, allowed, weights)
            if alive and i == len(recs) < len(keys):
                score, i = self._walk_on(keys, recs, alive, score, allowed, weights, touch)
            if touch:
                self._touch_later(keys[: min(i, len(recs))])
        else:
            pos = self._held_from(keys, 0)
            if not len(pos):
                return out
            vals = self._table.vals[pos]
            if np.count_nonzero(vals >= _WIDE):
                recs = [self._rec(k, v) for k, v in zip(keys, vals.tolist(), strict=False)]
                score, i, _ = self._walk_records(recs, allowed, weights)
            else:
                score, i = self._walk_packed(vals, allowed, weights)
            if touch:
                self._stamp_batch(pos[:i])
        names = self._names
        for q, v in score.items():
            out[names[q]] = v
        return out

    def _walk_on(self, keys, recs, alive, score, allowed, weights, touch: bool):
        """Past a shared prefix (the records `recs` of keys[:i]) that the pods `alive` all
        hold: extend their match over the table's keys from keys[i]. (score, keys matched)."""
        i = len(recs)
        pos = self._held_from(keys, i)
        if not len(pos):
            return score, i
        vals = self._table.vals[pos]
        if np.count_nonzero(vals >= _WIDE):  # shared again further on: the general walk over it all
            tail = [self._rec(k, v) for k, v in zip(keys[i:], vals.tolist(), strict=False)]
            score, j, _ = self._walk_records(recs + tail, allowed, weights)
            if touch and j > i:
                self._stamp_batch(pos[: j - i])
            return score, j
        q = int(vals[0]) >> _V_POD
        if q not in alive:
            return score, i
        run, n = self._walk_packed(vals, {q}, weights)
        score[q] += run[q] - weights[0]
        if touch:
            self._stamp_batch(pos[:n])
        return score, i + n

    def _held_from(self, keys: Sequence[int], i: int) -> np.ndarray:
        """The positions of keys[i], keys[i + 1], ... up to the first key nobody holds. The
        first key is probed alone (a prompt nobody holds costs one look), then from it on in
        chunks that double, each one numpy probe, until one has an absent key."""
        t = self._table
        if t.find_small((keys[i],))[0] < 0:
            return np.empty(0, np.int64)
        if i + 1 == len(keys):
            return np.array(t.find_small((keys[i],)), np.int64)
        out, size = [], 64
        while i < len(keys):
            part = t.find_prefix(_array(keys[i : i + size]))
            if part[-1] < 0:
                out.append(part[: _first_false(part >= 0)])
                break
            out.append(part)
            i, size = i + size, size * 2
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _walk_packed(self, vals: np.ndarray, allowed, weights) -> tuple[dict, int]:
        """Every key held by one pod: the match is the run of keys[0]'s pod, in array steps."""
        q = int(vals[0]) >> _V_POD
        if allowed is not None and q not in allowed:
            return {}, 0
        i = _first_false(vals >> _V_POD == q)
        # weights: (none, gpu only, cpu only, both); a key scores its best tier.
        n = np.bincount(_V_CLASS[vals[:i] & _V_FIELDS], minlength=4).tolist()
        return {q: weights[0] + n[1] * weights[1] + n[2] * weights[2] + n[3] * weights[3]}, i

    def _walk_records(self, recs: list, allowed, weights) -> tuple[dict, int, list]:
        """The general walk over keys' records (some held by several pods), from the pods
        holding the first: (score, keys matched, the pods that hold all of them)."""
        cand = [s >> _POD for s in _slots(recs[0]) if allowed is None or s >> _POD in allowed]
        score = dict.fromkeys(cand, weights[0])
        hit = dict.fromkeys(cand, 0)  # keys matched per pod; alive while it equals i
        i, alive, n = 0, len(cand), len(recs)
        while alive > 1 and i < n:  # several pods share the prefix
            rec = recs[i]
            j = i + 1  # a shared prefix is mostly a run of equal records: one pass per run
            while j < n and (recs[j] is rec or recs[j] == rec):
                j += 1
            alive = 0
            for s in _slots(rec):
                q = s >> _POD
                if hit.get(q) == i:
                    hit[q] = j
                    score[q] += (j - i) * _weight(s, weights)
                    alive += 1
            if alive:
                i = j
        if alive == 1:  # one pod left, the common case: a tight loop
            q = next(q for q, c in hit.items() if c == i)
            score[q], i = _run(recs, i, q, weights, score[q])
            return score, i, [q]
        return score, i, [q for q, c in hit.items() if c == i] if alive else []

    def _items(self) -> Iterator[tuple[int, tuple[int, ...]]]:
        """Every key with its slots; O(keys), for tests and debug."""
        t = self._table
        live = t.live_positions()
        for k, v in zip(t.keys[live].tolist(), t.vals[live].tolist(), strict=True):
            yield k, _slots(self._rec(k, v))

    def keys_of(self, pod: str, tier: str | None = None) -> set[int]:
        """The request keys `pod` holds (in `tier`, or any); O(keys), for tests and debug."""
        p = self._pod_idx.get(pod, -1)
        mask = _FIELDS if tier is None else _COUNT * _TIERS[tier] | (_SPEC if tier == "gpu" else 0)
        t = self._table
        live = t.live_positions()
        v = t.vals[live]
        mine = ((v & _WIDE) == 0) & (v >> _V_POD == p) & ((v & _V_TIER_MASK[tier]) != 0)
        out = set(t.keys[live[mine]].tolist())
        out.update(k for k, rec in self._wide.items() if _fields(rec, p) & mask)
        return out

    # --- accounting

    def stats(self) -> dict:
        """Counts for metrics; O(pods)."""
        self._expire(self._clock())
        return {
            "entries": self._n,
            "keys": self._table.live,
            "pods": sum(1 for n in self._pod_n if n),
            "speculative": sum(map(len, self._specs)),
            "bytes": self._table.nbytes + approx_bytes((self._wide, *self._specs)),
            "evicted": self._evicted,
        }

    def memory_bytes(self, seen: set[int] | None = None) -> int:
        """The index's own memory: its arrays, and a getsizeof walk of its dicts, shared objects
        counted once (`seen`: ids already counted by the caller); O(wide keys + speculative)."""
        seen = set() if seen is None else seen
        maps = (self._wide, *self._specs, self._canon)
        return (
            self._table.nbytes + walk_bytes(maps, seen) + sum(_size(x, seen) for x in self._spec_q)
        )

    def bytes_per_entry(self) -> float:
        return self.memory_bytes() / max(1, self._n)


def approx_bytes(maps: Iterable[dict]) -> int:
    """Int-keyed dicts' size, each key and value counted as one 64-bit int (slots are interned)."""
    key_size = sys.getsizeof(1 << 63)
    return sum(sys.getsizeof(d) + len(d) * key_size for d in maps)


def _size(o, seen: set[int]) -> int:
    if id(o) in seen:
        return 0
    seen.add(id(o))
    return sys.getsizeof(o) + (sum(_size(x, seen) for x in o) if o.__class__ is tuple else 0)


def walk_bytes(maps: Iterable[dict], seen: set[int]) -> int:
    """The dicts' memory with their keys and values (tuples walked), each object counted once."""
    return sum(
        sys.getsizeof(d) + sum(_size(k, seen) + _size(v, seen) for k, v in d.items()) for d in maps
    )
