"""One request's context: what the picker learns while it handles a request, kept beside the
parsed request (epp.request.InferenceRequest), which never changes.

Each field has one writer: extproc makes the context with the request and its endpoint
subset hint; the header trust (epp.trust) sets who is asking; the director sets the route,
priority, usage stripping and chosen targets; the gatekeeper's ticket is what it charged;
the prompt's tokens are kept the first time anyone asks (epp.tokenizing); plugins keep
their own per-request values in typed slots (PluginSlot).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from infergw.epp.request import InferenceRequest, token_ids, token_ids_off_loop
from infergw.epp.routing.table import Resolution
from infergw.epp.trust import DEFAULT_FAIRNESS_ID

if TYPE_CHECKING:  # the gatekeeper and tokenizers read the context: no import cycle at run time
    from infergw.epp.gatekeeper import Ticket
    from infergw.epp.response_ids import Pinned
    from infergw.kvindex.tokenize import PromptError, PromptTokenizer

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PromptTokens:
    """The prompt as one tokenizer tokenized it: the token ids, or why it could not."""

    tokenizer: PromptTokenizer
    ids: array | PromptError


class PluginSlot(Generic[T]):
    """Where one plugin keeps a value of type T for one request: the plugin makes its slot
    once, the context holds the value. Typed, unlike a shared dict of names."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name  # for debugging only: slots are told apart by identity

    def get(self, ctx: RequestContext) -> T | None:
        return cast("T | None", ctx.plugin_values.get(self))

    def put(self, ctx: RequestContext, value: T) -> None:
        ctx.plugin_values[self] = value

    def clear(self, ctx: RequestContext) -> None:
        ctx.plugin_values.pop(self, None)

    def once(self, ctx: RequestContext, compute: Callable[[], T]) -> T:
        """The value, computed the first time a request asks (None is a value, kept too)."""
        values = ctx.plugin_values
        if self not in values:
            values[self] = compute()
        return cast("T", values[self])

    def __repr__(self) -> str:
        return f"PluginSlot({self.name!r})"


@dataclass(slots=True, eq=False)
class RequestContext:
    request: InferenceRequest
    subset: list[str] | None = None  # ext_proc's endpoint subset hint; None: no hint
    # Who is asking, as the picker believes it (epp.trust.HeaderTrust.apply).
    objective: str | None = None
    fairness_id: str = DEFAULT_FAIRNESS_ID
    match_headers: dict[str, str] = field(default_factory=dict)  # what route rules match
    # The engine's model name: the client's, a trusted rewrite, then the route's.
    target_model: str = ""
    priority: int = 0  # the objective's; < 0 is sheddable
    resolution: Resolution | None = None  # the route, rule and ModelServer; None: no route
    # The picker asked a stream for usage the client did not: the usage event is removed
    # from the answer again.
    strip_usage: bool = False
    ticket: Ticket | None = None  # what rate limits and flow control charge when it ends
    tokens: PromptTokens | None = None  # the prompt's tokens, once someone asked
    targets: list[str] = field(default_factory=list)  # chosen endpoints, primary first
    # Headers the picker adds on the request's way to the pod (a route's timeout, P/D's
    # prefill pods).
    upstream_headers: dict[str, str] = field(default_factory=dict)
    # The stored response the request continues, on the pod that stored it
    # (epp/stored_responses.py); its engine's id goes in place of the client's.
    pinned: Pinned | None = None
    plugin_values: dict[PluginSlot[Any], object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.target_model:
            self.target_model = self.request.model
        if not self.match_headers:  # until the trust has its say: the client's
            self.match_headers = self.request.headers

    # What the KV cache facade reads (kvindex.cache.TokenizableRequest).
    @property
    def api(self) -> str:
        return self.request.api

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def prompt_token_ids(self, tokenizer: PromptTokenizer) -> array:
        """The prompt's token ids from `tokenizer`, tokenized once a request (here, on the
        calling thread, when `tokenize` was not awaited first). Raises its PromptError."""
        kept = self.tokens
        if kept is None or kept.tokenizer is not tokenizer:
            kept = self.tokens = PromptTokens(tokenizer, token_ids(self.request, tokenizer))
        if isinstance(kept.ids, array):
            return kept.ids
        raise kept.ids

    async def tokenize(self, tokenizer: PromptTokenizer) -> None:
        """Tokenize the prompt on a tokenizing thread, so that prompt_token_ids answers from
        what was kept without blocking the event loop."""
        kept = self.tokens
        if kept is None or kept.tokenizer is not tokenizer:
            self.tokens = PromptTokens(tokenizer, await token_ids_off_loop(self.request, tokenizer))

    def upstream_body(self) -> bytes:
        """The body the pod gets: the model the route chose, and usage asked for if the
        picker needs it."""
        return self.request.body_for_upstream(
            self.target_model,
            ask_usage=self.strip_usage,
            previous_response_id=self.pinned.stored.engine_id if self.pinned else "",
        )
