"""Validation of OpenAI-style request bodies, with vLLM's rules and OpenAI-style errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class ApiError(Exception):
    """An error the client caused (or may see): rendered as {"error": {...}} with this status."""

    TYPES = {
        400: "BadRequestError",
        404: "NotFoundError",
        405: "MethodNotAllowed",
        413: "RequestEntityTooLarge",
        500: "InternalServerError",
        503: "ServiceUnavailableError",
    }

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "Error"),
                "param": self.param,
                "code": self.status,
            }
        }


def decode_json(raw: bytes) -> Any:
    """A request body as JSON; ApiError 400 for anything that is not valid JSON text."""
    try:
        body = json.loads(raw)
        # Only a \u escape can make a lone surrogate (raw UTF-8 cannot): check only then.
        if b"\\u" in raw:
            json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        raise ApiError(
            400,
            "the body has a lone UTF-16 surrogate (a \\ud800-\\udfff escape outside a "
            "pair), which is not valid Unicode text",
        ) from exc
    # ValueError: also undecodable UTF-8 and integers over Python's 4300-digit limit.
    except ValueError as exc:
        raise ApiError(400, f"JSON decode error: {exc}") from exc
    except RecursionError as exc:
        raise ApiError(400, "JSON decode error: the body is nested too deeply") from exc
    return body


# Other fields (temperature, top_p, user, ...) are accepted and ignored, as vLLM ignores
# unknown ones: they shape real sampling, which synthetic output does not model.
# Would change the answer in ways the simulator cannot honour: refuse rather than mislead.
_UNSUPPORTED = {
    "logprobs": "logprobs",
    "top_logprobs": "logprobs",
    "prompt_logprobs": "prompt logprobs",
    "echo": "echo",
    "best_of": "best_of",
    "suffix": "suffix",
    "guided_json": "guided decoding",
    "guided_regex": "guided decoding",
    "guided_choice": "guided decoding",
    "structured_outputs": "structured outputs",
}
# Counts where 0 still asks for something (the chosen token's own logprob): only unset is off.
_ZERO_IS_ON = frozenset({"prompt_logprobs"})
_ZERO_IS_ON_COMPLETIONS = _ZERO_IS_ON | {"logprobs"}  # chat's logprobs is a boolean


@dataclass(slots=True, frozen=True)
class TemplateOptions:
    """How chat messages become a prompt: used by chat completions and /tokenize."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict | None = None
    tools: list | None = None


@dataclass(slots=True)
class GenerationRequest:
    """What both completion endpoints boil down to, before tokenization."""

    model: str | None
    stream: bool
    include_usage: bool
    continuous_usage: bool
    max_tokens: int | None
    min_tokens: int
    stop: tuple[str, ...]
    stop_token_ids: frozenset[int]
    ignore_eos: bool
    seed: int | None
    add_special_tokens: bool
    # completions: a list of prompts (text or token ids); chat: one message list
    prompts: list[str | list[int]] | None = None
    messages: list[dict] | None = None
    template: TemplateOptions | None = None  # chat only
    # P/D disaggregation (vLLM's NixlConnector): do_remote_decode on a prefill leg,
    # do_remote_prefill and where to pull the KV on a decode leg.
    kv_transfer_params: dict | None = None
    # vLLM's return_token_ids: prompt and output token ids in the answer; return_prompt_text
    # (chat): the prompt as the chat template rendered it, which the server fills in.
    return_token_ids: bool = False
    return_prompt_text: bool = False
    prompt_text: str | None = None
    cache_salt: str | None = None
    # chat: the function the answer must call (tool_choice "required" or named), if any
    tool_call: dict | None = None


