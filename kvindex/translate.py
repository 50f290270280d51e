"""vLLM KV events → the block index's add / remove / clear_pod calls.

The index is keyed by request keys (kvindex.keys), which the picker computes from a prompt's
tokens; vLLM's block hashes it cannot compute. So per pod an engine-hash → request-keys map
resolves removals, CPU-offload stores and the parents of later stores: engine hash
(| group << 64) → request key or tuple of them (at most MAX_KEYS_PER_HASH, the newest: vLLM
maps one hash to one content, so only a hostile publisher reuses a hash for many). The maps
are sharded as the index's keys are (by low bits), so no one dict grows huge.
"""

from __future__ import annotations

from collections import Counter

from kvindex.events import AllBlocksCleared, BlockRemoved, BlockStored
from kvindex.index import KVBlockIndex, Tier, approx_bytes, walk_bytes
from kvindex.keys import block_keys, model_root

_INDEXED_KINDS = frozenset({"full_attention", "mla_attention", "sink_full_attention"})
_TIER_OF_MEDIUM: dict[str, Tier] = {"gpu": "gpu", "cpu": "cpu"}
_SWEEP_MIN = 1024
# One engine block covers engine block size / index block size keys (16 for 256 / 16).
MAX_KEYS_PER_HASH = 64


def _slots(rs) -> tuple[int, ...]:
    return (rs,) if rs.__class__ is int else rs


class EventTranslator:
    """The subscriber's EventSink: applies decoded KV events of each pod to `index`."""

    def __init__(self, index: KVBlockIndex) -> None:
        self.index = index
        self._mask = index.shard_count - 1
        self._emaps: dict[str, list[dict[int, int | tuple[int, ...]]]] = {}
        self._stale: Counter[str] = Counter()  # per pod: entries evicted since its last sweep
        self._sweeping: dict[str, int] = {}  # pod -> next engine-map shard to sweep
        self._events: Counter[str] = Counter()
        self._skipped: Counter[str] = Counter()
        self._unknown_parents = self._removed_unknown = 0

    def _emap(self, pod: str) -> list[dict]:
        emap = self._emaps.get(pod)
        if emap is None:
            emap = self._emaps[pod] = [{} for _ in range(self._mask + 1)]
        return emap

    def apply(self, pod: str, model: str, event) -> None:
        """Apply one decoded KV event of `pod` serving `model` (the topic's model)."""
        cls = event.__class__
        self._events[cls.__name__] += 1
        if cls is BlockStored:
            self._stored(pod, model, event)
            self._sweep()
        elif cls is BlockRemoved:
            self._removed(pod, event)
        elif cls is AllBlocksCleared:
            self.clear_pod(pod)
        else:
            self._skipped["unknown_event"] += 1

    def _stored(self, pod: str, model: str, ev: BlockStored) -> None:
        if ev.kv_cache_spec_kind not in _INDEXED_KINDS:
            self._skipped["kv_cache_spec_kind"] += 1
            return
        tier = _TIER_OF_MEDIUM.get(ev.medium.lower())
        if tier is None:
            self._skipped["medium"] += 1
            return
        emap, g, hashes, m = self._emap(pod), ev.group_idx << 64, ev.block_hashes, self._mask
        if not ev.token_ids:  # a CPU-offload store: only hashes we already know
            by_copies: dict[int, list[int]] = {}
            for h, copies in Counter(hashes).items():
                rs = emap[h & m].get(h | g)
                if rs is None:
                    self._skipped["offload_unknown_hash"] += copies
                else:
                    by_copies.setdefault(copies, []).extend(_slots(rs))
            for copies, keys in by_copies.items():
                self.index.add(pod, keys, tier, copies)
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
        keys = block_keys(ev.token_ids, self.index.block_size, parent=pk, extra=extra)
        self.index.add(pod, keys, tier)
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

    def _removed(self, pod: str, ev: BlockRemoved) -> None:
        tier = _TIER_OF_MEDIUM.get(ev.medium.lower())
        if tier is None:
            self._skipped["medium"] += 1
            return
        emap, g, m = self._emaps.get(pod), ev.group_idx << 64, self._mask
        known: list[int] = []  # engine hashes (| group) we map
        keys: list[int] = []
        for h in ev.block_hashes:
            rs = None if emap is None else emap[h & m].get(h | g)
            if rs is None:
                self._removed_unknown += 1
            else:
                known.append(h | g)
                keys.extend(_slots(rs))
        if not known:
            return
        gone = set(self.index.remove(pod, keys, tier))
        for e in known:
            d = emap[e & m]
            rs = d.get(e)
            if rs is not None and all(k in gone for k in _slots(rs)):
                del d[e]  # refers to nothing this pod holds any more

    def clear_pod(self, pod: str) -> None:
        """Drop every entry and mapping of `pod` (engine restart, reset, pod gone)."""
        emap = self._emaps.pop(pod, None)
        known = () if emap is None else (k for d in emap for rs in d.values() for k in _slots(rs))
        self.index.clear_pod(pod, known)
        self._stale.pop(pod, None)
        self._sweeping.pop(pod, None)

    def _sweep(self) -> None:
        # Mappings whose keys the LRU evicted would stay until their BlockRemoved (forever if
        # it was lost); their chains are unreachable anyway, as a lookup stops at the evicted
        # key. Sweep once a quarter of a pod's mappings may be stale (amortized O(1)), one
        # shard of one pod per call (short pauses).
        for pod, n in self.index.take_evictions().items():
            emap = self._emaps.get(pod)
            if emap is None:
                continue
            self._stale[pod] += n
            mapped = sum(map(len, emap))
            if pod not in self._sweeping and self._stale[pod] > max(_SWEEP_MIN, mapped // 4):
                self._sweeping[pod], self._stale[pod] = 0, 0
        if self._sweeping:
            pod, i = next(iter(self._sweeping.items()))
            emap, holds = self._emaps[pod], self.index.holds_any
            # A new dict, because a dict does not shrink when emptied.
            emap[i] = {e: rs for e, rs in emap[i].items() if holds(pod, _slots(rs))}
            if i < self._mask:
                self._sweeping[pod] = i + 1
            else:
                del self._sweeping[pod]

    # --- accounting

    def _maps(self) -> list[dict]:
        return [d for emap in self._emaps.values() for d in emap]

    def stats(self) -> dict:
        """The index's counts and the translation's; O(pods + shards)."""
        maps = self._maps()
        out = self.index.stats()
        out["bytes"] += approx_bytes(maps)
        out.update(
            engine_hashes=sum(map(len, maps)),
            events=dict(self._events),
            skipped=dict(self._skipped),
            unknown_parents=self._unknown_parents,
            removed_unknown=self._removed_unknown,
        )
        return out

    def memory_bytes(self) -> int:
        """The index's memory and the engine-hash maps', shared objects counted once."""
        seen: set[int] = set()
        return self.index.memory_bytes(seen) + walk_bytes(self._maps(), seen)

    def bytes_per_entry(self) -> float:
        return self.memory_bytes() / max(1, self.index.stats()["entries"])
