"""The contention experiment on examples/fairness, shared by the benchmark and the e2e test.

Three tenants of one pod (16 slots, ~20 requests of 32 tokens a second):

- **A** floods: 60 requests outstanding at all times (a batch job, or a retry storm);
- **C** is backlogged too, with 20 outstanding: a third of A's, but enough that some always
  wait in the picker beyond the ~8 its fair half of the pod runs (with 12 its queue ran dry
  now and then, and a flow that is not backlogged banks no credit under VTC);
- **B** is light and latency-sensitive: one request every 0.5 s (~1.5 slots' worth).

First B runs alone (its baseline latency), then all three at once. Without flow control the
pod's FIFO queue serves A in proportion to the requests A parks there, and B waits behind
them; with it, the picker keeps the pod's queue short, A and C share by VTC, and B's
requests go out nearly at once.

VTC's promise (Sheng et al., OSDI '24, Theorem 4.4): over any interval in which two flows are
both backlogged, the weighted tokens served to them differ by at most
2 · max(w_in · L_in, w_out · M), L_in the longest prompt and M the most tokens a running
batch holds (here slots × (L_in + L_out)). Clients see a request's tokens only when it
completes, so a count from their usage is off from the service delivered by at most the
tokens each flow has in the pod at the interval's two ends ((slots + 1) requests: 16 running
and one waiting).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

from infergw.bench.common import percentile
from infergw.bench.fairness.load import Result, Run, Tenant, auth_headers, drive, weighted_tokens

SLOTS = 16  # examples/fairness/model.yaml: --max-num-seqs
WAITING = 1  # epp-config.yaml: queueDepthThreshold 0.5 lets one request wait in the pod
W_IN, W_OUT = 1.0, 2.0  # epp-config.yaml: fairness weights
MAX_TOKENS = 32
PROMPT_WORDS = 16

B = Tenant("tenant-b", "steady", interval=0.5, prompt_words=PROMPT_WORDS, max_tokens=MAX_TOKENS)
A = Tenant("tenant-a", "flood", concurrency=60, prompt_words=PROMPT_WORDS, max_tokens=MAX_TOKENS)
C = Tenant("tenant-c", "flood", concurrency=20, prompt_words=PROMPT_WORDS, max_tokens=MAX_TOKENS)
TENANTS = (A, B, C)


@dataclass(slots=True)
class Measurement:
    alone: Run  # B by itself
    contention: Run  # A, B and C at once
    warmup_s: float  # contention requests that started earlier are not counted
    duration_s: float  # how long the tenants sent
    sheddable_status: int | None = None  # a `batch` request sent during the flood

    def latencies(self, tenant: str) -> list[float]:
        return [r.latency for r in self.contention.of(tenant, since=self.warmup_s)]

    def alone_latencies(self) -> list[float]:
        return [r.latency for r in self.alone.of(B.name)]

    def b_p90_ratio(self) -> float:
        return percentile(self.latencies(B.name), 90) / percentile(self.alone_latencies(), 90)

    def service_gap(self, f: str = A.name, g: str = C.name) -> float:
        """The largest |weighted tokens of f − those of g| over [warmup, t], for every t up to
        the end of sending, counting each request when its answer arrived."""
        events = sorted(
            (r.end, r.tenant, weighted_tokens(r, W_IN, W_OUT))
            for r in self.served(f) + self.served(g)
        )
        gap = worst = 0.0
        for _, tenant, w in events:
            gap += w if tenant == f else -w
            worst = max(worst, abs(gap))
        return worst

    def longest(self) -> tuple[int, int]:
        """(longest prompt, longest answer) in tokens, as the clients were billed."""
        ok = [r for r in self.contention.results if r.ok]
        return max(r.prompt_tokens for r in ok), max(r.completion_tokens for r in ok)

    def vtc_bound(self) -> float:
        """VTC's bound for these requests, plus what counting at completion can add."""
        l_in, l_out = self.longest()
        batch_tokens = SLOTS * (l_in + l_out)
        theorem = 2 * max(W_IN * l_in, W_OUT * batch_tokens)
        in_flight = 2 * (SLOTS + WAITING) * (W_IN * l_in + W_OUT * l_out)
        return theorem + in_flight

    def served(self, tenant: str) -> list[Result]:
        """A tenant's answers that arrived while every tenant was sending, after warm-up."""
        return [
            r
            for r in self.contention.results
            if r.tenant == tenant and r.ok and self.warmup_s <= r.end <= self.duration_s
        ]

    def summary(self) -> dict:
        """Per tenant: latency p50/p90/p99 (s) of the requests sent after warm-up, and the
        tokens of the answers that arrived between warm-up and the end of sending."""
        rows = {}
        for tenant in TENANTS:
            lat = self.latencies(tenant.name)
            served = self.served(tenant.name)
            rows[tenant.name] = {
                "requests": len(lat),
                "p50_s": round(percentile(lat, 50), 3),
                "p90_s": round(percentile(lat, 90), 3),
                "p99_s": round(percentile(lat, 99), 3),
                "served_requests": len(served),
                "prompt_tokens": sum(r.prompt_tokens for r in served),
                "completion_tokens": sum(r.completion_tokens for r in served),
                "weighted_tokens": sum(weighted_tokens(r, W_IN, W_OUT) for r in served),
            }
        alone = self.alone_latencies()
        return {
            "tenants": rows,
            "b_alone": {
                "requests": len(alone),
                "p50_s": round(percentile(alone, 50), 3),
                "p90_s": round(percentile(alone, 90), 3),
            },
            "b_p90_ratio": round(self.b_p90_ratio(), 3),
            "service_gap_a_c": self.service_gap(),
            "vtc_bound": self.vtc_bound(),
            "errors": len(self.contention.errors()),
            "sheddable_status": self.sheddable_status,
        }


async def _sheddable(url: str, after: float) -> int:
    """One request of tenant-d, whose InferenceObjective is `batch` (priority -1,
    examples/fairness/epp-config.yaml), once the flood is on."""
    await asyncio.sleep(after)
    body = {"model": "infergate-sim", "prompt": "a batch job", "max_tokens": MAX_TOKENS}
    headers = auth_headers("tenant-d")
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
            await resp.read()
            return resp.status


def measure(url: str, *, alone_s: float, duration_s: float, warmup_s: float) -> Measurement:
    async def main() -> Measurement:
        alone = await drive(url, [B], alone_s, t0=time.monotonic())
        t0 = time.monotonic()
        contention, shed = await asyncio.gather(
            drive(url, list(TENANTS), duration_s, t0=t0),
            _sheddable(url, after=min(warmup_s + 1.0, duration_s / 2)),
        )
        return Measurement(alone, contention, warmup_s, duration_s, shed)

    return asyncio.run(main())