def _get(body: dict, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    # bool is an int in Python; a JSON true is not a valid max_tokens.
    if kind in (int, float, (int, float)) and isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be a number, got a boolean", key)
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ApiError(400, f"'{key}' must be of type {want}, got {type(value).__name__}", key)
    return value


def _unsupported(body: dict, *, chat: bool) -> None:
    zero_is_on = _ZERO_IS_ON if chat else _ZERO_IS_ON_COMPLETIONS
    for key, what in _UNSUPPORTED.items():
        value = body.get(key)
        off = value is None or (key not in zero_is_on and value in (False, 0))
        if not off and not (key == "best_of" and value == 1):
            raise ApiError(400, f"{what} is not supported by the infergate simulator", key)


def _stream_usage(options: dict | None) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats); vLLM includes usage once stream_options is set."""
    if options is None:
        return False, False
    flags = []
    for key, default in (("include_usage", True), ("continuous_usage_stats", False)):
        value = options.get(key, default)
        if value is not None and not isinstance(value, bool):
            raise ApiError(
                400, f"'stream_options.{key}' must be a boolean, got {value!r}", "stream_options"
            )
        flags.append(bool(value))
    return flags[0], flags[0] and flags[1]


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def _parse_prompts(body: dict) -> list[str | list[int]]:
    if "prompt" not in body or body["prompt"] is None:
        raise ApiError(400, "'prompt' is required", "prompt")
    p = body["prompt"]
    if isinstance(p, str):
        return [p]
    if _is_token_list(p) and p:
        return [p]
    if (
        isinstance(p, list)
        and p
        and all(isinstance(x, str) or (_is_token_list(x) and x) for x in p)
    ):
        return list(p)
    raise ApiError(
        400,
        "'prompt' must be a string, a list of strings, a list of token ids "
        "or a list of token-id lists, and not empty",
        "prompt",
    )


def _common(body: Any, *, chat: bool) -> GenerationRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _unsupported(body, chat=chat)
    n = _get(body, "n", int, 1)
    if n != 1:
        raise ApiError(400, "n > 1 is not supported by the infergate simulator", "n")
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise ApiError(400, "stream_options can only be set when stream is true", "stream_options")
    include_usage, continuous_usage = _stream_usage(options)
    if chat:  # chat: unset means "up to max_model_len", as in vLLM
        max_tokens = _get(body, "max_completion_tokens", int, None)
        max_tokens = max_tokens or _get(body, "max_tokens", int, None)
    else:  # completions: OpenAI's and vLLM's default is 16
        max_tokens = _get(body, "max_tokens", int, 16)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    min_tokens = _get(body, "min_tokens", int, 0)
    if min_tokens < 0 or (max_tokens is not None and min_tokens > max_tokens):
        raise ApiError(400, "min_tokens must be >= 0 and <= max_tokens", "min_tokens")
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", "stop")
    stop_ids = _get(body, "stop_token_ids", list, [])
    if not _is_token_list(stop_ids):
        raise ApiError(400, "'stop_token_ids' must be a list of integers", "stop_token_ids")
    return GenerationRequest(
        model=_get(body, "model", str, None),
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        stop=tuple(stop),
        stop_token_ids=frozenset(stop_ids),
        ignore_eos=_get(body, "ignore_eos", bool, False),
        seed=_get(body, "seed", int, None),
        add_special_tokens=_get(body, "add_special_tokens", bool, not chat),
        kv_transfer_params=_get(body, "kv_transfer_params", dict, None),
        return_token_ids=_get(body, "return_token_ids", bool, False),
        return_prompt_text=chat and _get(body, "return_prompt_text", bool, False),
        cache_salt=_cache_salt(body),
    )


def _cache_salt(body: dict) -> str | None:
    salt = body.get("cache_salt")
    if salt is not None and not (isinstance(salt, str) and salt):
        raise ApiError(
            400, "Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt"
        )
    return salt


def parse_completion(body: Any) -> GenerationRequest:
    req = _common(body, chat=False)
    req.prompts = _parse_prompts(body)
    return req


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required and must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", "messages")
    return messages


def parse_chat(body: Any) -> GenerationRequest:
    req = _common(body, chat=True)
    req.messages = parse_messages(body)
    req.template = _template_options(body)
    return req


def _template_options(body: dict) -> TemplateOptions:
    options = TemplateOptions(
        add_generation_prompt=_get(body, "add_generation_prompt", bool, True),
        continue_final_message=_get(body, "continue_final_message", bool, False),
        chat_template=_get(body, "chat_template", str, None),
        chat_template_kwargs=_get(body, "chat_template_kwargs", dict, None),
        tools=_get(body, "tools", list, None),
    )
    if options.add_generation_prompt and options.continue_final_message:
        raise ApiError(
            400,
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            "continue_final_message",
        )
    return options


@dataclass(slots=True)
class TokenizeRequest:
    """Either a prompt (special tokens added) or messages (rendered with `template`)."""

    model: str | None
    add_special_tokens: bool
    return_token_strs: bool
    prompt: str | None = None
    messages: list[dict] | None = None
    template: TemplateOptions | None = None


def parse_tokenize(body: Any) -> TokenizeRequest:
    """vLLM's /tokenize: either `prompt` (special tokens added) or `messages` (template applied)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    has_prompt, has_messages = "prompt" in body, "messages" in body
    if has_prompt == has_messages:
        raise ApiError(400, "give exactly one of 'prompt' or 'messages'")
    req = TokenizeRequest(
        model=_get(body, "model", str, None),
        add_special_tokens=_get(body, "add_special_tokens", bool, has_prompt),
        return_token_strs=_get(body, "return_token_strs", bool, False),
    )
    if has_prompt:
        req.prompt = _get(body, "prompt", str, None)
        if req.prompt is None:
            raise ApiError(400, "'prompt' must be a string", "prompt")
    else:
        req.messages = parse_messages(body)
        req.template = _template_options(body)
    return req


@dataclass(slots=True)
class DetokenizeRequest:
    model: str | None
    tokens: list[int]


def parse_detokenize(body: Any) -> DetokenizeRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    tokens = body.get("tokens")
    if not _is_token_list(tokens):
        raise ApiError(400, "'tokens' must be a list of integers", "tokens")
    return DetokenizeRequest(model=_get(body, "model", str, None), tokens=tokens)
