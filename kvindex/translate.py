"""vLLM KV events → the block index's add / remove / clear_pod calls.

The index is keyed by request keys (kvindex.keys), which the picker computes from a prompt's
tokens; vLLM's block hashes it cannot compute. So per pod an engine-hash → request-keys map
resolves removals, CPU-offload stores and the parents of later stores: engine hash
(| group << 64) → request key or tuple of them (at most MAX_KEYS_PER_HASH, the newest: vLLM
maps one hash to one content, so only a hostile publisher reuses a hash for many). The maps
are sharded as the index's keys are (by low bits), so no one dict grows huge.

vLLM's extra keys (LoRA name, cache salt, multimodal hashes: one tuple or None per engine block)
are placed as kvindex.keys says, so a prompt's keys match exactly where vLLM would share. They
are attacker-controlled values: an engine block's extra keys may take `MAX_EXTRA_BYTES` encoded,
else the event is skipped (counted under skipped["extra_keys"]). Each pod's engine block size
(from its BlockStored events) is remembered: the cached prefix counts whole engine blocks only.
Lookups of engine hashes that miss are counted per pod (kvindex.unresolved).
"""

from __future__ import annotations

from collections import Counter

from infergw.kvindex.backend import BlockIndex
from infergw.kvindex.events import AllBlocksCleared, BlockRemoved, BlockStored
from infergw.kvindex.index import Tier, approx_bytes, walk_bytes
from infergw.kvindex.keys import block_keys, encode_extras, model_root
from infergw.kvindex.unresolved import UnresolvedHashes

_INDEXED_KINDS = frozenset({"full_attention", "mla_attention", "sink_full_attention"})
_TIER_OF_MEDIUM: dict[str, Tier] = {"gpu": "gpu", "cpu": "cpu"}
_SWEEP_MIN = 1024
# One engine block covers engine block size / index block size keys (16 for 256 / 16).
MAX_KEYS_PER_HASH = 64
MAX_EXTRA_BYTES = 4096  # one engine block's extra keys, encoded (a salt is a client's string)
MAX_ENGINE_BLOCK_SIZE = 1 << 16  # tokens; vLLM's largest (hybrid models) are a few thousand


class _Refused(Exception):
    pass


def _placed_extras(ev: BlockStored, index_block_size: int) -> tuple[bytes, dict[int, bytes]]:
    """(the first block's extra keys for the root, index block → extra keys) of a store, as
    kvindex.keys places them: the LoRA name (first in each tuple, as vLLM orders them) is left
    out, as the root holds it; a request's first block's extras (its parent is None: vLLM's
    start token 0) go into the root; any other engine block's go into each index block that
    starts inside it. _Refused if they are malformed or too big."""
    per_block = ev.extra_keys
    if not per_block:
        return b"", {}
    if len(per_block) != len(ev.block_hashes):
        raise _Refused
    first, placed, bs, lora = b"", {}, ev.block_size, ev.lora_name
    for j, entry in enumerate(per_block):
        if entry is None:
            continue
        if entry.__class__ is not tuple:
            raise _Refused
        if lora and entry and entry[0] == lora:
            entry = entry[1:]
        if not entry:
            continue
        enc = encode_extras(entry)
        if len(enc) > MAX_EXTRA_BYTES:
            raise _Refused
        if j == 0 and ev.parent_block_hash is None:
            first = enc
            continue
        # index blocks i with j*bs <= i*B < (j+1)*bs
        for i in range(-(-j * bs // index_block_size), -(-(j + 1) * bs // index_block_size)):
            placed[i] = enc
    return first, placed


def _slots(rs) -> tuple[int, ...]:
    return (rs,) if rs.__class__ is int else rs


class EventTranslator:
    """The subscriber's EventSink: applies decoded KV events of each pod to `index`."""

    def __init__(self, index: BlockIndex) -> None:
        self.index = index
        self._mask = index.shard_count - 1
        self._emaps: dict[str, list[dict[int, int | tuple[int, ...]]]] = {}
        self._stale: Counter[str] = Counter()  # per pod: entries evicted since its last sweep
        self._sweeping: dict[str, int] = {}  # pod -> next engine-map shard to sweep
        self._events: Counter[str] = Counter()
        self._skipped: Counter[str] = Counter()
        self._unknown_parents = self._removed_unknown = 0
        self._engine_block_size: dict[str, int] = {}
        self.unresolved = UnresolvedHashes()

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
            missed = 0
            for h, copies in Counter(hashes).items():
                rs = emap[h & m].get(h | g)
                if rs is None:
                    missed += copies
                else:
                    by_copies.setdefault(copies, []).extend(_slots(rs))
            self._skipped["offload_unknown_hash"] += missed
            self.unresolved.note(pod, "offload", len(hashes), missed)
            for copies, keys in by_copies.items():
                self.index.add(pod, keys, tier, copies)
            return
        if not 0 < ev.block_size <= MAX_ENGINE_BLOCK_SIZE:
            self._skipped["block_size"] += 1
            return
        if len(ev.token_ids) != ev.block_size * len(hashes):
            self._skipped["token_count"] += 1
            return
        try:
            first, extras = _placed_extras(ev, self.index.block_size)
        except _Refused:
            self._skipped["extra_keys"] += 1
            return
        self._engine_block_size[pod] = ev.block_size
        parent = ev.parent_block_hash
        if parent is None:
            pk = model_root(model, ev.lora_name, first)
        else:
            rs = emap[parent & m].get(parent | g)
            self.unresolved.note(pod, "parent", 1, int(rs is None))
            if rs is not None:
                pk = _slots(rs)[-1]
            else:
                # An unknown parent (we joined mid-stream, or it had no full index block):
                # chain from the root as llm-d router PR #691 does.
                self._unknown_parents += 1
                pk = model_root(model, ev.lora_name)
        keys = block_keys(ev.token_ids, self.index.block_size, parent=pk, extras=extras)
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
            if rs is not None:
                known.append(h | g)
                keys.extend(_slots(rs))
        missed = len(ev.block_hashes) - len(known)
        self._removed_unknown += missed
        self.unresolved.note(pod, "removed", len(ev.block_hashes), missed)
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
        self._engine_block_size.pop(pod, None)

    def engine_block_size(self, pod: str) -> int | None:
        """The block size of `pod`'s engine, from its BlockStored events; None before any."""
        return self._engine_block_size.get(pod)

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
            unresolved=self.unresolved.totals(),
        )
        return out

    def memory_bytes(self) -> int:
        """The index's memory and the engine-hash maps', shared objects counted once."""
        seen: set[int] = set()
        return self.index.memory_bytes(seen) + walk_bytes(self._maps(), seen)

    def bytes_per_entry(self) -> float:
        return self.memory_bytes() / max(1, self.index.stats()["entries"])
