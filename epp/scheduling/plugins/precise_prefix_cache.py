"""precise-prefix-cache-scorer: what each pod really holds, from the model servers' KV events.

The prompt is tokenized as vLLM would (the model's own tokenizer and chat template), cut into
the index's blocks (keyed by model, LoRA adapter and cache_salt, as vLLM shares blocks) and
looked up: a pod scores the weighted count of consecutive blocks from the start that it holds
(GPU 1.0, CPU 0.8 a block), divided by the prompt's block count. After scheduling, the chosen
pod's blocks (and a prefill pod's, with P/D) go in as speculative entries for a couple of
seconds, so a burst of same-prefix requests follows the first one before its BlockStored
arrives; a pod more than `loadBound` in-flight requests above the least loaded candidate scores
0, so such a burst spills to another pod, which then gets the entries (plugins/_load_bound.py).
With the shared index in Redis (kvindex.redis_index) the prompt's blocks are read in
the prepare step, in one round trip, and scored from that answer.

The plugin needs the picker's KV cache (kvindex.cache, built by epp/kv_events.py): its type
says so (needs_kv_cache) and its factory takes the cache from the handle. Without one (a
config loaded with no KV cache) every pod scores 0 and the plugin knows no prompt.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from infergw.epp.context import PluginSlot, RequestContext
from infergw.epp.scheduling.framework import PrepareData, PreRequest, Scorer
from infergw.epp.scheduling.handle import Handle
from infergw.epp.scheduling.params import PluginParams, parse_params
from infergw.epp.scheduling.plugins._load_bound import DEFAULT_LOAD_BOUND, LoadBound, bounded
from infergw.kvindex.cache import KVCache, Prompt
from infergw.kvindex.index import DEFAULT_TIER_WEIGHTS

Weight = Annotated[float, msgspec.Meta(ge=0, le=1)]


class PrecisePrefixCacheParams(PluginParams):
    # What a block held in each tier counts for (a tier not named counts 0).
    tier_weights: dict[Annotated[str, msgspec.Meta(max_length=64)], Weight] = msgspec.field(
        default_factory=lambda: dict(DEFAULT_TIER_WEIGHTS)
    )
    speculative_indexing: bool = True
    load_bound: LoadBound = DEFAULT_LOAD_BOUND  # plugins/_load_bound.py; null: no bound


class PrecisePrefixCacheScorer(Scorer, PreRequest, PrepareData):
    type_name = "precise-prefix-cache-scorer"
    params_type = PrecisePrefixCacheParams
    precise = True  # a PrefixSource that knows what pods hold
    needs_kv_cache = True

    def __init__(self, name, params=None, kv: KVCache | None = None):
        super().__init__(name, params)
        p = parse_params(self.params_type, self.params)
        self.tier_weights = {k.lower(): v for k, v in p.tier_weights.items()}
        self.speculative = p.speculative_indexing
        self.load_bound = p.load_bound
        self.kv = kv
        self._prompt = PluginSlot[Prompt | None](f"{name}.prompt")
        self._held = PluginSlot[dict[str, float]](f"{name}.held")  # by address, when scored

    @classmethod
    def create(cls, name, params, handle: Handle):
        return cls(name, params, handle.kv_cache)

    async def prepare(self, ctx: RequestContext) -> None:
        kv = self.kv
        if kv is None:
            return
        await kv.tokenize(ctx)  # the tokens the gate counted, if it did: kept once
        if kv.remote:  # a shared index: read what the pods hold now, scheduling cannot wait
            prompt = self.prompt(ctx)
            if prompt is not None:
                self._prompt.put(ctx, await kv.fetch(prompt))

    def prompt(self, ctx: RequestContext) -> Prompt | None:
        """The prompt's index keys (salted by its cache_salt, as vLLM salts its blocks), cut
        once a request; None if they cannot be known."""
        kv = self.kv
        if kv is None:
            return None
        return self._prompt.once(ctx, lambda: kv.prompt(ctx, ctx.request.body.cache_salt))

    def score(self, ctx, endpoints):
        prompt = self.prompt(ctx)
        if prompt is None:
            return [0.0] * len(endpoints)
        addresses = [e.address for e in endpoints]
        scores = self.kv.score(prompt, addresses, self.tier_weights)
        self._held.put(ctx, dict(zip(addresses, scores, strict=True)))
        return bounded(scores, endpoints, self.load_bound)

    def held_share(self, ctx: RequestContext, address: str) -> float | None:
        """The share of the prompt `address` held (tier-weighted) when this request was
        scored: before its own speculative entries."""
        held = self._held.get(ctx)
        return None if held is None else held.get(address)

    def cached_prompt(self, ctx: RequestContext, address: str) -> tuple[int, int] | None:
        """(prompt tokens, how many of them `address` holds from the start, in any tier);
        None when the prompt cannot be tokenized."""
        prompt = self.prompt(ctx)
        if prompt is None:
            return None
        return prompt.tokens, self.kv.cached_prefix(prompt, address)

    def pre_request(self, ctx, result):
        if not self.speculative:
            return
        prompt = self.prompt(ctx)
        if prompt is None:
            return
        # Every profile's pick computes the prompt: the decode pod, and a prefill pod too.
        for profile_result in result.results.values():
            if profile_result is not None and profile_result.targets:
                self.kv.add_speculative(profile_result.targets[0].address, prompt)
