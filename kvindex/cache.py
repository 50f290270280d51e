"""The one entry the picker uses into the KV-cache index: tokenize a request's prompt (off the
event loop; the picker's token counting asks here too, so a prompt is tokenized once), cut it
into the index's keys, score pods by what they hold of it, and add a routing decision's
blocks speculatively.

The prompt is tokenized as vLLM would (the model's own tokenizer and chat template) and keyed as
vLLM shares blocks (kvindex.keys): by the base model, the LoRA adapter and the request's
`cache_salt`. Multimodal requests get no keys: the tokenizer refuses non-text content parts, as
the picker can compute neither vLLM's multimodal hashes nor the placeholder tokens an image
expands to, so it claims no hit for such a request rather than a wrong one.

The cached prefix counts what the pod's engine will reuse: whole engine blocks (a pod's block
size comes from its BlockStored events, else from its `vllm:cache_config_info`, else the index's)
and never the last prompt token, which vLLM always computes again:
`floor(min(held tokens, n - 1) / engine block) * engine block`. The index itself may be finer
than the engines (`--kv-index-block-size`, 16 by default); it must divide their block sizes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Histogram

from infergw.api import tracing
from infergw.kvindex.backend import PrefixIndex, PrefixView, RemotePrefixIndex
from infergw.kvindex.engine_hashing import EngineKeys
from infergw.kvindex.keys import prompt_keys
from infergw.kvindex.tokenize import PromptError, PromptTokenizer, PromptTokenizers

log = logging.getLogger("kvindex.cache")

TOKENIZED_APIS = frozenset({"chat", "completions"})


@dataclass(frozen=True, slots=True)
class Prompt:
    """One request's prompt as the index sees it; `held`: what the pods hold of it, when a
    remote index was asked (KVCache.fetch), else None (the index answers directly)."""

    tokens: int
    keys: list[int]
    held: PrefixView | None = None


class TokenizableRequest(Protocol):
    """What the cache needs of a request: epp.context.RequestContext, which keeps the
    prompt's tokens for the request's life."""

    @property
    def api(self) -> str: ...
    @property
    def request_id(self) -> str: ...
    @property
    def target_model(self) -> str: ...

    def prompt_token_ids(self, tokenizer: PromptTokenizer) -> array: ...
    async def tokenize(self, tokenizer: PromptTokenizer) -> None: ...


def tokens_with(req: TokenizableRequest, tokenizer: PromptTokenizer | None) -> array | None:
    """The prompt's token ids by `tokenizer` (tokenized once a request, by the request); None
    without a tokenizer, or when it refused the prompt (callers estimate instead)."""
    if tokenizer is None:
        return None
    try:
        return req.prompt_token_ids(tokenizer)
    except PromptError as exc:
        log.debug("no tokens for %s: %s", req.request_id, exc.reason)
        return None


def _no_adapter(model: str) -> tuple[str, str | None]:
    return model, None


class KVCache:
    """Tokenizers, keys and the block index behind one narrow surface."""

    def __init__(
        self,
        *,
        tokenizers: PromptTokenizers,
        index: PrefixIndex,
        base_model: Callable[[str], tuple[str, str | None]] = _no_adapter,
        lookup_seconds: Histogram | None = None,
        engine_block_size: Callable[[str], int | None] = lambda pod: None,
        engine_keys: EngineKeys | None = None,
    ) -> None:
        self.tokenizers = tokenizers  # shared with token counting: one prefix cache a model
        self._index = index
        self._remote = index if isinstance(index, RemotePrefixIndex) else None
        self._base_model = base_model  # model → (base model, LoRA adapter or None)
        self._lookup_seconds = lookup_seconds
        self._engine_block_size = engine_block_size  # pod → its engine's block size, if known
        # Set when the index is keyed by the engines' own block hashes (kvindex.engine_hashing).
        self._engine_keys = engine_keys
        # Told of every speculative add this picker makes (pod, keys): other picker
        # replicas hold the same entries (epp/replica_sync.py).
        self.speculative_listeners: list[Callable[[str, list[int]], None]] = []

    @property
    def block_size(self) -> int:
        return self._index.block_size

    def _tokenizer(self, req: TokenizableRequest) -> tuple[PromptTokenizer | None, str, str | None]:
        """(tokenizer, base model, LoRA adapter) for the request; no tokenizer if none fits."""
        base, lora = self._base_model(req.target_model)
        if req.api not in TOKENIZED_APIS:
            return None, base, lora
        return self.tokenizers.get(base), base, lora

    async def tokenize(self, req: TokenizableRequest) -> None:
        """Tokenize the prompt off the event loop: a multi-MiB prompt takes seconds."""
        tokenizer, _, _ = self._tokenizer(req)
        if tokenizer is not None:
            await req.tokenize(tokenizer)

    def token_ids(self, req: TokenizableRequest) -> array | None:
        """The prompt's token ids; None when no tokenizer fits its model or it refused the
        prompt."""
        return tokens_with(req, self._tokenizer(req)[0])

    def prompt(self, req: TokenizableRequest, cache_salt: str | None = None) -> Prompt | None:
        """The prompt's index keys, salted with the request's `cache_salt` as vLLM salts its
        blocks; None if they cannot be known (no tokenizer for its model, or the tokenizer
        refused the prompt). Callers keep it: it is cut anew."""
        tokens = self.token_ids(req)
        if tokens is None:
            return None
        _, base, lora = self._tokenizer(req)
        engine = self._engine_keys
        if engine is None:
            return Prompt(len(tokens), prompt_keys(tokens, self.block_size, base, lora, cache_salt))
        if not engine.knows(lora):  # vLLM hashes the adapter's path: no keys, no false hit
            log.debug("no path configured for LoRA adapter %r: %s not keyed", lora, req.request_id)
            return Prompt(len(tokens), [])
        return Prompt(len(tokens), engine.keys(tokens, lora, cache_salt))

    @property
    def remote(self) -> bool:
        """Whether the index is behind a round trip: scoring needs a `fetch` first."""
        return self._remote is not None

    async def fetch(self, prompt: Prompt) -> Prompt:
        """The prompt with what the pods hold of it, read in one round trip from a remote
        index (a failure reads as no hits); with the in-memory index, the prompt itself."""
        if self._remote is None or not prompt.keys:
            return prompt
        t0 = time.perf_counter()
        with tracing.span("kvindex.lookup", {"infergate.kv.blocks": len(prompt.keys)}):
            held = await self._remote.fetch(prompt.keys)
        if self._lookup_seconds is not None:
            self._lookup_seconds.observe(time.perf_counter() - t0)
        return dataclasses.replace(prompt, held=held)

    def _held(self, prompt: Prompt) -> PrefixView:
        return self._index if prompt.held is None else prompt.held

    def score(
        self, prompt: Prompt, pods: Sequence[str], tier_weights: Mapping[str, float]
    ) -> list[float]:
        """Per pod, the weighted count of consecutive prompt blocks from the start it holds
        (each block weighs its best tier), over the prompt's block count: 0..1."""
        if not prompt.keys:
            return [0.0] * len(pods)
        total = len(prompt.keys)
        if prompt.held is not None:  # fetched: its time was observed then
            held = prompt.held.lookup(prompt.keys, pods, tier_weights=tier_weights)
        else:
            t0 = time.perf_counter()
            with tracing.span(
                "kvindex.lookup", {"infergate.kv.blocks": total, "infergate.endpoints": len(pods)}
            ):
                held = self._index.lookup(prompt.keys, pods, tier_weights=tier_weights)
            if self._lookup_seconds is not None:
                self._lookup_seconds.observe(time.perf_counter() - t0)
        return [held.get(pod, 0.0) / total for pod in pods]

    def matched_blocks(self, prompt: Prompt, pods: Sequence[str]) -> dict[str, int]:
        """Per pod, how many blocks from the prompt's start it holds, in any tier."""
        return self._held(prompt).match_lengths(prompt.keys, pods) if prompt.keys else {}

    def cached_prefix(self, prompt: Prompt, pod: str) -> int:
        """How many of the prompt's tokens `pod` will reuse from the start, in any tier: whole
        engine blocks, never the last token (see the module's docstring)."""
        held = self.matched_blocks(prompt, (pod,)).get(pod, 0) * self.block_size
        engine = self._engine_block_size(pod) or self.block_size
        return max(0, min(held, prompt.tokens - 1)) // engine * engine

    def add_speculative(self, pod: str, prompt: Prompt) -> None:
        """`pod` was chosen for the prompt: its blocks count as held until they expire or a
        BlockStored confirms them."""
        if prompt.keys:
            self._index.add_speculative(pod, prompt.keys)
            for listener in self.speculative_listeners:
                listener(pod, prompt.keys)

    def add_speculative_keys(self, pod: str, keys: list[int]) -> None:
        """Another picker replica chose `pod` for a prompt with these keys: hold them as this
        picker's own speculative entries (not told to the listeners again)."""
        self._index.add_speculative(pod, keys)
