"""Scrape every endpoint's /metrics concurrently, each on its own interval loop.

A pod that fails `unreachable_after` scrapes in a row leaves the candidate set until it
answers again; metrics older than `stale_after` mark an endpoint stale, which scorers treat
as saturated.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp

from epp.datastore import Datastore, Endpoint
from epp.engine_metrics import MetricsParseError, parse
from epp.metrics import PickerMetrics

log = logging.getLogger("epp.scrape")


class MetricsScraper:
    def __init__(
        self,
        datastore: Datastore,
        metrics: PickerMetrics,
        *,
        interval: float = 0.05,
        timeout: float = 1.0,
        stale_after: float | None = None,
        unreachable_after: int = 3,
        models_interval: float = 5.0,
    ) -> None:
        self.datastore = datastore
        self.metrics = metrics
        self.interval = interval
        self.timeout = timeout
        # Fresh enough: a few missed scrapes, never less than 200 ms.
        self.stale_after = stale_after if stale_after is not None else max(0.2, 5 * interval)
        self.unreachable_after = unreachable_after
        self.models_interval = models_interval
        self.on_refresh: Callable[[], None] | None = None  # called after every good scrape
        self._loops: dict[str, asyncio.Task] = {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        )
        self._task = asyncio.create_task(self._manage(), name="scrape-manager")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._loops.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loops.clear()
        if self._session is not None:
            await self._session.close()

    async def _manage(self) -> None:
        """Keep one loop per endpoint and refresh staleness between scrapes."""
        while True:
            current = {e.address: e for e in self.datastore.endpoints()}
            for address in list(self._loops):
                if address not in current:
                    self._loops.pop(address).cancel()
            for address, ep in current.items():
                if address not in self._loops:
                    self._loops[address] = asyncio.create_task(
                        self._loop(ep), name=f"scrape {address}"
                    )
            now = time.monotonic()
            for ep in current.values():
                ep.stale = ep.metrics_age(now) > self.stale_after
            await asyncio.sleep(self.interval)

    async def _loop(self, ep: Endpoint) -> None:
        next_models = 0.0  # served models change rarely (LoRA loads): ask now and then
        while True:
            t0 = time.monotonic()
            await self.scrape_once(ep)
            # A pod that is still starting is asked again on the next round, not only
            # after models_interval: its adapters decide where LoRA prompts go.
            if t0 >= next_models and ep.reachable and await self.fetch_models(ep):
                next_models = t0 + self.models_interval
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - t0)))

    async def fetch_models(self, ep: Endpoint) -> bool:
        """GET /v1/models; a server without it (or a bad answer) leaves the list unknown.
        False only when the pod could not be reached, so that it is asked again soon."""
        assert self._session is not None
        try:
            async with self._session.get(f"http://{ep.address}/v1/models") as resp:
                if resp.status != 200:
                    return True
                body = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False
        except ValueError:  # not JSON
            return True
        try:
            ids = frozenset(m["id"] for m in body["data"] if isinstance(m.get("id"), str))
            parents = {
                m["id"]: m["parent"]
                for m in body["data"]
                if isinstance(m.get("id"), str) and isinstance(m.get("parent"), str)
            }
        except (KeyError, TypeError, AttributeError):
            return True
        ep.models = ids
        ep.lora_parents = parents
        return True

    async def scrape_once(self, ep: Endpoint) -> None:
        assert self._session is not None
        url = f"http://{ep.address}/metrics"
        # Requests sent while this scrape is under way may be missing from its numbers.
        sent_before = ep.sent_since_scrape
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    raise MetricsParseError(f"HTTP {resp.status}")
                text = await resp.text()
            ep.metrics = parse(text, ep.engine)
        except (
            TimeoutError,
            aiohttp.ClientError,
            OSError,
            MetricsParseError,
            UnicodeDecodeError,
        ) as exc:
            self._failed(ep, exc)
            return
        if not ep.reachable:
            log.info("endpoint %s answers again", ep.address)
        ep.reachable = True
        ep.scrape_failures = 0
        ep.stale = False
        ep.sent_since_scrape = max(0, ep.sent_since_scrape - sent_before)
        if self.on_refresh is not None:
            self.on_refresh()

    def _failed(self, ep: Endpoint, exc: Exception) -> None:
        ep.scrape_failures += 1
        reason = type(exc).__name__
        self.metrics.scrape_errors.labels(ep.address, reason).inc()
        if ep.scrape_failures == self.unreachable_after:
            log.warning(
                "endpoint %s unreachable after %d failed scrapes (%s: %s); dropped "
                "until it answers",
                ep.address,
                ep.scrape_failures,
                reason,
                exc,
            )
        if ep.scrape_failures >= self.unreachable_after:
            ep.reachable = False
        ep.stale = ep.metrics_age() > self.stale_after
