"""epp/scrape.py against real HTTP servers: a pod that starts after the picker is picked up
at once, with its served models and LoRA adapters; one that stops drops out and comes back."""

from __future__ import annotations

import asyncio
import gzip
import logging

import pytest
from aiohttp import web

from infergw.api.engines import METRIC_VOCABULARY, TRTLLM
from infergw.api.names import ENGINE_LABEL
from infergw.cluster.pool import PoolSpec
from infergw.epp.datastore import Datastore
from infergw.epp.engine_metrics import MAX_LORA_NAMES
from infergw.epp.metrics import PickerMetrics
from infergw.epp.scrape import (
    MAX_METRICS_BYTES,
    MAX_MODELS_BYTES,
    MAX_MODELS_PER_ENDPOINT,
    MetricsScraper,
)
from tests.conftest import free_port
from tests.datastores import one_pod_store
from tests.waiting import wait_for_async

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


async def test_a_pod_that_starts_late_is_learned_with_its_adapters_at_once():
    port = free_port()
    ds = one_pod_store(port)
    # models_interval far beyond the test: the adapters must come from the first answer.
    scraper = MetricsScraper(ds, PickerMetrics(), interval=0.05, models_interval=60)
    await scraper.start()
    try:
        (ep,) = ds.endpoints()
        await wait_for_async(lambda: not ep.reachable)
        runner = await start_pod(port)
        try:
            await wait_for_async(lambda: ep.reachable and ep.lora_parents == {"sql-lora": "base"})
            assert ep.models == {"base", "sql-lora"}
            assert ep.metrics.kv_usage == 0.25
        finally:
            await runner.cleanup()
        await wait_for_async(lambda: not ep.reachable)
        runner = await start_pod(port)
        try:
            await wait_for_async(lambda: ep.reachable and not ep.stale)
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
    scraper.fetcher.start()  # no loops: only the scrapes below
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
        scraper.fetcher.stop()
        await runner.cleanup()


# ---- hostile pods: a loop never dies, bodies are capped, values are checked ---------------


class Pod:
    """A pod whose answers a test swaps while the scraper runs."""

    def __init__(self) -> None:
        self.metrics = web.Response(text=METRICS)
        self.models = web.json_response(MODELS)
        self.runner: web.AppRunner | None = None

    async def _metrics(self, _req: web.Request) -> web.StreamResponse:
        return self._fresh(self.metrics)

    async def _models(self, _req: web.Request) -> web.StreamResponse:
        return self._fresh(self.models)

    @staticmethod
    def _fresh(template: web.Response) -> web.Response:
        # A Response is sent once: answer with a copy.
        return web.Response(
            body=template.body, status=template.status, headers=dict(template.headers)
        )

    async def start(self, port: int) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def page(waiting: float | str = 0, kv: float | str = 0.25) -> str:
    return (
        'vllm:num_requests_running{model_name="base"} 1\n'
        f'vllm:num_requests_waiting{{model_name="base"}} {waiting}\n'
        f'vllm:kv_cache_usage_perc{{model_name="base"}} {kv}\n'
    )


def lora_info(adapters: int) -> str:
    names = ",".join(f"lora-{i}" for i in range(adapters))
    return f'vllm:lora_requests_info{{running_lora_adapters="{names}",max_lora="4"}} 1\n'


def errors(metrics: PickerMetrics, reason: str) -> float:
    """Scrape errors counted with this reason, over all endpoints."""
    return scrape_errors(metrics).get(reason, 0.0)


