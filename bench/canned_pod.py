"""A model-server pod that answers at once: a fixed completion (with usage) to every POST,
the recorded vLLM `/metrics` page, `/v1/models` and `/health`. It stands in for pods when a
benchmark measures what sits in front of them (Envoy, the picker, a stub), so the pods' own
CPU stays small and the same for every path compared.

python -m infergw.bench.canned_pod PORT MODEL
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from aiohttp import web

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "vllm-cpu-tiny"


def completion(model: str) -> bytes:
    return json.dumps(
        {
            "id": "cmpl-canned",
            "object": "text_completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "text": " canned", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 64, "completion_tokens": 1, "total_tokens": 65},
        }
    ).encode()


def make_app(model: str) -> web.Application:
    metrics = (FIXTURE / "metrics.txt").read_bytes()
    answer = completion(model)
    models = json.dumps({"object": "list", "data": [{"id": model, "object": "model"}]}).encode()

    async def post(request: web.Request) -> web.Response:
        await request.read()  # the whole body, as an engine would take it
        return web.Response(body=answer, content_type="application/json")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/metrics", lambda _r: web.Response(body=metrics, content_type="text/plain"))
    app.router.add_get("/health", lambda _r: web.Response())
    app.router.add_get(
        "/v1/models", lambda _r: web.Response(body=models, content_type="application/json")
    )
    app.router.add_post("/{tail:.*}", post)
    return app


async def serve(port: int, model: str) -> None:
    runner = web.AppRunner(make_app(model), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def main(argv: list[str]) -> None:
    port, model = int(argv[0]), argv[1]
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(port, model))
    else:
        uvloop.run(serve(port, model))


if __name__ == "__main__":
    main(sys.argv[1:])
