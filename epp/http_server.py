"""Prometheus metrics and, with --enable-debug-endpoints, debug pages on one HTTP port (9090).

The debug pages show every pod's address and load and tokenize prompts on request: off by
default, on for the local stack and tests. Each group of routes is built by its own function;
make_app puts together the groups the flags ask for."""

from __future__ import annotations

import os

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from infergw.epp.datastore import Datastore, Endpoint
from infergw.epp.errors import PickerError
from infergw.epp.metrics import PickerMetrics
from infergw.epp.scheduling.handle import DebugReport

DEBUG_BODY_LIMIT = 1024 * 1024  # POST /debug/prefix-scores: larger bodies get 413


def make_app(
    datastore: Datastore, metrics: PickerMetrics, director=None, view=None, *, debug: bool = False
) -> web.Application:
    app = web.Application(client_max_size=DEBUG_BODY_LIMIT)
    app.add_routes(metrics_routes(metrics))
    app.add_routes(health_routes(datastore))
    if debug:
        app.add_routes(debug_routes(datastore, director, view))
        if view is not None and os.environ.get("INFERGATE_TEST_HOOKS") == "1":
            app.add_routes(kv_event_hook_routes(view))
    return app


def metrics_routes(metrics: PickerMetrics) -> list[web.RouteDef]:
    """GET /metrics: the picker's registry in Prometheus' text format."""

    async def scrape(_req: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    return [web.get("/metrics", scrape)]


def health_routes(datastore: Datastore) -> list[web.RouteDef]:
    """GET /healthz: 200 once the pool is synced, 503 before."""

    async def healthz(_req: web.Request) -> web.Response:
        return web.Response(
            status=200 if datastore.synced else 503, text="ok" if datastore.synced else "not synced"
        )

    return [web.get("/healthz", healthz)]


def debug_routes(datastore: Datastore, director, view) -> list[web.RouteDef]:
    """What the picker believes and why it routes as it does (--enable-debug-endpoints)."""

    async def endpoints(_req: web.Request) -> web.Response:
        """What the picker believes about each endpoint right now."""
        pool = datastore.pool
        return web.json_response(
            {
                "pool": None
                if pool is None
                else {
                    "name": pool.name,
                    "namespace": pool.namespace,
                    "failureMode": pool.failure_mode,
                },
                "synced": datastore.synced,
                "endpoints": [_endpoint_report(e) for e in datastore.endpoints()],
            }
        )

    async def prefix_scores(request: web.Request) -> web.Response:
        """Why a request would go where it goes: per endpoint, the blocks of its prompt held."""
        from infergw.epp.debug_prefix import prefix_report

        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            error = PickerError(413, f"a debug request body is at most {DEBUG_BODY_LIMIT} bytes")
            return web.json_response(error.body(), status=413)
        status, body = await prefix_report(raw, director, view)
        return web.json_response(body, status=status)

    async def pd_decisions(_req: web.Request) -> web.Response:
        """The prefill/decode handler's last decisions, newest first."""
        handler = director.scheduling.handler if director is not None else None
        if not isinstance(handler, DebugReport):
            return web.json_response(
                PickerError(404, "no pd-profile-handler is configured").body(), status=404
            )
        return web.json_response(handler.debug())

    return [
        web.post("/debug/prefix-scores", prefix_scores),
        web.get("/debug/pd", pd_decisions),
        web.get("/debug/endpoints", endpoints),
    ]


def kv_event_hook_routes(view) -> list[web.RouteDef]:
    """Hooks for tests only (INFERGATE_TEST_HOOKS=1, with debug pages and a KV cache)."""

    async def drop_kv_events(request: web.Request) -> web.Response:
        """Discard the next n KV-event messages."""
        try:
            n = int(request.query.get("n", "1"))
        except ValueError:
            n = -1
        if n < 0:
            return web.json_response({"error": "n must be a non-negative integer"}, status=400)
        view.subscriber.drop_next(n)
        return web.json_response({"dropping": n})

    return [web.post("/debug/kv-events/drop", drop_kv_events)]


def _endpoint_report(e: Endpoint) -> dict:
    m = e.metrics
    return {
        "name": e.name,
        "address": e.address,
        "engine": e.engine,
        "reachable": e.reachable,
        "stale": e.stale,
        "metrics_age_s": None if not m.updated_at else round(e.metrics_age(), 3),
        "waiting": m.waiting,
        "running": m.running,
        "kv_usage": m.kv_usage,
        "block_size": m.block_size,
        "num_blocks": m.num_blocks,
        "running_loras": sorted(m.running_loras),
        "max_loras": m.max_loras,
        "inflight_requests": e.inflight_requests,
        "inflight_tokens": e.inflight_tokens,
        "ttft_ewma_s": e.ttft_ewma,
        "tpot_ewma_s": e.tpot_ewma,
        "models": None if e.models is None else sorted(e.models),
    }
