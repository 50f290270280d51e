"""The pickers' demand for a ModelInfer: how many requests its pool's pickers hold because no
pod is ready (`infergate_epp_pool_waiting_for_capacity`, epp/capacity_wait.py), summed over
every picker replica. A pool scaled to zero has no pod to read metrics from; this is what
tells the autoscaler to start one.

Which pickers: the InferencePools whose selector the ModelInfer's labels satisfy, and for
each pool either
- the metrics URLs given for it (standalone mode: `--picker-metrics POOL=URL`, which
  `infergate up` passes for the pickers it starts), or
- in a cluster, the ready pods behind the Service its `endpointPickerRef` names, scraped on
  their `http-metrics` port (every replica: each holds its own requests).
A picker that does not answer fails the read, and the autoscaler skips the cycle: a missing
sample must not read as no demand (it would let a pool go to zero under held requests).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence

from infergw.api.names import PICKER_DEMAND_METRIC
from infergw.cluster.picker_pods import metrics_port, picker_pods
from infergw.cluster.store import INFERENCE_POOL, Obj, Store
from infergw.controllers.prom_text import parse_sum

Fetch = Callable[[str], Awaitable[str]]  # a URL's text, or raises


class PickerDemand:
    def __init__(
        self,
        store: Store,
        fetch: Fetch,
        static: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """`static`: pool name → its pickers' metrics URLs (standalone); None: find them
        through the pool's endpointPickerRef Service (kubernetes)."""
        self.store = store
        self.fetch = fetch
        self.static = static

    async def waiting(self, namespace: str, model_infer: Obj) -> float:
        """Requests held for capacity by the pickers of the pools serving `model_infer`."""
        labels = model_infer["metadata"].get("labels") or {}
        pools, _ = await self.store.list(INFERENCE_POOL, namespace)
        urls: list[str] = []
        for pool in pools:
            wanted = ((pool.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            if wanted and all(labels.get(k) == v for k, v in wanted.items()):
                urls += await self._urls(namespace, pool)
        texts = await asyncio.gather(*(self.fetch(u) for u in urls))
        return sum(demand_in(text) for text in texts)

    async def _urls(self, namespace: str, pool: Obj) -> list[str]:
        name = pool["metadata"]["name"]
        if self.static is not None:
            return list(self.static.get(name, ()))
        return [
            f"http://{p['status']['podIP']}:{metrics_port(p)}/metrics"
            for p in await picker_pods(self.store, namespace, pool)
        ]


def demand_in(text: str) -> float:
    """The demand gauge's samples summed (every model of the pool)."""
    return parse_sum(text, {PICKER_DEMAND_METRIC})[PICKER_DEMAND_METRIC]


def picker_metrics_item(text: str) -> tuple[str, str]:
    """One `--picker-metrics POOL=URL` (an argparse type)."""
    pool, sep, url = text.partition("=")
    if not sep or not pool or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"{text!r} is not POOL=http://HOST:PORT/metrics")
    return pool, url


def by_pool(items: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """(pool, URL) pairs → pool → URLs (a pool may have several pickers)."""
    out: dict[str, list[str]] = {}
    for pool, url in items:
        out.setdefault(pool, []).append(url)
    return out
