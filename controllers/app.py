"""`python -m infergw.controllers` / `infergate controllers`: the reconcilers, standalone or
against a cluster.

standalone (default): objects from --manifests (a watched YAML directory) live in memory,
pods run as local processes (local_runtime.py), and the InferencePools and Pods are written
to --pool-file for the picker's file provider.
kubernetes: the same reconcilers over the Kubernetes API (kubeconfig or in-cluster), and each
Model's endpoint picker and HTTPRoute (picker_objects.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import start_http_server

from infergw.api import logs, tracing, version
from infergw.api.cli_help import HelpFormatter
from infergw.api.engine_keys import INDEX_KEYS, TOKEN_KEYS
from infergw.api.names import KV_EVENTS_PORT, PICKER_FILTER_POLICY, POOL_FILE_ENV
from infergw.api.pod_ports import (
    AUTO,
    MANY,
    ONE,
    POD_ADDRESS_HELP,
    POD_ADDRESS_MODES,
    resolve_pod_addresses,
)
from infergw.api.sizes import size_arg
from infergw.cluster.informer import Informer
from infergw.cluster.store import (
    AUTOSCALING_BINDING,
    AUTOSCALING_POLICY,
    DEPLOYMENT,
    ENVOY_PATCH_POLICY,
    EVENT,
    HTTP_ROUTE,
    INFERENCE_POOL,
    MODEL,
    MODEL_INFER,
    MODEL_ROUTE,
    MODEL_SERVER,
    POD,
    Kind,
    NotFound,
    Obj,
    Store,
)
from infergw.controllers.autoscaler import AutoscalerReconciler
from infergw.controllers.engine_command import PER_POD, KVEventSockets
from infergw.controllers.events import EventRecorder
from infergw.controllers.model import ModelReconciler
from infergw.controllers.modelinfer import ContainerLogs, ModelInferReconciler
from infergw.controllers.networking_status import (
    ModelRouteStatus,
    ModelServerStatus,
    servers_selecting,
)
from infergw.controllers.picker_demand import by_pool, picker_metrics_item
from infergw.controllers.picker_objects import PICKER_IMAGE, PickerSettings
from infergw.controllers.policy_status import PolicyStatus
from infergw.controllers.runner import (
    Controller,
    ControllerMetrics,
    own_key,
    owner_key,
    same_namespace_keys,
)
from infergw.controllers.weights import CLUSTER, WeightsLayout, cache_volume_of

log = logging.getLogger("controllers")


def patch_policy_keys(models: Informer) -> Callable[[Obj], list[Hashable]]:
    """The Models an EnvoyPatchPolicy's status concerns: its controlling Model's, or for the
    install's Gateway-wide picker filter every Model in its namespace (the Gateway's: where a
    Model's own patch is written, its Gateway is)."""
    owned = owner_key(MODEL)

    def keys(obj: Obj) -> list[Hashable]:
        meta = obj["metadata"]
        if meta.get("name") != PICKER_FILTER_POLICY:
            return owned(obj)
        return [k for m in models.items(meta.get("namespace", "")) for k in own_key(m)]

    return keys


