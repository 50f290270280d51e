"""The packed layout: kvindex.packed's key table against a dict, and the packed block index
against the previous dict layout (kvindex.dict_index), op by op, in small batches (key by key)
and big ones (numpy)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infergw.kvindex.dict_index import DictBlockIndex
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.packed import GROW_LOAD, MAX_LOAD, SMALL, WAYS, KeyTable

# Few distinct keys, so batches repeat and share them; 0 and 1 are the reserved ones.
KEYS = st.one_of(st.integers(0, 40), st.integers(2**64 - 3, 2**64 - 1))
BATCH = st.lists(KEYS, max_size=3 * SMALL)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["upsert", "delete", "find"]), BATCH), max_size=40))
def test_key_table_agrees_with_a_dict(ops):
    table, model = KeyTable(), {}  # key -> value we wrote at its position
    for n, (op, keys) in enumerate(ops):
        small = n % 2 == 0
        if op == "upsert":
            if small:
                pos, fresh = table.upsert_small(keys)
            else:
                pos, fresh, _ = table.upsert(np.array(keys, dtype=np.uint64))
                pos, fresh = pos.tolist(), fresh.tolist()
            before, first = set(model), {}
            for i, (k, j, f) in enumerate(zip(keys, pos, fresh, strict=True)):
                if k <= 1:
                    assert j == -1 and not f
                    continue
                assert first.setdefault(k, j) == j  # a repeat finds the same slot
                assert f == (k not in before) or k in keys[:i]
                if k not in model:
                    model[k] = n
                    table.set_vals([j], [n])
        elif op == "delete":
            gone = sorted({k for k in keys if k in model})
            table.delete(table.find_small(gone) if small else table.find(np.array(gone, "u8")))
            for k in gone:
                del model[k]
        probe = [*range(45), 2**64 - 3, 2**64 - 2, 2**64 - 1]
        for pos in (table.find_small(probe), table.find(np.array(probe, "u8")).tolist()):
            found = {k: table.get_vals([j])[0] for k, j in zip(probe, pos, strict=True) if j >= 0}
            assert found == model
        assert table.live == len(model)


def test_key_table_grows_and_shrinks_and_keeps_every_key():
    table = KeyTable()
    keys = np.random.default_rng(5).integers(2, 2**64 - 1, 200_000, dtype=np.uint64)
    for chunk in np.split(keys, 100):
        pos, fresh, plain = table.upsert(chunk)
        assert plain and fresh.all()
        table.vals[pos] = chunk & np.uint64(0xFFFF)
    assert table.live == len(keys) and 0.9 * GROW_LOAD < table.live / table.keys.size <= MAX_LOAD
    pos = table.find(keys)
    assert (table.vals[pos] == keys & np.uint64(0xFFFF)).all()
    table.delete(pos[10_000:].tolist())
    assert table.live == 10_000 and table.keys.size < 100_000  # shrunk
    assert (table.find(keys[:10_000]) >= 0).all() and (table.find(keys[10_000:]) < 0).all()


def test_batches_racing_for_one_bucket_and_reusing_deleted_slots_keep_every_key():
    # A big table, so batches go through the rounds (not the dense path), with keys picked to
    # share a bucket: they race for its first free slot, and the losers must try again.
    rng = np.random.default_rng(9)
    table, model = KeyTable(), {}  # key -> value
    pool = rng.integers(2, 2**64 - 1, 400_000, dtype=np.uint64)
    start = pool[:40_000]
    pos, fresh, _ = table.upsert(start)
    table.vals[pos] = np.arange(len(start), dtype=np.uint32)
    model.update(zip(start.tolist(), range(len(start)), strict=True))
    spare = pool[40_000:]
    for n in range(40):
        buckets = table._bucket(spare)
        crowded = spare[buckets == np.bincount(buckets).argmax()][:40]  # one bucket's worth
        old = rng.choice(np.array(list(model), dtype=np.uint64), 30, replace=False)
        batch = np.concatenate([crowded, spare[-200:], old])
        spare = spare[~np.isin(spare, batch)]
        pos, fresh = table.upsert_distinct(batch)
        assert len(set(pos.tolist())) == len(batch)
        assert fresh.tolist() == [k not in model for k in batch.tolist()]
        for k, j, f in zip(batch.tolist(), pos.tolist(), fresh.tolist(), strict=True):
            if f:
                model[k] = table.vals[j] = 100_000 + n
            else:
                assert table.vals[j] == model[k]
        gone = rng.choice(np.array(list(model), dtype=np.uint64), 300, replace=False)
        table.delete(table.find(gone))
        for k in gone.tolist():
            del model[k]
        assert table.live == len(model) and table.deleted > 0
    keys = np.array(list(model), dtype=np.uint64)
    assert table.vals[table.find(keys)].tolist() == list(model.values())
    assert (table.find(gone) < 0).all()


def test_keys_aimed_at_one_bucket_still_spread():
    # Keys sharing their high bits would share a bucket without the secret multiplier.
    table = KeyTable()
    keys = (np.uint64(0xABCD) << np.uint64(48)) + np.arange(2, 50_002, dtype=np.uint64)
    table.upsert(keys)
    assert (table.find(keys) >= 0).all()
    filled = (table.keys.reshape(-1, WAYS) > 1).any(1).mean()
    assert filled > 0.9


# --- the block index against the previous layout

PODS = st.sampled_from(["a:1", "b:1", "c:1"])
CHAIN = st.integers(0, 3).flatmap(
    lambda c: st.integers(1, 3 * SMALL).map(lambda n: [c * 1000 + i + 2 for i in range(n)])
)
OPS = st.one_of(
    st.tuples(st.just("add"), PODS, CHAIN, st.sampled_from(["gpu", "cpu"]), st.integers(1, 3)),
    st.tuples(st.just("remove"), PODS, CHAIN, st.sampled_from(["gpu", "cpu"])),
    st.tuples(st.just("speculate"), PODS, CHAIN),
    st.tuples(st.just("clear"), PODS),
    st.tuples(st.just("tick"), st.floats(0, 3)),
    st.tuples(st.just("lookup"), CHAIN, st.booleans()),
)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@settings(max_examples=120, deadline=None)
@given(st.lists(OPS, max_size=30), st.sampled_from([40, 100, 10_000]))
def test_packed_index_answers_as_the_dict_layout_did(ops, max_entries):
    clock = Clock()
    new = KVBlockIndex(block_size=2, max_entries=max_entries, clock=clock)
    old = DictBlockIndex(block_size=2, max_entries=max_entries, clock=clock)
    for op, *args in ops:
        if op == "tick":
            clock.now += args[0]
            continue
        if op == "lookup":
            keys, with_pods = args
            pods = ["a:1", "b:1", "c:1", "z:9"] if with_pods else None
            assert new.lookup(keys, pods) == pytest.approx(old.lookup(keys, pods))
            assert new.match_lengths(keys, pods) == old.match_lengths(keys, pods)
            continue
        results = []
        for index in (new, old):
            if op == "add":
                index.add(args[0], args[1], args[2], args[3])
            elif op == "remove":
                results.append(index.remove(*args))
            elif op == "speculate":
                index.add_speculative(*args)
            else:
                index.clear_pod(args[0])
        if results:
            assert results[0] == results[1]
        for pod in ("a:1", "b:1", "c:1"):
            for tier in (None, "gpu", "cpu"):
                assert new.keys_of(pod, tier) == old.keys_of(pod, tier)
        s_new, s_old = new.stats(), old.stats()
        for field in ("entries", "keys", "pods", "speculative", "evicted"):
            assert s_new[field] == s_old[field], field
        assert new.take_evictions() == old.take_evictions()


def test_pods_past_the_packed_range_and_huge_counts_keep_exact_records():
    index = KVBlockIndex(block_size=2)
    for i in range(0x8000):  # the next pod's index does not fit a packed value
        index._pod(f"10.9.{i >> 8}.{i & 255}:1")
    keys = list(range(2, 2 + 2 * SMALL))
    index.add("far:1", keys, "gpu")
    index.add("a:1", keys[:3], "gpu", copies=300)  # past a packed count
    assert index.match_lengths(keys) == {"far:1": len(keys), "a:1": 3}
    assert index.lookup(keys, ["a:1"]) == {"a:1": 3.0}
    for _ in range(299):
        index.remove("a:1", keys[:3], "gpu")
    assert index.keys_of("a:1") == set(keys[:3])
    assert index.remove("a:1", keys[:3], "gpu") == keys[:3]
    assert index.keys_of("far:1") == set(keys) and index.stats()["entries"] == len(keys)


def test_a_lookup_of_a_shared_prefix_is_a_use_the_lru_sees():
    # Keys two pods hold are walked in their records, without probing the table for their
    # slots: their use is stamped later, but before any eviction reads the stamps.
    index = KVBlockIndex(block_size=2, max_entries=1000)
    shared = list(range(2, 102))
    index.add("a:1", shared, "gpu")
    index.add("b:1", shared, "gpu")
    others = list(range(1000, 1700))
    index.add("c:1", others, "gpu")  # newer than the shared keys
    assert index.lookup(shared) == {"a:1": 100.0, "b:1": 100.0}  # now the newest
    index.add("c:1", list(range(5000, 5200)), "gpu")  # past the bound: the oldest go
    assert index.take_evictions() == {"c:1": 103}
    assert index.match_lengths(shared) == {"a:1": 100, "b:1": 100}
    assert index.keys_of("c:1") == set(others[:597]) | set(range(5000, 5200))
