"""A model-server stand-in that is up but turns every request away with 503 (a pod draining or
out of room), and counts them.

`python -m tests.e2e.unavailable_backend PORT` answers POST /v1/completions with 503 and an
OpenAI-style error, serves the count at GET /turned-away, and /v1/models, /health and a
vLLM-named /metrics so the picker treats it as a ready pod.
"""

from __future__ import annotations

from aiohttp import web

from tests.e2e.recording_backend import serve_as_pod


def main() -> None:
    turned_away = 0

    async def complete(request: web.Request) -> web.Response:
        nonlocal turned_away
        await request.read()
        turned_away += 1
        error = {"message": "draining", "type": "server_error", "code": 503}
        return web.json_response({"error": error}, status=503)

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    app.router.add_get("/turned-away", lambda _r: web.json_response(turned_away))
    serve_as_pod(app)


if __name__ == "__main__":
    main()
