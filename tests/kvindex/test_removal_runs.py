"""A run of BlockRemoved events goes through the index as one removal (EventTranslator.
apply_events): pinned against applying the same events one by one, on random batches with
what makes a merge unsafe — an engine hash removed twice, hashes sharing a request key (an
engine block smaller than the index's), removals of unknown hashes, CPU copies, mixed
mediums and groups, stores and clears in between."""

from __future__ import annotations

import random

import pytest

from infergw.kvindex.dict_index import DictBlockIndex
from infergw.kvindex.events import AllBlocksCleared, BlockRemoved, BlockStored
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.translate import EventTranslator
from tests.kvindex.translator_replay import PODS, one_by_one, state


def random_batch(rng: random.Random, stored: dict[str, list[tuple[int, ...]]], pod: str):
    """Stores of chains (engine block 8 or 16 tokens, index block 16), then runs of removals
    of hashes the pod stored (some twice, some never stored), sometimes a clear."""
    events = []
    for _ in range(rng.randrange(1, 4)):
        bs = rng.choice((8, 16))
        n = rng.randrange(1, 7)
        hashes = tuple(rng.randrange(1, 400) for _ in range(n))
        tokens = tuple(rng.randrange(50) for _ in range(bs * n))
        parent = rng.choice([None, *[h for c in stored[pod] for h in c][-3:]])
        medium = rng.choice(("GPU", "GPU", "GPU", "CPU"))
        events.append(BlockStored(hashes, parent, tokens, bs, medium=medium))
        stored[pod].append(hashes)
    known = [h for c in stored[pod] for h in c]
    for _ in range(rng.randrange(0, 30)):
        h = rng.choice(known) if known and rng.random() < 0.9 else rng.randrange(1, 400)
        medium = rng.choice(("GPU", "GPU", "GPU", "CPU", "disk"))
        events.append(BlockRemoved((h,), medium, rng.choice((0, 0, 0, 1))))
    if rng.random() < 0.05:
        events.append(AllBlocksCleared())
        stored[pod].clear()
    return events


@pytest.mark.parametrize("layout", [DictBlockIndex, KVBlockIndex])
@pytest.mark.parametrize("seed", range(12))
def test_a_run_of_removals_ends_as_one_by_one_does(layout, seed):
    rng = random.Random(seed)
    merged, single = EventTranslator(layout()), EventTranslator(layout())
    stored = {p: [] for p in PODS}
    for _ in range(40):
        pod = rng.choice(PODS)
        events = random_batch(rng, stored, pod)
        assert merged.apply_events(pod, "m", events) == 0
        one_by_one(single, pod, events)
        assert state(merged) == state(single)
    assert merged.stats()["events"] == single.stats()["events"]


def test_a_run_that_raises_is_counted_and_the_rest_still_apply():
    tr = EventTranslator(DictBlockIndex())
    stored = BlockStored((1, 2), None, tuple(range(32)), 16)
    bad = BlockRemoved((3, 4), None, 0)  # no medium: the run raises
    later = BlockStored((5,), None, tuple(range(100, 116)), 16)
    assert tr.apply_events(PODS[0], "m", [stored, bad, bad, later]) == 2
    assert len(tr.index.keys_of(PODS[0])) == 3