def build_controllers(
    store: Store,
    metrics: ControllerMetrics,
    *,
    autoscale_interval: float = 15.0,
    namespace: str | None = None,
    kv_sockets: KVEventSockets = PER_POD,
    picker: PickerSettings | None = None,
    picker_metrics: dict[str, list[str]] | None = None,
    weights: WeightsLayout = CLUSTER,
    events: EventRecorder | None = None,
    logs: ContainerLogs | None = None,
) -> tuple[list[Controller], AutoscalerReconciler]:
    """The controllers; with `picker` (a cluster), every Model also gets its endpoint picker,
    HTTPRoute and EnvoyPatchPolicy, and is reconciled again when their status (or the
    install's picker filter's) changes. `picker_metrics`: the pickers' metrics URLs per
    pool, where the autoscaler reads their demand (None: each pool's picker Service's pods).
    Every controller reports what it does and what fails as Events (events.py) and writes
    the status of ModelRoutes, ModelServers and AutoScalingPolicies (networking_status.py,
    policy_status.py). `logs`: the pods' logs, where a download's progress is read
    (standalone: the local runtime's; a cluster: download_logs.py's; None: not read)."""
    events = events or EventRecorder(store)
    scaler = AutoscalerReconciler(
        store, interval=autoscale_interval, picker_metrics=picker_metrics, events=events
    )
    model_watches = [(MODEL, own_key), (MODEL_INFER, owner_key(MODEL))]
    if picker is not None:
        model_watches += [(DEPLOYMENT, owner_key(MODEL)), (HTTP_ROUTE, owner_key(MODEL))]
    models = Controller(
        store,
        ModelReconciler(store, kv_sockets, picker, weights, events),
        model_watches,
        metrics,
        namespace=namespace,
        events=events,
        # CRDs that may be missing: those installed with the gateway (the Gateway API's,
        # Envoy Gateway's) and ours of networking.infergate.io
        optional=(HTTP_ROUTE, ENVOY_PATCH_POLICY, MODEL_ROUTE, MODEL_SERVER),
    )
    if picker is not None:
        model_informer = models.informer(MODEL)
        models.watch(ENVOY_PATCH_POLICY, patch_policy_keys(model_informer))
        # A ModelRoute's parentRefs attach the HTTPRoutes of the Models it targets
        # (route_parents.py): any change may concern any Model of its namespace.
        for kind in (MODEL_ROUTE, MODEL_SERVER):
            models.watch(kind, same_namespace_keys(model_informer))

    def status_controller(reconciler, *optional: Kind) -> Controller:
        """A controller of a kind whose status alone it writes."""
        watches = [(reconciler.kind, own_key)]
        return Controller(store, reconciler, watches, metrics, namespace=namespace,
                          optional=optional, events=events)  # fmt: skip

    routes = status_controller(
        ModelRouteStatus(store, events), MODEL_ROUTE, MODEL_SERVER, INFERENCE_POOL
    )
    route_keys = same_namespace_keys(routes.informer(MODEL_ROUTE))
    routes.watch(MODEL_SERVER, route_keys)
    routes.watch(INFERENCE_POOL, route_keys)
    servers = status_controller(ModelServerStatus(store, events), MODEL_SERVER)
    servers.watch(POD, servers_selecting(servers.informer(MODEL_SERVER)))
    policies = status_controller(PolicyStatus(store, events))
    policies.watch(AUTOSCALING_BINDING, same_namespace_keys(policies.informer(AUTOSCALING_POLICY)))
    return [
        models,
        Controller(
            store,
            ModelInferReconciler(store, events=events, logs=logs),
            [(MODEL_INFER, own_key), (POD, owner_key(MODEL_INFER))],
            metrics,
            namespace=namespace,
            events=events,
        ),
        Controller(
            store,
            scaler,
            [(AUTOSCALING_BINDING, own_key)],
            metrics,
            namespace=namespace,
            events=events,
        ),
        routes,
        servers,
        policies,
    ], scaler


