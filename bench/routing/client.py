"""Time each answer's first and later tokens from the server-sent events (the routing
benchmark's `send` for bench.client.run_trace).

Every body streams (bench/workload.py), so TTFT is the time to the first chunk with text and
TPOT the time from it to the last one over the tokens after the first — the tokens counted
from the final usage chunk when the server sends it (a chunk may carry more than one token),
else one a chunk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import aiohttp

from infergw.bench.client import chunks, text_of, usage_of
from infergw.bench.routing.workloads import Arrival

PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(slots=True)
class Outcome:
    at: float  # the arrival's offset in the trace
    ok: bool = False
    ttft: float | None = None
    tpot: float | None = None
    tokens: int = 0  # chunks with text
    status: int = 0
    prompt_tokens: int = 0  # from the final usage chunk
    cached_tokens: int = 0  # prompt tokens the pod found in its cache on admission


async def send(session: aiohttp.ClientSession, base_url: str, arrival: Arrival) -> Outcome:
    out = Outcome(arrival.at)
    t0 = time.monotonic()
    first = last = None
    generated = 0  # from the usage chunk
    try:
        async with session.post(base_url + PATHS[arrival.api], json=arrival.body) as resp:
            out.status = resp.status
            if resp.status != 200:
                await resp.read()
                return out
            async for chunk in chunks(resp):
                usage = usage_of(chunk)
                if usage is not None:
                    out.prompt_tokens, out.cached_tokens = usage.prompt_tokens, usage.cached_tokens
                    generated = usage.completion_tokens
                if text_of(chunk):
                    now = time.monotonic()
                    first = first or now
                    last = now
                    out.tokens += 1
        out.ok = first is not None
    except (TimeoutError, aiohttp.ClientError):
        return out
    if first is not None:
        out.ttft = first - t0
        out.tpot = tpot(first, last, generated or out.tokens)
    return out


def tpot(first: float, last: float, tokens: int) -> float | None:
    """Mean time per output token after the first (None for a single token)."""
    return (last - first) / (tokens - 1) if tokens > 1 else None
