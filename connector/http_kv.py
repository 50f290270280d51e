"""The http connector (and lmcache, which moves KV through its own store): a one-token prefill
that fills the shared cache, then the client's request, unchanged, on the local engine."""

from __future__ import annotations

from aiohttp import web

from infergw.connector.prefill import run_prefill
from infergw.connector.upstream import Exchange, dumps, run_decode


def prefill_body(body: dict) -> dict:
    """As Kthena's http connector: no stream or stream_options, one token."""
    out = dict(body)
    out.pop("stream", None)
    out.pop("stream_options", None)
    out["max_tokens"] = 1
    out["max_completion_tokens"] = 1
    min_tokens = out.get("min_tokens")
    if isinstance(min_tokens, int) and min_tokens > 1:
        out["min_tokens"] = 1  # else the engine refuses min_tokens > max_tokens
    return out


class HttpConnector:
    local_fallback = True  # the decode engine can prefill a request itself

    def __init__(self, name: str = "http") -> None:
        self.name = name

    async def handle(self, ex: Exchange) -> web.StreamResponse:
        await run_prefill(ex, dumps(prefill_body(ex.body)))
        return await run_decode(ex, ex.body)
