"""Where the router's table comes from: the same objects the pickers read, from YAML files
(the local stack's pool file, reloaded on change) or from the API server (informers over one
namespace). Either way every change rebuilds the whole table (bbr/model_pools.py) and swaps it
in at once: a request sees one table, never half of an update.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from kubernetes import client, config

from infergw.api.parents import GatewayName
from infergw.bbr.metrics import RouterMetrics
from infergw.bbr.model_pools import ModelPools, Obj
from infergw.cluster.files import UnreadableFileError, WatchedFiles
from infergw.cluster.informer import Informer
from infergw.cluster.kube_store import KubeStore, api_client_from_environment
from infergw.cluster.store import (
    INFERENCE_POOL,
    MODEL,
    MODEL_ROUTE,
    MODEL_SERVER,
    Kind,
    NotFound,
    StoreError,
)

log = logging.getLogger("bbr.sources")

WATCH_TIMEOUT = 5  # seconds; bounds how long a silently dead watch goes unnoticed
LIST_TIMEOUT = 30
# Without the InferencePool CRD nothing can be routed; the others are read when installed.
OPTIONAL_KINDS = (MODEL_ROUTE, MODEL_SERVER, MODEL)


class SourceError(RuntimeError):
    """Objects the router cannot start from."""


class Source(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Table:
    """The current table, swapped whole; `synced` once the first objects arrived."""

    def __init__(
        self, namespace: str, metrics: RouterMetrics, gateway: GatewayName | None = None
    ) -> None:
        self.namespace = namespace
        self.gateway = gateway  # only what is served on it (None: everything)
        self.metrics = metrics
        self.current = ModelPools()
        self.synced = False

    def replace(self, objects: list[Obj]) -> None:
        self.current = ModelPools.build(objects, self.namespace, self.gateway)
        self.synced = True
        self.metrics.pools.set(len(self.current))
        log.info(
            "model table: %d InferencePools, %d ModelRoutes, %d Model names in %s",
            len(self.current), len(self.current.routes), len(self.current.models),
            self.namespace,
        )  # fmt: skip


class FileSource:
    """The objects of YAML files or directories; a bad file keeps the previous table."""

    def __init__(self, table: Table, paths: list[Path], poll_interval: float = 1.0) -> None:
        self.table = table
        self.paths = paths
        self.files = WatchedFiles(paths, table.replace, self._failed, poll_interval=poll_interval)

    async def start(self) -> None:
        try:
            await self.files.start()
        except (OSError, ValueError) as exc:  # ObjectFileError is a ValueError
            raise SourceError(str(exc)) from exc

    async def stop(self) -> None:
        await self.files.stop()

    def _failed(self, exc: Exception) -> None:
        reason = "unreadable" if isinstance(exc, UnreadableFileError | OSError) else "invalid"
        log.error(
            "reloading %s failed (%s), keeping the previous table: %s",
            [str(p) for p in self.paths], reason, exc,
        )  # fmt: skip
        self.table.metrics.source_errors.labels(reason).inc()


class KubernetesSource:
    """Informers over one namespace: InferencePools (required), ModelRoutes, ModelServers and
    Models (each when its CRD is installed and the Role lets the router read it)."""

    def __init__(
        self,
        table: Table,
        *,
        api_client: client.ApiClient | None = None,
        resync: float = 300,
    ) -> None:
        self.table = table
        self.api_client = api_client
        self.resync = resync
        self._owns_client = False
        self._informers: list[Informer] = []

    async def start(self) -> None:
        if self.api_client is None:
            try:
                self.api_client = api_client_from_environment()
            except config.ConfigException as exc:
                raise SourceError(f"no Kubernetes client config: {exc}") from exc
            self._owns_client = True
        store = KubeStore(
            self.api_client, watch_timeout=WATCH_TIMEOUT, request_timeout=LIST_TIMEOUT
        )
        try:
            await self._list(store, INFERENCE_POOL, optional=False)
            for kind in OPTIONAL_KINDS:
                await self._list(store, kind, optional=True)
        except BaseException:
            await self.stop()
            raise
        self._publish()
        for informer in self._informers:
            informer.on_change(self._publish)
            informer.start()

    async def stop(self) -> None:
        for informer in self._informers:
            await informer.stop()
        self._informers.clear()
        if self._owns_client and self.api_client is not None:
            self.api_client.close()
            self.api_client, self._owns_client = None, False

    async def _list(self, store: KubeStore, kind: Kind, *, optional: bool) -> None:
        informer = Informer(
            store,
            kind,
            self.table.namespace,
            resync=self.resync,
            skipped=self._skipped,
            logger=log,
        )
        try:
            await informer.list_first()
        except (NotFound, StoreError) as exc:
            missing = isinstance(exc, NotFound)
            if not optional or not (missing or exc.code == 403):
                raise SourceError(f"listing {kind.plural}: {exc}") from exc
            log.warning(
                "%s %s: running without them",
                kind.plural,
                "have no CRD in the cluster" if missing else "may not be listed (403)",
            )
            return
        except OSError as exc:
            raise SourceError(f"listing {kind.plural}: {exc}") from exc
        self._informers.append(informer)

    def _publish(self) -> None:
        self.table.replace([obj for informer in self._informers for obj in informer.items()])

    def _skipped(self, kind: Kind) -> None:
        self.table.metrics.skipped.labels(kind.kind).inc()
