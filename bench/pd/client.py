"""Keep the arrival time of every streamed token (the P/D benchmark's `send` for
bench.client.run_trace)."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field

import aiohttp

from infergw.bench.client import chunks, text_of, usage_of
from infergw.bench.pd.workload import Request


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


async def send(session: aiohttp.ClientSession, url: str, req: Request) -> Outcome:
    out = Outcome(req.kind, req.at)
    t0 = time.monotonic()
    try:
        async with session.post(url + "/v1/completions", json=req.body) as resp:
            out.status = resp.status
            if resp.status != 200:
                out.error = (await resp.text())[:300]
                return out
            async for chunk in chunks(resp):
                if "error" in chunk:
                    out.error = json.dumps(chunk["error"])[:300]
                    return out
                usage = usage_of(chunk)
                if usage is not None:
                    out.prompt_tokens, out.cached_tokens = usage.prompt_tokens, usage.cached_tokens
                if text_of(chunk):
                    out.token_times.append(time.monotonic())
    except (TimeoutError, aiohttp.ClientError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    if out.token_times:
        out.ttft = out.token_times[0] - t0
    return out
