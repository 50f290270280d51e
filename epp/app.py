"""Run the picker: providers, scraper, ext_proc (TLS) on 9002, health on 9003, metrics on 9090.

serve() is a few named steps: check the config, build the parts that decide where requests
go (build_picker: datastore and metrics, KV cache, scheduling, provider, gatekeeper, scraper,
director), start the servers, wait for a signal, drain and stop."""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pbg
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import Gauge

from infergw.api import logs, tracing, yaml_files
from infergw.api.signals import wait_for_signal
from infergw.cluster import certs
from infergw.epp.body_budget import BodyBudget
from infergw.epp.capacity_wait import CapacityWaitCollector
from infergw.epp.datastore import Datastore
from infergw.epp.director import Director, DirectorOptions
from infergw.epp.extproc import ExternalProcessor
from infergw.epp.flowcontrol import FlowControlConfig, FlowControlConfigError
from infergw.epp.gatekeeper import Gatekeeper
from infergw.epp.http_server import make_app
from infergw.epp.metric_collectors import (
    FlowControlMetrics,
    FlowQueueCollector,
    PoolEndpointsCollector,
)
from infergw.epp.metrics import PickerMetrics
from infergw.epp.options import PickerOptions, parse_options
from infergw.epp.providers import KubernetesProviderError
from infergw.epp.providers.file import FileProvider, FileProviderError
from infergw.epp.replica_members import ReplicaMembers
from infergw.epp.replica_sync import ReplicaSync
from infergw.epp.scheduling.config import (
    ConfigError,
    ConfigFile,
    SchedulingConfig,
    from_document,
    needs_kv_cache,
    read_config,
)
from infergw.epp.scheduling.handle import ForgetsServers, Handle
from infergw.epp.scrape import MetricsScraper
from infergw.epp.scrape_shares import ScrapeShares
from infergw.epp.tokenizing import ModelTokenizers
from infergw.epp.trust import HeaderTrust, Users, UsersConfigError
from infergw.kvindex.tokenize import PromptTokenizers

if TYPE_CHECKING:
    from infergw.epp.kv_events import KVCacheView
    from infergw.epp.replica_peers import ReplicaPeers

log = logging.getLogger("epp")

HEALTH_SERVICES = (
    "",
    "liveness",
    "readiness",
    "inference-extension",
    "envoy.service.ext_proc.v3.ExternalProcessor",
)
POOL_GAUGE_INTERVAL = 5.0
GRPC_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class Provider(Protocol):
    """Where the pool and its pods come from (epp/providers/)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(slots=True)
class Picker:
    """The parts that decide where requests go, in the order build_picker makes them."""

    datastore: Datastore
    metrics: PickerMetrics
    view: KVCacheView | None
    scheduling: SchedulingConfig
    provider: Provider
    gate: Gatekeeper
    scraper: MetricsScraper
    director: Director
    replicas: ReplicaSync | None = None  # decisions shared with other replicas
    peers: ReplicaPeers | None = None  # who those replicas are, in a cluster
    members: ReplicaMembers | None = None  # which of them owns which pod's shared work


@dataclass(slots=True)
class Servers:
    """What serves the picker: ext_proc, its gRPC health, the HTTP port, the pool gauges."""

    extproc: grpc.aio.Server
    health: grpc.aio.Server
    health_servicer: health.aio.HealthServicer
    http: web.AppRunner
    gauges: asyncio.Task


async def serve(opts: PickerOptions, ready: asyncio.Event | None = None) -> None:
    picker = await build_picker(opts)
    servers = await start_servers(opts, picker)
    try:
        await wait_for_signal(ready)
    finally:
        await drain_and_stop(opts, picker, servers)


# ---- build ---------------------------------------------------------------------------------


async def build_picker(opts: PickerOptions) -> Picker:
    # The config is checked whole before anything starts: a mistake stops the picker at once.
    text = _config_text(opts)
    doc = read_config(text)
    trust = _header_trust(opts, text)
    datastore, metrics = build_datastore(host_ports=opts.provider == "file")
    replicas = build_replica_sync(opts, datastore, metrics)
    members = build_replica_members(opts, replicas, metrics)
    view = build_kv_cache(opts, doc, datastore, metrics, replicas, members)
    try:
        scheduling = build_scheduling(doc, datastore, metrics, view, replicas)
    except ConfigError:
        if view is not None:
            await view.close()  # nothing is bound yet; this ends its ZMQ context
        if replicas is not None:
            await replicas.close()
        raise
    provider = await start_provider(opts, datastore, metrics)
    if view is not None:
        start_kv_cache(opts, view)
    peers = None
    if replicas is not None:
        replicas.start()
        peers = start_replica_peers(opts, replicas, metrics)
    gate = build_gatekeeper(opts, text, scheduling, view, metrics, datastore)
    scraper = await start_scraper(opts, datastore, metrics, gate, replicas, members)
    director = build_director(opts, datastore, scheduling, metrics, trust, gate)
    return Picker(
        datastore, metrics, view, scheduling, provider, gate, scraper, director, replicas, peers,
        members,
    )  # fmt: skip


def build_datastore(*, host_ports: bool = False) -> tuple[Datastore, PickerMetrics]:
    """The datastore and the picker's metrics, whose per-endpoint and per-model series follow
    the pool. host_ports: pods' one-address ports are read (pool files: standalone mode)."""
    datastore = Datastore(host_ports=host_ports)
    metrics = PickerMetrics()
    metrics.model_labels.known = datastore.serves_model
    datastore.removal_listeners.append(metrics.forget_endpoint)
    metrics.registry.register(PoolEndpointsCollector(datastore))
    return datastore, metrics


