"""A paged KV cache with vLLM's prefix-caching semantics.

Only full blocks are cached. A block's identity is its chain hash (see block_hashing). Blocks
with no user stay cached in an LRU free queue and are evicted, oldest first, only when a new
block is needed. A finished request frees its blocks tail first, so a prompt's last blocks are
evicted before its first ones, and blocks that hold no cached content go to the front of the
queue so they are reused before any cached block is evicted (the eviction order recorded from a
real vLLM 0.32 shows both). Every change a subscriber must know becomes an event.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from infergw.simulator.block_hashing import block_extra_keys, event_hash


@dataclass(slots=True, frozen=True)
class StoredEvent:
    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None
    lora_name: str | None
    extra_keys: tuple[tuple | None, ...]  # one entry per block, as vLLM publishes them


@dataclass(slots=True, frozen=True)
class RemovedEvent:
    block_hashes: tuple[int, ...]


@dataclass(slots=True, frozen=True)
class ClearedEvent:
    pass


KVEvent = StoredEvent | RemovedEvent | ClearedEvent


class Block:
    __slots__ = ("block_hash", "block_id", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None


class CacheUser(Protocol):
    """What the pool needs from a request."""

    blocks: list[Block]
    block_hashes: list[bytes]
    num_cached_blocks: int
    all_token_ids: list[int]
    lora_id: int | None
    lora_name: str | None
    cache_salt: str | None


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, *, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (one is vLLM's null block)")
        self.block_size = block_size
        self.enable_caching = enable_caching
        # Block 0 is vLLM's null block: never handed out, not counted in usage.
        self.num_usable = num_blocks - 1
        self._free: OrderedDict[int, Block] = OrderedDict(
            (i, Block(i)) for i in range(1, num_blocks)
        )
        self._cached: dict[bytes, dict[int, Block]] = {}
        self.events: list[KVEvent] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_usable

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, hashes: list[bytes], max_blocks: int) -> list[Block]:
        """The longest run of cached blocks from the start of `hashes`."""
        if not self.enable_caching:
            return []
        hit: list[Block] = []
        for h in hashes[:max_blocks]:
            copies = self._cached.get(h)
            if not copies:
                break
            hit.append(next(iter(copies.values())))
        return hit

    def allocate(self, req: CacheUser, total_tokens: int, computed: list[Block]) -> bool:
        """Give `req` blocks for `total_tokens`; False (and no change) if they do not fit."""
        needed = self.blocks_for(total_tokens) - len(req.blocks) - len(computed)
        # Cached blocks we are about to reuse sit in the free queue but cannot also be evicted.
        reusable_free = sum(1 for b in computed if b.ref_cnt == 0)
        if needed > len(self._free) - reusable_free:
            return False
        for block in computed:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1
            req.blocks.append(block)
        req.num_cached_blocks += len(computed)
        for _ in range(max(needed, 0)):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            req.blocks.append(block)
        return True

    def cache_full_blocks(self, req: CacheUser, num_computed_tokens: int) -> None:
        """Publish the request's blocks that became full since the last call."""
        if not self.enable_caching:
            return
        full = min(num_computed_tokens // self.block_size, len(req.block_hashes), len(req.blocks))
        start = req.num_cached_blocks
        if full <= start:
            return
        for i in range(start, full):
            block = req.blocks[i]
            h = req.block_hashes[i]
            block.block_hash = h
            self._cached.setdefault(h, {})[block.block_id] = block
        bs = self.block_size
        self.events.append(
            StoredEvent(
                block_hashes=tuple(event_hash(h) for h in req.block_hashes[start:full]),
                parent_block_hash=event_hash(req.block_hashes[start - 1]) if start else None,
                token_ids=tuple(req.all_token_ids[start * bs : full * bs]),
                block_size=bs,
                lora_id=req.lora_id,
                lora_name=req.lora_name,
                extra_keys=tuple(
                    block_extra_keys(i, req.lora_name, req.cache_salt) for i in range(start, full)
                ),
            )
        )
        req.num_cached_blocks = full

    def free(self, req: CacheUser) -> None:
        """Release a request's blocks, tail first, so a prompt's last blocks are evicted first."""
        for block in reversed(req.blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
                if block.block_hash is None:
                    self._free.move_to_end(block.block_id, last=False)
        req.blocks = []
        req.num_cached_blocks = 0

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; refused (False) while any block is in use, as in vLLM."""
        if len(self._free) != self.num_usable:
            return False
        for block in self._free.values():
            block.block_hash = None
        self._cached.clear()
        if self.enable_caching:
            self.events.append(ClearedEvent())
        return True

    def take_events(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events

    def _evict(self, block: Block) -> None:
        h = block.block_hash
        assert h is not None
        copies = self._cached.get(h)
        if copies is not None:
            copies.pop(block.block_id, None)
            if not copies:
                del self._cached[h]
        block.block_hash = None
        self.events.append(RemovedEvent((event_hash(h),)))
