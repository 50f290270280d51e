"""Requests without a body: only the inference API's reads (and deletes of a client's own
stored objects) may reach a pod. `GET /v1/models[/{id}]` never does: the picker answers it
with the gateway's names (epp/model_catalog.py). Everything else a model server answers
without a body — POST /reset_prefix_cache, /sleep, LoRA unloads, /metrics, … — is the
operator's, not a client's, so the picker answers 404 and nothing is sent.

The paths are OpenAI's (as vLLM serves them): stored responses, conversations.
"""

from __future__ import annotations

import re

# One path segment of an id: no dot segments (a server that resolves `..` would land
# elsewhere), no percent escapes or backslashes (decoded ones could do the same).
_ID = r"(?!\.\.?(?:/|$))[A-Za-z0-9._:~@+-]+"

ALLOWED: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (method, re.compile(pattern))
    for method, pattern in (
        ("GET", rf"/v1/responses/{_ID}"),
        ("DELETE", rf"/v1/responses/{_ID}"),
        ("POST", rf"/v1/responses/{_ID}/cancel"),
        ("GET", rf"/v1/responses/{_ID}/input_items"),
        ("GET", rf"/v1/conversations/{_ID}"),
        ("DELETE", rf"/v1/conversations/{_ID}"),
        ("GET", rf"/v1/conversations/{_ID}/items"),
        ("GET", rf"/v1/conversations/{_ID}/items/{_ID}"),
        ("DELETE", rf"/v1/conversations/{_ID}/items/{_ID}"),
    )
)


def allowed_without_body(method: str, path: str) -> bool:
    """Whether a body-less `method path` is one of the inference API's (a query string is
    allowed: list and retrieve calls take parameters)."""
    route = path.split("?", 1)[0]
    return any(method == m and pattern.fullmatch(route) for m, pattern in ALLOWED)