def build_replica_sync(
    opts: PickerOptions, datastore: Datastore, metrics: PickerMetrics
) -> ReplicaSync | None:
    """With several replicas (--replica-sync-bind): the channel their plugins and KV cache
    share recent decisions on; not started."""
    if not opts.replica_sync_bind:
        return None
    replicas = ReplicaSync(
        opts.replica_sync_bind,
        list(opts.replica_sync_peers),
        is_member=lambda address: datastore.endpoint(address) is not None,
    )
    metrics.registry.register(replicas)
    return replicas


WILDCARD_HOSTS = {"*", "0.0.0.0", "[::]"}  # canonical() brackets IPv6: "::" → "[::]"


def build_replica_members(
    opts: PickerOptions, replicas: ReplicaSync | None, metrics: PickerMetrics
) -> ReplicaMembers | None:
    """Who owns which pod among the replicas, when some work is shared by owner: KV-event
    ingestion into the shared index, scraping (epp/replica_members.py); not started."""
    if replicas is None or not (opts.kv_index_redis_shard or opts.share_scrapes):
        return None
    members = ReplicaMembers(replicas)
    if members.live.me.removeprefix("tcp://").rpartition(":")[0] in WILDCARD_HOSTS:
        log.warning(
            "--replica-sync-bind %s is a wildcard: the other replicas cannot name this one, so "
            "each replica owns every pod (scraping and KV shards are not shared). Bind this "
            "replica's own address (tcp://$(POD_IP):PORT in a cluster)",
            replicas.bind,
        )
    metrics.registry.register(members)
    return members


def start_replica_peers(
    opts: PickerOptions, replicas: ReplicaSync, metrics: PickerMetrics
) -> ReplicaPeers | None:
    """With --replica-sync-discovery: watch the Service's EndpointSlices for the replicas'
    addresses (in the background; the picker serves without them)."""
    if opts.replica_sync_discovery is None:
        return None
    from kubernetes import config

    from infergw.cluster.kube_store import KubeStore, api_client_from_environment
    from infergw.epp.providers.kubernetes import LIST_TIMEOUT, WATCH_TIMEOUT
    from infergw.epp.replica_peers import ReplicaPeers, own_ips

    service = opts.replica_sync_discovery
    try:
        client = api_client_from_environment()
    except config.ConfigException as exc:
        raise KubernetesProviderError(
            f"--replica-sync-discovery {service}: no Kubernetes client config: {exc}"
        ) from exc
    peers = ReplicaPeers(
        replicas,
        KubeStore(client, watch_timeout=WATCH_TIMEOUT, request_timeout=LIST_TIMEOUT),
        service.namespace,
        service.name,
        own=own_ips(replicas.bind, os.environ.get("POD_IP")),
        close_store=client.close,
    )
    metrics.registry.register(peers)
    peers.start()
    return peers


