"""The one way a request's prompt is tokenized: through the KV cache facade
(kvindex.cache.KVCache) when one is configured, else through the models' tokenizers given
with --tokenizer (ModelTokenizers). Token counting for rate limits and flow control and the
precise prefix scorer ask the same object, so a prompt is tokenized once, with one
tokenizer, and kept in the request's context."""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, Protocol

from infergw.epp.context import RequestContext
from infergw.kvindex.cache import TOKENIZED_APIS, tokens_with

if TYPE_CHECKING:
    from infergw.kvindex.tokenize import PromptTokenizer, PromptTokenizers


class PromptTokenizing(Protocol):
    """Tokenizes a request's prompt into its context; KVCache and ModelTokenizers are ones."""

    async def tokenize(self, req: RequestContext) -> None:
        """Tokenize off the event loop (a multi-MiB prompt takes seconds)."""
        ...

    def token_ids(self, req: RequestContext) -> array | None:
        """The prompt's token ids; None when no tokenizer fits or it refused the prompt."""
        ...


class ModelTokenizers:
    """The --tokenizer models' tokenizers, for the engine's model name (or, failing that,
    the client's)."""

    def __init__(self, tokenizers: PromptTokenizers) -> None:
        self.tokenizers = tokenizers

    def _tokenizer(self, ctx: RequestContext) -> PromptTokenizer | None:
        if ctx.api not in TOKENIZED_APIS:
            return None
        return self.tokenizers.get(ctx.target_model) or self.tokenizers.get(ctx.request.model)

    async def tokenize(self, ctx: RequestContext) -> None:
        tokenizer = self._tokenizer(ctx)
        if tokenizer is not None:
            await ctx.tokenize(tokenizer)

    def token_ids(self, ctx: RequestContext) -> array | None:
        return tokens_with(ctx, self._tokenizer(ctx))
