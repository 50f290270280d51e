"""A request built field by field (no body to parse) in a fresh context, for plugin tests."""

from __future__ import annotations

from typing import Any

from infergw.epp.context import RequestContext
from infergw.epp.request import InferenceRequest
from infergw.epp.request_body import RequestBody


def bare_context(
    *,
    api: str = "completions",
    model: str = "m",
    target_model: str = "",
    body: RequestBody | None = None,
    **fields: Any,
) -> RequestContext:
    """`fields` are InferenceRequest's (prompt_text, max_tokens, headers, session_id, …);
    `target_model` is the engine's model the route chose (default: `model`)."""
    request = InferenceRequest(
        request_id="r",
        path="/v1/chat/completions" if api == "chat" else f"/v1/{api}",
        api=api,
        body=body or RequestBody(),
        raw_body=b"",
        model=model,
        **fields,
    )
    return RequestContext(request, target_model=target_model)