def build_kv_cache(
    opts: PickerOptions,
    doc: ConfigFile,
    datastore: Datastore,
    metrics: PickerMetrics,
    replicas: ReplicaSync | None = None,
    members: ReplicaMembers | None = None,
) -> KVCacheView | None:
    """The KV-event index and tokenizers, only if a plugin type of the config needs them; not
    started (start_kv_cache binds its sockets once the provider runs)."""
    if not needs_kv_cache(doc):
        return None
    from infergw.epp.kv_events import KVCacheView, KVEventOptions

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
            backend=opts.kv_index_backend,
            layout=opts.kv_index_layout,
            engine_hashing=opts.kv_engine_hashing,
            redis_url=opts.kv_index_redis_url,
            redis_write=opts.kv_index_redis_write,
            redis_shard=opts.kv_index_redis_shard,
            redis_timeout=opts.kv_index_redis_timeout,
            redis_ttl=opts.kv_index_redis_ttl,
        ),
        metrics.registry,
        replicas,
        members,
    )
    metrics.registry.register(view)  # its collect() reports the subscriber and the index
    return view


def build_scheduling(
    doc: ConfigFile,
    datastore: Datastore,
    metrics: PickerMetrics,
    view: KVCacheView | None,
    replicas: ReplicaSync | None = None,
) -> SchedulingConfig:
    """The plugins, each given the handle at construction, and the profiles over them."""
    handle = Handle(
        kv_cache=view.cache if view is not None else None, metrics=metrics, replicas=replicas
    )
    scheduling = from_document(doc, handle)
    for plugin in scheduling.plugins.values():
        if isinstance(plugin, ForgetsServers):  # a departed pod must not attract requests
            datastore.removal_listeners.append(plugin.forget_server)
    return scheduling


async def start_provider(
    opts: PickerOptions, datastore: Datastore, metrics: PickerMetrics
) -> Provider:
    provider: Provider
    if opts.provider == "file":
        provider = FileProvider(
            datastore, opts.pool_files, opts.pool_name, opts.pool_namespace, metrics=metrics
        )
    else:
        from infergw.epp.providers.kubernetes import KubernetesProvider

        provider = KubernetesProvider(
            datastore, opts.pool_name, opts.pool_namespace, metrics=metrics
        )
    await provider.start()
    return provider


def start_kv_cache(opts: PickerOptions, view: KVCacheView) -> None:
    view.start()
    log.info(
        "KV events: %s (%s), index block size %d keyed by %s in %s, tokenizers for %s",
        _subscription(opts, view),
        opts.kv_events_bind if opts.kv_events_mode == "central" else "per pod",
        opts.kv_index_block_size,
        "token ids"
        if opts.kv_engine_hashing is None
        else f"engine hashes ({opts.kv_engine_hashing.describe()})",
        opts.kv_index_backend,
        sorted(opts.tokenizers) or "no model",
    )


def _subscription(opts: PickerOptions, view: KVCacheView) -> str:
    if not view.subscribes:
        return "not subscribed (reads the shared index)"
    if view.shards is not None:
        return f"{opts.kv_events_mode}, this replica's shard of the pods (writes the shared index)"
    return opts.kv_events_mode


