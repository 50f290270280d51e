"""A run of BlockStored events goes through the index as one add and one engine-map put
(EventTranslator.apply_events): pinned against applying the same events one by one — the
entries, counts, engine-hash maps and LRU order — on random batches with what makes a merge
unsafe: chains whose parent was stored earlier in the same run, an engine hash stored twice,
engine blocks smaller and larger than the index's, a hash re-stored with another key, mixed
mediums and groups, offload stores and events that raise or are skipped in the middle."""

from __future__ import annotations

import random

import pytest

from infergw.kvindex.dict_index import DictBlockIndex
from infergw.kvindex.events import BlockRemoved, BlockStored
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.translate import EventTranslator
from tests.kvindex.translator_replay import PODS, one_by_one, state


def lru_order(index) -> list[int]:
    """The index's keys, least recently used first."""
    if isinstance(index, KVBlockIndex):
        index._flush_touches()
        t = index._table
        live = t.live_positions()
        return t.keys[live[t.stamps[live].argsort(kind="stable")]].tolist()
    return [k for shard in index._shards for k in shard]


def store_run(rng: random.Random, hashes: list[int], pod_hashes: list[int]):
    """2-8 stores, mostly chained (a parent from earlier in the run or before), with fresh
    hashes mostly; sometimes one that cannot apply or that raises."""
    events = []
    for _ in range(rng.randrange(2, 9)):
        bs = rng.choice((8, 16, 16, 32))
        n = rng.randrange(1, 6)
        fresh = rng.random() < 0.9
        hs = tuple(next(hashes) if fresh else rng.choice(pod_hashes or [1]) for _ in range(n))
        parent = rng.choice([None, *pod_hashes[-4:]]) if rng.random() < 0.8 else 10**9
        tokens = [rng.randrange(60) for _ in range(bs * n)]
        roll = rng.random()
        if roll < 0.04:
            tokens[0] = 2**40  # outside uint32: the event raises
        elif roll < 0.08:
            tokens = tokens[:-1]  # token count does not match: skipped
        medium = "GPU" if rng.random() < 0.9 else "CPU"
        group = 0 if rng.random() < 0.9 else 1
        events.append(BlockStored(hs, parent, tuple(tokens), bs, medium=medium, group_idx=group))
        pod_hashes.extend(hs)
    if rng.random() < 0.2:  # an offload store of known hashes ends the run
        events.insert(rng.randrange(len(events)), BlockStored(tuple(pod_hashes[-3:]), None, (), 16))
    if rng.random() < 0.3:
        events.append(BlockRemoved((rng.choice(pod_hashes),)))
    return events


@pytest.mark.parametrize("layout", [DictBlockIndex, KVBlockIndex])
@pytest.mark.parametrize("seed", range(10))
def test_a_run_of_stores_ends_as_one_by_one_does(layout, seed):
    rng = random.Random(seed)
    merged, single = EventTranslator(layout(), store_runs=True), EventTranslator(layout())
    hashes = iter(range(2, 10**6))
    stored = {p: [] for p in PODS}
    for _ in range(30):
        pod = rng.choice(PODS)
        events = store_run(rng, hashes, stored[pod])
        raised = sum(
            isinstance(ev, BlockStored) and any(t > 2**32 for t in ev.token_ids) for ev in events
        )
        assert merged.apply_events(pod, "m", events) == raised
        one_by_one_counting(single, pod, events)
        assert state(merged) == state(single)
        assert lru_order(merged.index) == lru_order(single.index)
    assert merged.stats()["events"] == single.stats()["events"]


def one_by_one_counting(tr: EventTranslator, pod: str, events) -> None:
    """one_by_one, events that raise skipped as apply_events skips them."""
    for ev in events:
        try:
            one_by_one(tr, pod, [ev])
        except ValueError:
            pass


def test_a_chain_within_one_batch_resolves_its_parents():
    """Three events of one request in one batch, each the parent of the next: one add, and
    the keys chain exactly as three separate applies chain them."""
    stores = [
        BlockStored((10 + i,), 9 + i if i else None, tuple(range(16 * i, 16 * i + 16)), 16)
        for i in range(3)
    ]
    merged, single = EventTranslator(KVBlockIndex()), EventTranslator(KVBlockIndex())
    assert merged.store_runs
    assert merged.apply_events(PODS[0], "m", stores) == 0
    one_by_one(single, PODS[0], stores)
    assert merged.index.keys_of(PODS[0]) == single.index.keys_of(PODS[0])
    assert len(merged.index.keys_of(PODS[0])) == 3
    assert merged.stats()["unknown_parents"] == 0


def test_a_hostile_batch_of_many_stores_chained_to_one_long_store_ends_as_one_by_one():
    """A long store, then thousands of one-block stores whose parent is its last hash (engine
    blocks of 64 tokens: each hash has 4 keys): each parent resolves once, and the result is
    what one by one gives."""
    long = BlockStored(tuple(range(2, 2002)), None, tuple(i % 50 for i in range(64 * 2000)), 64)
    leaves = [
        BlockStored((10_000 + i,), 2001, tuple((i + j) % 50 for j in range(16)), 16)
        for i in range(3000)
    ]
    merged, single = EventTranslator(KVBlockIndex()), EventTranslator(KVBlockIndex())
    assert merged.apply_events(PODS[0], "m", [long, *leaves]) == 0
    one_by_one(single, PODS[0], [long, *leaves])
    assert state(merged) == state(single)
    assert merged.stats()["unknown_parents"] == 0