@dataclass(slots=True)
class Standalone:
    """Everything standalone mode runs, started and stopped together."""

    manifests: Path
    state_dir: Path
    pool_file: Path
    autoscale_interval: float = 15.0
    eds_file: Path | None = None  # the local Envoy's endpoints of eds_pool (default: the only)
    eds_pool: str | None = None
    eds_dir: Path | None = None  # every pool's endpoints, one file each (several Models)
    # The local picker's KV-event SUB, which every pod on this machine connects to.
    kv_sockets: KVEventSockets = field(default_factory=lambda: central_sockets(None))
    weights_cache_dir: Path | None = None  # None: the download's own default
    pvc_root: Path | None = None  # pvc://CLAIM/PATH is <pvc_root>/CLAIM/PATH; None: <state>/pvc
    weights_cache_max_bytes: int | None = None  # each download evicts down to it; None: no bound
    # How pods share this machine: `many` addresses, `one` address with ports of their own,
    # `auto` (api/pod_ports.py).
    pod_addresses: str = AUTO
    metrics: ControllerMetrics = field(default_factory=ControllerMetrics)
    # pool → its pickers' metrics URLs: their demand scales a pool up from zero
    picker_metrics: dict[str, list[str]] = field(default_factory=dict)
    store: Store | None = None
    parts: list = field(default_factory=list)
    _scaler: AutoscalerReconciler | None = None

    async def start(self) -> Standalone:
        from infergw.controllers.exporter import PoolExporter
        from infergw.controllers.local_runtime import LocalRuntime
        from infergw.controllers.manifests import ManifestDirectory
        from infergw.controllers.memory_store import MemoryStore

        store = self.store = MemoryStore()
        # The pool file is standalone mode's API server: decode sidecars read their pool there.
        pool_env = {POOL_FILE_ENV: str(self.pool_file.resolve())}
        addresses = resolve_pod_addresses(self.pod_addresses)
        log.info("standalone pods: %s", POD_ADDRESS_HELP[addresses])
        runtime = LocalRuntime(store, self.state_dir, env=pool_env, pod_addresses=addresses)
        controllers, self._scaler = build_controllers(
            store,
            self.metrics,
            # memory has no Event TTL: forgotten series take their Events with them
            events=EventRecorder(store, forget=forget_event(store)),
            autoscale_interval=self.autoscale_interval,
            kv_sockets=self.kv_sockets,
            picker_metrics=self.picker_metrics,
            weights=WeightsLayout.standalone(
                self.weights_cache_dir,
                self.state_dir / "models",
                self.pvc_root,
                self.weights_cache_max_bytes,
            ),
            logs=runtime.log_tail,
        )
        exporter = PoolExporter(
            store,
            self.pool_file,
            eds_file=self.eds_file,
            eds_pool=self.eds_pool,
            eds_dir=self.eds_dir,
        )
        manifests = ManifestDirectory(store, self.manifests)
        for part in (runtime, *controllers, exporter, manifests):
            await part.start()
            self.parts.append(part)
        return self

    async def stop(self) -> None:
        for part in reversed(self.parts):
            await part.stop()
        self.parts.clear()
        if self._scaler is not None:
            await self._scaler.close()


def forget_event(store: Store) -> Callable[[str, str], Awaitable[None]]:
    """Delete an Event the recorder no longer counts (standalone mode only: the API server
    expires Events itself, and the install grants no delete on them)."""

    async def forget(namespace: str, name: str) -> None:
        try:
            await store.delete(EVENT, namespace, name)
        except NotFound:
            pass

    return forget