def build_gatekeeper(
    opts: PickerOptions,
    text: str | None,
    scheduling: SchedulingConfig,
    view: KVCacheView | None,
    metrics: PickerMetrics,
    datastore: Datastore,
) -> Gatekeeper:
    """Rate limits and, when configured, flow control (with its queue's gauges)."""
    # One way to tokenize a prompt: the KV cache's, which its scorer shares, if there is one.
    prompts = view.cache if view is not None else ModelTokenizers(PromptTokenizers(opts.tokenizers))
    gate = Gatekeeper(
        metrics.registry,
        flow_control=_flow_control(text, scheduling),
        prompts=prompts,
        capacity_wait_ttl=opts.capacity_wait_ttl,
        flow_observer=FlowControlMetrics(metrics, opts.pool_name),
    )
    if gate.queue is not None:
        _queue_gauges(gate, metrics)
        metrics.registry.register(
            FlowQueueCollector(gate.queue, gate.detector, datastore, metrics, opts.pool_name)
        )
    gate.capacity.pool = lambda: opts.pool_name
    metrics.registry.register(CapacityWaitCollector(gate.capacity, metrics.model_labels))
    return gate


async def start_scraper(
    opts: PickerOptions,
    datastore: Datastore,
    metrics: PickerMetrics,
    gate: Gatekeeper,
    replicas: ReplicaSync | None = None,
    members: ReplicaMembers | None = None,
) -> MetricsScraper:
    scraper = MetricsScraper(
        datastore,
        metrics,
        interval=opts.refresh_metrics_interval,
        idle_interval=opts.idle_metrics_interval,
        quiet_interval=opts.quiet_metrics_interval,
        stale_after=opts.metrics_staleness_threshold,
        # Flow control's staleness bounds the quiet pace only when flow control runs: its
        # detector reads the numbers then, and nothing else does.
        stale_bound=gate.detector.config.metrics_staleness if gate.queue is not None else None,
    )
    scraper.on_refresh = gate.notify  # fresh metrics may show room for waiting requests
    queue = gate.queue
    if queue is not None:
        scraper.held = lambda: queue.queued_requests > 0
    metrics.registry.register(scraper)
    if opts.share_scrapes and replicas is not None and members is not None:
        shares = ScrapeShares(datastore, replicas, members, stale_after=scraper.stale_after)
        scraper.share(shares)
        metrics.registry.register(shares)
        members.start()
    await scraper.start()
    return scraper


def build_director(
    opts: PickerOptions,
    datastore: Datastore,
    scheduling: SchedulingConfig,
    metrics: PickerMetrics,
    trust: HeaderTrust,
    gate: Gatekeeper,
) -> Director:
    return Director(
        datastore,
        scheduling,
        metrics,
        DirectorOptions(
            fallbacks=opts.fallback_endpoints,
            max_body_bytes=opts.max_body_bytes,
            request_body_timeout=opts.request_body_timeout,
            subset_filter=opts.subset_filter,
            trust=trust,
            response_headers_skipped=opts.response_headers_skipped,
            response_id_key=opts.response_id_key,
        ),
        gate,
    )


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


# ---- serve ---------------------------------------------------------------------------------


async def start_servers(opts: PickerOptions, picker: Picker) -> Servers:
    """The HTTP port, then ext_proc, then its health, then the pool gauges."""
    health_server, health_servicer = await _health_server(opts, picker.datastore)
    extproc, address = _extproc_server(opts, picker.director, health_servicer)
    runner = web.AppRunner(
        make_app(
            picker.datastore,
            picker.metrics,
            picker.director,
            picker.view,
            debug=opts.enable_debug_endpoints,
        ),
        access_log=None,
    )
    await runner.setup()
    await web.TCPSite(runner, opts.host, opts.metrics_port).start()
    await extproc.start()
    await health_server.start()
    gauges = asyncio.create_task(_pool_gauges(picker.datastore, picker.metrics))
    log.info(
        "endpoint picker for pool %s/%s: ext_proc %s on %s, health :%d, metrics :%d, %d endpoints",
        opts.pool_namespace,
        opts.pool_name,
        "TLS" if opts.secure_serving else "plaintext",
        address,
        opts.grpc_health_port,
        opts.metrics_port,
        len(picker.datastore.endpoints()),
    )
    return Servers(extproc, health_server, health_servicer, runner, gauges)


