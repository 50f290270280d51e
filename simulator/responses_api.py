"""OpenAI's Responses API (`POST /v1/responses`), the part a client's plain text exchange
uses: `input` (a string, or messages whose content is a string or input_text/output_text
parts) and `instructions` become a chat generation; the answer is a `response` with one
assistant message of `output_text`, `status` (`incomplete` when `max_output_tokens` cut it)
and `usage` in input/output tokens; streamed (`stream`), vLLM's events from `response.created`
to `response.completed`, a text delta a token. Stored answers (`store`, true by default)
continue with `previous_response_id` (simulator/response_store.py). Not simulated: tools,
background responses."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from infergw.simulator.anthropic import event
from infergw.simulator.protocol import ApiError
from infergw.simulator.request import SimRequest

_SAME = ("model", "temperature", "top_p")
_ROLES = ("user", "assistant", "system", "developer")


def to_chat(body: Any, earlier: tuple[dict, ...] = ()) -> dict:
    """The chat completion request a Responses request amounts to, after the `earlier`
    conversation its previous_response_id names; 400 for what the simulator does not serve."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if body.get("tools"):
        raise ApiError(400, "tools in the Responses API are not simulated", "tools")
    chat = [*earlier, *_messages(body.get("input"))]
    if body.get("instructions") is not None:
        if not isinstance(body["instructions"], str):
            raise ApiError(400, "'instructions' must be a string", "instructions")
        chat.insert(0, {"role": "system", "content": body["instructions"]})
    out = {k: body[k] for k in _SAME if body.get(k) is not None}
    if body.get("max_output_tokens") is not None:
        out["max_tokens"] = body["max_output_tokens"]
    return {**out, "messages": chat}


def previous_id(body: Any) -> str | None:
    """The stored response a request continues (400 unless a string)."""
    given = body.get("previous_response_id") if isinstance(body, dict) else None
    if given is not None and not isinstance(given, str):
        raise ApiError(400, "'previous_response_id' must be a string", "previous_response_id")
    return given


def stores(body: dict) -> bool:
    """Whether the answer is kept (`store`, true unless false, as in vLLM)."""
    store = body.get("store")
    if store is not None and not isinstance(store, bool):
        raise ApiError(400, "'store' must be a boolean", "store")
    return store is not False


def _messages(given: Any) -> list[dict]:
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise ApiError(400, "'input' must be a string or a non-empty list of messages", "input")
    out = []
    for i, item in enumerate(given):
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise ApiError(400, f"input[{i}]: only messages are simulated", "input")
        role = item.get("role")
        if role not in _ROLES:
            raise ApiError(400, f"input[{i}] needs a role of {', '.join(_ROLES)}", "input")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _text(item.get("content"), i)})  # fmt: skip
    return out


def _text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"input[{i}].content must be a string or text parts", "input")


@dataclass(frozen=True, slots=True)
class Head:
    """What an answer is from its start: its ids, model, time and what it continues."""

    model: str
    created: int
    previous: str | None = None
    store: bool = True
    id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")


def response(head: Head, req: SimRequest) -> dict:
    """The finished answer."""
    cut = req.finish_reason == "length"
    prompt, output = len(req.prompt_token_ids), len(req.output_token_ids)
    text = {"type": "output_text", "text": req.output_text, "annotations": [], "logprobs": []}
    status = "incomplete" if cut else "completed"
    return {
        **_started(head, status),
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "output": [_message(head, status, [text])],
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": max(0, req.num_cached_tokens)},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + output,
        },
    }


def _started(head: Head, status: str) -> dict:
    return {
        "id": head.id,
        "object": "response",
        "created_at": head.created,
        "model": head.model,
        "status": status,
        "incomplete_details": None,
        "error": None,
        "instructions": None,
        "output": [],
        "previous_response_id": head.previous,
        "store": head.store,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": None,
    }


def _message(head: Head, status: str, content: list[dict]) -> dict:
    return {
        "id": head.message_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content,
    }


async def events(head: Head, req: SimRequest, done: Callable[[dict], None]) -> AsyncIterator[bytes]:
    """The streamed answer as vLLM sends it, a text delta a token; `done` gets the finished
    answer (to store it) before the last event."""
    numbers = iter(range(1 << 62))

    def sent(kind: str, **data: Any) -> bytes:
        return event(kind, {"sequence_number": next(numbers), **data})

    where = {"item_id": head.message_id, "output_index": 0, "content_index": 0}
    yield sent("response.created", response=_started(head, "in_progress"))
    yield sent("response.in_progress", response=_started(head, "in_progress"))
    yield sent("response.output_item.added", output_index=0,
               item=_message(head, "in_progress", []))  # fmt: skip
    empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield sent("response.content_part.added", part=empty, **where)
    while True:
        out = await req.outputs.get()
        if out.finish_reason in ("abort", "error"):
            error = ApiError(500, req.error or f"request {req.request_id} failed in the engine")
            yield sent("error", code=str(error.status), message=error.message, param=None)
            return
        if out.text:
            yield sent("response.output_text.delta", delta=out.text, logprobs=[], **where)
        if out.finish_reason is not None:
            break
    answer = response(head, req)
    message = answer["output"][0]
    text = message["content"][0]
    yield sent("response.output_text.done", text=text["text"], logprobs=[], **where)
    yield sent("response.content_part.done", part=text, **where)
    yield sent("response.output_item.done", output_index=0, item=message)
    done(answer)
    kind = "response.completed" if answer["status"] == "completed" else "response.incomplete"
    yield sent(kind, response=answer)
