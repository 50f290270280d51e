"""The file provider: InferencePool, Pod, ModelRoute, ModelServer and InferenceObjective
objects from YAML files, reloaded on change. InferenceObjectives may be llm-d.ai/v1alpha2 or
the older inference.networking.x-k8s.io/v1alpha2 (llm-d.ai's wins on a name in both).

The files hold the same objects a cluster would (multi-document YAML, one or more files or a
directory); Pods need status.podIP and a Ready condition, as kubelet would set. The local stack
uses this to describe its simulator pods.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from infergw.api.upstream import OBJECTIVE_GROUP_VERSIONS, current_group_last
from infergw.cluster.files import ObjectFileError, UnreadableFileError, WatchedFiles
from infergw.cluster.pool import PoolError, PoolSpec, find_pool
from infergw.epp.datastore import Datastore
from infergw.epp.metrics import PickerMetrics

log = logging.getLogger("epp.providers.file")

# Reasons of infergate_epp_pool_file_errors_total.
INVALID = "invalid"  # YAML or objects the picker cannot use
UNREADABLE = "unreadable"  # the file vanished or cannot be read
INTERNAL = "internal"  # a bug of ours: logged with its traceback

ROUTING_API = "networking.infergate.io/v1alpha1"

# What start() and load() raise for files the picker cannot use (the picker's name for it).
FileProviderError = ObjectFileError


def apply(
    datastore: Datastore, objects: list[dict[str, Any]], pool_name: str, namespace: str
) -> None:
    """Put the objects in the datastore, all or nothing: they are applied to a scratch
    datastore first, so whatever they hold that would fail does so before the real one
    changes."""
    try:
        _apply(Datastore(host_ports=True), objects, pool_name, namespace)
    except FileProviderError:
        raise
    except PoolError as exc:
        raise FileProviderError(str(exc)) from exc
    except Exception as exc:
        raise FileProviderError(f"objects the picker cannot use: {exc!r}") from exc
    _apply(datastore, objects, pool_name, namespace)


def _apply(
    datastore: Datastore, objects: list[dict[str, Any]], pool_name: str, namespace: str
) -> None:
    pool_obj, pods = find_pool(objects, pool_name, namespace)
    if pool_obj is None:
        raise FileProviderError(f"no InferencePool {namespace}/{pool_name} in the files")
    pool = PoolSpec.from_object(pool_obj)
    routing: dict[str, list[dict[str, Any]]] = {"ModelRoute": [], "ModelServer": []}
    objectives: list[dict[str, Any]] = []
    for obj in objects:
        if ((obj.get("metadata") or {}).get("namespace") or "default") != namespace:
            continue
        if obj.get("kind") in routing and obj.get("apiVersion") == ROUTING_API:
            routing[obj["kind"]].append(obj)
        elif obj.get("kind") == "InferenceObjective":
            if obj.get("apiVersion") in OBJECTIVE_GROUP_VERSIONS:
                objectives.append(obj)
            else:
                log.warning(
                    "ignoring InferenceObjective %s: apiVersion %r is neither of %s",
                    (obj.get("metadata") or {}).get("name"),
                    obj.get("apiVersion"),
                    ", ".join(OBJECTIVE_GROUP_VERSIONS),
                )
    datastore.set_pool(pool)
    datastore.set_routes(routing["ModelRoute"], routing["ModelServer"])
    datastore.set_objectives(current_group_last(objectives))
    datastore.replace_pods(pods)
    datastore.synced = True


class FileProvider:
    def __init__(
        self,
        datastore: Datastore,
        paths: list[Path],
        pool_name: str,
        namespace: str = "default",
        poll_interval: float = 1.0,
        metrics: PickerMetrics | None = None,
    ) -> None:
        self.datastore = datastore
        self.metrics = metrics
        self.paths = paths
        self.pool_name = pool_name
        self.namespace = namespace
        # A bad file (half written, wrong types) keeps the previous pool, is logged and
        # counted, and the watch goes on: a later good edit applies.
        self.files = WatchedFiles(paths, self._use, self._failed, poll_interval=poll_interval)

    def _use(self, objects: list[dict[str, Any]]) -> None:
        apply(self.datastore, objects, self.pool_name, self.namespace)
        log.info(
            "loaded pool %s/%s: %d endpoints",
            self.namespace,
            self.pool_name,
            len(self.datastore.endpoints()),
        )

    def load(self) -> None:
        """Read the files now; raise FileProviderError when they are wrong."""
        self.files.load()

    async def start(self) -> None:
        await self.files.start()

    async def stop(self) -> None:
        await self.files.stop()

    def refresh(self) -> None:
        """Reload now if a file changed since the last load (a bad file keeps the pool)."""
        self.files.refresh()

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, UnreadableFileError | OSError):
            reason = UNREADABLE
        elif isinstance(exc, FileProviderError):
            reason = INVALID
        else:
            reason = INTERNAL
        log.error(
            "reloading %s failed (%s), keeping the previous pool: %s",
            [str(p) for p in self.paths],
            reason,
            exc,
            exc_info=exc if reason == INTERNAL else None,
        )
        if self.metrics is not None:
            self.metrics.pool_file_errors.labels(reason).inc()
