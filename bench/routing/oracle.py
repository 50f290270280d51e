"""The oracle bound: the best prefix-cache hit rate a router could reach on a trace.

Every request goes to the pod that holds the longest prefix of its prompt (ties: round
robin), ignoring load; each pod is an LRU cache of full prompt blocks with the pods' own
capacity. The time to first token it implies counts only the prefill of uncached tokens —
no queueing, no decode — so it is a floor no router can beat on this fleet, not a target.
"""

from __future__ import annotations

import statistics
from collections import OrderedDict
from dataclasses import dataclass

import xxhash

from infergw.bench.routing.workloads import Arrival
from infergw.kvindex.tokenize import PromptTokenizer
from infergw.stack.local import DEFAULT_MODEL_DIR


@dataclass(slots=True)
class OracleResult:
    hit_rate: float
    ttft_mean_ms: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    ttft_p99_ms: float


def block_hashes(tokens: list[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks vLLM may reuse (never the prompt's last token)."""
    usable = (len(tokens) - 1) // block_size
    out, parent = [], 0
    for i in range(usable):
        h = xxhash.xxh64()
        h.update(parent.to_bytes(8, "little"))
        for t in tokens[i * block_size : (i + 1) * block_size]:
            h.update(t.to_bytes(4, "little"))
        parent = h.intdigest()
        out.append(parent)
    return out


class _PodCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def matched(self, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            n += 1
        return n

    def store(self, hashes: list[int]) -> None:
        for h in hashes:
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)


def oracle(
    trace: list[Arrival],
    *,
    pods: int,
    capacity_blocks: int,
    block_size: int,
    prefill_us_per_token: float,
    measured_from: float,
) -> OracleResult:
    from infergw.bench.common import percentile

    tok = PromptTokenizer.from_dir(DEFAULT_MODEL_DIR)
    caches = [_PodCache(capacity_blocks) for _ in range(pods)]
    hits = queries = 0
    ttfts = []
    turn = 0
    for a in trace:
        tokens = tok.tokens_for(a.api, a.body)
        hashes = block_hashes(tokens, block_size)
        best = max(c.matched(hashes) for c in caches)
        tied = [i for i, c in enumerate(caches) if c.matched(hashes) == best]
        pod = tied[turn % len(tied)]
        turn += 1
        caches[pod].store(hashes)
        if a.at >= measured_from:
            cached = best * block_size
            hits += cached
            queries += len(tokens)
            ttfts.append((len(tokens) - cached) * prefill_us_per_token / 1000)
    return OracleResult(
        hit_rate=round(hits / queries, 3) if queries else 0.0,
        ttft_mean_ms=round(statistics.fmean(ttfts), 1) if ttfts else float("nan"),
        ttft_p50_ms=round(percentile(ttfts, 50), 1),
        ttft_p90_ms=round(percentile(ttfts, 90), 1),
        ttft_p99_ms=round(percentile(ttfts, 99), 1),
    )
