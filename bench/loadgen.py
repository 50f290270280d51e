"""A closed-loop HTTP load generator for the benchmarks: C clients, each sending the next
request when the previous answer has fully arrived, for a fixed time."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass(slots=True)
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, whole answer
    ttfts: list[float] = field(default_factory=list)  # seconds, first body byte
    errors: int = 0
    wall: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.latencies)


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    body: dict,
    res: LoadResult,
    window: tuple[float, float],
) -> None:
    t0 = time.monotonic()
    first = None
    try:
        async with session.post(url, json=body) as resp:
            async for _chunk in resp.content.iter_any():
                if first is None:
                    first = time.monotonic()
            ok = resp.status == 200
    except aiohttp.ClientError:
        ok = False
    t1 = time.monotonic()
    if window[0] <= t0 and t1 <= window[1]:
        if ok:
            res.latencies.append(t1 - t0)
            res.ttfts.append((first or t1) - t0)
        else:
            res.errors += 1


async def run_load(
    url: str, make_body, concurrency: int, duration: float, warmup: float = 1.0
) -> LoadResult:
    """Requests that start after `warmup` and end within `duration` after it are counted."""
    res = LoadResult()
    start = time.monotonic()
    window = (start + warmup, start + warmup + duration)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(total=120)
    ) as session:

        async def worker(i: int) -> None:
            n = 0
            while time.monotonic() < window[1]:
                await _one(session, url, make_body(i, n), res, window)
                n += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    res.wall = duration
    return res
