"""kvindex.engine_maps: the translator's engine-hash maps in dicts and packed answer alike, stay
exact where the packed table cannot hold a hash as one key, and stay bounded."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from infergw.kvindex.dict_index import DictBlockIndex
from infergw.kvindex.engine_maps import MAX_KEYS_PER_HASH, DictEngineMap, PackedEngineMap
from infergw.kvindex.events import AllBlocksCleared, BlockRemoved, BlockStored
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.translate import EventTranslator

PODS = st.sampled_from(["a:1", "b:1"])
HASHES = st.lists(st.integers(0, 12) | st.sampled_from([2**64 - 1, 2**63]), max_size=6)
GROUP = st.sampled_from([0, 0, 1, 2**64 - 1])
TOKENS = st.integers(0, 3)
STORE = st.builds(
    lambda hashes, parent, bs, tok, group, medium, offload: BlockStored(
        tuple(hashes),
        parent,
        () if offload else tuple((tok + i) % 5 for i in range(bs * len(hashes))),
        bs,
        medium=medium,
        group_idx=group,
    ),
    HASHES,
    st.none() | st.integers(0, 12),
    st.sampled_from([1, 2, 4, 8]),  # the index block is 2: engine blocks shorter and longer
    TOKENS,
    GROUP,
    st.sampled_from(["GPU", "cpu"]),
    st.booleans(),
)
REMOVE = st.builds(
    lambda hashes, group, medium: BlockRemoved(tuple(hashes), medium, group),
    HASHES,
    GROUP,
    st.sampled_from(["GPU", "CPU"]),
)
EVENTS = st.tuples(PODS, STORE | REMOVE | st.just(AllBlocksCleared()))


def _state(sink: EventTranslator) -> tuple:
    index = sink.index
    held = {(p, t): index.keys_of(p, t) for p in ("a:1", "b:1") for t in ("gpu", "cpu")}
    s = sink.stats()
    counts = {k: s[k] for k in ("entries", "engine_hashes", "skipped", "removed_unknown")}
    return held, counts, s["unknown_parents"], s["unresolved"]


@settings(max_examples=150, deadline=None)
@given(st.lists(EVENTS, max_size=40), st.sampled_from([KVBlockIndex, DictBlockIndex]))
def test_packed_maps_translate_as_the_dicts_do(events, index_type):
    sinks = [
        EventTranslator(index_type(block_size=2), layout, clear_every=0)
        for layout in ("dict", "packed")
    ]
    for pod, ev in events:
        for sink in sinks:
            sink.apply(pod, "m", ev)
        assert _state(sinks[0]) == _state(sinks[1])
    for pod in ("a:1", "b:1"):
        for sink in sinks:
            sink.clear_pod(pod)
        assert _state(sinks[0]) == _state(sinks[1])
    assert sinks[1].stats()["engine_hashes"] == 0


def test_a_hash_the_table_cannot_hold_is_kept_beside_it():
    for m in (PackedEngineMap(), DictEngineMap(4)):
        if isinstance(m, PackedEngineMap):
            m._salt = 77  # so hash 77 (and 76) fold onto the table's reserved keys
        m.put([77, 76, 5], [1000, 1001, 1002], 0)
        assert m.resolve([77, 76, 5, 6], 0) == [(1000,), (1001,), (1002,), None]
        assert m.last(77, 0) == 1000 and len(m) == 3
        m.forget([77, 5], 0, {1000, 1002})
        assert m.resolve([77, 76, 5], 0) == [None, (1001,), None]
        assert sorted(m.keys()) == [1001]


def test_many_keys_of_one_hash_keep_the_newest_in_order():
    for m in (PackedEngineMap(), DictEngineMap(1)):
        keys = list(range(10, 10 + MAX_KEYS_PER_HASH + 5))
        m.put([3] * len(keys), keys, 1)  # one batch of repeats
        m.put([4], [99], 1)
        m.put([4], [98], 1)  # a second key for a hash the table held alone
        assert m.resolve([3], 1) == [tuple(keys[-MAX_KEYS_PER_HASH:])]
        assert m.resolve([4, 3], 0) == [None, None]  # another group
        assert m.last(4, 1) == 98 and m.resolve([4], 1) == [(99, 98)]


def test_a_sweep_drops_what_the_pod_no_longer_holds_and_the_table_shrinks():
    m = PackedEngineMap()
    n = 50_000
    m.put(list(range(2, n + 2)), list(range(10**6, 10**6 + n)), 0)
    full = m.approx_bytes()
    kept = set(range(10**6, 10**6 + n, 100))
    cursor = 0
    while cursor is not None:
        cursor = m.sweep(lambda keys: keys[0] in kept, cursor)
    assert sorted(m.keys()) == sorted(kept)
    assert m.approx_bytes() < full / 4


def test_the_packed_maps_follow_the_packed_index_and_dicts_the_dict_index():
    assert EventTranslator(KVBlockIndex()).layout == "packed"
    assert EventTranslator(DictBlockIndex()).layout == "dict"
    assert EventTranslator(KVBlockIndex(), "dict").layout == "dict"


def test_hashes_of_different_groups_never_share_a_table_key():
    """Group 1's hash 2**64-1 and group 2**64-1's hash 1 once folded onto one key (a product of
    the group and a secret differs between those two groups by ~1, whatever the secret)."""
    m = PackedEngineMap()
    m.put([1], [10], 2**64 - 1)
    m.put([2**64 - 1], [20], 1)
    assert m.resolve([1], 2**64 - 1) == [(10,)]
    assert m.resolve([2**64 - 1], 1) == [(20,)]
    assert len(m) == 2