def redis_address(text: str) -> str:
    """HOST:PORT (a name, an IPv4 address or a bracketed IPv6 one): what the picker connects to."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    if any(c.isspace() or c in "/?#@," for c in host):
        raise argparse.ArgumentTypeError(f"{text!r}: not a host name or address")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infergate controllers", description=__doc__, formatter_class=HelpFormatter
    )
    mode = p.add_argument_group("Mode")
    standalone = p.add_argument_group("Standalone mode (objects from files, pods as processes)")
    autoscaling = p.add_argument_group("Autoscaling")
    listening = p.add_argument_group("Listening and webhook")
    kv = p.add_argument_group("KV cache")
    pods = p.add_argument_group("Models' pods and pickers (kubernetes mode)")
    logging_group = p.add_argument_group("Logging")
    mode.add_argument(
        "--mode",
        choices=["standalone", "kubernetes"],
        default="standalone",
        help="standalone: objects from --manifests, pods as local processes; kubernetes: an "
        "API server's objects, pods and pickers made in the cluster",
    )
    standalone.add_argument(
        "--manifests", type=Path, help="standalone: YAML file or directory, watched"
    )
    standalone.add_argument(
        "--state-dir", type=Path, default=Path(".infergate"), help="standalone: logs"
    )
    standalone.add_argument(
        "--pool-file", type=Path, help="standalone: where the picker reads pools and pods"
    )
    standalone.add_argument(
        "--pod-addresses",
        choices=POD_ADDRESS_MODES,
        default=AUTO,
        help=f"standalone: {POD_ADDRESS_HELP[MANY]}; {POD_ADDRESS_HELP[ONE]}; auto: many where "
        "127.0.0.2 can be bound (Linux), else one (macOS)",
    )
    standalone.add_argument(
        "--envoy-eds-file", type=Path, help="standalone: write a pool's endpoints as Envoy EDS"
    )
    standalone.add_argument(
        "--envoy-eds-pool", help="standalone: that pool (default: the only one)"
    )
    standalone.add_argument(
        "--envoy-eds-dir",
        type=Path,
        help="standalone: write every pool's endpoints as Envoy EDS, DIR/<pool>.json each",
    )
    mode.add_argument("--namespace", default=None, help="kubernetes: watch one namespace")
    mode.add_argument(
        "--leader-elect", action="store_true", help="kubernetes: run several replicas"
    )
    mode.add_argument(
        "--leader-namespace", default="infergate-system", help="where the Lease lives"
    )
    autoscaling.add_argument(
        "--autoscale-interval",
        type=float,
        default=15.0,
        help="seconds between two looks at the pods' metrics",
    )
    autoscaling.add_argument(
        "--picker-metrics",
        action="append",
        type=picker_metrics_item,
        default=[],
        metavar="POOL=URL",
        help="standalone: a picker's metrics URL for pool POOL (repeat for every replica); the "
        "autoscaler sums their held requests to scale the pool up from zero "
        "(controllers/picker_demand.py). Kubernetes mode finds them itself",
    )
    listening.add_argument(
        "--host", default="127.0.0.1", help="address for metrics and the webhook"
    )
    listening.add_argument("--metrics-port", type=int, default=9091, help="/metrics and health")
    listening.add_argument(
        "--webhook-port", type=int, default=0, help="serve the admission webhook"
    )
    listening.add_argument(
        "--webhook-cert-dir", type=Path, help="tls.crt and tls.key (default: generated)"
    )
    kv.add_argument(
        "--kv-events-mode",
        choices=["central", "per-pod"],
        default=None,
        help="where the engines of the Models send KV events, as the picker's flag of that "
        "name says (default: central in standalone mode, per-pod in kubernetes mode)",
    )
    kv.add_argument(
        "--kv-events-picker",
        default=None,
        help="central mode: the picker's KV-event SUB as host:port (standalone default "
        f"127.0.0.1:{KV_EVENTS_PORT}; kubernetes mode needs it, e.g. the picker Service's "
        f"name:{KV_EVENTS_PORT})",
    )
    pods.add_argument(
        "--picker-image",
        default=PICKER_IMAGE,
        help="kubernetes mode: the image of every Model's endpoint picker (infergate epp), "
        "of its tokenizer fetch and of its weights' downloads (infergate download)",
    )
    kv.add_argument(
        "--picker-kv-index-redis",
        type=redis_address,
        default=None,
        metavar="HOST:PORT",
        help="kubernetes mode: every Model's picker replicas share one KV index in this Redis "
        "(standalone Redis or Valkey), each pod's KV events ingested by one replica; default: "
        "each replica subscribes to every pod and keeps its own index",
    )
    kv.add_argument(
        "--picker-kv-index-keys",
        choices=INDEX_KEYS,
        default=TOKEN_KEYS,
        help="kubernetes mode: what every Model's picker keys its KV index by: tokens (token "
        "ids; needs nothing of the engines) or engine (the engines' own block hashes: less "
        "picker memory; the controllers pass each picker its Model's --block-size, "
        "--prefix-caching-hash-algo, PYTHONHASHSEED and adapter paths; for vLLM and the "
        "simulator only, other Models keep token ids and their EngineKeys condition says why)",
    )
    pods.add_argument(
        "--weights-cache",
        type=weights_cache,
        default="emptyDir",
        metavar="emptyDir|hostPath:/DIR|pvc:CLAIM",
        help="kubernetes mode: the volume the Models' weights are downloaded into; a hostPath "
        "or a claim that a node's pods share downloads each model once per node (the "
        "webhook admits a hostPath only in namespaces labelled "
        "infergate.io/allow-privileged-pods=true); default: each pod's own emptyDir",
    )
    standalone.add_argument(
        "--weights-cache-dir",
        type=Path,
        default=None,
        help="standalone: where the Models' weights are downloaded (default: the download's "
        "own, $INFERGATE_CACHE_DIR, else ~/.cache/infergate/models)",
    )
    standalone.add_argument(
        "--weights-cache-max-bytes",
        type=size_arg,
        default=None,
        metavar="SIZE",
        help="standalone: after each download, least-recently-used entries no pod reads are "
        "removed until the cache fits (e.g. 500G; fetch/evict.py); default: no bound",
    )
    standalone.add_argument(
        "--pvc-root",
        type=Path,
        default=None,
        help="standalone: where a Model's pvc://CLAIM/PATH is, as DIR/CLAIM/PATH (copied into "
        "the weights cache, never written; default: STATE_DIR/pvc)",
    )
    logs.add_log_flags(logging_group)
    version.add_version_flag(p)
    return p


def weights_cache(text: str) -> str:
    try:
        cache_volume_of(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def central_sockets(picker: str | None) -> KVEventSockets:
    return KVEventSockets.central(picker or f"127.0.0.1:{KV_EVENTS_PORT}")


def kv_sockets(args: argparse.Namespace) -> KVEventSockets:
    """Where the engines send KV events: the flags, else the mode's usual place."""
    mode = args.kv_events_mode or ("per-pod" if args.mode == "kubernetes" else "central")
    if mode == "per-pod":
        # Standalone pods share this machine, one loopback address each: each binds its own.
        return PER_POD if args.mode == "kubernetes" else KVEventSockets.per_pod_address()
    if args.mode == "kubernetes" and not args.kv_events_picker:
        raise SystemExit("infergate controllers: --kv-events-mode central needs --kv-events-picker")
    return central_sockets(args.kv_events_picker)


