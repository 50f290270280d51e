"""Tool calls in chat answers. A request that forces one (`tool_choice` "required", or a named
function) gets it, as vLLM answers one under guided decoding: the message's `tool_calls` with
JSON arguments that fit the function's parameters (each required property a value of its
type; strings are the generated text), `finish_reason` "tool_calls". With "auto" or "none"
the answer is text, as vLLM's is without a tool parser."""

from __future__ import annotations

import json
import uuid
from typing import Any

from infergw.simulator.protocol import ApiError

FINISH_REASON = "tool_calls"
_OTHER_VALUES: dict[str, Any] = {"integer": 1, "number": 1.0, "boolean": True, "array": [],
                                 "object": {}, "null": None}  # fmt: skip


def forced_tool(body: dict) -> dict | None:
    """The function a request makes the answer call (its `function` object), or None."""
    choice = body.get("tool_choice")
    if choice in (None, "auto", "none"):
        return None
    tools = body.get("tools")
    functions = [
        t["function"]
        for t in (tools if isinstance(tools, list) else [])
        if isinstance(t, dict)
        and t.get("type") == "function"
        and isinstance(t.get("function"), dict)
    ]
    if not functions:
        raise ApiError(400, "a tool_choice other than auto or none needs tools", "tool_choice")
    if choice == "required":
        return functions[0]
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        for function in functions:
            if function.get("name") == name:
                return function
        raise ApiError(
            400, f"tool_choice names {name!r}, which is not among the tools", "tool_choice"
        )
    raise ApiError(
        400, "tool_choice must be none, auto, required or a named function", "tool_choice"
    )


def arguments(function: dict, text: str) -> str:
    """JSON arguments with each required parameter set."""
    params = function.get("parameters") if isinstance(function.get("parameters"), dict) else {}
    props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
    required = params.get("required") if isinstance(params.get("required"), list) else []
    out: dict[str, Any] = {}
    for name in required:
        if not isinstance(name, str):
            continue
        kind = (props.get(name) or {}).get("type") if isinstance(props.get(name), dict) else None
        out[name] = text.strip() or "x" if kind in (None, "string") else _OTHER_VALUES.get(kind)
    return json.dumps(out, ensure_ascii=False)


def tool_call(function: dict, text: str) -> dict:
    """One entry of a message's `tool_calls`."""
    return {
        "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
        "type": "function",
        "function": {"name": function.get("name"), "arguments": arguments(function, text)},
    }
