"""Replaying a trace open loop (each request at its own offset, whatever the answers do) and
reading the server-sent events of a streamed OpenAI-style answer.

Each benchmark keeps its own `send` (what it records per request); the schedule and the
parsing of the stream are shared.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import aiohttp

# A whole replay's limit: long enough for the slowest answer in any benchmark's trace.
REPLAY_TIMEOUT = aiohttp.ClientTimeout(total=300)


class Timed(Protocol):
    at: float  # seconds after the run starts


R = TypeVar("R", bound=Timed)
T = TypeVar("T")


async def run_trace(
    url: str,
    trace: Sequence[R],
    send: Callable[[aiohttp.ClientSession, str, R], Awaitable[T]],
    on_done: Callable[[T], None] | None = None,
) -> list[T]:
    """Send every request of `trace` at its offset; the outcomes, in trace order."""
    connector = aiohttp.TCPConnector(limit=0)  # open loop: never queue behind the pool
    async with aiohttp.ClientSession(timeout=REPLAY_TIMEOUT, connector=connector) as session:
        start = time.monotonic()

        async def timed(request: R) -> T:
            delay = start + request.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            out = await send(session, url, request)
            if on_done is not None:
                on_done(out)
            return out

        return list(await asyncio.gather(*(timed(r) for r in trace)))


def parse_chunk(data: bytes) -> dict:
    """One SSE data payload as a JSON object ({} for anything else)."""
    try:
        chunk = json.loads(data)
    except ValueError:
        return {}
    return chunk if isinstance(chunk, dict) else {}


async def chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """The JSON objects of a streamed answer's `data: {...}` lines ([DONE] and others skipped)."""
    async for line in resp.content:
        if line.startswith(b"data: {"):
            yield parse_chunk(line[6:])


def text_of(chunk: dict) -> str:
    """The generated text in one chunk ('' for role-only or usage chunks)."""
    try:
        choice = chunk["choices"][0]
    except (KeyError, IndexError, TypeError):
        return ""
    if "text" in choice:
        return choice["text"] or ""
    return (choice.get("delta") or {}).get("content") or ""


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int  # prompt tokens the pod found in its cache on admission
    completion_tokens: int = 0  # 0: not reported


def usage_of(chunk: dict) -> Usage | None:
    """The usage a chunk reports (the final one, with stream_options.include_usage)."""
    usage = chunk.get("usage")
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details") or {}
    return Usage(
        int(usage.get("prompt_tokens") or 0),
        int(details.get("cached_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
    )
