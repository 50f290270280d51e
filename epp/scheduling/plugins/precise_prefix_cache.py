"""precise-prefix-cache-scorer: what each pod really holds, from the model servers' KV events.

The prompt is tokenized as vLLM would (the model's own tokenizer and chat template), cut into
the index's blocks and looked up: a pod scores the weighted count of consecutive blocks from
the start that it holds (GPU 1.0, CPU 0.8 a block), divided by the prompt's block count. After
scheduling, the chosen pod's blocks (and a prefill pod's, with P/D) go in as speculative
entries for a couple of seconds, so a burst of same-prefix requests follows the first one
before its BlockStored arrives.

The plugin needs the picker's KV-cache view (epp/kv_events.py): `bind()` hands it over.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Annotated

import msgspec

from epp.scheduling.framework import PrepareData, PreRequest, Scorer
from epp.scheduling.params import PluginParams, parse_params
from kvindex.keys import prompt_keys

log = logging.getLogger("epp.plugins.precise_prefix")


@dataclass(slots=True)
class PromptBlocks:
    tokens: int
    keys: list[int]


Weight = Annotated[float, msgspec.Meta(ge=0, le=1)]


class PrecisePrefixCacheParams(PluginParams):
    # What a block held in each tier counts for (a tier not named counts 0).
    tier_weights: dict[Annotated[str, msgspec.Meta(max_length=64)], Weight] = msgspec.field(
        default_factory=lambda: {"gpu": 1.0, "cpu": 0.8}
    )
    speculative_indexing: bool = True


class PrecisePrefixCacheScorer(Scorer, PreRequest, PrepareData):
    type_name = "precise-prefix-cache-scorer"
    params_type = PrecisePrefixCacheParams
    needs_kv_cache_view = True

    def __init__(self, name, params=None):
        super().__init__(name, params)
        p = parse_params(self.params_type, self.params)
        self.tier_weights = {k.lower(): v for k, v in p.tier_weights.items()}
        self.speculative = p.speculative_indexing
        self.view = None

    def bind(self, view) -> None:
        self.view = view

    def _tokenizer(self, req):
        """(tokenizer, base model, LoRA adapter) for the request; no tokenizer if none fits."""
        base, lora = self.view.base_model(req.target_model) if self.view else (None, None)
        tokenizer = self.view.tokenizers.get(base) if self.view else None
        if req.api not in ("chat", "completions"):
            tokenizer = None
        return tokenizer, base, lora

    async def prepare(self, req) -> None:
        """Tokenize the prompt off the event loop: a multi-MiB prompt takes seconds."""
        tokenizer, _, _ = self._tokenizer(req)
        if tokenizer is not None:
            await req.tokenize(tokenizer)

    def blocks(self, req) -> PromptBlocks | None:
        """The prompt's index keys, computed once per request; None if it cannot be known."""
        if self.name in req.state:
            return req.state[self.name]
        out = None
        tokenizer, base, lora = self._tokenizer(req)
        if tokenizer is not None:
            from kvindex.tokenize import PromptError

            try:
                tokens = req.prompt_token_ids(tokenizer)
                keys = prompt_keys(tokens, self.view.index.block_size, base, lora_name=lora)
                out = PromptBlocks(len(tokens), keys)
            except PromptError as exc:
                log.debug("no prefix score for %s: %s", req.request_id, exc)
        req.state[self.name] = out
        return out

    def score(self, req, endpoints):
        blocks = self.blocks(req)
        if blocks is None or not blocks.keys:
            return [0.0] * len(endpoints)
        t0 = time.perf_counter()
        held = self.view.index.lookup(
            blocks.keys, [e.address for e in endpoints], tier_weights=self.tier_weights
        )
        self.view.lookup_seconds.observe(time.perf_counter() - t0)
        total = len(blocks.keys)
        return [held.get(e.address, 0.0) / total for e in endpoints]

    def cached_prompt(self, req, address: str) -> tuple[int, int] | None:
        """(prompt tokens, how many of them `address` holds from the start, in any tier);
        None when the prompt cannot be tokenized."""
        blocks = self.blocks(req)
        if blocks is None:
            return None
        if not blocks.keys:
            return blocks.tokens, 0
        index = self.view.index
        held = index.match_lengths(blocks.keys, (address,)).get(address, 0)
        return blocks.tokens, min(blocks.tokens, held * index.block_size)

    def pre_request(self, req, result):
        if not self.speculative:
            return
        blocks = self.blocks(req)
        if not blocks or not blocks.keys:
            return
        # Every profile's pick computes the prompt: the decode pod, and a prefill pod too.
        for profile_result in result.results.values():
            if profile_result is not None and profile_result.targets:
                self.view.index.add_speculative(profile_result.targets[0].address, blocks.keys)