async def serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    webhook_store = None
    if args.webhook_port:
        from infergw.controllers.webhook import namespace_reader, serve_webhook

        labels = None
        if args.mode == "kubernetes":  # namespaces opt in to privileged pods by a label
            from infergw.cluster.kube_store import KubeStore

            webhook_store = KubeStore.from_environment()
            labels = namespace_reader(webhook_store)
        webhook = asyncio.create_task(
            serve_webhook(
                args.host, args.webhook_port, args.webhook_cert_dir, namespace_labels=labels
            )
        )
        webhook.add_done_callback(lambda _: stop.set())  # it serves until cancelled: or it failed
    try:
        if args.mode == "kubernetes":
            await _serve_kubernetes(args, stop)
        else:
            await _serve_standalone(args, stop)
    finally:
        if args.webhook_port:
            webhook.cancel()
            [ended] = await asyncio.gather(webhook, return_exceptions=True)
            if webhook_store is not None:
                webhook_store.close()
            if isinstance(ended, Exception):
                raise SystemExit(f"infergate controllers: the admission webhook failed: {ended}")


async def _serve_standalone(args: argparse.Namespace, stop: asyncio.Event) -> None:
    if args.manifests is None:
        raise SystemExit("infergate controllers: standalone mode needs --manifests DIR")
    pool_file = args.pool_file or args.state_dir / "pool.yaml"
    app = Standalone(
        args.manifests,
        args.state_dir,
        pool_file,
        args.autoscale_interval,
        eds_file=args.envoy_eds_file,
        eds_pool=args.envoy_eds_pool,
        eds_dir=args.envoy_eds_dir,
        kv_sockets=kv_sockets(args),
        picker_metrics=by_pool(args.picker_metrics),
        weights_cache_dir=args.weights_cache_dir,
        pvc_root=args.pvc_root,
        weights_cache_max_bytes=args.weights_cache_max_bytes,
        pod_addresses=args.pod_addresses,
    )
    start_http_server(args.metrics_port, addr=args.host, registry=app.metrics.registry)
    await app.start()
    log.info(
        "controllers: standalone, manifests %s, pods' logs in %s, pools in %s",
        args.manifests,
        args.state_dir,
        pool_file,
    )
    try:
        await stop.wait()
    finally:
        await app.stop()


