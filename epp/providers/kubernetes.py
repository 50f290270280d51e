"""The Kubernetes provider: the InferencePool and its Pods from the API server, kept by watches,
and the namespace's ModelRoutes, ModelServers and InferenceObjectives when their CRDs are
installed.

The official client blocks, so each resource (the pool, the pods, …) has a daemon thread running
list-then-watch; changes go to the event loop with call_soon_threadsafe, where the datastore
lives. Watches are short (WATCH_TIMEOUT) so stop() is prompt and a dead connection is noticed;
a watch that ends resumes from the last resourceVersion, a 410 Gone or any error re-lists.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, config, watch

from epp.datastore import Datastore, PoolSpec, pod_problem
from epp.metrics import PickerMetrics

log = logging.getLogger("epp.providers.kubernetes")

GROUP, VERSION, PLURAL = "inference.networking.k8s.io", "v1", "inferencepools"
# Read when their CRDs are installed: (group, version, plural).
OPTIONAL_KINDS = {
    "routes": ("networking.infergate.io", "v1alpha1", "modelroutes"),
    "servers": ("networking.infergate.io", "v1alpha1", "modelservers"),
    "objectives": ("inference.networking.x-k8s.io", "v1alpha2", "inferenceobjectives"),
}
WATCH_TIMEOUT = 5  # seconds; bounds how long stop() and a silently dead connection take
LIST_TIMEOUT = 30
MAX_BACKOFF = 5.0


class KubernetesProviderError(RuntimeError):
    pass


def _name(obj: Any) -> str:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) and name else "<unnamed>"


def _selector(pool: PoolSpec | None) -> str | None:
    return ",".join(f"{k}={v}" for k, v in sorted(pool.selector.items())) if pool else None


class KubernetesProvider:
    def __init__(
        self,
        datastore: Datastore,
        pool_name: str,
        namespace: str,
        *,
        metrics: PickerMetrics | None = None,
        api_client: client.ApiClient | None = None,
        resync_timeout: float = 300,
        routing: bool = True,
    ) -> None:
        self.datastore = datastore
        self.metrics = metrics
        self.pool_name = pool_name
        self.namespace = namespace
        self.api_client = api_client
        self.resync_timeout = resync_timeout  # a full re-list this often, even without errors
        # False: the pool and its pods only (the decode sidecar needs no routes or objectives).
        self.optional_kinds = tuple(OPTIONAL_KINDS) if routing else ()
        self.watch_timeout = WATCH_TIMEOUT
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watches: dict[str, watch.Watch] = {}
        self._selector: str | None = None  # what the pod watch filters by
        self._relist_pods = threading.Event()  # set when the pool's selector changed
        self._owns_client = False
        self._routing: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in OPTIONAL_KINDS}

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self.api_client is None:
            cfg = client.Configuration()
            try:
                if os.environ.get("KUBERNETES_SERVICE_HOST"):
                    config.load_incluster_config(client_configuration=cfg)
                else:  # the client reads $KUBECONFIG at import; read it now
                    path = os.environ.get("KUBECONFIG")
                    config.load_kube_config(config_file=path, client_configuration=cfg)
            except config.ConfigException as exc:
                raise KubernetesProviderError(f"no Kubernetes client config: {exc}") from exc
            self.api_client, self._owns_client = client.ApiClient(cfg), True
        self._core = client.CoreV1Api(self.api_client)
        self._custom = client.CustomObjectsApi(self.api_client)
        self._loop = asyncio.get_running_loop()
        self._stopping.clear()
        where = f"InferencePool {self.namespace}/{self.pool_name}"
        try:
            pools, pool_rv = await asyncio.to_thread(self._list, "pool")
            if not pools:
                raise KubernetesProviderError(f"{where} not found ({GROUP}/{VERSION} {PLURAL})")
            pool = PoolSpec.from_object(pools[0])
            self._selector = _selector(pool)
            pods, pods_rv = await asyncio.to_thread(self._list, "pods")
        except KubernetesProviderError:
            raise
        except Exception as exc:
            raise KubernetesProviderError(f"{where}: {exc}") from exc
        watches = [("pool", pool_rv), ("pods", pods_rv)]
        for kind in self.optional_kinds:
            rv = await asyncio.to_thread(self._list_routing, kind)
            if rv is not None:
                watches.append((kind, rv))
        self.datastore.set_pool(pool)
        self._publish_routing()
        self.datastore.replace_pods(pods)
        self.datastore.synced = True
        log.info(
            "synced %s: %d pods, %d endpoints, %d ModelRoutes",
            where, len(pods), len(self.datastore.endpoints()), len(self._routing["routes"]),
        )  # fmt: skip
        for kind, rv in watches:
            t = threading.Thread(target=self._run, args=(kind, rv), name=f"k8s-{kind}", daemon=True)
            t.start()
            self._threads.append(t)

    def refresh(self) -> None:
        """Nothing to do: the watch already delivers every change as it happens."""

    async def stop(self) -> None:
        self._stopping.set()
        deadline = time.monotonic() + self.watch_timeout + 2
        # Repeat watch.stop(): a watch that was just opening would miss a single call.
        while any(t.is_alive() for t in self._threads) and time.monotonic() < deadline:
            for w in list(self._watches.values()):
                w.stop()
            await asyncio.sleep(0.05)
        if any(t.is_alive() for t in self._threads):
            log.warning("Kubernetes watch threads did not stop in time")
        self._threads.clear()
        if self._owns_client and self.api_client is not None:
            self.api_client.close()
            self.api_client, self._owns_client = None, False

    # ---- lists (threads) ---------------------------------------------------------------

    def _call(self, kind: str) -> tuple[Callable, tuple, dict[str, Any]]:
        """The list function for a resource; watches use it too, with watch=True."""
        if kind == "pods":
            pods = self._core.list_namespaced_pod
            return pods, (self.namespace,), {"label_selector": self._selector}
        if kind in OPTIONAL_KINDS:
            group, version, plural = OPTIONAL_KINDS[kind]
            where = (group, version, self.namespace, plural)
            return self._custom.list_namespaced_custom_object, where, {}
        pools, only = self._custom.list_namespaced_custom_object, f"metadata.name={self.pool_name}"
        return pools, (GROUP, VERSION, self.namespace, PLURAL), {"field_selector": only}

    def _list(self, kind: str) -> tuple[list[dict[str, Any]], str]:
        """Usable objects and the list's resourceVersion; malformed ones are logged and skipped."""
        func, args, kwargs = self._call(kind)
        # Raw JSON: the datastore wants API dicts, and the client's models could reject odd pods.
        resp = func(*args, **kwargs, _preload_content=False, _request_timeout=LIST_TIMEOUT)
        body = json.loads(resp.data)
        items = []
        for obj in body.get("items") or []:
            if kind == "pool" and _name(obj) != self.pool_name:
                continue
            problem = pod_problem(obj) if kind == "pods" else None
            if problem:
                log.warning("skipping pod %s: %s", _name(obj), problem)
                self._skipped("Pod")
            else:
                items.append(obj)
        return items, body["metadata"]["resourceVersion"]

    def _list_routing(self, kind: str) -> str | None:
        """The first list of routes or servers; None when their CRD is not installed."""
        try:
            items, rv = self._list(kind)
        except client.ApiException as exc:
            if exc.status == 404:
                log.info("no %s CRD in the cluster: running without them", kind)
                return None
            if exc.status == 403:  # an older Role: serve the pool, without this feature
                log.warning(
                    "not allowed to list %s (403): running without them; grant get, list, "
                    "watch on %s to the picker",
                    kind, OPTIONAL_KINDS[kind][2],
                )  # fmt: skip
                return None
            raise KubernetesProviderError(f"listing {OPTIONAL_KINDS[kind][2]}: {exc}") from exc
        self._routing[kind] = {_name(o): o for o in items}
        return rv

    def _publish_routing(self) -> None:
        self.datastore.set_routes(
            list(self._routing["routes"].values()), list(self._routing["servers"].values())
        )
        self.datastore.set_objectives(list(self._routing["objectives"].values()))

    def _relist(self, kind: str) -> str:
        if kind in OPTIONAL_KINDS:
            items, rv = self._list(kind)
            self._post(self._replace_routing, kind, {_name(o): o for o in items})
            return rv
        if kind == "pods":
            self._relist_pods.clear()  # before listing, so a selector change meanwhile counts
        items, rv = self._list(kind)
        if kind == "pods":
            self._post(self.datastore.replace_pods, items)
            log.info("re-listed pods: %d", len(items))
        elif items:
            self._on_pool("MODIFIED", items[0])
        else:
            log.warning("InferencePool %s/%s is gone", self.namespace, self.pool_name)
            self._post(self.datastore.set_pool, None)
        return rv

    # ---- watches (threads) -------------------------------------------------------------

    def _run(self, kind: str, rv: str | None) -> None:
        backoff, next_resync = 0.1, time.monotonic() + self.resync_timeout
        while not self._stopping.is_set():
            selector_changed = kind == "pods" and self._relist_pods.is_set()
            try:
                if rv is None or selector_changed or time.monotonic() > next_resync:
                    rv = self._relist(kind)
                    next_resync = time.monotonic() + self.resync_timeout
                rv = self._watch(kind, rv)
                backoff = 0.1
            except Exception as exc:
                if self._stopping.is_set():
                    break
                if kind == "pods" and self._relist_pods.is_set():
                    rv = None  # we cut the watch short ourselves: the selector changed
                    continue
                if isinstance(exc, client.ApiException) and exc.status == 410:
                    log.info("%s watch expired (410 Gone); re-listing in %.1fs", kind, backoff)
                else:
                    log.warning("%s watch failed: %r; re-listing in %.1fs", kind, exc, backoff)
                rv = None
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    def _watch(self, kind: str, rv: str) -> str:
        """One watch from rv until it times out; returns the last resourceVersion seen."""
        w = watch.Watch(return_type=object)  # object: events carry plain dicts
        self._watches[kind] = w
        func, args, kwargs = self._call(kind)
        for event in w.stream(
            func,
            *args,
            **kwargs,
            resource_version=rv,
            timeout_seconds=self.watch_timeout,
            allow_watch_bookmarks=True,
            _request_timeout=self.watch_timeout + 5,
        ):
            if self._stopping.is_set() or (kind == "pods" and self._relist_pods.is_set()):
                w.stop()
                break
            obj = event.get("raw_object")
            meta = obj.get("metadata") if isinstance(obj, dict) else None
            if isinstance(meta, dict) and isinstance(meta.get("resourceVersion"), str):
                rv = meta["resourceVersion"]
            if event.get("type") == "BOOKMARK":
                continue
            if kind in OPTIONAL_KINDS:
                self._post(self._on_routing, kind, event.get("type"), obj)
            else:
                (self._on_pod if kind == "pods" else self._on_pool)(event.get("type"), obj)
        return rv

    def _on_pod(self, kind: str | None, pod: Any) -> None:
        problem = pod_problem(pod)
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            problem = f"unexpected event type {kind!r}"
        elif kind == "DELETED" and _name(pod) != "<unnamed>":
            problem = None  # a deleted pod only needs its name
        if problem:
            log.warning("skipping %s event for pod %s: %s", kind, _name(pod), problem)
            self._skipped("Pod")
        elif kind == "DELETED":
            self._post(self.datastore.delete_pod, _name(pod))
        else:
            self._post(self.datastore.upsert_pod, pod)

    def _on_pool(self, kind: str | None, obj: Any) -> None:
        if _name(obj) != self.pool_name:
            return
        if kind == "DELETED":
            log.warning("InferencePool %s/%s was deleted", self.namespace, self.pool_name)
            self._post(self.datastore.set_pool, None)
            return
        try:
            pool = PoolSpec.from_object(obj)
        except Exception as exc:
            log.error("keeping the previous pool: InferencePool %s is invalid: %s", _name(obj), exc)
            self._skipped("InferencePool")
            return
        self._post(self.datastore.set_pool, pool)
        if _selector(pool) != self._selector:
            log.info("pool selector is now %s; re-listing pods", _selector(pool))
            self._selector = _selector(pool)
            self._relist_pods.set()
            if w := self._watches.get("pods"):
                w.stop()

    # ---- routing objects (event loop) ------------------------------------------------------

    def _replace_routing(self, kind: str, objects: dict[str, dict[str, Any]]) -> None:
        self._routing[kind] = objects
        self._publish_routing()

    def _on_routing(self, kind: str, event: str | None, obj: Any) -> None:
        if not isinstance(obj, dict) or _name(obj) == "<unnamed>":
            log.warning("skipping %s event for a malformed %s object", event, kind)
            self._skipped(OPTIONAL_KINDS[kind][2])
            return
        if event == "DELETED":
            self._routing[kind].pop(_name(obj), None)
        else:
            self._routing[kind][_name(obj)] = obj
        self._publish_routing()

    def _skipped(self, kind: str) -> None:
        """Count an object left out (prometheus_client counters are thread-safe)."""
        if self.metrics is not None:
            self.metrics.kubernetes_skipped.labels(kind).inc()

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run fn on the event loop, unless we are stopping (the loop may be gone)."""
        if self._loop is None or self._stopping.is_set():
            return
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed
            pass
