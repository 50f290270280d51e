"""Fuzz: hostile /metrics pages and /v1/models answers, served by a real HTTP server to the
real scrape loop. Whatever a pod says, the loop lives on, every failure is counted, the
endpoint's metrics are always possible values, and a good page afterwards is read."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from infergw.epp.datastore import Datastore, Endpoint, PoolSpec
from infergw.epp.engine_metrics import MetricsParseError, parse
from infergw.epp.metrics import PickerMetrics
from infergw.epp.scrape import MetricsScraper
from tests.conftest import free_port
from tests.engine_metric_names import WANTED
from tests.fuzzing import fuzz_settings
from tests.waiting import wait_for_async

pytestmark = pytest.mark.fuzz

NAMES = [*WANTED, "vllm:num_requests_waiting_by_reason", "sglang:num_queue_reqs"]
VALUES = [
    "0",
    "1",
    "0.5",
    "1.0000001",
    "-1",
    "-0",
    "NaN",
    "+Inf",
    "-Inf",
    "1e308",
    "1e309",
    "9" * 400,
    "0x10",
    "",
    "1_000",
]
LABELS = [
    "",
    '{engine="0"}',
    '{model_name="m",engine="1"}',
    '{max_lora="-1",running_lora_adapters="a,b",waiting_lora_adapters=""}',
    '{block_size="99999999999999999999",num_gpu_blocks="x"}',
    '{a="\\"}',
    "{",
    "}",
    '{a="' + "b" * 300 + '"}',
]


@st.composite
def metric_line(draw) -> str:
    name = draw(st.sampled_from(NAMES))
    labels = draw(st.sampled_from(LABELS))
    value = draw(st.sampled_from(VALUES) | st.floats().map(repr))
    tail = draw(st.sampled_from(["", " 1700000000", "  ", " x y"]))
    return f"{name}{labels} {value}{tail}"


LINE = metric_line() | st.text(max_size=40) | st.sampled_from(["# HELP x", "# TYPE x gauge", ""])
CHARSETS = ["", "utf-8", "hex", "rot13", "zlib", "base64", "utf-16", "no-such-codec", "latin-1"]


@st.composite
def metrics_answer(draw) -> tuple[int, bytes, dict[str, str]]:
    """(status, body, headers) of one hostile /metrics answer."""
    body = "\n".join(draw(st.lists(LINE, max_size=30))).encode()
    if draw(st.booleans()):  # bytes that may not be UTF-8
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + draw(st.binary(max_size=8)) + body[cut:]
    charset = draw(st.sampled_from(CHARSETS))
    headers = {"Content-Type": f"text/plain; charset={charset}" if charset else "text/plain"}
    if draw(st.integers(0, 9)) == 0:
        headers["Content-Encoding"] = draw(st.sampled_from(["gzip", "deflate", "br", "x"]))
    status = draw(st.sampled_from([200] * 8 + [204, 404, 500]))
    return status, body, headers


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=20,
)


@st.composite
def models_answer(draw) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return json.dumps(draw(JSON)).encode()
    if kind == 1:
        data = draw(st.lists(st.dictionaries(st.sampled_from(["id", "parent", "x"]), JSON)))
        return json.dumps({"data": data}).encode()
    if kind == 2:
        depth = draw(st.sampled_from([10, 1000, 100_000]))
        return b'{"data": [' + b"[" * depth + b"]" * depth + b"]}"
    return draw(st.binary(max_size=64))


GOOD = "vllm:num_requests_waiting 2\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.5\n"
GOOD_MODELS = json.dumps({"data": [{"id": "m", "parent": None}]}).encode()


def possible(ep: Endpoint) -> bool:
    m = ep.metrics
    return (
        math.isfinite(m.waiting)
        and math.isfinite(m.running)
        and m.waiting >= 0
        and m.running >= 0
        and 0.0 <= m.kv_usage <= 1.0
        and all(v is None or v >= 0 for v in (m.block_size, m.num_blocks, m.max_loras))
    )


class FuzzPod:
    """Serves the answers it is given, one per request, then the good page for ever."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, bytes, dict[str, str]]] = []
        self.models: list[bytes] = []
        self.served = 0

    async def _metrics(self, _req: web.Request) -> web.Response:
        if self.metrics:
            status, body, headers = self.metrics.pop(0)
            self.served += 1
            return web.Response(status=status, body=body, headers=headers)
        return web.Response(text=GOOD)

    async def _models(self, _req: web.Request) -> web.Response:
        body = self.models.pop(0) if self.models else GOOD_MODELS
        return web.Response(body=body, content_type="application/json")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        return app


async def scrape_all(answers, models) -> None:
    pod = FuzzPod()
    pod.metrics, pod.models = list(answers), list(models)
    runner = web.AppRunner(pod.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    ds = Datastore()
    ds.set_pool(PoolSpec("pool", "ns", {"app": "vllm"}, [port]))
    ready = [{"type": "Ready", "status": "True"}]
    pod_object = {"metadata": {"name": "p", "labels": {"app": "vllm"}}}
    ds.replace_pods([{**pod_object, "status": {"podIP": "127.0.0.1", "conditions": ready}}])
    (ep,) = ds.endpoints()
    metrics = PickerMetrics()
    scraper = MetricsScraper(ds, metrics, interval=0.005, models_interval=0.005)
    await scraper.start()
    try:
        total = len(answers)
        while pod.served < total:
            assert possible(ep)
            assert not any(loop.done() for loop in scraper._loops.values()), "a loop ended"
            await asyncio.sleep(0.005)
        # The hostile answers are over: the good page and model list are read.
        await wait_for_async(
            lambda: not ep.stale and ep.metrics.waiting == 2 and ep.models == {"m"}
        )
        assert possible(ep)
    finally:
        await scraper.stop()
        await runner.cleanup()


@fuzz_settings(30)
@given(
    answers=st.lists(metrics_answer(), min_size=1, max_size=15),
    models=st.lists(models_answer(), max_size=5),
)
def test_hostile_pages_never_end_the_loop_nor_poison_the_metrics(answers, models):
    asyncio.run(scrape_all(answers, models))


@fuzz_settings(40)
@given(lines=st.lists(LINE, min_size=1, max_size=30), rng=st.randoms(use_true_random=False))
def test_the_parser_returns_possible_values_or_a_parse_error(lines, rng):
    """50 pages an example, mixed from its lines (2000 in the suite): each parses to
    possible values or raises MetricsParseError, never anything else."""
    for _ in range(50):
        text = "\n".join(rng.choices(lines, k=rng.randint(0, 40)))
        try:
            m = parse(text, "vllm")
        except MetricsParseError:
            continue
        ep = Endpoint(name="e", pod="p", address="10.0.0.1:8000", metrics=m)
        assert possible(ep)
