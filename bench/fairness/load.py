"""Tenants that load a gateway, and what each of their requests got.

A tenant is a flow (its API key: the picker's flow is the verified user, examples/fairness)
with a way of sending: `flood` keeps
`concurrency` requests outstanding (a closed loop with no think time: a backlogged flow),
`steady` sends one request every `interval` seconds whatever the answers do (an open loop:
a light, latency-sensitive flow). Every request is a non-streaming completion with its own
prompt (so no prefix cache helps one tenant more than another) and a fixed `max_tokens`
that the simulator always fills; tokens served are read from each answer's `usage`, as a
client would bill them.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import aiohttp

WORDS = (
    "river stone cloud lantern orchard copper meadow signal harbor violet engine quartz "
    "thistle amber falcon glacier ribbon saddle timber walnut"
).split()


@dataclass(slots=True, frozen=True)
class Tenant:
    name: str
    mode: str  # "flood" or "steady"
    concurrency: int = 1  # flood: requests outstanding at once
    interval: float = 1.0  # steady: seconds between sends
    prompt_words: int = 48
    max_tokens: int = 32


@dataclass(slots=True)
class Result:
    tenant: str
    start: float  # seconds since the run began
    latency: float
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def end(self) -> float:
        return self.start + self.latency

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass(slots=True)
class Run:
    """Every request of one load run, in completion order."""

    results: list[Result] = field(default_factory=list)

    def of(self, tenant: str, since: float = 0.0, until: float = float("inf")) -> list[Result]:
        """A tenant's answered requests that started in [since, until)."""
        return [r for r in self.results if r.tenant == tenant and r.ok and since <= r.start < until]

    def errors(self) -> list[Result]:
        return [r for r in self.results if not r.ok]


def auth_headers(tenant: str) -> dict[str, str]:
    """The tenant's development API key (examples/fairness/api-keys.yaml)."""
    return {"authorization": f"Bearer sk-infergate-dev-{tenant}"}


def weighted_tokens(r: Result, w_in: float = 1.0, w_out: float = 2.0) -> float:
    return w_in * r.prompt_tokens + w_out * r.completion_tokens


def prompt(tenant: str, n: int, words: int) -> str:
    """A prompt unique to (tenant, n), about `words` words long."""
    body = " ".join(WORDS[(n * 7 + i * 3) % len(WORDS)] for i in range(words))
    return f"{tenant} request {n}: {body}"


async def _one(
    session: aiohttp.ClientSession, url: str, tenant: Tenant, n: int, t0: float
) -> Result:
    headers = auth_headers(tenant.name)
    body = {
        "model": "infergate-sim",
        "prompt": prompt(tenant.name, n, tenant.prompt_words),
        "max_tokens": tenant.max_tokens,
    }
    start = time.monotonic()
    status, usage = 0, {}
    try:
        async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
            status = resp.status
            answer = await resp.json(content_type=None)
            if status == 200 and isinstance(answer, dict):
                usage = answer.get("usage") or {}
    except (TimeoutError, aiohttp.ClientError, ValueError):
        pass
    end = time.monotonic()
    return Result(
        tenant.name,
        start - t0,
        end - start,
        status,
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
    )


async def drive(url: str, tenants: list[Tenant], duration: float, *, t0: float) -> Run:
    """Load the gateway with every tenant for `duration` seconds; requests still out at the
    end are awaited (and kept), none is started after it."""
    run = Run()
    deadline = t0 + duration
    counter = itertools.count()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def flood(tenant: Tenant) -> None:
            while time.monotonic() < deadline:
                run.results.append(await _one(session, url, tenant, next(counter), t0))

        async def steady(tenant: Tenant) -> None:
            pending = []
            next_at = time.monotonic()
            while next_at < deadline:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                task = asyncio.create_task(_one(session, url, tenant, next(counter), t0))
                task.add_done_callback(lambda t: run.results.append(t.result()))
                pending.append(task)
                next_at += tenant.interval
            await asyncio.gather(*pending)

        jobs = []
        for tenant in tenants:
            if tenant.mode == "flood":
                jobs += [flood(tenant) for _ in range(tenant.concurrency)]
            elif tenant.mode == "steady":
                jobs.append(steady(tenant))
            else:
                raise ValueError(f"tenant {tenant.name}: unknown mode {tenant.mode!r}")
        await asyncio.gather(*jobs)
    return run


def run_load(url: str, tenants: list[Tenant], duration: float) -> Run:
    async def main() -> Run:
        return await drive(url, tenants, duration, t0=time.monotonic())

    return asyncio.run(main())
