"""A model-server stand-in that records what reached it, for tests about what Envoy forwards.

`python -m tests.e2e.recording_backend PORT` answers POST /v1/completions and
/v1/chat/completions with a small OpenAI-style completion and GET /v1/responses/{id} (a
request without a body) with a stored response, keeps every such request's headers
(all values of repeated headers, in order), and serves them at GET /recorded; /v1/models,
/health and a vLLM-named /metrics let the picker treat it as a pod.
"""

from __future__ import annotations

import sys

from aiohttp import web

from tests.e2e.scripted_backend import METRICS

MODEL = "infergate-sim"


def main() -> None:
    recorded: list[dict] = []

    def record(request: web.Request) -> None:
        recorded.append(
            {"path": request.path, "headers": [[k.lower(), v] for k, v in request.headers.items()]}
        )

    async def complete(request: web.Request) -> web.Response:
        await request.read()
        record(request)
        return web.json_response(
            {
                "id": f"cmpl-{len(recorded)}",
                "object": "text_completion",
                "model": MODEL,
                "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    async def stored_response(request: web.Request) -> web.Response:
        record(request)
        return web.json_response({"id": request.match_info["id"], "object": "response"})

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_get("/v1/responses/{id}", stored_response)
    app.router.add_get("/recorded", lambda _r: web.json_response(recorded))
    serve_as_pod(app)


def serve_as_pod(app: web.Application) -> None:
    """Serve `app` on the port in argv with what the picker needs of a pod: /v1/models (MODEL),
    /health and a vLLM-named /metrics."""

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", lambda _r: web.Response())
    app.router.add_get("/metrics", lambda _r: web.Response(text=METRICS))
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)


if __name__ == "__main__":
    main()