def _extproc_server(
    opts: PickerOptions, director: Director, health_servicer: health.aio.HealthServicer
) -> tuple[grpc.aio.Server, str]:
    """The ext_proc gRPC server (TLS unless --secure-serving=false), not started. It answers
    gRPC health too, from the health port's servicer: Envoy Gateway health-checks the ext_proc
    port of each picker replica (its health checks cannot name another port)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
        ]
    )
    pbg.add_ExternalProcessorServicer_to_server(
        ExternalProcessor(director, BodyBudget(opts.max_held_request_bytes)), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{opts.host}:{opts.grpc_port}"
    if opts.secure_serving:
        cert, key = certs.read_cert_dir(opts.cert_path) if opts.cert_path else certs.self_signed()
        server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    else:
        server.add_insecure_port(address)
    return server, address


async def _health_server(
    opts: PickerOptions, datastore: Datastore
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """gRPC health, not started: SERVING once the pool is synced; liveness always."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"{opts.host}:{opts.grpc_health_port}")
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if datastore.synced
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in HEALTH_SERVICES:
        await servicer.set(name, status)
    await servicer.set("liveness", health_pb2.HealthCheckResponse.SERVING)
    return server, servicer


async def _pool_gauges(datastore: Datastore, metrics: PickerMetrics) -> None:
    while True:
        pool = datastore.pool
        if pool is not None:
            eps = datastore.ready_endpoints()
            metrics.pool_ready.labels(pool.name).set(len(eps))
            if eps:
                for what, average, values in (
                    ("kv_cache_utilization", metrics.pool_kv, [e.metrics.kv_usage for e in eps]),
                    ("queue_size", metrics.pool_queue, [e.metrics.waiting for e in eps]),
                    ("running_requests", metrics.pool_running, [e.metrics.running for e in eps]),
                ):
                    average.labels(pool.name).set(statistics.fmean(values))
                    metrics.pool_spread[what].labels(pool.name).set(statistics.pstdev(values))
        await asyncio.sleep(POOL_GAUGE_INTERVAL)


async def drain_and_stop(opts: PickerOptions, picker: Picker, servers: Servers) -> None:
    # Drain: health says NOT_SERVING (so Envoy and the kubelet send new streams to another
    # picker), new streams are refused, in-flight ones get the grace period.
    log.info(
        "shutting down: NOT_SERVING, up to %.0f s for in-flight ext_proc streams",
        opts.grace_period,
    )
    await servers.health_servicer.enter_graceful_shutdown()
    await servers.extproc.stop(grace=opts.grace_period)
    log.info("ext_proc streams done; stopping")
    servers.gauges.cancel()
    await servers.health.stop(grace=0)
    await stop_picker(picker)
    await servers.http.cleanup()  # last: /metrics answers until the picker is down


async def stop_picker(picker: Picker) -> None:
    """Waiting requests, the scraper, the provider, the KV-event subscriber, in that order."""
    await picker.gate.close()
    await picker.scraper.stop()
    await picker.provider.stop()
    if picker.view is not None:
        await picker.view.close()
    if picker.peers is not None:
        await picker.peers.stop()
    if picker.members is not None:
        await picker.members.close()
    if picker.replicas is not None:
        await picker.replicas.close()


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
    logs.configure(opts.log)
    for warning in opts.reference_warnings:
        log.warning("%s", warning)
    if not tracing.started("epp", force=opts.tracing):
        return 2
    if opts.response_id_key is None:
        log.info(
            "Responses API ids are signed with a key derived from the pool's name: give every "
            "replica the same --response-id-key-file so clients cannot make up ids"
        )
    try:
        _run(serve(opts))
    except (ConfigError, FileProviderError, KubernetesProviderError, FileNotFoundError) as exc:
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
