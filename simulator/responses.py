"""OpenAI response and stream-chunk shapes, as vLLM writes them."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec

from infergw.simulator.request import SimRequest, TokenOutput

_json = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def sse(obj: Any) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


def system_fingerprint(mode: str, custom: str | None, version: str, config: object) -> str | None:
    """vLLM's --fingerprint-mode: "vllm-<version>-<hash8>" (full and hash agree without
    parallelism), a custom literal, or None; the hash covers what shapes the answers."""
    if mode == "none":
        return None
    if mode == "custom":
        return custom
    digest = hashlib.blake2b(repr(config).encode(), digest_size=4).hexdigest()
    return f"vllm-{version}-{digest}"


@dataclass(slots=True, frozen=True)
class AnswerHead:
    """What the body, or every chunk, of one answer carries: id, created, model."""

    id: str
    created: int
    model: str
    chat: bool
    system_fingerprint: str | None

    @classmethod
    def new(cls, model: str, chat: bool, system_fingerprint: str | None) -> AnswerHead:
        return cls(new_id(chat), now(), model, chat, system_fingerprint)

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def chunk(self, choices: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": self.chunk_object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


def prompt_details(req: SimRequest, *, chat: bool) -> dict:
    """usage.prompt_tokens_details of one prompt. vLLM 0.32's chat reports the prompt tokens
    this request wrote to the prefix cache too; its completions report only the hits."""
    created = (req.num_created_cache_tokens or 0) if chat else None
    return {
        "cached_tokens": max(req.num_cached_tokens, 0),
        "created_cache_tokens": created,
        "multimodal_tokens": None,  # text only
    }


def usage(prompt_tokens: int, completion_tokens: int, details: dict | None) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": details,
        # Only a reasoning parser fills it (reasoning_tokens); the simulator has none.
        "completion_tokens_details": None,
    }


def usage_of(reqs: list[SimRequest], details_of: SimRequest | None, *, chat: bool) -> dict:
    """The usage of one answer, summed over its prompts. prompt_tokens_details come from
    one prompt, `details_of`, as in vLLM (None: --enable-prompt-tokens-details is off)."""
    return usage(
        sum(r.num_prompt_tokens for r in reqs),
        sum(len(r.output_token_ids) for r in reqs),
        None if details_of is None else prompt_details(details_of, chat=chat),
    )


def running_usage(req: SimRequest, *, chat: bool) -> dict:
    """stream_options.continuous_usage_stats: one prompt's usage so far, without details."""
    n_prompt, n_out = req.num_prompt_tokens, len(req.output_token_ids)
    use = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
    if chat:
        use["completion_tokens_details"] = None
    return use


def without_nulls(obj: Any) -> Any:
    """vLLM writes the final usage chunk with exclude_none: no null anywhere in it."""
    if isinstance(obj, dict):
        return {k: without_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [without_nulls(v) for v in obj]
    return obj


def completion(
    head: AnswerHead,
    reqs: list[SimRequest],
    use: dict,
    *,
    return_token_ids: bool,
    kv_transfer_params: dict | None = None,
) -> dict:
    return {
        "id": head.id,
        "object": head.object,
        "created": head.created,
        "model": head.model,
        "choices": [
            {
                "index": i,
                "text": r.output_text,
                "logprobs": None,
                "finish_reason": r.finish_reason,
                "stop_reason": r.stop_reason,
                "token_ids": list(r.output_token_ids) if return_token_ids else None,
                "prompt_logprobs": None,
                "prompt_token_ids": list(r.prompt_token_ids) if return_token_ids else None,
                "routed_experts": None,
            }
            for i, r in enumerate(reqs)
        ],
        "service_tier": None,
        "system_fingerprint": head.system_fingerprint,
        "usage": use,
        "kv_transfer_params": kv_transfer_params,
        "ec_transfer_params": None,
        "metrics": None,
    }


def chat_message(text: str) -> dict:
    """vLLM 0.32's ChatMessage; it drops tool_calls when empty (no tool parser here)."""
    return {
        "role": "assistant",
        "content": text,
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "reasoning": None,
    }


def chat_completion(
    head: AnswerHead,
    req: SimRequest,
    use: dict,
    *,
    return_token_ids: bool,
    prompt_text: str | None = None,
    kv_transfer_params: dict | None = None,
) -> dict:
    return {
        "id": head.id,
        "object": head.object,
        "created": head.created,
        "model": head.model,
        "choices": [
            {
                "index": 0,
                "message": chat_message(req.output_text),
                "logprobs": None,
                "finish_reason": req.finish_reason,
                "stop_reason": req.stop_reason,
                "token_ids": list(req.output_token_ids) if return_token_ids else None,
                "routed_experts": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": head.system_fingerprint,
        "usage": use,
        "prompt_logprobs": None,
        "prompt_token_ids": list(req.prompt_token_ids) if return_token_ids else None,
        "prompt_text": prompt_text,
        "kv_transfer_params": kv_transfer_params,
        "ec_transfer_params": None,
        "metrics": None,
    }


# Stream chunks hold the fields vLLM sets on each (it writes them with exclude_unset).


def chat_first_chunk(
    head: AnswerHead, prompt_token_ids: list[int] | None, prompt_text: str | None
) -> dict:
    choice = {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    }
    return {
        **head.chunk([choice]),
        "prompt_token_ids": prompt_token_ids,
        "prompt_text": prompt_text,
    }


def chat_chunk(head: AnswerHead, out: TokenOutput, token_ids: list[int] | None) -> dict:
    choice: dict[str, Any] = {
        "index": 0,
        "delta": {"content": out.text},
        "logprobs": None,
        "finish_reason": out.finish_reason,
    }
    if out.finish_reason is not None:
        choice["stop_reason"] = out.stop_reason
    choice["token_ids"] = token_ids
    return head.chunk([choice])


def completion_chunk(
    head: AnswerHead,
    index: int,
    out: TokenOutput,
    prompt_token_ids: list[int] | None,
    token_ids: list[int] | None,
) -> dict:
    choice = {
        "index": index,
        "text": out.text,
        "logprobs": None,
        "finish_reason": out.finish_reason,
        "stop_reason": out.stop_reason,
        "prompt_token_ids": prompt_token_ids,
        "token_ids": token_ids,
    }
    return head.chunk([choice])


def usage_chunk(head: AnswerHead, use: dict) -> dict:
    return without_nulls(
        {**head.chunk([]), "usage": use, "system_fingerprint": head.system_fingerprint}
    )


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
