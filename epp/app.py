"""Run the picker: providers, scraper, ext_proc (TLS) on 9002, health on 9003, metrics on 9090."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import Gauge

from api import yaml_files
from epp import tls
from epp.body_budget import BodyBudget
from epp.datastore import Datastore
from epp.director import Director, DirectorOptions
from epp.extproc import ExternalProcessor
from epp.flowcontrol import FlowControlConfig, FlowControlConfigError
from epp.gatekeeper import Gatekeeper
from epp.http_server import make_app
from epp.metrics import PickerMetrics
from epp.options import PickerOptions, parse_options
from epp.providers.file import FileProvider, FileProviderError
from epp.providers.kubernetes import KubernetesProviderError
from epp.scheduling.config import ConfigError, load_config
from epp.scheduling.handle import ForgetsServers, UsesKVCache
from epp.scrape import MetricsScraper
from epp.tokenizing import ModelTokenizers
from epp.trust import HeaderTrust, Users, UsersConfigError
from kvindex.tokenize import PromptTokenizers

log = logging.getLogger("epp")

HEALTH_SERVICES = (
    "",
    "liveness",
    "readiness",
    "inference-extension",
    "envoy.service.ext_proc.v3.ExternalProcessor",
)
POOL_GAUGE_INTERVAL = 5.0


def _provider(opts: PickerOptions, datastore: Datastore, metrics: PickerMetrics):
    if opts.provider == "file":
        return FileProvider(
            datastore, opts.pool_files, opts.pool_name, opts.pool_namespace, metrics=metrics
        )
    from epp.providers.kubernetes import KubernetesProvider

    return KubernetesProvider(datastore, opts.pool_name, opts.pool_namespace, metrics=metrics)


def _kv_cache_view(opts: PickerOptions, scheduling, datastore: Datastore, metrics: PickerMetrics):
    """The KV-event index and tokenizers, built only if a plugin needs them."""
    users = [p for p in scheduling.plugins.values() if isinstance(p, UsesKVCache)]
    if not users:
        return None
    from epp.kv_events import KVCacheView, KVEventOptions

    view = KVCacheView(
        datastore,
        KVEventOptions(
            mode=opts.kv_events_mode,
            bind=opts.kv_events_bind,
            pub_port=opts.kv_events_pub_port,
            replay_port=opts.kv_events_replay_port,
            block_size=opts.kv_index_block_size,
            max_entries=opts.kv_index_max_entries,
            tokenizers=opts.tokenizers,
        ),
        metrics.registry,
    )
    metrics.registry.register(view)  # its collect() reports the subscriber and the index
    view.start()
    for plugin in users:
        plugin.use_kv_cache(view.cache)
    log.info(
        "KV events: %s (%s), index block size %d, tokenizers for %s",
        opts.kv_events_mode,
        opts.kv_events_bind if opts.kv_events_mode == "central" else "per pod",
        opts.kv_index_block_size,
        sorted(opts.tokenizers) or "no model",
    )
    return view


def _config_text(opts: PickerOptions) -> str | None:
    if opts.config_file is None:
        return opts.config_text
    try:
        return yaml_files.read_text(opts.config_file)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config-file: {exc}") from exc


def _flow_control(text: str | None, scheduling) -> FlowControlConfig | None:
    """The config's flowControl section; on when present or when the flowControl feature
    gate is set (GIE's switch), off otherwise: requests then never wait in the picker."""
    raw = (yaml_files.safe_load(text) or {}) if text else {}
    section = raw.get("flowControl") if isinstance(raw, dict) else None
    if section is None and "flowControl" not in scheduling.feature_gates:
        return None
    try:
        return FlowControlConfig.from_dict(section or {})
    except FlowControlConfigError as exc:
        raise ConfigError(f"flowControl: {exc}") from exc


def _header_trust(opts: PickerOptions, text: str | None) -> HeaderTrust:
    """The trust flags and the config's users section (refused at start when malformed)."""
    raw = yaml_files.safe_load(text) if text else None
    try:
        users = Users.from_config(raw)
    except UsersConfigError as exc:
        raise ConfigError(str(exc)) from exc
    return HeaderTrust(opts.trust_client_headers, opts.trust_model_rewrite_header, users)


def _queue_gauges(gate: Gatekeeper, metrics: PickerMetrics) -> None:
    queue = gate.queue
    waiting = Gauge(
        "infergate_epp_flow_control_queue_size",
        "Requests waiting in the picker for a saturated pool",
        registry=metrics.registry,
    )
    waiting.set_function(lambda: queue.queued_requests)
    queued_bytes = Gauge(
        "infergate_epp_flow_control_queue_bytes",
        "Bytes of the requests waiting in the picker",
        registry=metrics.registry,
    )
    queued_bytes.set_function(lambda: queue.queued_bytes)


async def _pool_gauges(datastore: Datastore, metrics: PickerMetrics) -> None:
    while True:
        pool = datastore.pool
        if pool is not None:
            eps = datastore.ready_endpoints()
            metrics.pool_ready.labels(pool.name).set(len(eps))
            if eps:
                metrics.pool_kv.labels(pool.name).set(
                    sum(e.metrics.kv_usage for e in eps) / len(eps)
                )
                metrics.pool_queue.labels(pool.name).set(
                    sum(e.metrics.waiting for e in eps) / len(eps)
                )
        await asyncio.sleep(POOL_GAUGE_INTERVAL)


async def serve(opts: PickerOptions, ready: asyncio.Event | None = None) -> None:
    text = _config_text(opts)
    scheduling = load_config(text)
    trust = _header_trust(opts, text)
    datastore = Datastore()
    for plugin in scheduling.plugins.values():
        if isinstance(plugin, ForgetsServers):  # a departed pod must not attract requests
            datastore.removal_listeners.append(plugin.forget_server)
    metrics = PickerMetrics()
    metrics.model_labels.known = datastore.serves_model
    datastore.removal_listeners.append(metrics.forget_endpoint)
    provider = _provider(opts, datastore, metrics)
    await provider.start()
    view = _kv_cache_view(opts, scheduling, datastore, metrics)
    # One way to tokenize a prompt: the KV cache's, which its scorer shares, if there is one.
    prompts = view.cache if view is not None else ModelTokenizers(PromptTokenizers(opts.tokenizers))
    gate = Gatekeeper(
        metrics.registry, flow_control=_flow_control(text, scheduling), prompts=prompts
    )
    if gate.queue is not None:
        _queue_gauges(gate, metrics)
    scraper = MetricsScraper(datastore, metrics, interval=opts.refresh_metrics_interval)
    scraper.on_refresh = gate.notify  # fresh metrics may show room for waiting requests
    await scraper.start()
    director = Director(
        datastore,
        scheduling,
        metrics,
        DirectorOptions(
            fallbacks=opts.fallback_endpoints,
            max_body_bytes=opts.max_body_bytes,
            subset_filter=opts.subset_filter,
            trust=trust,
        ),
        gate,
    )

    grpc_opts = [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ]
    server = grpc.aio.server(options=grpc_opts)
    pbg.add_ExternalProcessorServicer_to_server(
        ExternalProcessor(director, BodyBudget(opts.max_held_request_bytes)), server
    )
    address = f"{opts.host}:{opts.grpc_port}"
    if opts.secure_serving:
        cert, key = tls.load_cert_dir(opts.cert_path) if opts.cert_path else tls.self_signed()
        server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    else:
        server.add_insecure_port(address)

    health_server = grpc.aio.server()
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
    health_server.add_insecure_port(f"{opts.host}:{opts.grpc_health_port}")
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if datastore.synced
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in HEALTH_SERVICES:
        await health_servicer.set(name, status)
    await health_servicer.set("liveness", health_pb2.HealthCheckResponse.SERVING)

    runner = web.AppRunner(
        make_app(datastore, metrics, director, view, debug=opts.enable_debug_endpoints),
        access_log=None,
    )
    await runner.setup()
    await web.TCPSite(runner, opts.host, opts.metrics_port).start()
    await server.start()
    await health_server.start()
    gauges = asyncio.create_task(_pool_gauges(datastore, metrics))
    log.info(
        "endpoint picker for pool %s/%s: ext_proc %s on %s, health :%d, metrics :%d, %d endpoints",
        opts.pool_namespace,
        opts.pool_name,
        "TLS" if opts.secure_serving else "plaintext",
        address,
        opts.grpc_health_port,
        opts.metrics_port,
        len(datastore.endpoints()),
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        # Drain: health says NOT_SERVING (so Envoy and the kubelet send new streams to
        # another picker), new streams are refused, in-flight ones get the grace period.
        log.info(
            "shutting down: NOT_SERVING, up to %.0f s for in-flight ext_proc streams",
            opts.grace_period,
        )
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=opts.grace_period)
        log.info("ext_proc streams done; stopping")
        gauges.cancel()
        await health_server.stop(grace=0)
        await gate.close()
        await scraper.stop()
        await provider.stop()
        if view is not None:
            await view.close()
        await runner.cleanup()


def _run(coro) -> None:
    """uvloop when available: it cuts the picker's CPU per request (see the README)."""
    if os.environ.get("INFERGATE_EVENT_LOOP", "uvloop") == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    logging.basicConfig(
        level=opts.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        _run(serve(opts))
    except (ConfigError, FileProviderError, KubernetesProviderError, FileNotFoundError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    return 0