def scrape_errors(metrics: PickerMetrics) -> dict[str, float]:
    """Scrape errors by reason, over all endpoints."""
    out: dict[str, float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "infergate_epp_metrics_scrape_errors_total":
                reason = sample.labels["reason"]
                out[reason] = out.get(reason, 0.0) + sample.value
    return out


def polls_failed(metrics: PickerMetrics) -> float:
    (value,) = [
        sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == "llm_d_epp_datalayer_poll_errors_total"
        and sample.labels == {"source_type": "metrics-data-source"}
    ]
    return value


async def running_scraper(ds: Datastore, metrics: PickerMetrics, **kw) -> MetricsScraper:
    scraper = MetricsScraper(ds, metrics, interval=0.05, **{"models_interval": 0.05, **kw})
    await scraper.start()
    return scraper


HEX = {"Content-Type": "text/plain; charset=hex"}


async def test_a_bytes_codec_charset_does_not_end_the_scrape_loop():
    """charset=hex (a bytes-to-bytes codec) made aiohttp's text() raise LookupError, which
    ended the loop: the pod stayed reachable and stale for good. The text format is UTF-8."""
    port = free_port()
    pod = Pod()
    pod.metrics = web.Response(body=page(waiting=4).encode(), headers=HEX)
    await pod.start(port)
    ds, metrics = one_pod_store(port), PickerMetrics()
    scraper = await running_scraper(ds, metrics)
    try:
        (ep,) = ds.endpoints()
        await wait_for_async(lambda: not ep.stale and ep.metrics.waiting == 4)
    finally:
        await scraper.stop()
        await pod.stop()


@pytest.mark.parametrize(
    "hostile, reason",
    [
        (web.Response(body=b"\xff\xfe" + page().encode()), "not_utf8"),
        (web.Response(body=b"x" * (MAX_METRICS_BYTES + 1)), "too_large"),
        (web.Response(text=page(waiting="NaN")), "invalid_value"),
        (web.Response(text=page(waiting=-3)), "invalid_value"),
        (web.Response(text=page(kv="+Inf")), "invalid_value"),
        (web.Response(text=page(kv=1.5)), "invalid_value"),
        # Every LoRA request unions these sets for every endpoint: 300k names cost 60 ms each.
        (web.Response(text=page() + lora_info(MAX_LORA_NAMES + 1)), "invalid_value"),
        (web.Response(text="vllm:num_requests_waiting{ 1\n"), "parse"),
        (web.Response(status=500, text="boom"), "http_status"),
        # Compressed bodies are never inflated: a small gzip bomb is just a bad page.
        (
            web.Response(
                body=gzip.compress(b"\n" * (64 * 1024 * 1024)),
                headers={"Content-Encoding": "gzip"},
            ),
            "not_utf8",
        ),
    ],
)
async def test_a_hostile_page_is_counted_and_the_loop_goes_on(hostile, reason):
    """The pod answers with a hostile page, then a good one: the bad page is counted by
    reason, the last good values stay until the good page comes, and the loop survives."""
    port = free_port()
    pod = Pod()
    pod.metrics = web.Response(text=page(waiting=1))
    await pod.start(port)
    ds, metrics = one_pod_store(port), PickerMetrics()
    scraper = await running_scraper(ds, metrics)
    try:
        (ep,) = ds.endpoints()
        await wait_for_async(lambda: not ep.stale and ep.metrics.waiting == 1)
        pod.metrics = hostile
        await wait_for_async(lambda: errors(metrics, reason) >= 2)
        # The last good values stay (never the hostile ones) until they go stale.
        assert ep.metrics.waiting == 1 and ep.metrics.kv_usage == 0.25
        await wait_for_async(lambda: ep.stale)
        pod.metrics = web.Response(text=page(waiting=2))
        await wait_for_async(lambda: not ep.stale and ep.metrics.waiting == 2 and ep.reachable)
        # llm-d's poll errors are the same failed /metrics scrapes, without the endpoint
        polls = polls_failed(metrics)
        assert polls == sum(n for why, n in scrape_errors(metrics).items() if "models" not in why)
        assert polls >= 2
    finally:
        await scraper.stop()
        await pod.stop()


@pytest.mark.parametrize(
    "hostile",
    [
        web.Response(body=b'{"data": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}"),
        web.Response(body=b'{"data": [{"id": "a", "x": ' + b"{" * 5 + b"}"),
        web.Response(body=b'{"data": [{"id": 1}]}'),
        web.Response(body=b"[" * (MAX_MODELS_BYTES + 1)),
        web.Response(body=b'{"data": []}', headers=HEX),
    ],
)
async def test_a_hostile_model_list_is_counted_and_scraping_goes_on(hostile):
    """A /v1/models body nested 100k deep raised RecursionError out of the loop. Now it is
    counted; the model list stays as it was and /metrics keeps being read."""
    port = free_port()
    pod = Pod()
    pod.models = hostile
    await pod.start(port)
    ds, metrics = one_pod_store(port), PickerMetrics()
    scraper = await running_scraper(ds, metrics)
    try:
        (ep,) = ds.endpoints()
        await wait_for_async(
            lambda: (
                errors(metrics, "models_parse") + errors(metrics, "models_too_large") >= 2
                or ep.models == frozenset()
            )  # the charset one is a good (empty) list
        )
        pod.metrics = web.Response(text=page(waiting=7))
        pod.models = web.json_response(MODELS)
        await wait_for_async(lambda: ep.metrics.waiting == 7 and ep.models == {"base", "sql-lora"})
    finally:
        await scraper.stop()
        await pod.stop()


async def test_a_pod_answering_nonsense_models_is_logged_once_per_run_and_counted_each_time(
    caplog,
):
    """A pod whose /v1/models keeps answering nonsense was a warning every models_interval
    (5 s) for ever: now one line when the run starts or its reason changes, an info line
    when the answer is usable again, and each bad answer counted."""
    port = free_port()
    pod = Pod()
    pod.models = web.Response(body=b"<html>not json</html>")
    await pod.start(port)
    ds, metrics = one_pod_store(port), PickerMetrics()
    scraper = await running_scraper(ds, metrics)
    try:
        (ep,) = ds.endpoints()
        with caplog.at_level(logging.INFO, logger="epp.scrape"):
            await wait_for_async(lambda: errors(metrics, "models_parse") >= 5)
            pod.models = web.json_response({"data": [{"id": f"m{i}"} for i in range(5000)]})
            await wait_for_async(lambda: errors(metrics, "models_too_many") >= 5)
            pod.models = web.json_response(MODELS)
            await wait_for_async(lambda: ep.models == {"base", "sql-lora"})
            pod.models = web.json_response({"data": [{"id": None}]})
            await wait_for_async(lambda: errors(metrics, "models_parse") >= 8)
    finally:
        await scraper.stop()
        await pod.stop()
    # The scraper's own lines: the fake pod's access log (aiohttp.access) names the path too.
    scrape = [r for r in caplog.records if r.name == "epp.scrape"]
    lines = [r.getMessage() for r in scrape if "/v1/models" in r.getMessage()]
    assert [line.split("answer")[1][:12] for line in lines] == [
        " (parse); it",
        " (too_many);",
        " is usable a",
        " (parse); it",
    ], lines
    assert ep.models == {"base", "sql-lora"}  # the last good list stays


async def test_a_new_pod_on_a_recycled_ip_is_scraped():
    """Pod a leaves and pod b takes its IP in the same update: b is a new endpoint, and the
    scraper must read b (it kept a's loop, keyed by address, and b stayed stale)."""
    port = free_port()
    pod = Pod()
    pod.metrics = web.Response(text=page(waiting=3))
    await pod.start(port)
    ds = one_pod_store(port)
    scraper = await running_scraper(ds, PickerMetrics())
    try:
        (a,) = ds.endpoints()
        await wait_for_async(lambda: not a.stale)
        recycled = {
            "metadata": {"name": "q", "namespace": "ns", "labels": {"app": "vllm"}},
            "status": {
                "podIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
        ds.replace_pods([recycled])
        (b,) = ds.endpoints()
        assert b is not a and b.address == a.address and b.stale
        await wait_for_async(lambda: not b.stale and b.metrics.waiting == 3)
    finally:
        await scraper.stop()
        await pod.stop()


async def test_a_failing_refresh_callback_does_not_end_the_loop():
    port = free_port()
    pod = Pod()
    await pod.start(port)
    ds = one_pod_store(port)
    scraper = MetricsScraper(ds, PickerMetrics(), interval=0.05)
    calls = []

    def broken() -> None:
        calls.append(1)
        raise RuntimeError("a bug in a listener")

    scraper.on_refresh = broken
    await scraper.start()
    try:
        await wait_for_async(lambda: len(calls) >= 3)
    finally:
        await scraper.stop()
        await pod.stop()


class CountingPod(Pod):
    """A Pod that counts the /metrics requests it answers."""

    def __init__(self) -> None:
        super().__init__()
        self.scrapes = 0

    async def _metrics(self, req: web.Request) -> web.StreamResponse:
        self.scrapes += 1
        return await super()._metrics(req)


def costly_page() -> str:
    """A valid page of ~3 MiB that vLLM never sends: LoRA info lines by the ten thousand,
    each of which the parser must read (the newest timestamp wins)."""
    lora = 'vllm:lora_requests_info{running_lora_adapters="a,b",max_lora="4"} '
    return page(waiting=1) + "".join(f"{lora}{i}\n" for i in range(40_000))


async def test_a_pod_whose_pages_cost_much_cpu_is_scraped_less_often():
    """Parsing runs on the event loop every request shares: a pod answering pages that cost
    a fraction of a second of CPU, every 50 ms, held the loop most of the time. Now its
    next scrape waits PARSE_BACKOFF times the CPU its page took, and well-behaved pods
    keep their interval."""
    normal_port, costly_port = free_port(), free_port()
    normal, costly = CountingPod(), CountingPod()
    normal.metrics = web.Response(text=page(waiting=1))
    costly.metrics = web.Response(text=costly_page())
    await normal.start(normal_port)
    await costly.start(costly_port)
    ds = one_pod_store(normal_port, costly_port)
    # Both pods are busy and sent nothing: at the fast pace, not the quiet one (scrape_pace),
    # so that the normal pod's sixty pages take three seconds, not nine.
    scraper = await running_scraper(ds, PickerMetrics(), models_interval=60, quiet_interval=0)
    try:
        await wait_for_async(lambda: costly.scrapes >= 1 and normal.scrapes >= 60, within=60)
        # Before, both were scraped at about the same rate (each round of the normal pod
        # waited for the costly parse); now the costly one is asked a few times at most.
        assert costly.scrapes * 6 <= normal.scrapes
    finally:
        await scraper.stop()
        await normal.stop()
        await costly.stop()


class SlowPod(CountingPod):
    """Answers cheap pages, each after longer than the scrape interval (a loaded machine)."""

    async def _metrics(self, req: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.08)
        return await super()._metrics(req)


async def test_a_slow_answer_of_a_cheap_page_is_not_a_costly_page(caplog):
    """An answer slower than the interval left no wait, so any parse CPU exceeded it: every
    round logged "took 0 ms of CPU to read; scraping it every 0.0s" and waited anyway."""
    port = free_port()
    pod = SlowPod()
    await pod.start(port)
    scraper = await running_scraper(one_pod_store(port), PickerMetrics(), models_interval=60)
    try:
        with caplog.at_level(logging.WARNING, logger="epp.scrape"):
            await wait_for_async(lambda: pod.scrapes >= 5, within=10)
    finally:
        await scraper.stop()
        await pod.stop()
    assert not [r for r in caplog.records if "CPU to read" in r.getMessage()]


async def test_a_model_list_longer_than_the_bound_is_refused_whole():
    """Every name a pod lists may get its own metric series and is kept per endpoint: a
    list of more than MAX_MODELS_PER_ENDPOINT is counted and the last good list stays."""
    port = free_port()
    pod = Pod()
    await pod.start(port)
    ds, metrics = one_pod_store(port), PickerMetrics()
    scraper = await running_scraper(ds, metrics)
    try:
        (ep,) = ds.endpoints()
        await wait_for_async(lambda: ep.models == {"base", "sql-lora"})
        many = [{"id": f"lora-{i}", "parent": "base"} for i in range(MAX_MODELS_PER_ENDPOINT + 1)]
        pod.models = web.json_response({"object": "list", "data": many})
        await wait_for_async(lambda: errors(metrics, "models_too_many") >= 2)
        assert ep.models == {"base", "sql-lora"}
    finally:
        await scraper.stop()
        await pod.stop()


async def test_a_redirect_is_not_followed():
    """A pod answering 302 to another address (an idle pod's /metrics) had that address's
    numbers taken as its own, and could attract traffic it cannot serve. A redirect is a
    bad answer: counted, and the endpoint's numbers stay its own."""
    idle_port, busy_port = free_port(), free_port()
    idle, busy = Pod(), Pod()
    idle.metrics = web.Response(text=page(waiting=0))
    busy.metrics = web.Response(text=page(waiting=50))
    await idle.start(idle_port)
    await busy.start(busy_port)
    ds, metrics = one_pod_store(busy_port), PickerMetrics()
    scraper = await running_scraper(ds, metrics)
    try:
        (ep,) = ds.endpoints()
        await wait_for_async(lambda: ep.metrics.waiting == 50)
        busy.metrics = web.Response(
            status=302, headers={"Location": f"http://127.0.0.1:{idle_port}/metrics"}
        )
        await wait_for_async(lambda: errors(metrics, "http_status") >= 2)
        assert ep.metrics.waiting == 50
    finally:
        await scraper.stop()
        await idle.stop()
        await busy.stop()


async def test_a_trtllm_serve_pod_is_scraped_at_its_prometheus_path():
    """trtllm-serve's /metrics answers JSON iteration stats; its Prometheus text is at
    /prometheus/metrics. A pod labelled with the vocabulary the controllers write for
    engine.type TRTLLM is read there, and stays reachable."""
    asked: list[str] = []

    async def prometheus(req: web.Request) -> web.Response:
        asked.append(req.path)
        return web.Response(
            text='trtllm_num_requests_waiting{model_name="m"} 2\n'
            'trtllm_num_requests_running{model_name="m"} 1\n'
            'trtllm_kv_cache_utilization{model_name="m"} 0.5\n'
        )

    async def json_stats(req: web.Request) -> web.Response:
        asked.append(req.path)
        return web.json_response([{"iter": 1}])

    port = free_port()
    app = web.Application()
    app.router.add_get("/prometheus/metrics", prometheus)
    app.router.add_get("/metrics", json_stats)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    ds = Datastore()
    ds.set_pool(PoolSpec("pool", "ns", {"app": "trt"}, [port]))
    labels = {"app": "trt", ENGINE_LABEL: METRIC_VOCABULARY[TRTLLM]}
    ds.replace_pods(
        [
            {
                "metadata": {"name": "p", "namespace": "ns", "labels": labels},
                "status": {
                    "podIP": "127.0.0.1",
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }
        ]
    )
    scraper = MetricsScraper(ds, PickerMetrics(), interval=60)
    scraper.fetcher.start()  # no loops: only the scrapes below
    try:
        (ep,) = ds.endpoints()
        await scraper.scrape_once(ep)
        assert asked == ["/prometheus/metrics"]
        assert ep.reachable and not ep.stale
        assert (ep.metrics.waiting, ep.metrics.kv_usage) == (2, 0.5)
    finally:
        scraper.fetcher.stop()
        await runner.cleanup()
