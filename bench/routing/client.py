"""Send a trace open loop (each request at its own offset, whatever the answers do) and
time each answer's first and later tokens from the server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp

from bench.routing.workloads import Arrival

PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(slots=True)
class Outcome:
    at: float  # the arrival's offset in the trace
    ok: bool = False
    ttft: float | None = None
    tpot: float | None = None
    tokens: int = 0
    status: int = 0
    prompt_tokens: int = 0  # from the final usage chunk
    cached_tokens: int = 0  # prompt tokens the pod found in its cache on admission


def _parse(event: bytes) -> dict:
    try:
        chunk = json.loads(event)
    except ValueError:
        return {}
    return chunk if isinstance(chunk, dict) else {}


def _text_of(event: bytes | dict) -> str:
    """The generated text in one SSE data line ('' for role-only or usage chunks)."""
    chunk = _parse(event) if isinstance(event, bytes) else event
    try:
        choice = chunk["choices"][0]
    except (KeyError, IndexError, TypeError):
        return ""
    if "text" in choice:
        return choice["text"] or ""
    return (choice.get("delta") or {}).get("content") or ""


async def send(session: aiohttp.ClientSession, base_url: str, arrival: Arrival) -> Outcome:
    out = Outcome(arrival.at)
    t0 = time.monotonic()
    first = last = None
    try:
        async with session.post(base_url + PATHS[arrival.api], json=arrival.body) as resp:
            out.status = resp.status
            if resp.status != 200:
                await resp.read()
                return out
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = _parse(line[6:])
                usage = chunk.get("usage")
                if isinstance(usage, dict):
                    out.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    details = usage.get("prompt_tokens_details") or {}
                    out.cached_tokens = int(details.get("cached_tokens") or 0)
                if _text_of(chunk):
                    now = time.monotonic()
                    first = first or now
                    last = now
                    out.tokens += 1
        out.ok = first is not None
    except (TimeoutError, aiohttp.ClientError):
        return out
    if first is not None:
        out.ttft = first - t0
        if out.tokens > 1:
            out.tpot = (last - first) / (out.tokens - 1)
    return out


async def run_trace(
    base_url: str, trace: list[Arrival], on_done=None
) -> tuple[list[Outcome], float]:
    """All outcomes in trace order, and the seconds from the first send to the last answer."""
    timeout = aiohttp.ClientTimeout(total=300)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.monotonic()

        async def timed(a: Arrival) -> Outcome:
            delay = start + a.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            out = await send(session, base_url, a)
            if on_done is not None:
                on_done(out)
            return out

        outcomes = await asyncio.gather(*(timed(a) for a in trace))
        return list(outcomes), time.monotonic() - start
