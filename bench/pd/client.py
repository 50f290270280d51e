"""Send a trace open loop (each request at its offset, whatever the answers do) and keep the
arrival time of every streamed token."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field

import aiohttp

from bench.pd.workload import Request


@dataclass(slots=True)
class Outcome:
    kind: str
    at: float  # the request's offset in the trace
    status: int = 0
    error: str = ""
    ttft: float | None = None
    token_times: list[float] = field(default_factory=list)  # monotonic, one per token
    prompt_tokens: int = 0
    cached_tokens: int = 0  # from the final usage chunk

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and bool(self.token_times)

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None

    @property
    def gaps(self) -> list[float]:
        """Inter-token latencies."""
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t)]


def _chunk(line: bytes) -> dict:
    try:
        doc = json.loads(line[6:])
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


async def send(session: aiohttp.ClientSession, url: str, req: Request) -> Outcome:
    out = Outcome(req.kind, req.at)
    t0 = time.monotonic()
    try:
        async with session.post(url + "/v1/completions", json=req.body) as resp:
            out.status = resp.status
            if resp.status != 200:
                out.error = (await resp.text())[:300]
                return out
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = _chunk(line)
                if "error" in chunk:
                    out.error = json.dumps(chunk["error"])[:300]
                    return out
                usage = chunk.get("usage")
                if isinstance(usage, dict):
                    out.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    details = usage.get("prompt_tokens_details") or {}
                    out.cached_tokens = int(details.get("cached_tokens") or 0)
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    out.token_times.append(time.monotonic())
    except (TimeoutError, aiohttp.ClientError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    if out.token_times:
        out.ttft = out.token_times[0] - t0
    return out


async def run_trace(url: str, trace: list[Request], on_done=None) -> list[Outcome]:
    """Every outcome, in trace order."""
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        start = time.monotonic()

        async def timed(r: Request) -> Outcome:
            delay = start + r.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            out = await send(session, url, r)
            if on_done is not None:
                on_done(out)
            return out

        return list(await asyncio.gather(*(timed(r) for r in trace)))