async def _serve_kubernetes(args: argparse.Namespace, stop: asyncio.Event) -> None:
    """Against the API server; with --leader-elect, only the Lease holder reconciles.

    Metrics are served from the start, so a replica waiting for the Lease answers its
    probes too; a stop (SIGTERM) while waiting for the Lease or for the first lists ends
    the wait."""
    import os
    import socket

    from infergw.cluster.kube_store import KubeStore
    from infergw.cluster.store import StoreError
    from infergw.controllers.download_logs import PodLogs
    from infergw.controllers.leader import LeaderElector

    store = KubeStore.from_environment()
    weights = WeightsLayout.cluster(cache_volume_of(args.weights_cache), args.picker_image)
    metrics = ControllerMetrics()
    start_http_server(args.metrics_port, addr=args.host, registry=metrics.registry)
    controllers, scaler = build_controllers(
        store,
        metrics,
        autoscale_interval=args.autoscale_interval,
        namespace=args.namespace,
        kv_sockets=kv_sockets(args),
        picker=PickerSettings(
            image=args.picker_image,
            kv_index_redis=args.picker_kv_index_redis,
            kv_index_keys=args.picker_kv_index_keys,
            trace_env=tracing.passed_on(),
            weights=weights,
        ),
        weights=weights,
        logs=PodLogs(store),
    )
    elector = None
    try:
        if args.leader_elect:
            identity = f"{socket.gethostname()}-{os.getpid()}"
            elector = LeaderElector(
                store,
                name="infergate-controllers",
                namespace=args.leader_namespace,
                identity=identity,
            )
            log.info("controllers: waiting for the lease as %s", identity)
            if not await _unless_stopped(elector.acquire(), stop):
                return
            asyncio.get_running_loop().create_task(_stop_when(elector.lost, stop))
        for c in controllers:
            if not await _unless_stopped(c.start(), stop):
                return
        log.info(
            "controllers: watching the Kubernetes API (%s)", args.namespace or "all namespaces"
        )
        await stop.wait()
    finally:
        for c in controllers:
            await c.stop()
        await scaler.close()
        if elector is not None:
            try:
                await elector.release()
            except StoreError as exc:  # it expires by itself then
                log.warning("controllers: could not hand the lease back: %s", exc)
        store.close()


async def _unless_stopped(work, stop: asyncio.Event) -> bool:
    """Await `work` unless `stop` is set first (then cancel it): whether it finished."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()  # its exception, if it failed
    return True


async def _stop_when(lost: asyncio.Event, stop: asyncio.Event) -> None:
    """A leader that lost its Lease stops; its replacement starts from a fresh list."""
    await lost.wait()
    stop.set()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(logs.settings_from_args(args))
    if not tracing.started("controllers"):
        return 2
    try:
        asyncio.run(serve(args))
    finally:
        tracing.stop()
    return 0
