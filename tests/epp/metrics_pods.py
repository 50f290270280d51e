"""Real HTTP model-server pods for the scraper's tests: each serves a vLLM-shaped /metrics
page it can change, counts its scrapes, and lists one model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from tests.conftest import free_port

INTERVAL = 0.05
IDLE_INTERVAL = 1.0


def page(running: int, waiting: int = 0, noise: int = 0) -> str:
    """A vLLM page; `noise` changes a counter the picker does not read."""
    return (
        f'vllm:prompt_tokens_total{{model_name="m"}} {noise}\n'
        f'vllm:num_requests_running{{model_name="m"}} {running}\n'
        f'vllm:num_requests_waiting{{model_name="m"}} {waiting}\n'
        'vllm:kv_cache_usage_perc{model_name="m"} 0.0\n'
    )


@dataclass
class Pod:
    text: str
    scrapes: int = 0
    port: int = 0  # set by whoever serves it, for tests that keep several


@asynccontextmanager
async def serving(pod: Pod) -> AsyncIterator[int]:
    async def metrics(_req: web.Request) -> web.Response:
        pod.scrapes += 1
        return web.Response(text=pod.text)

    async def models(_req: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m"}]})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()
