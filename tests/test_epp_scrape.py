"""epp/scrape.py against real HTTP servers: a pod that starts after the picker is picked up
at once, with its served models and LoRA adapters; one that stops drops out and comes back."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from epp.datastore import Datastore, PoolSpec
from epp.metrics import PickerMetrics
from epp.scrape import MetricsScraper
from tests.conftest import free_port

METRICS = (
    'vllm:num_requests_running{model_name="base"} 1\n'
    'vllm:num_requests_waiting{model_name="base"} 0\n'
    'vllm:kv_cache_usage_perc{model_name="base"} 0.25\n'
)
MODELS = {
    "object": "list",
    "data": [
        {"id": "base", "object": "model", "root": "base", "parent": None},
        {"id": "sql-lora", "object": "model", "root": "/adapters/sql", "parent": "base"},
    ],
}


async def metrics(_req: web.Request) -> web.Response:
    return web.Response(text=METRICS)


async def models(_req: web.Request) -> web.Response:
    return web.json_response(MODELS)


async def start_pod(port: int) -> web.AppRunner:
    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def one_pod_store(port: int) -> Datastore:
    ds = Datastore()
    ds.set_pool(PoolSpec("pool", "ns", {"app": "vllm"}, [port]))
    pod = {
        "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "vllm"}},
        "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    ds.replace_pods([pod])
    return ds


async def wait_for(condition, within: float = 3.0) -> float:
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < within, "condition never met"
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def test_a_pod_that_starts_late_is_learned_with_its_adapters_at_once():
    port = free_port()
    ds = one_pod_store(port)
    # models_interval far beyond the test: the adapters must come from the first answer.
    scraper = MetricsScraper(ds, PickerMetrics(), interval=0.05, models_interval=60)
    await scraper.start()
    try:
        (ep,) = ds.endpoints()
        await wait_for(lambda: not ep.reachable)
        runner = await start_pod(port)
        try:
            await wait_for(lambda: ep.reachable and ep.lora_parents == {"sql-lora": "base"})
            assert ep.models == {"base", "sql-lora"}
            assert ep.metrics.kv_usage == 0.25
        finally:
            await runner.cleanup()
        await wait_for(lambda: not ep.reachable)
        runner = await start_pod(port)
        try:
            await wait_for(lambda: ep.reachable and not ep.stale)
        finally:
            await runner.cleanup()
    finally:
        await scraper.stop()


async def test_a_scrape_forgets_only_the_requests_sent_before_it_began():
    """Flow control counts requests sent since the last scrape; one sent while a scrape is
    under way may be missing from that scrape's numbers, so it must stay counted."""
    port = free_port()
    answer = asyncio.Event()

    async def slow_metrics(_req: web.Request) -> web.Response:
        await answer.wait()
        return web.Response(text=METRICS)

    app = web.Application()
    app.router.add_get("/metrics", slow_metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    ds = one_pod_store(port)
    scraper = MetricsScraper(ds, PickerMetrics(), interval=60)
    scraper._session = aiohttp.ClientSession()
    try:
        (ep,) = ds.endpoints()
        ep.sent_since_scrape = 3  # sent before the scrape
        scrape = asyncio.create_task(scraper.scrape_once(ep))
        await asyncio.sleep(0.1)
        ep.sent_since_scrape += 2  # sent while it is under way
        answer.set()
        await scrape
        assert ep.sent_since_scrape == 2 and not ep.stale
    finally:
        await scraper._session.close()
        await runner.cleanup()
