"""A model-server stand-in whose streamed bytes are known in advance, for byte-for-byte checks.

`python -m tests.e2e.scripted_backend PORT` serves /health, a vLLM-named /metrics and, on
POST /v1/completions, the bytes of SCRIPT in uneven writes with pauses between them, so the
proxy sees many chunks (one split inside a multi-byte UTF-8 character).
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

SCRIPT = (
    'data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":"héllo'
    ' wörld ✓","finish_reason":null}]}\n\n'
    + "".join(
        f'data: {{"id":"cmpl-1","choices":[{{"index":0,"text":" token{i}"}}]}}\n\n'
        for i in range(40)
    )
    + 'data: {"id":"cmpl-1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":41,'
    '"total_tokens":46}}\n\ndata: [DONE]\n\n'
).encode()
CUTS = [7, 61, 62, 200, 201, 977, 1500, 2222]  # byte offsets where a write ends

METRICS = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="scripted"} 0.0
vllm:num_requests_waiting{engine="0",model_name="scripted"} 0.0
vllm:kv_cache_usage_perc{engine="0",model_name="scripted"} 0.0
"""


async def completions(request: web.Request) -> web.StreamResponse:
    await request.read()
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    start = 0
    for cut in [*CUTS, len(SCRIPT)]:
        await resp.write(SCRIPT[start:cut])
        start = cut
        await asyncio.sleep(0.01)
    await resp.write_eof()
    return resp


def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", lambda _r: web.Response())
    app.router.add_get("/metrics", lambda _r: web.Response(text=METRICS))
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)


if __name__ == "__main__":
    main()
