"""Parse an OpenAI-style request body into what scheduling needs, and nothing more."""

from __future__ import annotations

import logging
import re
import sys
import threading
import traceback
import uuid
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from infergw.api.names import REQUEST_ID_HEADER, SESSION_HEADER, USER_HEADER
from infergw.epp.errors import PickerError
from infergw.epp.json_splice import set_member
from infergw.epp.multipart import FormField, form_field
from infergw.epp.request_body import (
    STREAM_OPTIONS,
    TEXT,
    RequestBody,
    StreamOptions,
    check_routed_member,
    decode_body,
    decode_field,
    decode_raw,
    present,
    requested_model,
)
from infergw.epp.worker_lane import WorkerLane

if TYPE_CHECKING:  # loaded when a prompt is first tokenized (jinja2, tokenizers)
    from infergw.kvindex.tokenize import PromptError, PromptTokenizer

log = logging.getLogger("epp.request")


# Which API a path is: the suffix decides, so /v1/chat/completions and /openai/v1/... both work.
API_BY_SUFFIX = (
    ("/chat/completions", "chat"),
    ("/completions", "completions"),
    ("/responses", "responses"),
    ("/conversations", "conversations"),
    ("/embeddings", "embeddings"),
    ("/audio/transcriptions", "transcriptions"),
    ("/audio/translations", "translations"),
    ("/rerank", "rerank"),
    ("/score", "score"),
    ("/messages", "messages"),  # Anthropic's Messages API, as vLLM serves it
)
# APIs whose body is a multipart/form-data upload, its `model` a text field (epp/multipart.py).
FORM_APIS = frozenset({"transcriptions", "translations"})
# APIs whose streams carry usage only when stream_options asks for it: the picker may ask on
# a client's behalf. Anthropic's stream always has it; the others do not stream here.
STREAM_OPTIONS_APIS = frozenset({"chat", "completions", "responses", "conversations"})
# The members an API must have besides `model` (400 naming the first one missing).
_REQUIRED = {
    "rerank": ("query", "documents"),
    "score": ("text_1", "text_2"),
}


@dataclass(frozen=True, slots=True)
class _TokenizingLane:
    """A thread that tokenizes prompts off the event loop, one at a time (one prompt's decoded
    messages, and the tokenizer's Encoding of ~400 bytes a token, is what a lane may hold
    beyond the bodies themselves)."""

    thread: WorkerLane
    lock: threading.Lock


# Large prompts have a lane of their own: one takes seconds (1 MiB: ~4 s on 2 busy cores), and
# nearly every request waits for its tokens, so small prompts must never queue behind them
# (four 4 MiB prompts on one lane held a 1-token request for 9 s).
_SMALL_PROMPTS = _TokenizingLane(WorkerLane("epp-tokenize"), threading.Lock())
_LARGE_PROMPTS = _TokenizingLane(WorkerLane("epp-tokenize-large"), threading.Lock())
LARGE_PROMPT_BYTES = 64 * 1024
# Larger prompts (about 300k tokens, past most models' context) are not tokenized: their
# tokens are estimated and the precise prefix scorer leaves them to the others. Tokenizing
# one costs ~150 bytes of memory a byte of prompt (a 4 MiB one: ~600 MB and 16 s).
MAX_TOKENIZED_BYTES = 1024 * 1024
_NON_EMPTY_LIST = re.compile(rb"\[\s*[^\]\s]")


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """What parsing one request produces, and nothing else: it never changes after
    parse_request. What the picker learns while handling it (who it believes is asking, the
    route, the gate's ticket, the prompt's tokens, the chosen endpoints) is kept in its
    context (epp.context.RequestContext)."""

    request_id: str
    path: str
    api: str
    body: RequestBody
    raw_body: bytes
    model: str
    headers: dict[str, str] = field(default_factory=dict)  # as the client (and Envoy) sent them
    stream: bool = False
    max_tokens: int | None = None
    prompt_text: str = ""  # what approximate prefix hashing reads
    user: str | None = None  # the verified user Envoy's auth forwards (x-infergate-user)
    session_id: str | None = None
    stream_options: StreamOptions | None = None
    # A form's `model` (FORM_APIS): where its value's bytes are in raw_body, for a rewrite.
    model_span: tuple[int, int] | None = None

    @property
    def approx_prompt_tokens(self) -> int:
        # ~4 characters a token: good enough to weigh load, never used for billing.
        return max(1, len(self.prompt_text) // 4)

    @property
    def held_bytes(self) -> int:
        """What the request keeps in memory while the picker holds it: its body and the
        prompt text taken from it (the typed fields are slices of the body)."""
        return len(self.raw_body) + sys.getsizeof(self.prompt_text)

    def body_for_upstream(
        self, target_model: str, *, ask_usage: bool = False, previous_response_id: str = ""
    ) -> bytes:
        """The body to send on: the client's bytes, with the model and stream_options members
        replaced in place when the model is rewritten to `target_model` or usage is asked
        for on the client's behalf, and previous_response_id replaced by the engine's own id
        (epp/stored_responses.py)."""
        out = self.raw_body
        if previous_response_id:
            current = bytes(self.body.previous_response_id)
            encoded = msgspec.json.encode(previous_response_id)
            out = set_member(out, "previous_response_id", encoded, current)
        if target_model and target_model != self.model:
            if self.model_span is not None:
                start, end = self.model_span
                return b"".join((out[:start], target_model.encode(), out[end:]))
            out = set_member(
                out, "model", msgspec.json.encode(target_model), bytes(self.body.model)
            )
        if ask_usage:
            asked = self.stream_options or StreamOptions()
            options = msgspec.structs.replace(asked, include_usage=True)
            raw = self.body.stream_options
            current = bytes(raw) if len(raw) else None
            out = set_member(out, "stream_options", msgspec.json.encode(options), current)
        return out

    @property
    def takes_stream_options(self) -> bool:
        """Whether usage may be asked for on the client's behalf (STREAM_OPTIONS_APIS)."""
        return self.api in STREAM_OPTIONS_APIS

    @property
    def client_wants_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)


