"""Tests for kvindex.index: the global KV block index, against a real vLLM 0.32 recording and
hand-built events."""

from __future__ import annotations

import base64
import gc
import json
import tracemalloc
from collections import Counter

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from infergw.kvindex import packed
from infergw.kvindex.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    decode_batch,
    decode_replay_frames,
    parse_topic,
)
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.keys import prompt_keys
from infergw.kvindex.translate import EventTranslator
from tests.paths import TINY

FIXTURE = TINY
POD, MODEL = "127.0.0.1:8300", "tiny"
A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"


def _jsonl(name: str) -> list[dict]:
    with open(FIXTURE / name) as f:
        return [json.loads(line) for line in f if line.strip()]


def live_batches():
    return [decode_batch(base64.b64decode(d["payload_b64"])) for d in _jsonl("events.jsonl")]


def replay_batches():
    out = []
    for d in _jsonl("replay.jsonl"):
        msg = decode_replay_frames([base64.b64decode(f) for f in d["frames_b64"]])
        if msg is not None:
            assert parse_topic(msg.topic) == (POD, MODEL)
            out.append(msg.batch)
    return out


class EngineModel:
    """What vLLM holds, tracked independently of the index: engine hashes by copies, and the
    full token prefix behind each hash (chained through parents)."""

    def __init__(self) -> None:
        self.copies: Counter[int] = Counter()
        self.prefix: dict[int, tuple[int, ...]] = {}

    def apply(self, event) -> None:
        if isinstance(event, BlockStored):
            prefix = () if event.parent_block_hash is None else self.prefix[event.parent_block_hash]
            bs = event.block_size
            for i, h in enumerate(event.block_hashes):
                prefix += tuple(event.token_ids[i * bs : (i + 1) * bs])
                self.prefix[h] = prefix
                self.copies[h] += 1
        elif isinstance(event, BlockRemoved):
            for h in event.block_hashes:
                assert self.copies[h] > 0
                self.copies[h] -= 1
        elif isinstance(event, AllBlocksCleared):
            self.copies.clear()

    def request_keys(self, block_size: int) -> set[int]:
        """The index keys of the blocks held, at an index block size that divides the
        engine's: each engine block stands for its last block_size-token chunks."""
        out = set()
        for h, n in self.copies.items():
            if n > 0:
                out.update(prompt_keys(self.prefix[h], block_size, MODEL)[-32 // block_size :])
        return out


@pytest.mark.parametrize("source", [live_batches, replay_batches])
@pytest.mark.parametrize("block_size", [32, 16])
def test_fixture_index_holds_what_vllm_held_after_each_message(source, block_size):
    index, engine = KVBlockIndex(block_size=block_size), EngineModel()
    sink = EventTranslator(index)
    batches = source()
    assert len(batches) == 18
    for batch in batches:
        for event in batch.events:
            sink.apply(POD, MODEL, event)
            engine.apply(event)
        assert index.keys_of(POD) == engine.request_keys(block_size)
    stats = sink.stats()
    assert stats["entries"] == len(engine.request_keys(block_size)) == 78 * 32 // block_size
    assert stats["unknown_parents"] == stats["removed_unknown"] == 0
    assert stats["skipped"] == {}
    assert stats["events"] == {"BlockStored": 17, "BlockRemoved": 240}


@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_fixture_lookups_of_stored_prompts_match_their_full_blocks(block_size):
    index, engine = KVBlockIndex(block_size=block_size), EngineModel()
    sink = EventTranslator(index)
    checked = 0
    for batch in live_batches():
        for event in batch.events:
            sink.apply(POD, MODEL, event)
            engine.apply(event)
            if not isinstance(event, BlockStored):
                continue
            if block_size > 32 and event.parent_block_hash is not None:
                # A coarser index block cannot chain from an engine block in its middle.
                continue
            prompt = engine.prefix[event.block_hashes[-1]]
            keys = prompt_keys((*prompt, 7, 7, 7), block_size, MODEL)  # a partial tail
            assert len(keys) == len(prompt) // block_size
            assert index.match_lengths(keys) == {POD: len(keys)}
            assert index.lookup(keys, [POD, A]) == {POD: float(len(keys)), A: 0.0}
            checked += 1
    assert checked == (17 if block_size <= 32 else 14)


@pytest.mark.parametrize("block_size", [16, 32])
def test_fixture_keys_from_vllm_tokenize_match_the_index(block_size):
    # The picker computes keys from a tokenizer; vLLM's own /tokenize answer for each
    # recorded request must find every full engine block of the prompt, while it was held.
    tokens = [r["tokenize"]["tokens"] for r in _jsonl("requests.jsonl")]
    keys = [prompt_keys(t, block_size, MODEL) for t in tokens]
    best = [0] * len(keys)
    index = KVBlockIndex(block_size=block_size)
    sink = EventTranslator(index)
    for batch in live_batches():
        for event in batch.events:
            sink.apply(POD, MODEL, event)
        for i, k in enumerate(keys):
            best[i] = max(best[i], index.match_lengths(k).get(POD, 0))
    # (At 16 a prompt can match one block more than its own engine blocks: a later chat turn
    # that extends it stored the engine block its tail half-fills.)
    for t, k, b in zip(tokens, keys, best, strict=True):
        assert len(t) // 32 * 32 // block_size <= b <= len(k)


# --- hand-built events (engine block size 4 unless said)


def _h(*path) -> int:
    return xxhash.xxh64_intdigest(repr(path).encode(), seed=7)


def chain(name: str, n: int, bs: int = 4) -> tuple[list[int], list[int]]:
    """n blocks of tokens for a prompt called `name`, and engine hashes for them."""
    tokens = [_h(name, i) % 50_000 for i in range(n * bs)]
    return tokens, [_h(name, "block", i) for i in range(n)]


def stored(hashes, tokens, parent=None, bs=4, **kw) -> BlockStored:
    return BlockStored(tuple(hashes), parent, tuple(tokens), bs, **kw)


def removed(hashes, medium="GPU", **kw) -> BlockRemoved:
    return BlockRemoved(tuple(hashes), medium, **kw)


def test_lookup_counts_consecutive_blocks_from_the_first():
    index = KVBlockIndex(block_size=4)
    sink = EventTranslator(index)
    toks, hs = chain("p", 4)
    sink.apply(A, "m", stored(hs, toks))
    sink.apply(B, "m", stored(hs[:2], toks[:8]))
    sink.apply(C, "m", stored(hs, toks))
    sink.apply(C, "m", removed(hs[:1]))  # C keeps blocks 1..3 but not block 0
    keys = prompt_keys(toks, 4, "m")
    assert index.match_lengths(keys) == {A: 4, B: 2}
    assert index.lookup(keys) == {A: 4.0, B: 2.0}
    assert index.lookup(keys[1:]) == {A: 3.0, B: 1.0, C: 3.0}
    assert index.match_lengths(keys[:1] + keys[2:]) == {A: 3, B: 1}
    assert index.lookup([]) == {}
    assert index.lookup(prompt_keys(toks, 4, "other-model")) == {}


def test_lookup_restricted_to_pods():
    index = KVBlockIndex(block_size=4)
    sink = EventTranslator(index)
    toks, hs = chain("p", 3)
    sink.apply(A, "m", stored(hs, toks))
    sink.apply(B, "m", stored(hs, toks))
    keys = prompt_keys(toks, 4, "m")
    assert index.lookup(keys, [B]) == {B: 3.0}
    assert index.lookup(keys, (p for p in [B, C, "unknown:1"])) == {
        B: 3.0,
        C: 0.0,
        "unknown:1": 0.0,
    }
    assert index.match_lengths(keys, []) == {}


def test_lookup_weighs_tiers_and_takes_the_best_tier_per_block():
    index = KVBlockIndex(block_size=4)
    sink = EventTranslator(index)
    toks, hs = chain("p", 4)
    sink.apply(A, "m", stored(hs, toks, medium="CPU"))
    sink.apply(B, "m", stored(hs[:2], toks[:8]))
    sink.apply(B, "m", stored(hs[2:], toks[8:], parent=hs[1], medium="cpu"))
    sink.apply(C, "m", stored(hs, toks))
    sink.apply(C, "m", stored(hs, toks, medium="CPU"))
    keys = prompt_keys(toks, 4, "m")
    assert index.lookup(keys) == pytest.approx({A: 3.2, B: 3.6, C: 4.0})
    assert index.lookup(keys, tier_weights={"gpu": 1.0, "cpu": 0.5}) == {A: 2.0, B: 3.0, C: 4.0}
    assert index.lookup(keys, tier_weights={"gpu": 0.0, "cpu": 1.0}) == {A: 4.0, B: 2.0, C: 4.0}
    assert index.match_lengths(keys) == {A: 4, B: 4, C: 4}
    assert index.keys_of(B, "gpu") == set(keys[:2]) and index.keys_of(B, "cpu") == set(keys[2:])


def test_index_block_size_finer_than_the_engines():
    index = KVBlockIndex(block_size=2)
    sink = EventTranslator(index)
    toks, hs = chain("p", 3)
    sink.apply(A, "m", stored(hs, toks))
    keys = prompt_keys(toks, 2, "m")
    assert index.match_lengths(keys) == {A: 6}
    sink.apply(A, "m", removed(hs[1:2]))  # one engine block is two index blocks
    assert index.match_lengths(keys) == {A: 2}
    assert index.keys_of(A) == set(keys) - set(keys[2:4])


def test_duplicate_copies_are_counted_per_pod_and_tier():
    index = KVBlockIndex(block_size=4)
    sink = EventTranslator(index)
    toks, hs = chain("p", 2)
    sink.apply(A, "m", stored(hs, toks))
    sink.apply(A, "m", stored(hs, toks))  # vLLM computed the same blocks twice
    keys = prompt_keys(toks, 4, "m")
    assert sink.stats()["entries"] == 2
    sink.apply(A, "m", removed(hs))
    assert index.match_lengths(keys) == {A: 2}
    sink.apply(A, "m", removed(hs))
    assert index.match_lengths(keys) == {}
    stats = sink.stats()
    assert (stats["entries"], stats["keys"], stats["engine_hashes"]) == (0, 0, 0)


def test_removal_of_unknown_hashes_is_ignored_and_counted():
    index = KVBlockIndex(block_size=4)
    sink = EventTranslator(index)
    toks, hs = chain("p", 2)
    sink.apply(A, "m", stored(hs, toks))
    sink.apply(A, "m", removed([12345, 678]))
    sink.apply(B, "m", removed(hs))  # another pod's hashes
    sink.apply(A, "m", removed(hs, group_idx=1))  # another KV-cache group
    assert sink.stats()["removed_unknown"] == 6
    assert index.match_lengths(prompt_keys(toks, 4, "m")) == {A: 2}


def test_clear_pod_and_all_blocks_cleared_drop_only_that_pod():
    index = KVBlockIndex(block_size=4)
    sink = EventTranslator(index)
    toks, hs = chain("p", 3)
    for pod in (A, B, C):
        sink.apply(pod, "m", stored(hs, toks))
    index.add_speculative(A, prompt_keys(chain("q", 2)[0], 4, "m"))
    assert sink.stats()["entries"] == 11
    sink.clear_pod(A)
    sink.apply(B, "m", AllBlocksCleared())
    sink.clear_pod("never-seen:1")
    keys = prompt_keys(toks, 4, "m")
    assert index.match_lengths(keys) == {C: 3}
    stats = sink.stats()
    assert (stats["entries"], stats["keys"], stats["pods"], stats["engine_hashes"]) == (3, 3, 1, 3)
    # The cleared pods' engine maps are gone too.
    sink.apply(A, "m", removed(hs))
    more_toks, more_hs = chain("p2", 1)
    sink.apply(B, "m", stored(more_hs, more_toks, parent=hs[-1]))
    stats = sink.stats()
    assert (stats["removed_unknown"], stats["unknown_parents"]) == (3, 1)
    assert stats["events"]["AllBlocksCleared"] == 1


def test_unknown_parent_falls_back_to_the_model_root():
    index = KVBlockIndex(block_size=4)
    sink = EventTranslator(index)
    toks, hs = chain("p", 2)
    sink.apply(A, "m", stored(hs, toks, parent=999))
    assert sink.stats()["unknown_parents"] == 1
    # The keys are those of a prompt that starts with these tokens (llm-d router PR #691).
    assert index.match_lengths(prompt_keys(toks, 4, "m")) == {A: 2}


def test_blocks_chain_through_the_parents_engine_hash():
    index = KVBlockIndex(block_size=4)
    sink = EventTranslator(index)
    toks, hs = chain("p", 5)
    sink.apply(A, "m", stored(hs[:2], toks[:8]))
    sink.apply(A, "m", stored(hs[2:3], toks[8:12], parent=hs[1]))
    sink.apply(A, "m", stored(hs[3:], toks[12:], parent=hs[2]))
    assert index.match_lengths(prompt_keys(toks, 4, "m")) == {A: 5}
    assert sink.stats()["unknown_parents"] == 0


def test_lora_name_is_part_of_every_blocks_key():
    index = KVBlockIndex(block_size=4)
    sink = EventTranslator(index)
    toks, hs = chain("p", 3)
    sink.apply(A, "base", stored(hs[:2], toks[:8], lora_name="sql", lora_id=1))
    sink.apply(A, "base", stored(hs[2:], toks[8:], parent=hs[1], lora_name="sql", lora_id=1))
    assert index.match_lengths(prompt_keys(toks, 4, "base", "sql")) == {A: 3}
    assert index.match_lengths(prompt_keys(toks, 4, "base")) == {}
    assert index.match_lengths(prompt_keys(toks, 4, "sql")) == {}


def test_cpu_offload_store_without_tokens_resolves_through_known_hashes():
    index = KVBlockIndex(block_size=4)
    sink = EventTranslator(index)
    toks, hs = chain("p", 3)
    sink.apply(A, "m", stored(hs, toks))
    sink.apply(A, "m", stored([*hs[:2], 4242], (), bs=4, medium="CPU"))
    assert sink.stats()["skipped"] == {"offload_unknown_hash": 1}
    keys = prompt_keys(toks, 4, "m")
    sink.apply(A, "m", removed(hs))  # GPU copies evicted; the CPU ones stay
    assert index.lookup(keys) == pytest.approx({A: 1.6})
    assert index.keys_of(A, "cpu") == set(keys[:2]) and index.keys_of(A, "gpu") == set()
    sink.apply(A, "m", removed(hs[:2], medium="CPU"))
    assert index.lookup(keys) == {}
    assert sink.stats()["engine_hashes"] == 0


def test_skips_non_full_attention_bad_token_counts_and_unknown_tiers():
    index = KVBlockIndex(block_size=4)
    sink = EventTranslator(index)
    toks, hs = chain("p", 2)
    sink.apply(A, "m", stored(hs, toks, kv_cache_spec_kind="sliding_window", group_idx=1))
    sink.apply(A, "m", stored(hs, toks[:7]))
    sink.apply(A, "m", stored(hs, toks, medium="DISK"))
    sink.apply(A, "m", removed(hs, medium="DISK"))
    sink.apply(A, "m", object())
    assert sink.stats()["skipped"] == {
        "kv_cache_spec_kind": 1,
        "token_count": 1,
        "medium": 2,
        "unknown_event": 1,
    }
    assert sink.stats()["entries"] == 0
    for kind in ("mla_attention", "sink_full_attention"):
        sink.apply(B, "m", stored(hs, toks, kv_cache_spec_kind=kind))
    assert index.match_lengths(prompt_keys(toks, 4, "m")) == {B: 2}


def test_sliding_window_group_removals_do_not_touch_full_attention_blocks():
    # Hybrid models: the same hash can exist in a full-attention and a sliding-window group.
    index = KVBlockIndex(block_size=4)
    sink = EventTranslator(index)
    toks, hs = chain("p", 2)
    sink.apply(A, "m", stored(hs, toks, group_idx=0))
    sink.apply(A, "m", stored(hs, toks, group_idx=1, kv_cache_spec_kind="sliding_window"))
    sink.apply(A, "m", removed(hs, group_idx=1))
    assert index.match_lengths(prompt_keys(toks, 4, "m")) == {A: 2}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_speculative_entries_expire_unless_confirmed():
    clock = FakeClock()
    index = KVBlockIndex(block_size=4, speculative_ttl=2.0, clock=clock)
    sink = EventTranslator(index)
    toks, hs = chain("p", 3)
    keys = prompt_keys(toks, 4, "m")
    index.add_speculative(A, keys)
    index.add_speculative(B, keys)
    assert index.lookup(keys) == {A: 3.0, B: 3.0}
    assert sink.stats()["speculative"] == 6
    clock.now += 1.0
    sink.apply(A, "m", stored(hs[:2], toks[:8]))  # confirms A's first two blocks
    assert (sink.stats()["entries"], sink.stats()["speculative"]) == (6, 4)
    clock.now += 1.0  # the TTL is over
    assert index.lookup(keys) == {A: 2.0}
    stats = sink.stats()
    assert (stats["entries"], stats["speculative"]) == (2, 0)
    sink.apply(A, "m", removed(hs[:2]))  # confirmed entries are real: removable
    assert sink.stats()["entries"] == 0


def test_speculative_entries_renewed_live_for_a_new_ttl_and_count_as_gpu():
    clock = FakeClock()
    index = KVBlockIndex(block_size=4, speculative_ttl=2.0, clock=clock)
    sink = EventTranslator(index)
    toks, hs = chain("p", 2)
    keys = prompt_keys(toks, 4, "m")
    sink.apply(A, "m", stored(hs, toks, medium="CPU"))
    index.add_speculative(A, keys)
    assert index.lookup(keys) == {A: 2.0}  # speculatively on GPU
    clock.now += 1.5
    index.add_speculative(A, keys[:1])
    clock.now += 1.0
    assert index.lookup(keys) == pytest.approx({A: 1.8})
    clock.now += 1.0
    assert index.lookup(keys) == pytest.approx({A: 1.6})
    assert sink.stats()["entries"] == 2  # the CPU entries were never touched
    index.add_speculative(B, [])


def test_lru_bound_evicts_least_recently_used_keys_and_chain_tails_first():
    index = KVBlockIndex(block_size=4, max_entries=10)
    sink = EventTranslator(index)
    (ta, ha), (tb, hb), (tc, hc) = chain("a", 4), chain("b", 4), chain("c", 4)
    sink.apply(A, "m", stored(ha, ta))
    sink.apply(A, "m", stored(hb, tb))
    ka, kb, kc = (prompt_keys(t, 4, "m") for t in (ta, tb, tc))
    assert index.lookup(ka) == {A: 4.0}  # a is now more recent than b
    sink.apply(B, "m", stored(hc, tc))
    assert sink.stats()["entries"] == 10
    assert index.match_lengths(ka) == {A: 4}
    assert index.match_lengths(kc) == {B: 4}
    assert index.match_lengths(kb) == {A: 2}  # b lost its tail, not its head
    assert sink.stats()["evicted"] == 2
    # Removals of evicted blocks are harmless.
    sink.apply(A, "m", removed(hb))
    assert sink.stats()["entries"] == 8


def test_lru_eviction_of_shared_keys_and_speculative_entries_keeps_counts_right():
    clock = FakeClock()
    index = KVBlockIndex(block_size=4, max_entries=5, clock=clock)
    sink = EventTranslator(index)
    toks, hs = chain("p", 3)
    sink.apply(A, "m", stored(hs, toks))
    sink.apply(B, "m", stored(hs[:1], toks[:4]))
    index.add_speculative(C, prompt_keys(chain("q", 2)[0], 4, "m"))
    stats = sink.stats()
    assert stats["entries"] <= 5 and stats["evicted"] == 1
    clock.now += 5
    assert sink.stats()["entries"] == 3
    for pod in (A, B, C):
        sink.clear_pod(pod)
    assert sink.stats()["entries"] == 0 and sink.stats()["pods"] == 0


def test_engine_map_entries_of_evicted_blocks_are_swept():
    index = KVBlockIndex(block_size=4, max_entries=256, shards=2)
    sink = EventTranslator(index)
    hot_toks, hot_hs = chain("hot", 4)
    sink.apply(A, "m", stored(hot_hs, hot_toks))
    hot = prompt_keys(hot_toks, 4, "m")
    for i in range(600):
        toks, hs = chain(f"c{i}", 8)
        sink.apply(A, "m", stored(hs, toks))
        assert index.lookup(hot) == {A: 4.0}  # in use: never evicted
    stats = sink.stats()
    assert stats["entries"] <= 256 and stats["evicted"] > 4000
    assert stats["engine_hashes"] < 1500  # 4804 stored, most of them evicted
    # The mappings of what is still held survive a sweep: parents resolve, removals apply.
    more_toks, more_hs = chain("more", 1)
    sink.apply(A, "m", stored(more_hs, more_toks, parent=hot_hs[-1]))
    assert index.match_lengths(prompt_keys(hot_toks + more_toks, 4, "m")) == {A: 5}
    sink.apply(A, "m", removed(hot_hs))
    assert index.match_lengths(hot) == {}
    assert sink.stats()["unknown_parents"] == 0


def test_constructor_checks_its_arguments():
    for kw in (
        {"block_size": 0},
        {"max_entries": 0},
        {"shards": 3},
        {"max_entries": 2, "shards": 4},
    ):
        with pytest.raises(ValueError):
            KVBlockIndex(**kw)


def test_stats_and_memory_estimate(monkeypatch):
    # tracemalloc sees numpy's allocations, not anonymous mmaps: the tables' arrays go to numpy.
    monkeypatch.setattr(packed, "MMAP_BYTES", 1 << 40)
    n_prompts, blocks = 400, 32
    gc.collect()
    tracemalloc.start()  # before the events: the index keeps their engine-hash ints
    before = tracemalloc.get_traced_memory()[0]
    index = KVBlockIndex(block_size=16)
    sink = EventTranslator(index)
    for i in range(n_prompts):
        toks, hs = chain(f"p{i}", blocks, bs=16)
        sink.apply((A, B, C)[i % 3], "m", stored(hs, toks, bs=16))
    del toks, hs
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    stats = sink.stats()
    assert stats["entries"] == stats["keys"] == stats["engine_hashes"] == n_prompts * blocks
    assert stats["pods"] == 3
    measured = sink.memory_bytes()
    assert 0.85 < measured / grown < 1.15
    assert 0.7 < stats["bytes"] / measured < 1.3
    # Two dict entries per block (key -> slot, engine hash -> key) and two 64-bit ints.
    assert sink.bytes_per_entry() < 250


# --- random interleavings


PODS = st.sampled_from([A, B])
MEDIUM = st.sampled_from(["GPU", "CPU"])
OPS = {
    "store": st.tuples(
        PODS, st.integers(0, 3), st.sampled_from([0, 0, 1, 2, 3, 4]), st.integers(1, 4), MEDIUM
    ),
    "remove": st.tuples(st.integers(0, 15)),  # a held block (n mod held), unknown if n > 12
    "offload": st.tuples(st.integers(0, 15)),  # a tokenless CPU store of a held block
    "clear": st.tuples(PODS),
    "speculate": st.tuples(PODS, st.integers(0, 3)),
    "tick": st.tuples(st.floats(0, 3)),
}


@st.composite
def operations(draw, speculate: bool = True):
    kinds = ["store"] * 4 + ["remove"] * 3 + ["offload", "clear"]
    kinds += ["speculate", "tick"] if speculate else []
    return [
        (kind, *draw(OPS[kind]))
        for kind in draw(st.lists(st.sampled_from(kinds), min_size=5, max_size=80))
    ]


# Chains 0 and 1 share their first two blocks, so keys are shared and blocks duplicated.
def _chain_tokens(c: int, i: int) -> tuple[int, ...]:
    owner = 0 if (c < 2 and i < 2) else c
    return (owner * 100 + i, 7)


def _prefix(c: int, i: int) -> tuple[int, ...]:
    return sum((_chain_tokens(c, j) for j in range(i + 1)), ())


def _engine_hash(c: int, i: int) -> int:
    return xxhash.xxh64_intdigest(repr(_prefix(c, i)).encode())


BY_HASH = {
    _engine_hash(c, i): prompt_keys(_prefix(c, i), 2, "m")[-1] for c in range(4) for i in range(8)
}


def _run_ops(index: KVBlockIndex, clock: FakeClock, ops, check_exact: bool) -> None:
    """Apply well-formed events (as vLLM would send them) and check the index after each."""
    sink = EventTranslator(index, clear_every=0)  # the engine model clears at once
    held: Counter[tuple[str, str, int]] = Counter()  # (pod, tier, engine hash) -> copies
    for kind, *args in ops:
        live = sorted(k for k, n in held.items() if n)
        if kind == "store":
            pod, c, first, n, medium = args
            tier = medium.lower()
            if first > 0 and held[(pod, tier, _engine_hash(c, first - 1))] == 0:
                first = 0  # vLLM stores a block only after its parent
            hs = [_engine_hash(c, i) for i in range(first, first + n)]
            toks = sum((_chain_tokens(c, i) for i in range(first, first + n)), ())
            parent = _engine_hash(c, first - 1) if first else None
            sink.apply(pod, "m", BlockStored(tuple(hs), parent, toks, 2, medium=medium))
            held.update((pod, tier, h) for h in hs)
        elif kind == "remove":
            n = args[0]
            pod, tier, h = live[n % len(live)] if live and n <= 12 else (A, "gpu", n)
            sink.apply(pod, "m", BlockRemoved((h,), tier.upper()))
            held[(pod, tier, h)] -= held[(pod, tier, h)] > 0
        elif kind == "offload" and live:
            pod, _, h = live[args[0] % len(live)]
            sink.apply(pod, "m", BlockStored((h,), None, (), 2, medium="CPU"))
            held[(pod, "cpu", h)] += 1
        elif kind == "clear":
            sink.apply(args[0], "m", AllBlocksCleared())
            for k in [k for k in held if k[0] == args[0]]:
                del held[k]
        elif kind == "speculate":
            index.add_speculative(args[0], prompt_keys(_prefix(args[1], 5), 2, "m"))
        elif kind == "tick":
            clock.now += args[0]
        stats = sink.stats()
        assert stats["entries"] <= index.max_entries
        assert stats["unknown_parents"] == 0 or not check_exact
        for c in range(4):
            keys = prompt_keys(_prefix(c, 5), 2, "m")
            assert all(0 <= v <= len(keys) for v in index.lookup(keys).values())
        if check_exact:
            tiers = {}
            for pod in (A, B):
                for tier in ("gpu", "cpu"):
                    want = {
                        BY_HASH[h] for (p, t, h), n in held.items() if (p, t) == (pod, tier) and n
                    }
                    assert index.keys_of(pod, tier) == want
                    tiers[pod, tier] = want
            for c in range(4):  # lookups agree with the blocks held
                keys = prompt_keys(_prefix(c, 5), 2, "m")
                want_len, want_score = {}, {}
                for pod in (A, B):
                    n = score = 0
                    while n < len(keys) and any(keys[n] in tiers[pod, t] for t in ("gpu", "cpu")):
                        score += 1.0 if keys[n] in tiers[pod, "gpu"] else 0.8
                        n += 1
                    if n:
                        want_len[pod], want_score[pod] = n, score
                assert index.match_lengths(keys) == want_len
                assert index.lookup(keys) == pytest.approx(want_score)


@settings(max_examples=200, deadline=None)
@given(operations(), st.integers(1, 12), st.sampled_from([1, 2, 4]))
def test_random_interleavings_keep_the_bound(ops, max_entries, shards):
    clock = FakeClock()
    while shards > max_entries:
        shards //= 2
    index = KVBlockIndex(block_size=2, max_entries=max_entries, clock=clock, shards=shards)
    _run_ops(index, clock, ops, False)


@settings(max_examples=150, deadline=None)
@given(operations(speculate=False))
def test_random_interleavings_without_eviction_match_the_engine(ops):
    clock = FakeClock()
    _run_ops(KVBlockIndex(block_size=2, clock=clock), clock, ops, True)
