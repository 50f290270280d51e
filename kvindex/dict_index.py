"""The block index in dicts of Python ints: the picker's default layout (`--kv-index-layout
dict`). Lookups and ingestion are faster than the packed layout's (kvindex.index), at about 3x
its memory per (block, pod); `infergate bench kvindex` measures both in one run.

Layout, for memory (one dict entry per key, no object per entry):
- request key → a *slot* int, or a tuple of slots when several pods hold the key. A slot
  packs `pod index << 41 | SPEC | cpu copies << 20 | gpu copies`. A copy count saturates at
  2**20 - 1 rather than carry into the next field (past it, removals may end an entry while
  copies remain: a missed hit, never a wrong tier). Slot ints are interned, so equal slots
  share one object; the interning table is bounded (emptied when full: only sharing is lost).
- The keys are spread over up to 64 dicts (by their low bits) because growing one big dict
  copies it all at once: 0.75 s at 5M keys, on the picker's event loop.
- Each dict's order is its LRU order (a use moves the key to the end); eviction takes the
  front. With one shard (max_entries < 65536) that is exact LRU, with more a close one.
- Per pod: request key → expiry of a speculative entry, with a FIFO of expiries.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from itertools import islice

from infergw.kvindex.index import (
    _COUNT,
    _FIELDS,
    _GPU,
    _GPU_MASK,
    _HELD,
    _POD,
    _SPEC,
    _TIERS,
    DEFAULT_TIER_WEIGHTS,
    MAX_INTERNED_SLOTS,
    Tier,
    _fields,
    _size,
    _slots,
    _weight,
    approx_bytes,
    walk_bytes,
)


def _run(shards, m: int, keys, i: int, q: int, weights, score):
    """Extend pod q's match from keys[i]; returns (score, keys matched)."""
    memo = {}  # slot -> weight: slots are interned, so few distinct ones recur
    for k in islice(keys, i, None):
        rec = shards[k & m].get(k)
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


class DictBlockIndex:
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
        self._mask = n_shards - 1
        self._shards: list[dict[int, int | tuple[int, ...]]] = [{} for _ in range(n_shards)]
        self._shard_n = [0] * n_shards  # (key, pod) entries per shard
        self._budget = max_entries // n_shards
        self._over: set[int] = set()  # shards above their budget
        self._n = 0  # (key, pod) entries
        self._pod_idx: dict[str, int] = {}
        self._names: list[str] = []
        self._pod_n: list[int] = []  # per pod: entries,
        self._specs: list[dict[int, float]] = []  # speculative key -> expiry
        self._spec_q: deque[tuple[float, int, tuple[int, ...]]] = deque()
        self._evicted_from: dict[int, int] = {}  # pod -> entries evicted since take_evictions
        self._canon: dict[int, int] = {}
        self._evicted = 0

    # --- slots

    def _pod(self, pod: str) -> int:
        p = self._pod_idx.get(pod)
        if p is None:
            p = self._pod_idx[pod] = len(self._names)
            self._names.append(pod)
            self._pod_n.append(0)
            self._specs.append({})
        return p

    def _get(self, k: int):
        return self._shards[k & self._mask].get(k)

    def _touch(self, k: int) -> None:
        d = self._shards[k & self._mask]
        d[k] = d.pop(k)

    def _set(self, k: int, p: int, f: int, touch: bool) -> None:
        """Make pod p's slot of key k hold fields f (0 removes it); touch moves k to the end."""
        sh = k & self._mask
        d = self._shards[sh]
        rec = d.pop(k, None) if touch else d.get(k)
        old = () if rec is None else _slots(rec)
        rest = tuple(s for s in old if s >> _POD != p)
        delta = (f != 0) - (len(rest) != len(old))
        if f:
            s = p << _POD | f
            canon = self._canon
            if len(canon) >= MAX_INTERNED_SLOTS:
                canon.clear()
            rest += (canon.setdefault(s, s),)
        if rest:
            d[k] = rest[0] if len(rest) == 1 else rest
        elif rec is not None and not touch:
            del d[k]
        self._n += delta
        self._pod_n[p] += delta
        self._shard_n[sh] += delta
        if delta > 0 and self._shard_n[sh] > self._budget:
            self._over.add(sh)

    def _add(self, k: int, p: int, tier: int, copies: int = 1) -> None:
        f = _fields(self._get(k), p)
        if tier == _GPU and f & _SPEC:  # a speculative entry confirmed: it becomes real
            f -= _SPEC
            self._specs[p].pop(k, None)
        held = f // tier & _COUNT
        f += (min(_COUNT, held + copies) - held) * tier  # saturate: never carry into the next
        self._set(k, p, f, True)

    def _evict(self) -> None:
        if not self._over:  # every add asks; few find a shard over its budget
            return
        # A little below the budget, so the scan over a dict's front (where deleted entries
        # collect until its next resize) is paid once per batch.
        target = self._budget - (self._budget >> 8)
        evicted: Counter[int] = Counter()
        for sh in self._over:
            if self._shard_n[sh] <= self._budget:  # removals brought it back already
                continue
            d, excess = self._shards[sh], self._shard_n[sh] - target
            victims = []
            for k, rec in d.items():
                victims.append(k)
                excess -= 1 if rec.__class__ is int else len(rec)
                if excess <= 0:
                    break
            for k in victims:
                for s in _slots(d.pop(k)):
                    q = s >> _POD
                    self._pod_n[q] -= 1
                    evicted[q] += 1
                    self._shard_n[sh] -= 1
                    self._n -= 1
                    self._evicted += 1
        self._over.clear()
        for q in evicted:
            self._evicted_from[q] = self._evicted_from.get(q, 0) + evicted[q]

    # --- keys in, keys out

    @property
    def shard_count(self) -> int:
        """How many dicts the keys are spread over (by their low bits)."""
        return self._mask + 1

    def add(self, pod: str, keys: Sequence[int], tier: Tier, copies: int = 1) -> None:
        """`pod` stored `copies` more copies of each key in `tier`. Keys go in tail first, so the
        head ends up newest: eviction trims chains from the tail."""
        p, t = self._pod(pod), _TIERS[tier]
        if copies < 1:
            return
        # A key nobody holds yet (most of what BlockStored events bring) takes one pop and one
        # store; any other goes through _add. Counters are summed once per call.
        s = p << _POD | min(_COUNT, copies) * t
        canon = self._canon
        if len(canon) >= MAX_INTERNED_SLOTS:
            canon.clear()
        s = canon.setdefault(s, s)
        shards, m, shard_n, budget, over = (
            self._shards,
            self._mask,
            self._shard_n,
            self._budget,
            self._over,
        )
        fresh = 0
        for k in reversed(keys):
            sh = k & m
            d = shards[sh]
            rec = d.pop(k, None)
            if rec is None:
                d[k] = s
                fresh += 1
                shard_n[sh] += 1
                if shard_n[sh] > budget:
                    over.add(sh)
            else:
                d[k] = rec
                self._add(k, p, t, copies)
        self._n += fresh
        self._pod_n[p] += fresh
        self._evict()

    def remove(self, pod: str, keys: Sequence[int], tier: Tier) -> list[int]:
        """`pod` dropped one copy of each key from `tier`; returns the keys it no longer holds
        in any tier (speculative entries do not count as held)."""
        p = self._pod_idx.get(pod)
        if p is None:
            return list(keys)
        mask, t, gone = _COUNT * _TIERS[tier], _TIERS[tier], []
        shards, m, canon = self._shards, self._mask, self._canon
        dropped = 0
        for k in keys:
            sh = k & m
            rec = shards[sh].get(k)
            if rec.__class__ is int and rec >> _POD == p:
                # Held by this pod alone, the common case: what _set does, inline (vLLM
                # removes blocks one by one, ~70 a request in bench/routing).
                f = rec & _FIELDS
                if f & mask:
                    f -= t
                    if f:
                        if len(canon) >= MAX_INTERNED_SLOTS:
                            canon.clear()
                        s = p << _POD | f
                        shards[sh][k] = canon.setdefault(s, s)
                    else:
                        del shards[sh][k]
                        self._shard_n[sh] -= 1
                        dropped += 1
            else:
                f = _fields(rec, p)
                if f & mask:
                    f -= t
                    self._set(k, p, f, False)
            if not f & _HELD:
                gone.append(k)
        self._n -= dropped
        self._pod_n[p] -= dropped
        return gone

    def holds_any(self, pod: str, keys: Iterable[int]) -> bool:
        """Whether `pod` holds any of `keys` for real, in some tier."""
        p = self._pod_idx.get(pod)
        return p is not None and any(_fields(self._get(k), p) & _HELD for k in keys)

    def take_evictions(self) -> dict[str, int]:
        """Per pod, the entries the LRU evicted since the last call (for whoever maps
        engine hashes to keys: those mappings went stale)."""
        out = {self._names[q]: n for q, n in self._evicted_from.items()}
        self._evicted_from.clear()
        return out

    def clear_pod(self, pod: str, keys: Iterable[int] = ()) -> None:
        """Drop every entry of `pod` (engine restart, reset, pod gone). `keys`: those the caller
        knows it holds, dropped directly; any left are found by a full scan."""
        p = self._pod_idx.get(pod)
        if p is None:
            return
        for k in keys:
            self._set(k, p, 0, False)
        for k in self._specs[p]:
            self._set(k, p, 0, False)
        self._specs[p] = {}
        self._evicted_from.pop(p, None)
        if self._pod_n[p]:  # keys the caller did not know; a full scan keeps the index right
            for d in self._shards:
                for k in [k for k, rec in d.items() if _fields(rec, p)]:
                    self._set(k, p, 0, False)

    # --- speculative entries

    def add_speculative(self, pod: str, keys: list[int]) -> None:
        """Insert GPU entries for a routing decision before its BlockStored events arrive;
        they vanish after `speculative_ttl` seconds unless a BlockStored confirms them."""
        now = self._clock()
        q = self._spec_q
        if q and q[0][0] <= now:  # see _walk: nothing to expire is the common case
            self._expire(now)
        p, exp = self._pod(pod), now + self.speculative_ttl
        spec = self._specs[p]
        shards, m, shard_n, budget = self._shards, self._mask, self._shard_n, self._budget
        # A key nobody holds (a new prompt's tail: most of its keys) takes the slot of a lone
        # speculative entry, counted once per call: what _set does for it, inline.
        canon = self._canon
        if len(canon) >= MAX_INTERNED_SLOTS:
            canon.clear()
        lone = p << _POD | _SPEC
        lone = canon.setdefault(lone, lone)
        fresh = 0
        for k in reversed(keys):  # head newest, as in add
            sh = k & m
            d = shards[sh]
            rec = d.get(k)
            if rec is None:
                d[k] = lone
                spec[k] = exp
                fresh += 1
                shard_n[sh] += 1
                if shard_n[sh] > budget:
                    self._over.add(sh)
                continue
            # The chosen pod mostly holds the prompt's head already, alone (a shared prefix
            # routed where it is): a touch, inline (what _fields and _touch do).
            if rec.__class__ is int and rec >> _POD == p and rec & _GPU_MASK:
                d[k] = d.pop(k)
                continue
            f = _fields(rec, p)
            if f & _GPU_MASK:
                self._touch(k)  # already real
            else:
                self._set(k, p, f | _SPEC, True)
                spec[k] = exp
        self._n += fresh
        self._pod_n[p] += fresh
        self._spec_q.append((exp, p, tuple(keys)))
        self._evict()

    def _expire(self, now: float) -> None:
        q = self._spec_q
        shards, m, shard_n = self._shards, self._mask, self._shard_n
        while q and q[0][0] <= now:
            exp, p, keys = q.popleft()
            spec = self._specs[p]
            lone = p << _POD | _SPEC  # the pod's speculative entry, alone on its key
            gone = 0
            for k in keys:
                if spec.get(k) == exp:  # neither confirmed nor renewed since
                    del spec[k]
                    sh = k & m
                    rec = shards[sh].get(k)
                    if rec == lone:  # the common case: what _set does for it, inline
                        del shards[sh][k]
                        shard_n[sh] -= 1
                        gone += 1
                        continue
                    f = _fields(rec, p)
                    if f & _SPEC:
                        self._set(k, p, f - _SPEC, False)
            self._n -= gone
            self._pod_n[p] -= gone

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
        # _expire's own first test, made here: every walk of every request would otherwise
        # call it (and the clock) for nothing. The clock is read only while speculative
        # entries exist, _expire called only when one is due.
        q = self._spec_q
        if q and q[0][0] <= (now := self._clock()):
            self._expire(now)
        out, allowed = {}, None
        if pods is not None:
            out = dict.fromkeys(pods, weights[0])
            allowed = {self._pod_idx[x] for x in out if x in self._pod_idx}
        shards, m = self._shards, self._mask
        first = self._get(keys[0]) if keys else None
        if first is None:
            return out
        cand = [s >> _POD for s in _slots(first) if allowed is None or s >> _POD in allowed]
        score = dict.fromkeys(cand, weights[0])
        hit = dict.fromkeys(cand, 0)  # keys matched per pod; alive while it equals i
        i, alive, n = 0, len(cand), len(keys)
        while alive > 1 and i < n:  # several pods share the prefix
            rec = shards[keys[i] & m].get(keys[i])
            if rec is None:
                break
            j = i + 1  # a shared prefix is mostly a run of equal records: one pass per run
            while j < n and shards[keys[j] & m].get(keys[j]) == rec:
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
            score[q], i = _run(shards, m, keys, i, q, weights, score[q])
        if touch:  # tail first, so the head is newest (see add)
            for k in reversed(keys[:i]):
                self._touch(k)
        names = self._names
        for q, v in score.items():
            out[names[q]] = v
        return out

    def keys_of(self, pod: str, tier: str | None = None) -> set[int]:
        """The request keys `pod` holds (in `tier`, or any); O(entries), for tests and debug."""
        p = self._pod_idx.get(pod, -1)
        mask = _FIELDS if tier is None else _COUNT * _TIERS[tier] | (_SPEC if tier == "gpu" else 0)
        return {k for d in self._shards for k, rec in d.items() if _fields(rec, p) & mask}

    # --- accounting

    def stats(self) -> dict:
        """Counts for metrics; O(pods + shards)."""
        self._expire(self._clock())
        return {
            "entries": self._n,
            "keys": sum(map(len, self._shards)),
            "pods": sum(1 for n in self._pod_n if n),
            "speculative": sum(map(len, self._specs)),
            "bytes": approx_bytes((*self._shards, *self._specs)),
            "evicted": self._evicted,
        }

    def memory_bytes(self, seen: set[int] | None = None) -> int:
        """The index's own memory by a getsizeof walk, shared objects counted once (`seen`:
        ids already counted by the caller); O(entries)."""
        seen = set() if seen is None else seen
        maps = (*self._shards, *self._specs, self._canon)
        return walk_bytes(maps, seen) + sum(_size(x, seen) for x in self._spec_q)

    def bytes_per_entry(self) -> float:
        return self.memory_bytes() / max(1, self._n)
