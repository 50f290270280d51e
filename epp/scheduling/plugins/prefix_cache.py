"""prefix-cache-scorer (approximate): remember which pod got which prompt prefix.

The prompt text is cut into blocks of blockSizeTokens × 4 characters; block i's hash chains
block i-1's (xxh64 of the block's bytes and the previous hash, seeded with the model name),
so a hit on block i means the whole prefix up to i matches. The score is the fraction of a
prompt's blocks found, from block 0 up to the first miss, on each pod. After scheduling, the
chosen pod's blocks are recorded in its LRU (lruCapacityPerServer entries); with prefill/decode
disaggregation, the prefill pod's too. A pod more than `loadBound` in-flight requests above the
least loaded candidate scores 0 (plugins/_load_bound.py). With several picker replicas each
records what the others chose as well (epp/replica_sync.py): otherwise each would learn its own
map and a shared prefix would spread over as many pods as there are replicas.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Annotated

import msgspec
import xxhash

from infergw.epp.context import PluginSlot, RequestContext
from infergw.epp.scheduling.framework import PreRequest, Scorer
from infergw.epp.scheduling.handle import Handle
from infergw.epp.scheduling.params import PluginParams, PositiveCount, parse_params
from infergw.epp.scheduling.plugins._load_bound import DEFAULT_LOAD_BOUND, LoadBound, bounded


class PrefixCacheParams(PluginParams):
    # A block is this many tokens of 4 characters; 64k tokens is far past any real block.
    block_size_tokens: Annotated[int, msgspec.Meta(ge=1, le=65_536)] = 16
    max_prefix_blocks_to_match: PositiveCount = 256
    lru_capacity_per_server: PositiveCount = 31_250
    load_bound: LoadBound = DEFAULT_LOAD_BOUND  # plugins/_load_bound.py; null: no bound


class PrefixCacheScorer(Scorer, PreRequest):
    precise = False  # a PrefixSource that guesses from past routing
    type_name = "prefix-cache-scorer"
    params_type = PrefixCacheParams

    def __init__(self, name, params=None):
        super().__init__(name, params)
        p = parse_params(self.params_type, self.params)
        self.block_chars = p.block_size_tokens * 4
        self.max_blocks = p.max_prefix_blocks_to_match
        self.capacity = p.lru_capacity_per_server
        self.load_bound = p.load_bound
        # Per instance: block sizes may differ.
        self._hashes = PluginSlot[list[int]](f"{name}.hashes")
        self._held = PluginSlot[dict[str, float]](f"{name}.held")  # by address, when scored
        self._by_server: dict[str, OrderedDict[int, None]] = {}
        # Reverse index for lookups: block hash → servers holding it.
        self._servers_of: dict[int, set[str]] = {}
        self._share = None  # tells the other replicas what we recorded (create() sets it)
        self._metrics = None  # the picker's, for the lookups' hit ratio (create() sets it)
        self._entries = 0  # (block, pod) entries over every pod's LRU

    @classmethod
    def create(cls, name, params, handle: Handle):
        scorer = cls(name, params)
        if handle.metrics is not None:
            scorer._metrics = handle.metrics
            handle.metrics.prefix_indexes.append(lambda: scorer._entries)
        if handle.replicas is not None:
            scorer._share = handle.replicas.channel(f"approximate-prefix/{name}", scorer._record)
        return scorer

    def hashes(self, ctx: RequestContext) -> list[int]:
        """The prompt's chained block hashes, computed once a request."""
        return self._hashes.once(ctx, lambda: self._hash(ctx))

    def _hash(self, ctx: RequestContext) -> list[int]:
        req = ctx.request
        data = req.prompt_text.encode()
        seed = ctx.target_model + (req.body.cache_salt or "")
        prev = xxhash.xxh64_intdigest(seed.encode())
        out = []
        step = self.block_chars
        for start in range(0, min(len(data), step * self.max_blocks), step):
            prev = xxhash.xxh64_intdigest(data[start : start + step] + prev.to_bytes(8, "little"))
            out.append(prev)
        return out

    def score(self, ctx, endpoints):
        hashes = self.hashes(ctx)
        if not hashes:
            return [0.0] * len(endpoints)
        alive = {e.address for e in endpoints}
        matched = dict.fromkeys(alive, 0)
        for i, h in enumerate(hashes):
            alive &= self._servers_of.get(h, set())
            if not alive:
                break
            for address in alive:
                matched[address] = i + 1
        total = len(hashes)
        if self._metrics is not None:  # the best match among the candidates, as GIE records
            best = max(matched.values(), default=0)
            self._metrics.prefix_hit_ratio.observe(best / total)
            self._metrics.prefix_hit_bytes.observe(best * self.block_chars)
        shares = [matched[e.address] / total for e in endpoints]
        self._held.put(ctx, dict(zip((e.address for e in endpoints), shares, strict=True)))
        return bounded(shares, endpoints, self.load_bound)

    def held_share(self, ctx: RequestContext, address: str) -> float | None:
        """The share of the prompt `address` held when this request was scored."""
        held = self._held.get(ctx)
        return None if held is None else held.get(address)

    def cached_prompt(self, ctx: RequestContext, address: str) -> tuple[int, int]:
        """(prompt tokens, how many of them `address` holds from the start), in this
        scorer's approximate tokens of 4 characters."""
        holders = self._servers_of
        matched = 0
        for h in self.hashes(ctx):
            if address not in holders.get(h, ()):
                break
            matched += 1
        prompt = ctx.request.approx_prompt_tokens
        return prompt, min(prompt, matched * (self.block_chars // 4))

    def pre_request(self, ctx, result):
        # Every profile's pick computes the prompt: the decode pod, and a prefill pod too.
        for profile_result in result.results.values():
            if profile_result is not None and profile_result.targets:
                address, hashes = profile_result.targets[0].address, self.hashes(ctx)
                self._record(address, hashes)
                if self._share is not None:
                    self._share(address, hashes)

    def _record(self, server: str, hashes: list[int]) -> None:
        lru = self._by_server.setdefault(server, OrderedDict())
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                self._entries += 1
                self._servers_of.setdefault(h, set()).add(server)
        while len(lru) > self.capacity:
            old, _ = lru.popitem(last=False)
            self._entries -= 1
            holders = self._servers_of.get(old)
            if holders is not None:
                holders.discard(server)
                if not holders:
                    del self._servers_of[old]

    def forget_server(self, server: str) -> None:
        """A pod left the pool: drop what we believed it held."""
        forgotten = self._by_server.pop(server, {})
        self._entries -= len(forgotten)
        for h in forgotten:
            holders = self._servers_of.get(h)
            if holders is not None:
                holders.discard(server)
                if not holders:
                    del self._servers_of[h]
