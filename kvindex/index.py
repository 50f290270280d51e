"""The global KV-cache block index: which pod holds how many leading blocks of a prompt.

Keyed by request keys (kvindex.keys), which the picker computes from a prompt's tokens; vLLM's
block hashes it cannot compute. Per pod, an engine-hash → request-keys map resolves removals,
CPU-offload stores and the parents of later stores.

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
- Per pod: engine hash (| group << 64) → request key or tuple of them (at most
  MAX_KEYS_PER_HASH, the newest: vLLM maps one hash to one content, so only a hostile
  publisher reuses a hash for many); request key → expiry of a speculative entry, with a FIFO
  of expiries.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, deque
from collections.abc import Iterable
from itertools import islice

from kvindex.events import AllBlocksCleared, BlockRemoved, BlockStored
from kvindex.keys import block_keys, model_root

_GPU, _CPU, _SPEC = 1, 1 << 20, 1 << 40
_POD = 41  # slot >> _POD is the pod index
_COUNT = (1 << 20) - 1
_GPU_MASK, _CPU_MASK = _COUNT, _COUNT << 20
_HELD = _GPU_MASK | _CPU_MASK  # held for real, in some tier
_ON_GPU = _GPU_MASK | _SPEC  # held on GPU, for real or speculatively
_FIELDS = (1 << _POD) - 1
_TIERS = {"gpu": _GPU, "cpu": _CPU}
_INDEXED_KINDS = frozenset({"full_attention", "mla_attention", "sink_full_attention"})
_SWEEP_MIN = 1024
MAX_INTERNED_SLOTS = 1 << 16  # distinct slot values interned at once
# One engine block covers engine block size / index block size keys (16 for 256 / 16).
MAX_KEYS_PER_HASH = 64
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
        self._mask = n_shards - 1
        self._shards: list[dict[int, int | tuple[int, ...]]] = [{} for _ in range(n_shards)]
        self._shard_n = [0] * n_shards  # (key, pod) entries per shard
        self._budget = max_entries // n_shards
        self._over: set[int] = set()  # shards above their budget
        self._sweeping: dict[int, int] = {}  # pod -> next engine-map shard to sweep
        self._n = 0  # (key, pod) entries
        self._pod_idx: dict[str, int] = {}
        self._names: list[str] = []
        self._pod_n: list[int] = []  # per pod: entries,
        self._stale: list[int] = []  # entries evicted since its last sweep,
        self._emaps: list[list[dict]] = []  # engine hash -> keys, sharded as the keys are,
        self._specs: list[dict[int, float]] = []  # speculative key -> expiry
        self._spec_q: deque[tuple[float, int, tuple[int, ...]]] = deque()
        self._canon: dict[int, int] = {}
        self._events: Counter[str] = Counter()
        self._skipped: Counter[str] = Counter()
        self._unknown_parents = self._removed_unknown = self._evicted = 0

    # --- slots

    def _pod(self, pod: str) -> int:
        p = self._pod_idx.get(pod)
        if p is None:
            p = self._pod_idx[pod] = len(self._names)
            self._names.append(pod)
            self._pod_n.append(0)
            self._stale.append(0)
            self._emaps.append([{} for _ in self._shards])
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
        # A little below the budget, so the scan over a dict's front (where deleted entries
        # collect until its next resize) is paid once per batch.
        target = self._budget - (self._budget >> 8)
        pods = set()
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
                    self._stale[q] += 1
                    self._shard_n[sh] -= 1
                    self._n -= 1
                    self._evicted += 1
                    pods.add(q)
        self._over.clear()
        # Mappings whose keys the LRU evicted would stay until their BlockRemoved (forever
        # if it was lost); their chains are unreachable anyway, as a lookup stops at the
        # evicted key. Sweep once a quarter of a pod's mappings may be stale (amortized O(1)),
        # one shard of one pod per call (short pauses).
        for q in pods:
            mapped = sum(map(len, self._emaps[q]))
            if q not in self._sweeping and self._stale[q] > max(_SWEEP_MIN, mapped // 4):
                self._sweeping[q], self._stale[q] = 0, 0
        if self._sweeping:
            q, i = next(iter(self._sweeping.items()))
            emap, get = self._emaps[q], self._get
            # A new dict, because a dict does not shrink when emptied.
            emap[i] = {
                e: rs
                for e, rs in emap[i].items()
                if any(_fields(get(k), q) & _HELD for k in _slots(rs))
            }
            if i < self._mask:
                self._sweeping[q] = i + 1
            else:
                del self._sweeping[q]

    # --- ingestion

    def apply(self, pod: str, model: str, event) -> None:
        """Apply one decoded KV event of `pod` serving `model` (the topic's model)."""
        p = self._pod(pod)
        cls = event.__class__
        self._events[cls.__name__] += 1
        if cls is BlockStored:
            self._stored(p, model, event)
            self._evict()
        elif cls is BlockRemoved:
            self._removed(p, event)
        elif cls is AllBlocksCleared:
            self.clear_pod(pod)
        else:
            self._skipped["unknown_event"] += 1

    def _stored(self, p: int, model: str, ev: BlockStored) -> None:
        if ev.kv_cache_spec_kind not in _INDEXED_KINDS:
            self._skipped["kv_cache_spec_kind"] += 1
            return
        tier = _TIERS.get(ev.medium.lower())
        if tier is None:
            self._skipped["medium"] += 1
            return
        emap, g, hashes, m = self._emaps[p], ev.group_idx << 64, ev.block_hashes, self._mask
        if not ev.token_ids:  # a CPU-offload store: only hashes we already know
            for h, copies in Counter(hashes).items():
                rs = emap[h & m].get(h | g)
                if rs is None:
                    self._skipped["offload_unknown_hash"] += copies
                else:
                    for k in _slots(rs):
                        self._add(k, p, tier, copies)
            return
        if len(ev.token_ids) != ev.block_size * len(hashes):
            self._skipped["token_count"] += 1
            return
        parent = ev.parent_block_hash
        rs = None if parent is None else emap[parent & m].get(parent | g)
        if rs is not None:
            pk = _slots(rs)[-1]
        else:
            # An unknown parent (we joined mid-stream, or it had no full index block): chain
            # from the root as llm-d router PR #691 does.
            self._unknown_parents += parent is not None
            pk = model_root(model)
        extra = (ev.lora_name,) if ev.lora_name else None
        keys = block_keys(ev.token_ids, self.block_size, parent=pk, extra=extra)
        for k in reversed(keys):  # the head ends up newest: eviction trims chains from the tail
            self._add(k, p, tier)
        # llm-d's length ratio: with n = max(|E|, |R|), E[i*|E|/n] ↔ R[i*|R|/n].
        ne, nr = len(hashes), len(keys)
        n = max(ne, nr)
        for i in range(n if nr else 0):
            e, k = hashes[i * ne // n] | g, keys[i * nr // n]
            d = emap[e & m]
            old = d.get(e)
            if old is None:
                d[e] = k
            elif k not in _slots(old):
                d[e] = (*_slots(old)[1 - MAX_KEYS_PER_HASH :], k)

    def _removed(self, p: int, ev: BlockRemoved) -> None:
        tier = _TIERS.get(ev.medium.lower())
        if tier is None:
            self._skipped["medium"] += 1
            return
        emap, g, mask = self._emaps[p], ev.group_idx << 64, _COUNT * tier
        for h in ev.block_hashes:
            d = emap[h & self._mask]
            rs = d.get(h | g)
            if rs is None:
                self._removed_unknown += 1
                continue
            held = False
            for k in _slots(rs):
                f = _fields(self._get(k), p)
                if f & mask:
                    f -= tier
                    self._set(k, p, f, False)
                held = held or bool(f & _HELD)
            if not held:  # refers to nothing this pod holds any more
                del d[h | g]

    def clear_pod(self, pod: str) -> None:
        """Drop every entry and mapping of `pod` (engine restart, reset, pod gone)."""
        p = self._pod_idx.get(pod)
        if p is None:
            return
        # Every entry of p is reachable from its engine map or its speculative set.
        for d in self._emaps[p]:
            for rs in d.values():
                for k in _slots(rs):
                    self._set(k, p, 0, False)
        for k in self._specs[p]:
            self._set(k, p, 0, False)
        self._emaps[p] = [{} for _ in self._shards]
        self._specs[p], self._stale[p] = {}, 0
        self._sweeping.pop(p, None)
        if self._pod_n[p]:  # not expected; a full scan keeps the index right anyway
            for d in self._shards:
                for k in [k for k, rec in d.items() if _fields(rec, p)]:
                    self._set(k, p, 0, False)

    # --- speculative entries

    def add_speculative(self, pod: str, keys: list[int]) -> None:
        """Insert GPU entries for a routing decision before its BlockStored events arrive;
        they vanish after `speculative_ttl` seconds unless a BlockStored confirms them."""
        now = self._clock()
        self._expire(now)
        p, exp = self._pod(pod), now + self.speculative_ttl
        spec = self._specs[p]
        for k in reversed(keys):  # head newest, as in _stored
            f = _fields(self._get(k), p)
            if f & _GPU_MASK:
                self._touch(k)  # already real
            else:
                self._set(k, p, f | _SPEC, True)
                spec[k] = exp
        self._spec_q.append((exp, p, tuple(keys)))
        self._evict()

    def _expire(self, now: float) -> None:
        q = self._spec_q
        while q and q[0][0] <= now:
            exp, p, keys = q.popleft()
            spec = self._specs[p]
            for k in keys:
                if spec.get(k) == exp:  # neither confirmed nor renewed since
                    del spec[k]
                    f = _fields(self._get(k), p)
                    if f & _SPEC:
                        self._set(k, p, f - _SPEC, False)

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
        if touch:  # tail first, so the head is newest (see _stored)
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
        key_size = sys.getsizeof(1 << 63)  # a 64-bit int; slots are interned
        emaps = [d for shards in self._emaps for d in shards]
        maps = (*self._shards, *emaps, *self._specs)
        return {
            "entries": self._n,
            "keys": sum(map(len, self._shards)),
            "pods": sum(1 for n in self._pod_n if n),
            "engine_hashes": sum(map(len, emaps)),
            "speculative": sum(map(len, self._specs)),
            "bytes": sum(sys.getsizeof(d) + len(d) * key_size for d in maps),
            "events": dict(self._events),
            "skipped": dict(self._skipped),
            "unknown_parents": self._unknown_parents,
            "removed_unknown": self._removed_unknown,
            "evicted": self._evicted,
        }

    def memory_bytes(self) -> int:
        """The index's own memory by a getsizeof walk, shared objects counted once; O(entries)."""
        seen: set[int] = set()

        def size(o) -> int:
            if id(o) in seen:
                return 0
            seen.add(id(o))
            return sys.getsizeof(o) + (sum(map(size, o)) if o.__class__ is tuple else 0)

        emaps = [d for shards in self._emaps for d in shards]
        maps = (*self._shards, *emaps, *self._specs, self._canon)
        total = sum(sys.getsizeof(d) + sum(size(k) + size(v) for k, v in d.items()) for d in maps)
        return total + sum(map(size, self._spec_q))

    def bytes_per_entry(self) -> float:
        return self.memory_bytes() / max(1, self._n)
