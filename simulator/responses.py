"""OpenAI response and stream-chunk shapes, as vLLM writes them."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from simulator.request import SimRequest, TokenOutput

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


def usage_of(reqs: list[SimRequest], *, prompt_tokens_details: bool) -> dict:
    """The usage of one answer, summed over its prompts; cached tokens only when the
    operator turned prompt_tokens_details on (vLLM's --enable-prompt-tokens-details)."""
    cached = sum(max(r.num_cached_tokens, 0) for r in reqs) if prompt_tokens_details else None
    return usage(
        sum(r.num_prompt_tokens for r in reqs),
        sum(len(r.output_token_ids) for r in reqs),
        cached,
    )


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


async def merge_outputs(reqs: list[SimRequest]) -> AsyncIterator[tuple[int, TokenOutput]]:
    """Yield (prompt index, output) from several requests as tokens arrive, until all finish."""
    if len(reqs) == 1:
        while True:
            out = await reqs[0].outputs.get()
            yield 0, out
            if out.finish_reason is not None:
                return
    merged: asyncio.Queue[tuple[int, TokenOutput]] = asyncio.Queue()

    async def pump(i: int, r: SimRequest) -> None:
        while True:
            out = await r.outputs.get()
            merged.put_nowait((i, out))
            if out.finish_reason is not None:
                return

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    try:
        remaining = len(reqs)
        while remaining:
            i, out = await merged.get()
            yield i, out
            if out.finish_reason is not None:
                remaining -= 1
    finally:
        for t in tasks:
            t.cancel()
