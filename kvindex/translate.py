"""vLLM KV events → the block index's add / remove / clear_pod calls.

The index is keyed by request keys (kvindex.keys), which the picker computes from a prompt's
tokens; vLLM's block hashes it cannot compute. So per pod an engine-hash → request-keys map
(kvindex.engine_maps) resolves removals, CPU-offload stores and the parents of later stores.
Its layout follows the index's: dicts beside the dict index, a packed key table beside the
packed one (`layout` overrides).

vLLM's extra keys (LoRA name, cache salt, multimodal hashes: one tuple or None per engine block)
are placed as kvindex.keys says, so a prompt's keys match exactly where vLLM would share. They
are attacker-controlled values: an engine block's extra keys may take `MAX_EXTRA_BYTES` encoded,
else the event is skipped (counted under skipped["extra_keys"]). Each pod's engine block size
(from its BlockStored events) is remembered: the cached prefix counts whole engine blocks only.
Lookups of engine hashes that miss are counted per pod (kvindex.unresolved).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from infergw.kvindex.backend import BlockIndex, SharedBlockIndex
from infergw.kvindex.clear_pace import CLEAR_EVERY, ClearPace
from infergw.kvindex.engine_hashing import MAX_ENGINE_BLOCK_SIZE
from infergw.kvindex.engine_maps import LAYOUTS, MAX_KEYS_PER_HASH, EngineMap, appended
from infergw.kvindex.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from infergw.kvindex.fault_log import FaultLog
from infergw.kvindex.index import KVBlockIndex, Tier
from infergw.kvindex.keys import block_keys, encode_extras, model_root
from infergw.kvindex.unresolved import UnresolvedHashes

__all__ = ["MAX_EXTRA_BYTES", "MAX_KEYS_PER_HASH", "EventTranslator"]

log = logging.getLogger("kvindex.translate")

INDEXED_KINDS = frozenset({"full_attention", "mla_attention", "sink_full_attention"})
TIER_OF_MEDIUM: dict[str, Tier] = {"gpu": "gpu", "cpu": "cpu"}
_SWEEP_MIN = 1024
MAX_EXTRA_BYTES = 4096  # one engine block's extra keys, encoded (a salt is a client's string)


ParentKey = Callable[[int, int], "int | None"]  # (engine hash, group) → its newest key


def _same_run(ev, cls, medium: str, group: int) -> bool:
    """Whether `ev` continues a run of `cls` events of one medium and group (stores: with
    token ids, as a CPU-offload store resolves hashes the run may not have mapped yet)."""
    if ev.__class__ is not cls or ev.medium != medium or ev.group_idx != group:
        return False
    return cls is not BlockStored or bool(ev.token_ids)


class _Refused(Exception):
    pass


@dataclass(slots=True)
class _Store:
    """A BlockStored's effect: `keys` added in `tier`; engine hashes[i] ↔ mapped[i]."""

    tier: Tier
    keys: list[int]
    hashes: Sequence[int]
    mapped: Sequence[int]


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


