"""The file provider: InferencePool, Pod, ModelRoute, ModelServer and InferenceObjective
objects from YAML files, reloaded on change.

The files hold the same objects a cluster would (multi-document YAML, one or more files or a
directory); Pods need status.podIP and a Ready condition, as kubelet would set. The local stack
uses this to describe its simulator pods.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import msgspec
import yaml

from api import yaml_files
from api.meta import ObjectMeta
from epp.datastore import Datastore, PoolSpec, pod_problem
from epp.metrics import PickerMetrics

log = logging.getLogger("epp.providers.file")

# Reasons of infergate_epp_pool_file_errors_total.
INVALID = "invalid"  # YAML or objects the picker cannot use
UNREADABLE = "unreadable"  # the file vanished or cannot be read
INTERNAL = "internal"  # a bug of ours: logged with its traceback

ROUTING_API = "networking.infergate.io/v1alpha1"
POOL_API_GROUPS = ("inference.networking.k8s.io/v1", "inference.networking.x-k8s.io/v1alpha2")


class FileProviderError(ValueError):
    pass


class UnreadableFileError(FileProviderError):
    """A file that vanished, cannot be read, or is no regular file of bounded size."""


def _files(paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml")))
        else:
            out.append(p)
    return out


def load_objects(paths: list[Path]) -> list[dict[str, Any]]:
    objects = []
    for f in _files(paths):
        try:
            docs = yaml_files.safe_load_all(yaml_files.read_text(f))
        except OSError as exc:
            raise UnreadableFileError(f"{f}: {exc}") from exc
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise FileProviderError(f"{f}: {exc}") from exc
        for i, doc in enumerate(docs):
            if doc is None:
                continue
            items = (
                doc.get("items") if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]
            )
            if not isinstance(items, list):
                raise FileProviderError(f"{f}: document {i}: a List's items must be a list")
            for obj in items:
                _check_object(obj, f"{f}: document {i}")
            objects.extend(items)
    return objects


def _check_object(obj: Any, where: str) -> None:
    """The shape every object needs before apply() reads it: a map with a kind and typed
    metadata; a Pod, the fields the datastore reads."""
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
        raise FileProviderError(f"{where} is not a Kubernetes object")
    try:
        msgspec.convert(obj.get("metadata") or {}, ObjectMeta)
    except msgspec.ValidationError as exc:
        raise FileProviderError(f"{where} ({obj['kind']}): metadata: {exc}") from None
    if obj["kind"] == "Pod" and (problem := pod_problem(obj)) is not None:
        raise FileProviderError(f"{where} (Pod): {problem}")


def apply(
    datastore: Datastore, objects: list[dict[str, Any]], pool_name: str, namespace: str
) -> None:
    """Put the objects in the datastore, all or nothing: they are applied to a scratch
    datastore first, so whatever they hold that would fail does so before the real one
    changes."""
    try:
        _apply(Datastore(), objects, pool_name, namespace)
    except FileProviderError:
        raise
    except Exception as exc:
        raise FileProviderError(f"objects the picker cannot use: {exc!r}") from exc
    _apply(datastore, objects, pool_name, namespace)


def _apply(
    datastore: Datastore, objects: list[dict[str, Any]], pool_name: str, namespace: str
) -> None:
    pool = None
    pods = []
    routing: dict[str, list[dict[str, Any]]] = {"ModelRoute": [], "ModelServer": []}
    objectives: list[dict[str, Any]] = []
    for obj in objects:
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace") or "default"
        if ns != namespace:
            continue
        if obj.get("kind") == "InferencePool" and meta.get("name") == pool_name:
            if obj.get("apiVersion") not in POOL_API_GROUPS:
                raise FileProviderError(
                    f"InferencePool {pool_name}: unsupported apiVersion {obj.get('apiVersion')!r}"
                )
            try:
                pool = PoolSpec.from_object(obj)
            except ValueError as exc:
                raise FileProviderError(str(exc)) from exc
        elif obj.get("kind") == "Pod":
            pods.append(obj)
        elif obj.get("kind") in routing and obj.get("apiVersion") == ROUTING_API:
            routing[obj["kind"]].append(obj)
        elif obj.get("kind") == "InferenceObjective":
            objectives.append(obj)
    if pool is None:
        raise FileProviderError(f"no InferencePool {namespace}/{pool_name} in the files")
    datastore.set_pool(pool)
    datastore.set_routes(routing["ModelRoute"], routing["ModelServer"])
    datastore.set_objectives(objectives)
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
        self.poll_interval = poll_interval
        self._stamp: tuple = ()
        self._task: asyncio.Task | None = None

    def _current_stamp(self) -> tuple:
        """What says a file changed. The inode too: two writes within one tick of the
        filesystem clock can leave mtime and size alike, but a file replaced by rename (as the
        controllers write it) always has another inode than the one it replaced."""
        stamps = []
        for f in _files(self.paths):
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            stamps.append((str(f), st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def load(self) -> None:
        """Read the files now; raise FileProviderError when they are wrong."""
        self._stamp = self._current_stamp()
        apply(self.datastore, load_objects(self.paths), self.pool_name, self.namespace)
        log.info(
            "loaded pool %s/%s: %d endpoints",
            self.namespace,
            self.pool_name,
            len(self.datastore.endpoints()),
        )

    async def start(self) -> None:
        self.load()
        self._task = asyncio.create_task(self._watch(), name="file-provider")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        """Reload on change. A bad file (half written, wrong types) keeps the previous pool,
        is logged and counted, and the watch goes on: a later good edit applies."""
        while True:
            await asyncio.sleep(self.poll_interval)
            self.refresh()

    def refresh(self) -> None:
        """Reload now if a file changed since the last load (a bad file keeps the pool)."""
        try:
            if self._current_stamp() != self._stamp:
                self.load()
        except UnreadableFileError as exc:
            self._failed(UNREADABLE, exc)
        except FileProviderError as exc:
            self._failed(INVALID, exc)
        except OSError as exc:
            self._failed(UNREADABLE, exc)
        except Exception as exc:
            self._failed(INTERNAL, exc)

    def _failed(self, reason: str, exc: Exception) -> None:
        log.error(
            "reloading %s failed (%s), keeping the previous pool: %s",
            [str(p) for p in self.paths],
            reason,
            exc,
            exc_info=exc if reason == INTERNAL else None,
        )
        if self.metrics is not None:
            self.metrics.pool_file_errors.labels(reason).inc()
