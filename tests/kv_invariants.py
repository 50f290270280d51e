"""Invariants of a KV-event stream from one vLLM engine, and of the index (test helpers)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from infergw.kvindex.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from infergw.kvindex.index import _FIELDS, _POD, KVBlockIndex


def check_event_stream(batches: Iterable[EventBatch], *, strict: bool = False) -> int:
    """Raise AssertionError at the first event that breaks an invariant.

    Blocks are keyed by (medium, group_idx, hash) and ref-counted: vLLM can keep two
    copies of an identical block and then emits a BlockRemoved for each. Such a
    re-store of a currently-stored hash fails only with strict=True; otherwise it
    is counted, and the count is returned.
    """
    stored: Counter[tuple[str, int, int]] = Counter()
    restores = 0
    for b, batch in enumerate(batches):
        for e, event in enumerate(batch.events):
            where = f"batch {b} (ts={batch.ts}) event {e}"
            if isinstance(event, BlockStored):
                tier = (event.medium, event.group_idx)
                n_tokens, n_blocks = len(event.token_ids), len(event.block_hashes)
                assert n_tokens == event.block_size * n_blocks, (
                    f"{where}: BlockStored has {n_tokens} token ids for {n_blocks} blocks "
                    f"of size {event.block_size} (expected {event.block_size * n_blocks})"
                )
                assert len(set(event.block_hashes)) == n_blocks, (
                    f"{where}: BlockStored repeats a hash within one event"
                )
                parent = event.parent_block_hash
                assert parent is None or stored[(*tier, parent)] > 0, (
                    f"{where}: BlockStored parent {parent:#x} is not currently stored"
                )
                for h in event.block_hashes:
                    if stored[(*tier, h)] > 0:
                        assert not strict, f"{where}: BlockStored re-stores stored hash {h:#x}"
                        restores += 1
                    stored[(*tier, h)] += 1
            elif isinstance(event, BlockRemoved):
                tier = (event.medium, event.group_idx)
                for h in event.block_hashes:
                    assert stored[(*tier, h)] > 0, (
                        f"{where}: BlockRemoved of hash {h:#x} that is not currently stored"
                    )
                    stored[(*tier, h)] -= 1
            elif isinstance(event, AllBlocksCleared):
                stored.clear()
            else:
                raise AssertionError(f"{where}: unexpected event {event!r}")
    return restores


def check_index_consistent(index: KVBlockIndex) -> None:
    """Raise AssertionError if the index's counters disagree with the entries it holds, or it
    holds an entry with no copy in any tier (a test helper that reads the index's layout)."""
    per_pod: Counter[int] = Counter()
    keys = 0
    for key, slots in index._items():
        assert slots, f"key {key:#x} has no record"
        for slot in slots:
            assert slot & _FIELDS, f"key {key:#x} has an empty slot for pod {slot >> _POD}"
            per_pod[slot >> _POD] += 1
        keys += 1
    assert keys == index._table.live == index.stats()["keys"]
    assert sum(per_pod.values()) == index._n
    for p, n in enumerate(index._pod_n):
        assert n == per_pod[p], f"pod {index._names[p]} counts {n} entries, holds {per_pod[p]}"
