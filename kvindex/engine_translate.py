"""vLLM KV events → the block index, in the "engine keys" mode: the index is keyed by the
engines' own block hashes, which the picker computes for prompts (kvindex.engine_hashing).

No per-pod map is kept (kvindex.translate needs one to turn engine hashes into request keys):
a store adds its hashes, a CPU-offload store adds more copies of them, a removal removes them,
all straight by hash. A run of stores (or removals) of one tier is one index call. Token ids
matter only where a request starts, so the subscriber may decode only those
(kvindex.events.decode_batch(tokens=False)): other stores come with their count alone.

The mode is only right if the picker hashes as the engines do; a wrong seed, algorithm, block
size or adapter path would make every lookup miss, silently. So each store that starts a
request (no parent) is checked: its first block's hash, computed from the event's token ids
and extra keys, must equal the hash the engine sent. A miss is counted per pod (the
`unresolved` counts, kind "root_mismatch", as kvindex.unresolved's) and logged with the
settings to compare. Every fault (a store of another block size, a token count that does not
fill its blocks, another medium or cache kind, an event the index refuses) is counted per pod
and kind and logged at most once per `LOG_EVERY` seconds per (pod, kind) (kvindex.fault_log).
A pod's clears are paced (kvindex.clear_pace): each is a pass over the whole index.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence

from infergw.kvindex.backend import BlockIndex, SharedBlockIndex
from infergw.kvindex.clear_pace import CLEAR_EVERY, ClearPace
from infergw.kvindex.engine_hashing import EngineKeys
from infergw.kvindex.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from infergw.kvindex.fault_log import FaultLog
from infergw.kvindex.translate import INDEXED_KINDS, TIER_OF_MEDIUM
from infergw.kvindex.unresolved import MAX_PODS

log = logging.getLogger("kvindex.engine_translate")

ROOT_MISMATCH = "root_mismatch"  # the unresolved-counts kind of a first block hashed otherwise


class EngineKeyTranslator:
    """The subscriber's EventSink when the index is keyed by engine block hashes."""

    def __init__(
        self,
        index: BlockIndex,
        engine: EngineKeys,
        clock=time.monotonic,
        clear_every: float = CLEAR_EVERY,
    ) -> None:
        if index.block_size != engine.block_size:
            raise ValueError(
                f"the index's block size ({index.block_size}) must be the engines' "
                f"({engine.block_size}) when it is keyed by their hashes"
            )
        self.index = index
        self.engine = engine
        self._clock = clock
        self._events: Counter[str] = Counter()
        self._skipped: Counter[str] = Counter()
        self._roots: dict[str, list[int]] = {}  # pod → [checked, mismatched]
        self.faults = FaultLog(log, clock)
        self._pods: set[str] = set()
        self.clears = ClearPace(self.faults, clock, clear_every)

    # --- the EventSink

    def apply(self, pod: str, model: str, event) -> None:
        """Apply one decoded KV event of `pod`. The model is not needed: vLLM's hashes leave
        it out (one engine serves one base model; a LoRA adapter is in the hashes), and a
        lookup names the pods that serve the prompt's model."""
        self.apply_events(pod, model, (event,))

    def apply_events(self, pod: str, model: str, events: Sequence[KVEvent]) -> int:
        """Apply one batch's events in order; how many raised (each skipped, the rest apply).
        A run of stores (or of removals) of one medium is one index call."""
        for due in self.clears.due():
            self._clear(due)
        rejected, i, n = 0, 0, len(events)
        while i < n:
            ev, j = events[i], i + 1
            cls = ev.__class__
            if cls is BlockStored or cls is BlockRemoved:
                medium = ev.medium
                while j < n and events[j].__class__ is cls and events[j].medium == medium:
                    j += 1
                try:
                    self._run(pod, cls, events[i:j])
                except Exception as exc:  # events the index cannot take; the rest still count
                    rejected += j - i
                    self.faults.note(
                        pod,
                        "index_rejected",
                        f"the index refused {j - i} {cls.__name__} event(s): {exc!r}",
                    )
            elif cls is AllBlocksCleared:
                self._events["AllBlocksCleared"] += 1
                self.clear_pod(pod)
            else:
                self._events[cls.__name__] += 1
                self._skip(
                    pod, "unknown_event", f"an event the index does not take ({cls.__name__})"
                )
            i = j
        return rejected

    def _run(
        self, pod: str, cls: type, run: Sequence[BlockStored] | Sequence[BlockRemoved]
    ) -> None:
        self._events[cls.__name__] += len(run)
        tier = TIER_OF_MEDIUM.get(run[0].medium.lower())
        if tier is None:
            self._skip(
                pod,
                "medium",
                f"{len(run)} {cls.__name__} event(s) of medium "
                f"{run[0].medium[:64]!r}, not one of {sorted(TIER_OF_MEDIUM)}",
                len(run),
            )
            return
        if cls is BlockRemoved:
            # Hashes this pod does not hold (stored before we subscribed, evicted, or made
            # up) remove nothing.
            hashes = [h for ev in run for h in ev.block_hashes]
            if len(set(hashes)) == len(hashes):
                self.index.remove(pod, hashes, tier)
            else:
                for ev in run:
                    self.index.remove(pod, ev.block_hashes, tier)
            return
        parts = [hs for ev in run if (hs := self._stored_hashes(pod, ev))]
        # The index stamps an add's first key newest: the run's last store goes first.
        keys = [h for hs in reversed(parts) for h in hs]
        if len(set(keys)) == len(keys):
            if keys:
                self.index.add(pod, keys, tier)
        else:
            for hs in parts:
                self.index.add(pod, hs, tier)

    def _stored_hashes(self, pod: str, ev: BlockStored) -> Sequence[int] | None:
        """A store's hashes to add, its checks and counts done; None if it is skipped."""
        if ev.kv_cache_spec_kind not in INDEXED_KINDS:
            self._skip(
                pod,
                "kv_cache_spec_kind",
                f"a store of cache kind "
                f"{ev.kv_cache_spec_kind[:64]!r}, not one of {sorted(INDEXED_KINDS)}",
            )
            return None
        bs = self.engine.block_size
        count = len(ev.token_ids) if ev.token_count is None else ev.token_count
        if count:  # else a CPU-offload store: more copies of known hashes
            if ev.block_size != bs:
                self._skipped["block_size"] += 1
                self._mismatch(pod, "block_size", f"block size {ev.block_size}")
                return None
            if count != bs * len(ev.block_hashes):
                self._skip(
                    pod,
                    "token_count",
                    f"a store of {len(ev.block_hashes)} block "
                    f"hash(es) and {count} token ids, not {bs} a block",
                )
                return None
            if ev.parent_block_hash is None and ev.block_hashes and ev.token_ids:
                self._check_root(pod, ev)
        self._pods.add(pod)
        return ev.block_hashes

    def _check_root(self, pod: str, ev: BlockStored) -> None:
        """Compare a request's first block with the hash the picker computes for it."""
        extra = self._tagged_first_extras(ev)
        if extra is False:
            return  # extra keys the picker cannot rebuild (multimodal, an unknown adapter)
        counts = self._roots.get(pod)
        if counts is None:
            if len(self._roots) >= MAX_PODS:
                del self._roots[next(iter(self._roots))]
            counts = self._roots[pod] = [0, 0]
        counts[0] += 1
        if self.engine.first_block(ev.token_ids, extra) != ev.block_hashes[0]:
            counts[1] += 1
            self._mismatch(pod, ROOT_MISMATCH, "a request's first block")

    def _tagged_first_extras(self, ev: BlockStored):
        """The first block's extra keys as vLLM hashed them, from the event's untagged ones
        (the LoRA name, then the cache salt); False if they cannot be rebuilt."""
        entry = ev.extra_keys[0] if ev.extra_keys else None
        lora = ev.lora_name
        if lora and not self.engine.knows(lora):
            return False
        rest = () if entry is None else entry
        if rest.__class__ is not tuple:
            return False
        if lora:
            if not rest or rest[0] != lora:
                return False
            rest = rest[1:]
        if len(rest) > 1 or (rest and rest[0].__class__ is not str):
            return False  # multimodal keys, or something vLLM does not send for text
        return self.engine.extra_keys(0, lora, rest[0] if rest else None)

    def _skip(self, pod: str, kind: str, detail: str, n: int = 1) -> None:
        self._skipped[kind] += n
        self.faults.note(pod, kind, f"skipped {detail}")

    def _mismatch(self, pod: str, kind: str, what: str) -> None:
        self.faults.note(
            pod,
            kind,
            f"{what} does not hash as the picker hashes it ({self.engine.hashing.describe()}, "
            f"LoRA paths configured: {len(self.engine.hashing.lora_paths)}). The index is "
            "keyed by engine hashes (--kv-index-keys engine), so this pod's blocks will never "
            "match a prompt: give the picker the engines' settings, or use --kv-index-keys "
            "tokens",
        )

    # --- pods

    def clear_pod(self, pod: str) -> None:
        """Drop every entry of `pod` (engine restart, reset, pod gone): at once, or at the
        end of its pacing period if it was cleared less than that ago."""
        if self.clears.now_or_later(pod):
            self._clear(pod)

    def _clear(self, pod: str) -> None:
        self._pods.discard(pod)
        self.index.clear_pod(pod)

    def release_pod(self, pod: str) -> None:
        """Stop following `pod` here (another replica subscribes to it now): its entries go
        from this index; a shared index keeps them for the new writer."""
        self._pods.discard(pod)
        self.clears.forget(pod)
        if isinstance(self.index, SharedBlockIndex):
            self.index.release_pod(pod)
        else:
            self.index.clear_pod(pod)

    def engine_block_size(self, pod: str) -> int | None:
        """A pod's engine block size: the configured one, once its stores were taken."""
        return self.engine.block_size if pod in self._pods else None

    # --- accounting

    def root_checks(self) -> dict[str, tuple[int, int]]:
        """Per pod, (requests' first blocks checked, of which hashed otherwise)."""
        return {pod: (c[0], c[1]) for pod, c in self._roots.items()}

    def stats(self) -> dict:
        """The index's counts and the events'; O(pods)."""
        out = self.index.stats()
        out.update(
            engine_hashes=0,
            events=dict(self._events),
            skipped=dict(self._skipped),
            unknown_parents=0,
            removed_unknown=0,
            unresolved={pod: {ROOT_MISMATCH: c[1]} for pod, c in self._roots.items() if c[1]},
        )
        return out

    def memory_bytes(self) -> int:
        """The index's memory: there are no maps beside it."""
        return self.index.memory_bytes(set())

    def bytes_per_entry(self) -> float:
        return self.memory_bytes() / max(1, self.index.stats()["entries"])