def token_ids(req: InferenceRequest, tokenizer: PromptTokenizer) -> array | PromptError:
    """The prompt as `tokenizer` tokenizes it, on the calling thread (under its lane's lock),
    or the PromptError that says why not. RequestContext keeps the answer: call it through
    the context, which asks once a request."""
    return _tokens_or_error(tokenizer, req.api, req.body)


async def token_ids_off_loop(
    req: InferenceRequest, tokenizer: PromptTokenizer
) -> array | PromptError:
    """token_ids on the request's tokenizing lane, so the event loop never waits for it."""
    return await _lane(req.body).thread.run(_tokens_or_error, tokenizer, req.api, req.body)


def _tokens_or_error(
    tokenizer: PromptTokenizer, api: str, body: RequestBody
) -> array | PromptError:
    """The token ids, 4 bytes each (a list of ints would hold 36 a token for the request's
    life), or the PromptError the tokenizer raised (kept, so it is raised once a caller asks
    rather than in the tokenizing thread)."""
    from infergw.kvindex.tokenize import PromptError

    size = _prompt_bytes(body)
    if size > MAX_TOKENIZED_BYTES:
        return PromptError(
            f"the prompt's {size} bytes are over the {MAX_TOKENIZED_BYTES} tokenized"
        )
    with _lane(body).lock:
        try:
            return array("I", tokenizer.tokens_for(api, _tokenizer_fields(body)))
        except PromptError as exc:
            return exc
        except OverflowError:  # a client's token ids out of 0..2**32-1: no vocabulary has them
            return PromptError("token ids must fit in 32 bits")
        except Exception as exc:  # a tokenizer bug: callers estimate instead of failing
            # The exception's message may quote the prompt: the log has its type and frames.
            log.error(
                "tokenizing a %s prompt failed: %s",
                api,
                type(exc).__name__,
                extra={"frames": "".join(traceback.format_tb(exc.__traceback__))},
            )
            return PromptError("the tokenizer failed", repr(exc))


def _prompt_bytes(body: RequestBody) -> int:
    """The bytes of the body's fields a tokenizer reads."""
    return sum(len(r) for r in (body.prompt, body.messages, body.tools, body.chat_template_kwargs))


def _lane(body: RequestBody) -> _TokenizingLane:
    return _LARGE_PROMPTS if _prompt_bytes(body) > LARGE_PROMPT_BYTES else _SMALL_PROMPTS


def _tokenizer_fields(body: RequestBody) -> dict[str, Any]:
    """The body fields a tokenizer reads, decoded: the prompt, or the chat's messages, tools
    and template arguments."""
    fields = {
        "prompt": decode_raw(body.prompt),
        "messages": decode_raw(body.messages),
        "tools": decode_raw(body.tools),
        "chat_template_kwargs": decode_raw(body.chat_template_kwargs),
    }
    if body.add_generation_prompt is not None:
        fields["add_generation_prompt"] = body.add_generation_prompt
    return fields


def verified_user(headers: dict[str, str]) -> str | None:
    """The user Envoy's auth verified; Envoy removes a client's x-infergate-user and sets
    this one (stack/auth.py). None: no auth, or no user (empty counts as none)."""
    return headers.get(USER_HEADER) or None


