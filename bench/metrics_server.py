"""Serve a real vLLM /metrics page (the recorded fixture) on many ports from one process, so a
benchmark can measure what scraping N endpoints costs the picker without N model servers.

python -m infergw.bench.metrics_server PORT [PORT ...]
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from aiohttp import web

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "vllm-cpu-tiny"


async def main(ports: list[int]) -> None:
    text = (FIXTURE / "metrics.txt").read_text()
    app = web.Application()
    app.router.add_get("/metrics", lambda _r: web.Response(text=text))
    app.router.add_get("/health", lambda _r: web.Response())
    app.router.add_get(
        "/v1/models",
        lambda _r: web.json_response(
            {"object": "list", "data": [{"id": "tiny", "object": "model"}]}
        ),
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for port in ports:
        await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main([int(p) for p in sys.argv[1:]]))
