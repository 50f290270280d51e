"""epp/scrape_pace.py through the scraper, against a real HTTP pod that counts its scrapes:
an idle pod rests between slow scrapes and stays fresh, the first request sent to it brings
the fast interval back, a busy pod the picker sends nothing is scraped at the quiet pace and
stays fresh, a pod sent requests at a rate is scraped far less than at the fast interval and
shows each request as soon, and a page whose wanted lines did not change is not parsed
again. The pace policy alone, with endpoints set by hand, at the end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from infergw.epp import scrape
from infergw.epp.datastore import Datastore, Endpoint
from infergw.epp.metrics import PickerMetrics
from infergw.epp.scrape import MetricsScraper
from infergw.epp.scrape_pace import FAST, QUIET, RESTING, Pace
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


async def test_a_busy_pod_the_picker_sends_nothing_is_scraped_at_the_quiet_pace():
    kw = {"idle_interval": IDLE_INTERVAL, "quiet_interval": 0.15}
    async with scraped(page(running=0, waiting=2), **kw) as (pod, ep, scraper):
        assert scraper.pace.quiet_interval == 0.15
        # About 6 pages a second where the fast interval takes 20; never stale meanwhile.
        assert 3 <= await scrapes_during(pod, ep, 1.0) <= 9
        assert not scraper.resting(ep)


async def test_the_quiet_pace_stays_under_the_staleness_bounds():
    pod = Pod(page(running=1))
    async with serving(pod) as port:
        (ep,) = (ds := one_pod_store(port)).endpoints()
        # Asked for 1 s, kept one interval under flow control's 200 ms.
        async with scraping(ds, quiet_interval=1.0, stale_bound=0.2) as scraper:
            assert scraper.pace.quiet_interval == pytest.approx(0.2 - INTERVAL)
            await wait_for_async(lambda: ep.models is not None and not ep.stale)
            await scrapes_during(pod, ep, 1.0)  # fresh throughout


async def test_requests_waiting_in_flow_control_keep_busy_pods_at_the_fast_interval():
    async with scraped(page(running=1), quiet_interval=0.15) as (pod, ep, scraper):
        scraper.held = lambda: True
        await asyncio.sleep(0.2)  # a quiet wait under way ends at the next manager tick
        assert await scrapes_during(pod, ep, 1.0) >= 8


async def test_a_request_sent_to_a_quiet_pod_is_on_its_next_page_within_a_tick():
    kw = {"quiet_interval": 20.0, "stale_after": 30.0}
    async with scraped(page(running=1), **kw) as (pod, ep, scraper):
        await wait_for_async(lambda: scraper.waiting(ep) == QUIET)
        pod.text = page(running=2)
        ep.sent_since_scrape += 1  # what the director does when it routes a request there
        t0 = time.monotonic()
        await wait_for_async(lambda: ep.metrics.running == 2, within=2.0)
        assert time.monotonic() - t0 < 4 * INTERVAL


async def test_at_a_request_rate_fewer_pages_and_each_request_seen_as_soon():
    """A pod sent a request every 200 ms, each one on the pod's next page (running counts
    them): with the quiet pace it is scraped about once per request plus every quiet
    interval, a third of the fast interval's pages, and each request shows on a page
    within about two intervals, as at the fast interval."""
    seen: dict[float, float] = {}
    for quiet in (INTERVAL, 0.15):  # INTERVAL: the quiet pace off, every page at 50 ms
        async with scraped(page(running=1), quiet_interval=quiet) as (pod, ep, _):
            before, delays = pod.scrapes, []
            for n in range(2, 12):
                pod.text = page(running=n)
                ep.sent_since_scrape += 1
                ep.inflight_requests += 1
                t0 = time.monotonic()
                await wait_for_async(lambda n=n: ep.metrics.running == n, within=2.0)
                delays.append(time.monotonic() - t0)
                assert not ep.stale
                await asyncio.sleep(0.2 - delays[-1])
            seen[quiet] = pod.scrapes - before
            assert sorted(delays)[len(delays) // 2] < 2.5 * INTERVAL
    assert seen[0.15] <= 0.6 * seen[INTERVAL]


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
        # Busy now, and nothing sent since that page: the quiet pace, no longer resting.
        assert await scrapes_during(pod, ep, 0.6) >= 3
        assert pod.scrapes > before and not scraper.resting(ep)


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
        scraper.fetcher.start()  # no loops: only the scrapes below
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
            scraper.fetcher.stop()


async def test_the_scrapes_cpu_is_counted_apart():
    async with scraped(page(running=1)) as (pod, ep, scraper):
        await scrapes_during(pod, ep, 0.3)
        fetch = scraper.fetcher.cpu_seconds()
        assert fetch > 0 and scraper.loop_cpu > 0
        assert scraper.cpu_seconds() == pytest.approx(fetch + scraper.loop_cpu, abs=0.01)
        (family,) = scraper.collect()
        parts = {s.labels["part"]: s.value for s in family.samples}
        assert set(parts) == {"fetch", "loop"} and parts["fetch"] >= fetch
    assert scraper.cpu_seconds() >= fetch  # still readable once the thread has ended


# ---- the policy alone ----------------------------------------------------------------------


def endpoint(running=0.0, waiting=0.0, sent=0, inflight=0) -> Endpoint:
    ep = Endpoint(name="p", pod="p", address="10.0.0.1:8000", stale=False)
    ep.metrics.running, ep.metrics.waiting, ep.metrics.updated_at = running, waiting, 1.0
    ep.sent_since_scrape, ep.inflight_requests = sent, inflight
    return ep


PACE = Pace(0.05, idle_interval=1.0, quiet_interval=0.15)


@pytest.mark.parametrize(
    ("ep", "pace"),
    [
        (endpoint(), RESTING),
        (endpoint(inflight=1), FAST),  # idle by its page, but the picker has one there
        (endpoint(running=2, inflight=2), QUIET),  # what runs is on the page: nothing new
        (endpoint(waiting=1), QUIET),
        (endpoint(running=2, inflight=3, sent=1), FAST),  # one sent since the page
    ],
)
def test_the_pace_of_a_pod_follows_what_the_picker_sent(ep, pace):
    assert PACE.pace(ep) == pace
    assert PACE.wait_for(pace) == {FAST: 0.05, QUIET: 0.15, RESTING: 1.0}[pace]


@pytest.mark.parametrize("why", ["stale", "unreachable", "failed", "never scraped"])
def test_a_pod_without_a_good_fresh_page_keeps_the_fast_pace(why):
    ep = endpoint(running=2)
    if why == "stale":
        ep.stale = True
    elif why == "unreachable":
        ep.reachable = False
    elif why == "failed":
        ep.scrape_failures = 1
    else:
        ep.metrics.updated_at = 0.0
    assert PACE.pace(ep) == FAST


def test_what_ends_a_wait():
    busy = endpoint(running=2, inflight=2)
    assert not PACE.wakes(QUIET, busy)  # in flight, but all on the page
    busy.sent_since_scrape = 1
    assert PACE.wakes(QUIET, busy)
    idle = endpoint()
    assert not PACE.wakes(RESTING, idle)
    idle.inflight_requests = 1
    assert PACE.wakes(RESTING, idle)


def test_the_quiet_interval_is_kept_one_interval_under_the_staleness_bound():
    assert Pace.of(0.05, 1.0, 0.25, stale_bound=0.2).quiet_interval == pytest.approx(0.15)
    assert Pace.of(0.05, 1.0, 0.25, stale_bound=1.0).quiet_interval == 0.25
    # No room under the bound: busy pods at the fast interval, as before the quiet pace.
    off = Pace.of(0.05, 1.0, 0.25, stale_bound=0.08)
    assert not off.quiets and off.pace(endpoint(running=1)) == FAST
