"""Anthropic's Messages API (`POST /v1/messages`) as vLLM serves it: the request becomes a chat
completion for the engine; the answer is a `message` with text content blocks, `stop_reason`
and `usage` (`input_tokens`, `output_tokens`), or, streamed, Anthropic's event sequence
(message_start, content_block_start, content_block_delta…, content_block_stop, message_delta,
message_stop)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from infergw.simulator.protocol import ApiError
from infergw.simulator.request import SimRequest

# The chat request's members a Messages request carries under the same name and meaning.
_SAME = ("model", "max_tokens", "stream", "temperature", "top_p", "top_k")
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


def to_chat(body: Any) -> dict:
    """The chat completion request a Messages request amounts to: `system` first, each
    message's text blocks joined. ApiError 400 for a body of the wrong shape."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if not isinstance(body.get("max_tokens"), int) or isinstance(body.get("max_tokens"), bool):
        raise ApiError(400, "'max_tokens' is required and must be an integer", "max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required and must be a non-empty list", "messages")
    chat = [{"role": m.get("role"), "content": _text(m.get("content"), f"messages[{i}]")}
            for i, m in enumerate(_objects(messages))]  # fmt: skip
    if body.get("system") is not None:
        chat.insert(0, {"role": "system", "content": _text(body["system"], "system")})
    out = {k: body[k] for k in _SAME if body.get(k) is not None}
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ApiError(400, "'stop_sequences' must be a list of strings", "stop_sequences")
        out["stop"] = stops
    return {**out, "messages": chat}


def _objects(messages: list) -> list[dict]:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of user or assistant", "messages")
    return messages


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or content blocks whose text is joined (tool results'
    too; images have no text here)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of blocks", "messages")
    parts = []
    for block in content:
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise ApiError(400, f"{where}.content has a block without a type", "messages")
        if isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif block["type"] == "tool_result":
            parts.append(_text(block.get("content") or "", where))
        elif block["type"] == "tool_use":
            parts.append(json.dumps(block.get("input") or {}))
    return "\n".join(parts)


def new_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def stop_reason(req: SimRequest) -> str:
    if isinstance(req.stop_reason, str):  # one of the request's stop_sequences
        return "stop_sequence"
    return _STOP_REASONS.get(req.finish_reason or "", "end_turn")


def usage(req: SimRequest) -> dict:
    return {"input_tokens": len(req.prompt_token_ids), "output_tokens": len(req.output_token_ids)}


def message(message_id: str, model: str, req: SimRequest) -> dict:
    """The whole answer, once the engine finished the request."""
    reason = stop_reason(req)
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": req.output_text}],
        "stop_reason": reason,
        "stop_sequence": req.stop_reason if reason == "stop_sequence" else None,
        "usage": usage(req),
    }


def event(kind: str, data: dict) -> bytes:
    """One server-sent event, named as Anthropic names them."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


async def events(message_id: str, model: str, req: SimRequest) -> AsyncIterator[bytes]:
    """The streamed answer, a text delta a token."""
    start = {**message(message_id, model, req), "content": [], "stop_reason": None}
    start["usage"] = {"input_tokens": len(req.prompt_token_ids), "output_tokens": 0}
    yield event("message_start", {"message": start})
    yield event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    while True:
        out = await req.outputs.get()
        if out.finish_reason in ("abort", "error"):
            error = ApiError(500, req.error or f"request {req.request_id} failed in the engine")
            yield event("error", {"error": error.body()["error"]})
            return
        if out.text:
            delta = {"type": "text_delta", "text": out.text}
            yield event("content_block_delta", {"index": 0, "delta": delta})
        if out.finish_reason is not None:
            break
    yield event("content_block_stop", {"index": 0})
    reason = stop_reason(req)
    sequence = req.stop_reason if reason == "stop_sequence" else None
    yield event(
        "message_delta",
        {
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": {"output_tokens": len(req.output_token_ids)},
        },
    )
    yield event("message_stop", {})