class EventTranslator:
    """The subscriber's EventSink: applies decoded KV events of each pod to `index`.
    `layout`: the engine-hash maps' (kvindex.engine_maps: "dict" or "packed"); by default
    packed beside the packed index, dicts beside any other. `store_runs`: whether a batch's
    run of stores goes in as one add (_stored_run); by default where the index is packed (its
    numpy calls cost per call, not per key; the dicts' per-key loops gain nothing from it)."""

    def __init__(
        self,
        index: BlockIndex,
        layout: str | None = None,
        *,
        store_runs: bool | None = None,
        clock=time.monotonic,
        clear_every: float = CLEAR_EVERY,
    ) -> None:
        self.index = index
        packed = isinstance(index, KVBlockIndex)
        if layout is None:
            layout = "packed" if packed else "dict"
        self.layout = layout
        self.store_runs = packed if store_runs is None else store_runs
        self._new_map = LAYOUTS[layout]
        self._shards = index.shard_count
        self._emaps: dict[str, EngineMap] = {}
        self._stale: Counter[str] = Counter()  # per pod: entries evicted since its last sweep
        self._sweeping: dict[str, int] = {}  # pod -> where its sweep goes on
        self._events: Counter[str] = Counter()
        self._skipped: Counter[str] = Counter()
        self._unknown_parents = self._removed_unknown = 0
        self._engine_block_size: dict[str, int] = {}
        self.unresolved = UnresolvedHashes()
        self.faults = FaultLog(log, clock)
        self.clears = ClearPace(self.faults, clock, clear_every)  # a clear: a pass over the index

    def _emap(self, pod: str) -> EngineMap:
        emap = self._emaps.get(pod)
        if emap is None:
            emap = self._emaps[pod] = self._new_map(self._shards)
        return emap

    def apply(self, pod: str, model: str, event) -> None:
        """Apply one decoded KV event of `pod` serving `model` (the topic's model)."""
        for due in self.clears.due():
            self._clear(due)
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

    def apply_events(self, pod: str, model: str, events: Sequence[KVEvent]) -> int:
        """Apply one batch's events in order (AllBlocksCleared clears the pod); how many
        raised (each skipped, the rest still apply). vLLM sends a BlockRemoved per evicted
        block, ~70 a request in bench/routing's shared-prefix workload: a run of them with
        one medium and group goes through the index as one removal (see _removed_run); a run
        of stores with token ids, one medium and group, as one add (see _stored_run)."""
        for due in self.clears.due():
            self._clear(due)
        rejected, i, n = 0, 0, len(events)
        while i < n:
            ev = events[i]
            j = i + 1
            cls = ev.__class__
            if cls is BlockRemoved or (cls is BlockStored and ev.token_ids and self.store_runs):
                medium, group = ev.medium, ev.group_idx
                while j < n and _same_run(events[j], cls, medium, group):
                    j += 1
            try:
                if cls is BlockStored and j - i > 1:
                    rejected += self._stored_run(pod, model, events[i:j])
                elif j - i > 1:
                    self._events["BlockRemoved"] += j - i
                    self._removed_run(pod, events[i:j])
                elif cls is AllBlocksCleared:
                    self.clear_pod(pod)
                else:
                    self.apply(pod, model, ev)
            except Exception as exc:  # events the index cannot take; the rest still count
                rejected += j - i
                self.faults.note(
                    pod, "index_rejected", f"the index refused {j - i} event(s): {exc!r}"
                )
            i = j
        return rejected

    def _stored(self, pod: str, model: str, ev: BlockStored) -> None:
        store = self._store_keys(pod, model, ev)
        if store is not None:
            self.index.add(pod, store.keys, store.tier)
            self._emap(pod).put(store.hashes, store.mapped, ev.group_idx)

    def _store_keys(
        self, pod: str, model: str, ev: BlockStored, parent_key: ParentKey | None = None
    ) -> _Store | None:
        """A store's request keys and engine-hash pairs, its checks and counts done; None if
        it is skipped or is a CPU-offload store (applied here: it names known hashes only).
        parent_key(hash, group): the newest key of the parent's hash (the map's, by default)."""
        if ev.kv_cache_spec_kind not in INDEXED_KINDS:
            self._skipped["kv_cache_spec_kind"] += 1
            return None
        tier = TIER_OF_MEDIUM.get(ev.medium.lower())
        if tier is None:
            self._skipped["medium"] += 1
            return None
        emap, g, hashes = self._emap(pod), ev.group_idx, ev.block_hashes
        if not ev.token_ids:  # a CPU-offload store: only hashes we already know
            self._offloaded(pod, tier, g, hashes)
            return None
        if not 0 < ev.block_size <= MAX_ENGINE_BLOCK_SIZE:
            self._skipped["block_size"] += 1
            return None
        if len(ev.token_ids) != ev.block_size * len(hashes):
            self._skipped["token_count"] += 1
            return None
        try:
            first, extras = _placed_extras(ev, self.index.block_size)
        except _Refused:
            self._skipped["extra_keys"] += 1
            return None
        self._engine_block_size[pod] = ev.block_size
        parent = ev.parent_block_hash
        if parent is None:
            pk = model_root(model, ev.lora_name, first)
        else:
            pk = (parent_key or emap.last)(parent, g)
            self.unresolved.note(pod, "parent", 1, int(pk is None))
            if pk is None:
                # An unknown parent (we joined mid-stream, or it had no full index block):
                # chain from the root as llm-d router PR #691 does.
                self._unknown_parents += 1
                pk = model_root(model, ev.lora_name)
        keys = block_keys(ev.token_ids, self.index.block_size, parent=pk, extras=extras)
        # llm-d's length ratio: with n = max(|E|, |R|), E[i*|E|/n] ↔ R[i*|R|/n].
        ne, nr = len(hashes), len(keys)
        if ne == nr or not nr:
            return _Store(tier, keys, hashes if nr else (), keys)
        n = max(ne, nr)
        mapped = [keys[i * nr // n] for i in range(n)]
        return _Store(tier, keys, [hashes[i * ne // n] for i in range(n)], mapped)

    def _offloaded(self, pod: str, tier: Tier, g: int, hashes: Sequence[int]) -> None:
        """A CPU-offload store (no token ids): more copies of blocks whose hashes we know."""
        by_copies: dict[int, list[int]] = {}
        missed = 0
        counts = Counter(hashes)
        resolved = self._emap(pod).resolve(list(counts), g)
        for copies, rs in zip(counts.values(), resolved, strict=True):
            if rs is None:
                missed += copies
            else:
                by_copies.setdefault(copies, []).extend(rs)
        self._skipped["offload_unknown_hash"] += missed
        self.unresolved.note(pod, "offload", len(hashes), missed)
        for copies, keys in by_copies.items():
            self.index.add(pod, keys, tier, copies)

    def _stored_run(self, pod: str, model: str, run: Sequence[BlockStored]) -> int:
        """Consecutive BlockStored events with token ids, of one medium and group, as one
        index add and one engine-map put (a numpy call costs the same for 50 keys as for 500):
        exactly what applying them one by one does, but for when the LRU evicts (once, after
        the run). A parent stored earlier in the run resolves as the map would have answered
        then. A run that names an engine hash twice applies one by one; one whose stores
        share a request key, one add per store. Returns how many events raised (each
        skipped, the rest still apply)."""
        hashes = [h for ev in run for h in ev.block_hashes]
        if len(set(hashes)) != len(hashes):
            return sum(self._apply_one(pod, model, ev) for ev in run)
        g, rejected = run[0].group_idx, 0
        stores: list[_Store] = []
        # Made as parents need them, each pair once (a hostile batch of many events chained
        # to one long store stays linear): engine hash → the keys the run pairs it with, and
        # the answers given. An event's hashes are its own (no hash twice in the run), so a
        # hash's pairs are complete once its store is in.
        paired: dict[int, list[int]] = {}
        newest: dict[int, int] = {}
        indexed = 0

        def parent_key(h: int, group: int) -> int | None:
            nonlocal indexed
            if h in newest:
                return newest[h]
            for s in stores[indexed:]:
                for x, k in zip(s.hashes, s.mapped, strict=True):
                    paired.setdefault(x, []).append(k)
            indexed = len(stores)
            emap, new = self._emap(pod), paired.get(h)
            if new is None:
                return emap.last(h, group)
            rs = emap.resolve((h,), group)[0]
            for k in new:  # put appends: the map's keys, then the run's
                rs = (k,) if rs is None else appended(rs, k) or rs
            newest[h] = rs[-1]
            return rs[-1]

        for ev in run:
            self._events["BlockStored"] += 1
            try:
                store = self._store_keys(pod, model, ev, parent_key)
            except Exception as exc:  # this event only, as one by one
                rejected += 1
                log.debug("index rejected an event from %s: %r", pod, exc)
                continue
            if store is not None:
                stores.append(store)
        if not stores:
            self._sweep()
            return rejected
        # Newest last: the index stamps a batch's first key newest, so stores go in reversed.
        keys = [k for s in reversed(stores) for k in s.keys]
        if len(set(keys)) == len(keys):
            self.index.add(pod, keys, stores[0].tier)
        else:
            for s in stores:
                self.index.add(pod, s.keys, s.tier)
        self._emap(pod).put(
            [h for s in stores for h in s.hashes], [k for s in stores for k in s.mapped], g
        )
        self._sweep()
        return rejected

    def _apply_one(self, pod: str, model: str, ev) -> int:
        """apply, counting an event that raises (1) instead of raising."""
        try:
            self.apply(pod, model, ev)
        except Exception as exc:
            log.debug("index rejected an event from %s: %r", pod, exc)
            return 1
        return 0

    def _removed(self, pod: str, ev: BlockRemoved) -> None:
        tier = TIER_OF_MEDIUM.get(ev.medium.lower())
        if tier is None:
            self._skipped["medium"] += 1
            return
        emap, g = self._emaps.get(pod), ev.group_idx
        known, keys = self._resolve(emap, ev.block_hashes, g)
        self._remove(pod, tier, emap, g, len(ev.block_hashes), known, keys)

    def _removed_run(self, pod: str, run: Sequence[BlockRemoved]) -> None:
        """Consecutive BlockRemoved events of one medium and group, as one removal when that
        is exactly what applying them one by one does: when no engine hash and no request
        key comes twice (an event's removal then touches nothing a later one reads), else
        one by one."""
        first = run[0]
        tier = TIER_OF_MEDIUM.get(first.medium.lower())
        if tier is None:
            self._skipped["medium"] += len(run)
            return
        hashes = [h for ev in run for h in ev.block_hashes]
        emap, g = self._emaps.get(pod), first.group_idx
        known, keys = self._resolve(emap, hashes, g)
        if len(set(hashes)) != len(hashes) or len(set(keys)) != len(keys):
            for ev in run:
                self._removed(pod, ev)
            return
        self._remove(pod, tier, emap, g, len(hashes), known, keys)

    @staticmethod
    def _resolve(
        emap: EngineMap | None, hashes: Sequence[int], g: int
    ) -> tuple[list[int], list[int]]:
        """(the engine hashes the pod's map knows, the request keys they map to)."""
        known: list[int] = []
        keys: list[int] = []
        if emap is not None:
            for h, rs in zip(hashes, emap.resolve(hashes, g), strict=True):
                if rs is not None:
                    known.append(h)
                    keys.extend(rs)
        return known, keys

    def _remove(
        self,
        pod: str,
        tier: Tier,
        emap: EngineMap | None,
        g: int,
        looked: int,
        known: list[int],
        keys: list[int],
    ) -> None:
        missed = looked - len(known)
        self._removed_unknown += missed
        self.unresolved.note(pod, "removed", looked, missed)
        if not known or emap is None:
            return
        gone = set(self.index.remove(pod, keys, tier))
        emap.forget(known, g, gone)  # those that refer to nothing this pod holds any more

    def clear_pod(self, pod: str) -> None:
        """Drop every entry and mapping of `pod` (engine restart, reset, pod gone): at once,
        or at the end of its pacing period if it was cleared less than that ago."""
        if self.clears.now_or_later(pod):
            self._clear(pod)

    def _clear(self, pod: str) -> None:
        self.index.clear_pod(pod, self._forget(pod))

    def release_pod(self, pod: str) -> None:
        """Stop following `pod` here (another replica subscribes to it now): its mappings go,
        and its entries in this index; a shared index keeps them for the new writer."""
        keys = self._forget(pod)
        self.clears.forget(pod)
        if isinstance(self.index, SharedBlockIndex):
            self.index.release_pod(pod, keys)
        else:
            self.index.clear_pod(pod, keys)

    def _forget(self, pod: str) -> Iterable[int]:
        """Drop `pod`'s mappings; the keys its engine-hash map held (for the index's clear)."""
        emap = self._emaps.pop(pod, None)
        self._stale.pop(pod, None)
        self._sweeping.pop(pod, None)
        self._engine_block_size.pop(pod, None)
        return () if emap is None else emap.keys()

    def engine_block_size(self, pod: str) -> int | None:
        """The block size of `pod`'s engine, from its BlockStored events; None before any."""
        return self._engine_block_size.get(pod)

    def _sweep(self) -> None:
        # Mappings whose keys the LRU evicted would stay until their BlockRemoved (forever if
        # it was lost); their chains are unreachable anyway, as a lookup stops at the evicted
        # key. Sweep once a quarter of a pod's mappings may be stale (amortized O(1)), a part
        # of one pod's map per call (short pauses).
        for pod, n in self.index.take_evictions().items():
            emap = self._emaps.get(pod)
            if emap is None:
                continue
            self._stale[pod] += n
            if pod not in self._sweeping and self._stale[pod] > max(_SWEEP_MIN, len(emap) // 4):
                self._sweeping[pod], self._stale[pod] = 0, 0
        if self._sweeping:
            pod, cursor = next(iter(self._sweeping.items()))
            holds = self.index.holds_any
            cursor = self._emaps[pod].sweep(lambda keys: holds(pod, keys), cursor)
            if cursor is None:
                del self._sweeping[pod]
            else:
                self._sweeping[pod] = cursor

    # --- accounting

    def stats(self) -> dict:
        """The index's counts and the translation's; O(pods) (and O(shards) a pod for dicts)."""
        out = self.index.stats()
        out["bytes"] += sum(m.approx_bytes() for m in self._emaps.values())
        out.update(
            engine_hashes=sum(map(len, self._emaps.values())),
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
        own = self.index.memory_bytes(seen)
        return own + sum(m.memory_bytes(seen) for m in self._emaps.values())

    def bytes_per_entry(self) -> float:
        return self.memory_bytes() / max(1, self.index.stats()["entries"])
