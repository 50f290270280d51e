"""epp/scrape_pace.py through the scraper, against a real HTTP pod that counts its scrapes:
an idle pod rests between slow scrapes and stays fresh, the first request sent to it brings
the fast interval back, a busy pod never rests, and a page whose wanted lines did not change
is not parsed again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from infergw.epp import scrape
from infergw.epp.datastore import Datastore, Endpoint
from infergw.epp.metrics import PickerMetrics
from infergw.epp.scrape import MetricsScraper
from tests.datastores import one_pod_store
from tests.epp.metrics_pods import IDLE_INTERVAL, INTERVAL, Pod, page, serving
from tests.waiting import wait_for_async


@asynccontextmanager
async def scraping(ds: Datastore, **kw) -> AsyncIterator[MetricsScraper]:
    scraper = MetricsScraper(ds, PickerMetrics(), interval=INTERVAL, **kw)
    await scraper.start()
    try:
        yield scraper
    finally:
        await scraper.stop()


async def scrapes_during(pod: Pod, ep: Endpoint, seconds: float) -> int:
    """Scrapes the pod answered over `seconds`; the endpoint must stay fresh throughout."""
    before = pod.scrapes
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert ep.reachable and not ep.stale, "an idle pod's numbers went stale"
        await asyncio.sleep(INTERVAL / 2)
    return pod.scrapes - before


@asynccontextmanager
async def scraped(text: str, **kw) -> AsyncIterator[tuple[Pod, Endpoint, MetricsScraper]]:
    """A pod serving `text`, scraped until it is known (models and a fresh page)."""
    pod = Pod(text)
    async with serving(pod) as port:
        ds = one_pod_store(port)
        async with scraping(ds, **kw) as scraper:
            (ep,) = ds.endpoints()
            await wait_for_async(lambda: ep.models is not None and not ep.stale)
            yield pod, ep, scraper


async def test_an_idle_pod_rests_and_stays_fresh():
    async with scraped(page(running=0), idle_interval=IDLE_INTERVAL) as (pod, ep, _):
        # 2.5 idle intervals: two or three slow scrapes where 50 would run at 50 ms.
        assert await scrapes_during(pod, ep, 2.5 * IDLE_INTERVAL) <= 4
        assert ep.metrics_age() < 5 * INTERVAL


async def test_without_an_idle_interval_an_idle_pod_is_scraped_at_the_fast_interval():
    async with scraped(page(running=0), idle_interval=INTERVAL) as (pod, ep, _):
        assert await scrapes_during(pod, ep, 1.0) >= 8


async def test_a_busy_pod_never_rests():
    async with scraped(page(running=0, waiting=2), idle_interval=IDLE_INTERVAL) as (pod, ep, _):
        assert await scrapes_during(pod, ep, 1.0) >= 8


@pytest.mark.parametrize("how", ["sent", "in_flight"])
async def test_the_first_request_sent_to_a_resting_pod_brings_the_fast_interval_back(how):
    async with scraped(page(running=0), idle_interval=30.0) as (pod, ep, scraper):
        await wait_for_async(lambda: scraper.resting(ep))
        before = pod.scrapes
        pod.text = page(running=1)
        if how == "sent":  # what the director does when it routes a request there
            ep.sent_since_scrape += 1
        else:
            ep.inflight_requests += 1
        t0 = time.monotonic()
        await wait_for_async(lambda: ep.metrics.running == 1, within=2.0)
        assert time.monotonic() - t0 < 10 * INTERVAL
        # Busy now: scraped at the fast interval again.
        assert await scrapes_during(pod, ep, 0.5) >= 4
        assert pod.scrapes > before


async def test_a_resting_pod_that_dies_is_dropped_soon_after_a_request_goes_there():
    pod = Pod(page(running=0))
    scraper: MetricsScraper | None = None
    try:
        async with serving(pod) as port:
            ds = one_pod_store(port)
            scraper = MetricsScraper(ds, PickerMetrics(), interval=INTERVAL, idle_interval=30.0)
            await scraper.start()
            (ep,) = ds.endpoints()
            await wait_for_async(lambda: scraper.resting(ep))
        # The pod is gone; nothing was sent, so the picker still vouches for it.
        await asyncio.sleep(0.3)
        assert ep.reachable and not ep.stale
        ep.sent_since_scrape += 1
        await wait_for_async(lambda: not ep.reachable, within=2.0)
    finally:
        if scraper is not None:
            await scraper.stop()


async def test_a_page_whose_wanted_lines_did_not_change_is_not_parsed_again(monkeypatch):
    parsed: list[tuple[str, ...]] = []
    real = scrape.parse_lines

    def counting(lines, vocab, now=None):
        parsed.append(lines)
        return real(lines, vocab, now)

    monkeypatch.setattr(scrape, "parse_lines", counting)
    pod = Pod(page(running=3))
    async with serving(pod) as port:
        ds = one_pod_store(port)
        scraper = MetricsScraper(ds, PickerMetrics(), interval=60)
        scraper._session = aiohttp.ClientSession()  # no loops: only the scrapes below
        try:
            (ep,) = ds.endpoints()
            await scraper.scrape_once(ep)
            first = ep.metrics
            pod.text = page(running=3, noise=7)  # only a counter the picker ignores moved
            await scraper.scrape_once(ep)
            assert len(parsed) == 1
            assert ep.metrics.running == 3 and ep.metrics.updated_at > first.updated_at
            pod.text = page(running=4, noise=7)
            await scraper.scrape_once(ep)
            assert len(parsed) == 2 and ep.metrics.running == 4
        finally:
            await scraper._session.close()
