"""The Kubernetes provider: the InferencePool and its Pods from the API server, kept by watches,
and the namespace's ModelRoutes, ModelServers and InferenceObjectives when their CRDs are
installed. InferenceObjectives come from both groups, llm-d.ai and the Inference Extension's
older inference.networking.x-k8s.io, whichever CRDs exist; on a name in both, llm-d.ai's wins.

It stands on cluster/: the pool and its pods through PoolWatch, the routing objects through
informers, all over one KubeStore. Everything they hand over arrives on the event loop, where
the datastore lives. Watches are short (WATCH_TIMEOUT) so a silently dead connection is
noticed; a watch that ends resumes from the last resourceVersion, a 410 Gone or any error
lists again, and so does `resync_timeout` even when nothing failed.
"""

from __future__ import annotations

import logging

from kubernetes import client, config

from infergw.api.upstream import current_group_last
from infergw.cluster.informer import Informer
from infergw.cluster.kube_store import KubeStore, api_client_from_environment
from infergw.cluster.pool import PoolError
from infergw.cluster.pool_watch import PoolWatch
from infergw.cluster.store import (
    INFERENCE_OBJECTIVE,
    LEGACY_INFERENCE_OBJECTIVE,
    MODEL_ROUTE,
    MODEL_SERVER,
    Kind,
    NotFound,
    StoreError,
)
from infergw.epp.datastore import Datastore
from infergw.epp.metrics import PickerMetrics
from infergw.epp.providers import KubernetesProviderError

log = logging.getLogger("epp.providers.kubernetes")

# Read when their CRDs are installed.
OPTIONAL_KINDS = {
    "routes": MODEL_ROUTE,
    "servers": MODEL_SERVER,
    "objectives": INFERENCE_OBJECTIVE,
    "legacy objectives": LEGACY_INFERENCE_OBJECTIVE,
}
WATCH_TIMEOUT = 5  # seconds; bounds how long a silently dead connection goes unnoticed
LIST_TIMEOUT = 30


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
    ) -> None:
        self.datastore = datastore
        self.metrics = metrics
        self.pool_name = pool_name
        self.namespace = namespace
        self.api_client = api_client
        self.resync_timeout = resync_timeout  # a full list this often, even without errors
        self.watch_timeout = WATCH_TIMEOUT
        self.where = f"InferencePool {namespace}/{pool_name}"
        self._owns_client = False
        self._pool: PoolWatch | None = None
        self._routing: dict[str, Informer] = {}  # the optional kinds the cluster has
        self._routing_due = False

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self.api_client is None:
            try:
                self.api_client = api_client_from_environment()
            except config.ConfigException as exc:
                raise KubernetesProviderError(f"no Kubernetes client config: {exc}") from exc
            self._owns_client = True
        store = KubeStore(
            self.api_client, watch_timeout=self.watch_timeout, request_timeout=LIST_TIMEOUT
        )
        self._pool = PoolWatch(
            store,
            self.pool_name,
            self.namespace,
            on_pool=self.datastore.set_pool,
            on_pods=self.datastore.replace_pods,
            resync=self.resync_timeout,
            skipped=self._skipped,
            logger=log,
        )
        try:
            await self._pool.start()
            for name, kind in OPTIONAL_KINDS.items():
                await self._list_routing(store, name, kind)
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, PoolError):
                raise KubernetesProviderError(str(exc)) from exc
            if isinstance(exc, StoreError | OSError):
                raise KubernetesProviderError(f"{self.where}: {exc}") from exc
            raise
        self._publish_routing()
        self.datastore.synced = True
        log.info(
            "synced %s: %d pods, %d endpoints, %d ModelRoutes",
            self.where, len(self._pool.pods.cache), len(self.datastore.endpoints()),
            len(self._items("routes")),
        )  # fmt: skip
        for informer in self._routing.values():
            informer.start()

    def refresh(self) -> None:
        """Nothing to do: the watch already delivers every change as it happens."""

    async def stop(self) -> None:
        if self._pool is not None:
            await self._pool.stop()
        for informer in self._routing.values():
            await informer.stop()
        self._routing.clear()
        if self._owns_client and self.api_client is not None:
            self.api_client.close()
            self.api_client, self._owns_client = None, False

    # ---- routing objects ---------------------------------------------------------------

    async def _list_routing(self, store: KubeStore, name: str, kind: Kind) -> None:
        """The first list of one optional kind; without its CRD (or the right to read it) the
        picker runs without it."""
        informer = Informer(
            store,
            kind,
            self.namespace,
            resync=self.resync_timeout,
            skipped=self._skipped,
            logger=log,
        )
        try:
            await informer.list_first()
        except NotFound:
            log.info("no %s CRD in the cluster: running without them", name)
            return
        except StoreError as exc:
            if exc.code == 403:  # an older Role: serve the pool, without this feature
                log.warning(
                    "not allowed to list %s (403): running without them; grant get, list, "
                    "watch on %s to the picker",
                    name, kind.plural,
                )  # fmt: skip
                return
            raise KubernetesProviderError(f"listing {kind.plural}: {exc}") from exc
        informer.on_change(self._publish_routing)
        self._routing[name] = informer

    def _items(self, name: str) -> list:
        informer = self._routing.get(name)
        return informer.items() if informer is not None else []

    def _publish_routing(self) -> None:
        self.datastore.set_routes(self._items("routes"), self._items("servers"))
        objectives = self._items("legacy objectives") + self._items("objectives")
        self.datastore.set_objectives(current_group_last(objectives))

    def _skipped(self, kind: Kind) -> None:
        """Count an object left out."""
        if self.metrics is not None:
            self.metrics.kubernetes_skipped.labels(kind.kind).inc()
