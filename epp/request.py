"""Parse an OpenAI-style request body into what scheduling needs, and nothing more."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from epp.errors import PickerError

USER_HEADER = "x-infergate-user"

# Which API a path is: the suffix decides, so /v1/chat/completions and /openai/v1/... both work.
API_BY_SUFFIX = (
    ("/chat/completions", "chat"),
    ("/completions", "completions"),
    ("/responses", "responses"),
    ("/conversations", "conversations"),
    ("/embeddings", "embeddings"),
)


@dataclass(slots=True)
class InferenceRequest:
    request_id: str
    path: str
    api: str
    body: dict[str, Any]
    raw_body: bytes
    model: str
    headers: dict[str, str] = field(default_factory=dict)
    target_model: str = ""
    stream: bool = False
    max_tokens: int | None = None
    prompt_text: str = ""  # what approximate prefix hashing reads
    fairness_id: str = "default-flow"
    user: str | None = None  # the verified user Envoy's auth forwards (x-infergate-user)
    objective: str | None = None
    session_id: str | None = None
    priority: int = 0
    # Set by model routing: the route, rule and ModelServer (epp.routing.table.Resolution).
    resolution: Any = None
    # Set by scheduling: the chosen endpoints, primary first.
    targets: list[str] = field(default_factory=list)
    # Headers the picker adds to the request on its way to the pod (e.g. a route's timeout).
    upstream_headers: dict[str, str] = field(default_factory=dict)
    # Set when the picker asked a stream for usage the client did not ask for: the usage
    # event is removed from the answer again.
    strip_usage: bool = False
    ticket: Any = None  # what flow control and rate limits charge when the answer ends
    # Free slots for plugins (prefix hashes, kv-index hits, ...) keyed by plugin name.
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def approx_prompt_tokens(self) -> int:
        # ~4 characters a token: good enough to weigh load, never used for billing.
        return max(1, len(self.prompt_text) // 4)

    def body_for_upstream(self) -> bytes:
        """The body to send on: re-serialized only when the model was rewritten or usage
        was asked for."""
        rewrite = bool(self.target_model) and self.target_model != self.model
        if not rewrite and not self.strip_usage:
            return self.raw_body
        body = {**self.body, "model": self.target_model or self.model}
        if self.strip_usage:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

    def prompt_token_ids(self, tokenizer) -> list[int]:
        """The prompt as `tokenizer` (kvindex.tokenize.PromptTokenizer) tokenizes it, once a
        request: token counting for limits and prefix scoring both ask. May raise the
        tokenizer's PromptError."""
        key = ("prompt_token_ids", id(tokenizer))
        if key not in self.state:
            self.state[key] = tokenizer.tokens_for(self.api, self.body)
        return self.state[key]

    @property
    def client_wants_usage(self) -> bool:
        options = self.body.get("stream_options")
        return isinstance(options, dict) and bool(options.get("include_usage"))


def api_for_path(path: str) -> str | None:
    path = path.split("?", 1)[0].rstrip("/")
    for suffix, api in API_BY_SUFFIX:
        if path.endswith(suffix):
            return api
    return None


def _messages_text(messages: Any) -> str:
    # The whole message list, serialized: a stable prefix as the conversation grows.
    return json.dumps(messages, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def _prompt_text(api: str, body: dict[str, Any]) -> str:
    if api == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise PickerError(400, "'messages' must be a non-empty list")
        return _messages_text(messages)
    if api == "completions":
        prompt = body.get("prompt")
        if prompt is None:
            raise PickerError(400, "'prompt' is required")
        return prompt if isinstance(prompt, str) else json.dumps(prompt, separators=(",", ":"))
    if api == "responses":
        parts = [body.get("instructions"), body.get("tools"), body.get("input")]
        return _messages_text([p for p in parts if p is not None])
    if api == "embeddings":
        value = body.get("input")
        if value is None:
            raise PickerError(400, "'input' is required")
        return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return ""


def _max_tokens(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


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
    try:
        body = json.loads(raw_body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PickerError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise PickerError(400, "request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise PickerError(400, "'model' is required and must be a non-empty string")
    stream = body.get("stream")
    stream = False if stream is None else stream  # OpenAI allows null
    if not isinstance(stream, bool):
        raise PickerError(400, "'stream' must be a boolean")
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise PickerError(400, "'stream_options' must be an object")
    req = InferenceRequest(
        request_id=headers.get("x-request-id") or str(uuid.uuid4()),
        path=path,
        api=api,
        body=body,
        raw_body=raw_body,
        model=model,
        headers=headers,
        target_model=headers.get("x-gateway-model-name-rewrite") or model,
        stream=stream,
        max_tokens=_max_tokens(body),
        prompt_text=_prompt_text(api, body),
        # Envoy removes a client's x-infergate-user and sets the verified one: it wins.
        fairness_id=headers.get(USER_HEADER)
        or headers.get("x-gateway-inference-fairness-id")
        or "default-flow",
        user=headers.get(USER_HEADER) or None,
        objective=headers.get("x-gateway-inference-objective"),
        session_id=headers.get("x-session-id"),
    )
    return req
