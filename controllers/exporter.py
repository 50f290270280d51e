"""Standalone mode's bridge to the picker: write the InferencePools, Pods, ModelRoutes,
ModelServers and InferenceObjectives the controllers keep in memory to a YAML file that the
picker's file provider reloads on change — the same objects a picker in a cluster would watch
through the API server.

The file is replaced atomically (write, then rename), so the picker never reads half of it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import yaml

from infergw.cluster.store import (
    INFERENCE_OBJECTIVE,
    INFERENCE_POOL,
    MODEL_ROUTE,
    MODEL_SERVER,
    POD,
    Obj,
    Store,
)
from infergw.controllers import envoy_eds


def _slim(obj: Obj) -> Obj:
    """What the picker reads: identity, labels, annotations, the spec, and pod status."""
    m = obj["metadata"]
    out = {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "metadata": {
            "name": m["name"],
            "namespace": m.get("namespace", "default"),
            "labels": m.get("labels") or {},
        },
        "spec": obj.get("spec") or {},
    }
    if m.get("annotations"):
        out["metadata"]["annotations"] = m["annotations"]
    if m.get("creationTimestamp"):  # the oldest of two routes for one model wins
        out["metadata"]["creationTimestamp"] = m["creationTimestamp"]
    if obj["kind"] == "Pod":
        out["spec"] = {}
        out["status"] = obj.get("status") or {}
        if m.get("deletionTimestamp"):
            out["metadata"]["deletionTimestamp"] = m["deletionTimestamp"]
    return out


async def snapshot(store: Store, pool: str | None = None) -> str:
    pools, _ = await store.list(INFERENCE_POOL)
    if pool is not None:
        pools = [p for p in pools if p["metadata"]["name"] == pool]
    pods, _ = await store.list(POD)
    routes, _ = await store.list(MODEL_ROUTE)
    servers, _ = await store.list(MODEL_SERVER)
    objectives, _ = await store.list(INFERENCE_OBJECTIVE)
    docs = [_slim(o) for o in pools + pods + routes + servers + objectives]
    return yaml.safe_dump_all(docs, sort_keys=True) if docs else ""


def _replace(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class PoolExporter:
    """Writes the pool file and, given eds_file, one pool's endpoints for the local Envoy
    (eds_pool names it; by default the only pool there is); given eds_dir, every pool's, each
    in `<pool>.json` for a cluster named after the pool (several Models behind one Envoy)."""

    def __init__(
        self,
        store: Store,
        path: Path,
        *,
        interval: float = 0.2,
        eds_file: Path | None = None,
        eds_pool: str | None = None,
        eds_cluster: str = "pool",
        eds_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.path = path
        self.interval = interval
        self.eds_file = eds_file
        self.eds_pool = eds_pool
        self.eds_cluster = eds_cluster
        self._last: str | None = None
        self._last_eds: str | None = None
        self.eds_dir = eds_dir
        self._last_eds_files: dict[str, str] = {}
        self._task: asyncio.Task | None = None

    async def write_once(self) -> bool:
        if self.eds_file is not None:
            await self._write_eds()
        if self.eds_dir is not None:
            await self._write_eds_dir()
        text = await snapshot(self.store)
        if text == self._last:
            return False
        _replace(self.path, text)
        self._last = text
        return True

    async def _write_eds(self) -> None:
        pools, _ = await self.store.list(INFERENCE_POOL)
        if self.eds_pool is not None:
            pools = [p for p in pools if p["metadata"]["name"] == self.eds_pool]
        endpoints = []
        if len(pools) == 1:
            pods, _ = await self.store.list(POD)
            endpoints = envoy_eds.pool_endpoints(pools[0], pods)
        text = envoy_eds.discovery_response(self.eds_cluster, endpoints)
        if text != self._last_eds:
            _replace(self.eds_file, text)
            self._last_eds = text

    async def _write_eds_dir(self) -> None:
        """One file per pool; a pool that goes away keeps its last file (its cluster in
        Envoy's static config stays too) with no endpoints."""
        pools, _ = await self.store.list(INFERENCE_POOL)
        pods, _ = await self.store.list(POD)
        texts = {name: envoy_eds.discovery_response(name, []) for name in self._last_eds_files}
        for pool in pools:
            name = pool["metadata"]["name"]
            texts[name] = envoy_eds.discovery_response(name, envoy_eds.pool_endpoints(pool, pods))
        for name, text in texts.items():
            if self._last_eds_files.get(name) != text:
                _replace(self.eds_dir / f"{name}.json", text)
                self._last_eds_files[name] = text

    async def start(self) -> None:
        await self.write_once()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.write_once()
