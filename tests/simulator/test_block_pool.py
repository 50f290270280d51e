"""The paged KV cache: vLLM's prefix-caching rules, eviction order and events."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from infergw.simulator.block_hashing import BlockHasher, block_extra_keys, event_hash
from infergw.simulator.block_pool import BlockPool, ClearedEvent, RemovedEvent, StoredEvent

BS = 4


@dataclass
class Req:
    all_token_ids: list[int]
    blocks: list = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0
    lora_id: int | None = None
    lora_name: str | None = None
    cache_salt: str | None = None


def make(tokens: list[int], hasher: BlockHasher, cache_salt: str | None = None) -> Req:
    r = Req(list(tokens), cache_salt=cache_salt)
    hasher.extend(r.block_hashes, r.all_token_ids, r.lora_name, r.cache_salt)
    return r


def run_prompt(pool: BlockPool, req: Req) -> int:
    """Admit and fully prefill `req` as the engine does; return the cached token count."""
    hit = pool.find_cached_prefix(req.block_hashes, (len(req.all_token_ids) - 1) // BS)
    assert pool.allocate(req, len(req.all_token_ids), hit)
    pool.cache_full_blocks(req, len(req.all_token_ids))
    return len(hit) * BS


@pytest.fixture
def hasher() -> BlockHasher:
    return BlockHasher(BS, "sha256", seed=0)


def test_only_full_blocks_are_cached_and_stored_events_chain(hasher):
    pool = BlockPool(10, BS)
    req = make(range(10), hasher)  # 2 full blocks + 2 tokens
    assert run_prompt(pool, req) == 0
    [ev] = pool.take_events()
    assert isinstance(ev, StoredEvent)
    assert ev.parent_block_hash is None
    assert len(ev.block_hashes) == 2 and ev.token_ids == tuple(range(8))
    assert ev.block_hashes == tuple(event_hash(h) for h in req.block_hashes)
    assert len(req.blocks) == 3  # the partial block is allocated but not cached


def test_repeat_hits_all_but_the_last_token(hasher):
    pool = BlockPool(10, BS)
    first = make(range(8), hasher)
    run_prompt(pool, first)
    pool.free(first)
    again = make(range(8), hasher)
    # 8 tokens = 2 full blocks, but the last token is always recomputed: only 1 block hits.
    assert run_prompt(pool, again) == 4
    longer = make(range(9), hasher)
    pool.free(again)
    assert run_prompt(pool, longer) == 8


def test_block_identity_chains_parent_and_lora(hasher):
    a, b = [], []
    hasher.extend(a, [1, 2, 3, 4, 5, 6, 7, 8])
    hasher.extend(b, [9, 9, 9, 9, 5, 6, 7, 8])
    assert a[1] != b[1]  # same tokens, different parent
    c = []
    hasher.extend(c, [1, 2, 3, 4, 5, 6, 7, 8], "my-lora")
    assert c[0] != a[0]
    assert BlockHasher(BS, "sha256", seed=0).root == hasher.root
    assert BlockHasher(BS, "sha256", seed=1).root != hasher.root


def test_cache_salt_keys_the_first_block_and_so_every_block(hasher):
    # vLLM's generate_block_hash_extra_keys: the salt is in block 0's extra keys only.
    assert block_extra_keys(0, "lora", "s") == ("lora", "s")
    assert block_extra_keys(1, "lora", "s") == ("lora",)
    assert block_extra_keys(1, None, "s") is None and block_extra_keys(0, None, None) is None
    plain, salted = make(range(8), hasher), make(range(8), hasher, "s")
    other = make(range(8), hasher, "t")
    assert not set(salted.block_hashes) & (set(plain.block_hashes) | set(other.block_hashes))
    pool = BlockPool(10, BS)
    run_prompt(pool, salted)
    [stored] = pool.take_events()
    assert stored.extra_keys == (("s",), None)
    pool.free(salted)
    assert run_prompt(pool, make(range(9), hasher)) == 0
    assert run_prompt(pool, make(range(9), hasher, "s")) == 8


def test_lru_eviction_order_and_removed_events(hasher):
    pool = BlockPool(5, BS)  # 4 usable blocks
    first = make(range(8), hasher)
    run_prompt(pool, first)
    pool.free(first)  # freed tail first: block 1, then block 0
    pool.take_events()
    second = make(range(100, 108), hasher)
    run_prompt(pool, second)  # takes the 2 never-used blocks
    assert pool.take_events()[0].parent_block_hash is None
    pool.free(second)
    third = make(range(200, 204), hasher)
    run_prompt(pool, third)
    events = pool.take_events()
    # the least recently freed cached block goes first: first's *last* block
    assert events[0] == RemovedEvent((event_hash(first.block_hashes[1]),))
    assert isinstance(events[1], StoredEvent)


def test_cached_blocks_in_use_are_never_evicted(hasher):
    pool = BlockPool(4, BS)  # 3 usable
    a = make(range(8), hasher)
    run_prompt(pool, a)  # holds 2 blocks
    b = make(range(50, 58), hasher)
    hit = pool.find_cached_prefix(b.block_hashes, 1)
    assert not pool.allocate(b, 8, hit)  # needs 2, only 1 free
    assert b.blocks == [] and pool.num_free == 1


def test_usage_excludes_the_null_block(hasher):
    pool = BlockPool(5, BS)
    assert pool.usage == 0.0
    run_prompt(pool, make(range(8), hasher))
    assert pool.usage == pytest.approx(0.5)


def test_reset_clears_only_when_idle(hasher):
    pool = BlockPool(10, BS)
    r = make(range(8), hasher)
    run_prompt(pool, r)
    pool.take_events()
    assert not pool.reset_prefix_cache()
    pool.free(r)
    assert pool.reset_prefix_cache()
    assert pool.take_events() == [ClearedEvent()]
    assert pool.find_cached_prefix(r.block_hashes, 2) == []


def test_caching_disabled_emits_nothing(hasher):
    pool = BlockPool(10, BS, enable_caching=False)
    r = make(range(8), hasher)
    run_prompt(pool, r)
    pool.free(r)
    assert run_prompt(pool, make(range(8), hasher)) == 0
    assert pool.take_events() == []
