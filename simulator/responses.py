"""OpenAI response and stream-chunk shapes, as vLLM writes them."""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

_json = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def sse(obj: Any) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": (
            None if cached_tokens is None else {"cached_tokens": cached_tokens}
        ),
    }


# stop_reason: the stop string or stop token id that ended a choice, else None (vLLM's field).
StopReason = str | int | None


def completion(
    rid: str,
    model: str,
    choices: list[tuple[str, str | None, StopReason]],
    use: dict,
    kv_transfer_params: dict | None = None,
) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": i,
                "text": text,
                "logprobs": None,
                "finish_reason": reason,
                "stop_reason": stop_reason,
                "prompt_logprobs": None,
            }
            for i, (text, reason, stop_reason) in enumerate(choices)
        ],
        "usage": use,
        "kv_transfer_params": kv_transfer_params,
    }


def chat_completion(
    rid: str,
    model: str,
    text: str,
    reason: str | None,
    stop_reason: StopReason,
    use: dict,
    kv_transfer_params: dict | None = None,
) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "tool_calls": [],
                    "reasoning_content": None,
                },
                "logprobs": None,
                "finish_reason": reason,
                "stop_reason": stop_reason,
            }
        ],
        "usage": use,
        "kv_transfer_params": kv_transfer_params,
    }


def completion_chunk(
    rid: str,
    created: int,
    model: str,
    index: int,
    text: str,
    reason: str | None,
    stop_reason: StopReason,
) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": index,
                "text": text,
                "logprobs": None,
                "finish_reason": reason,
                "stop_reason": stop_reason,
            }
        ],
    }


def chat_chunk(
    rid: str, created: int, model: str, delta: dict, reason: str | None, stop_reason: StopReason
) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": reason,
                "stop_reason": stop_reason,
            }
        ],
    }


def usage_chunk(rid: str, created: int, model: str, chat: bool, use: dict) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": use,
    }


def model_card(
    name: str, created: int, root: str, parent: str | None, max_model_len: int | None
) -> dict:
    """One entry of GET /v1/models, with vLLM's fields."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [
            {
                "id": "modelperm-" + uuid.uuid4().hex,
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }
