"""Run the body-based router: its table's source, ext_proc (TLS) on 9004, gRPC health on 9005
(and on the ext_proc port, which Envoy Gateway health-checks), metrics on 9090.

SERVING once the first objects are read; on SIGTERM, NOT_SERVING and new streams refused while
the ones in flight get --grace-period."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from infergw.api import logs, tracing
from infergw.api.signals import wait_for_signal
from infergw.bbr.extproc import BodyRouter, RouterOptions
from infergw.bbr.metrics import RouterMetrics
from infergw.bbr.options import BbrOptions, parse_options
from infergw.bbr.sources import FileSource, KubernetesSource, Source, SourceError, Table
from infergw.cluster import certs
from infergw.epp.body_budget import BodyBudget

log = logging.getLogger("bbr")

HEALTH_SERVICES = ("", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor")
# A body chunk Envoy sends is at most its buffer; the router's own limit is --max-body-bytes.
GRPC_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class Servers:
    extproc: grpc.aio.Server
    health: grpc.aio.Server
    health_servicer: health.aio.HealthServicer
    http: web.AppRunner


def build_source(opts: BbrOptions, table: Table) -> Source:
    if opts.provider == "file":
        return FileSource(table, list(opts.pool_files))
    return KubernetesSource(table, resync=opts.resync)


async def serve(opts: BbrOptions, ready: asyncio.Event | None = None) -> None:
    metrics = RouterMetrics()
    table = Table(opts.namespace, metrics, opts.gateway)
    source = build_source(opts, table)
    await source.start()
    try:
        servers = await start_servers(opts, table, metrics)
        try:
            await wait_for_signal(ready)
        finally:
            await drain(opts, servers)
    finally:
        await source.stop()


async def start_servers(opts: BbrOptions, table: Table, metrics: RouterMetrics) -> Servers:
    servicer = health.aio.HealthServicer()
    serving = health_pb2.HealthCheckResponse.SERVING
    status = serving if table.synced else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in HEALTH_SERVICES:
        await servicer.set(name, status)
    await servicer.set("liveness", serving)
    health_server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, health_server)
    health_server.add_insecure_port(f"{opts.host}:{opts.grpc_health_port}")

    extproc = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
        ]
    )
    router = BodyRouter(
        table,
        RouterOptions(opts.max_body_bytes, opts.pass_bad_bodies, opts.request_body_timeout),
        BodyBudget(opts.max_held_request_bytes),
        metrics,
    )
    pbg.add_ExternalProcessorServicer_to_server(router, extproc)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, extproc)
    address = f"{opts.host}:{opts.grpc_port}"
    if opts.secure_serving:
        cert, key = certs.read_cert_dir(opts.cert_path) if opts.cert_path else certs.self_signed()
        extproc.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    else:
        extproc.add_insecure_port(address)

    runner = web.AppRunner(http_app(table, metrics), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, opts.host, opts.metrics_port).start()
    await extproc.start()
    await health_server.start()
    log.info(
        "body-based router for namespace %s (Gateway %s): ext_proc %s on %s, health :%d, "
        "metrics :%d, %d InferencePools",
        opts.namespace, opts.gateway or "any",
        "TLS" if opts.secure_serving else "plaintext", address,
        opts.grpc_health_port, opts.metrics_port, len(table.current),
    )  # fmt: skip
    return Servers(extproc, health_server, servicer, runner)


def http_app(table: Table, metrics: RouterMetrics) -> web.Application:
    """/metrics, /healthz, and /debug/pools: the router's Gateway, the table's pools and the
    names they answer."""

    async def metrics_page(_request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"content-type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_request: web.Request) -> web.Response:
        if table.synced:
            return web.Response(text="ok\n")
        return web.Response(text="not synced\n", status=503)

    async def pools(_request: web.Request) -> web.Response:
        current = table.current
        return web.json_response(
            {
                "gateway": None if table.gateway is None else str(table.gateway),
                "pools": sorted(current.pools),
                "routes": {
                    route.metadata.name: [route.spec.model_name, *(route.spec.lora_adapters or [])]
                    for route in current.routes.routes
                },
                "models": {name: pool for name, (pool, _) in sorted(current.models.items())},
            }
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/debug/pools", pools)
    return app


async def drain(opts: BbrOptions, servers: Servers) -> None:
    log.info("shutting down: NOT_SERVING, up to %.0f s for in-flight streams", opts.grace_period)
    await servers.health_servicer.enter_graceful_shutdown()
    await servers.extproc.stop(grace=opts.grace_period)
    await servers.health.stop(grace=0)
    await servers.http.cleanup()


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    logs.configure(opts.log)
    if not tracing.started("bbr"):
        return 2
    try:
        asyncio.run(serve(opts))
    except SourceError as exc:
        log.error("cannot start: %s", exc)
        return 2
    except OSError as exc:
        log.error(
            "cannot serve: %s (another process on a port? --grpc-port, --grpc-health-port and "
            "--metrics-port choose others)",
            exc,
        )
        return 1
    finally:
        tracing.stop()
    return 0