def api_for_path(path: str) -> str | None:
    path = path.split("?", 1)[0].rstrip("/")
    for suffix, api in API_BY_SUFFIX:
        if path.endswith(suffix):
            return api
    return None


def _text(raw: msgspec.Raw, name: str) -> str:
    """A prompt field as text: a JSON string's value, else its JSON as the client wrote it."""
    view = memoryview(raw)
    if view[:1] == b'"':
        return decode_field(raw, name, TEXT)
    return str(view, "utf-8")


def _prompt_text(api: str, body: RequestBody) -> str:
    """What approximate prefix hashing reads: the prompt's bytes as the client sent them (a
    conversation that grows keeps its prefix), never re-serialized."""
    for name in _REQUIRED.get(api, ()):
        if not present(getattr(body, name)):
            raise PickerError(400, f"'{name}' is required", param=name)
    if api in ("chat", "messages"):
        if not present(body.messages) or not _NON_EMPTY_LIST.match(memoryview(body.messages)):
            raise PickerError(400, "'messages' must be a non-empty list", param="messages")
        if api == "messages" and present(body.system):  # Anthropic's system prompt comes first
            return str(b"\n".join((memoryview(body.system), memoryview(body.messages))), "utf-8")
        return str(memoryview(body.messages), "utf-8")
    if api == "completions":
        if not present(body.prompt):
            raise PickerError(400, "'prompt' is required", param="prompt")
        return _text(body.prompt, "prompt")
    if api == "responses":
        parts = [memoryview(p) for p in (body.instructions, body.tools, body.input) if present(p)]
        return str(b"\n".join(parts), "utf-8")
    if api == "embeddings":
        if not present(body.input):
            raise PickerError(400, "'input' is required", param="input")
        return _text(body.input, "input")
    if api in _REQUIRED:  # rerank, score: what the prompts share comes first
        first, second = (getattr(body, name) for name in _REQUIRED[api])
        return str(b"\n".join((memoryview(first), memoryview(second))), "utf-8")
    return ""


def parse_request(
    path: str, raw_body: bytes, headers: dict[str, str], *, max_body_bytes: int
) -> InferenceRequest:
    """Validate at the edge: every problem is a PickerError with a precise message."""
    if len(raw_body) > max_body_bytes:
        raise PickerError(
            413, f"request body of {len(raw_body)} bytes exceeds the limit of {max_body_bytes}"
        )
    api = api_for_path(path)
    if api is None:
        raise PickerError(404, f"no inference API at path {path!r}")
    if api in FORM_APIS:
        return _parse_form(path, api, raw_body, headers)
    body = decode_body(raw_body)
    model = requested_model(body)
    stream_options = None
    if present(body.stream_options):
        stream_options = decode_field(body.stream_options, "stream_options", STREAM_OPTIONS)
    # The members the picker routes on and may rewrite: once, named without escapes.
    check_routed_member(raw_body, "model", body.model)
    check_routed_member(raw_body, "stream_options", body.stream_options)
    if api == "responses":  # the picker may put the engine's own id in its place
        check_routed_member(raw_body, "previous_response_id", body.previous_response_id)
    return InferenceRequest(
        request_id=headers.get(REQUEST_ID_HEADER) or str(uuid.uuid4()),
        path=path,
        api=api,
        body=body,
        raw_body=raw_body,
        model=model,
        headers=headers,
        stream=bool(body.stream),  # OpenAI allows null
        stream_options=stream_options,
        max_tokens=body.max_output,
        prompt_text=_prompt_text(api, body),
        user=verified_user(headers),
        session_id=headers.get(SESSION_HEADER),
    )


def form_model(raw_body: bytes, headers: dict[str, str]) -> FormField:
    """A form upload's `model` field: PickerError 400 unless the body is a well-formed
    multipart/form-data body with a non-empty `model` text field (epp/multipart.py)."""
    found = form_field(raw_body, headers.get("content-type", ""), "model")
    if found is None or not found.value:
        raise PickerError(400, "'model' is required and must be a non-empty string", param="model")
    return found


def _parse_form(path: str, api: str, raw_body: bytes, headers: dict[str, str]) -> InferenceRequest:
    """A form upload (FORM_APIS): only its `model` is read; the file goes on untouched."""
    model = form_model(raw_body, headers)
    return InferenceRequest(
        request_id=headers.get(REQUEST_ID_HEADER) or str(uuid.uuid4()),
        path=path,
        api=api,
        body=RequestBody(),
        raw_body=raw_body,
        model=model.value,
        headers=headers,
        user=verified_user(headers),
        session_id=headers.get(SESSION_HEADER),
        model_span=(model.start, model.end),
    )
