"""Standalone mode's bridge to the picker: write the InferencePools and Pods the controllers
keep in memory to a YAML file that the picker's file provider reloads on change — the same
objects a picker in a cluster would watch through the API server.

The file is replaced atomically (write, then rename), so the picker never reads half of it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import yaml

from controllers.store import INFERENCE_POOL, POD, Obj, Store


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
    docs = [_slim(o) for o in pools + pods]
    return yaml.safe_dump_all(docs, sort_keys=True) if docs else ""


class PoolExporter:
    def __init__(self, store: Store, path: Path, *, interval: float = 0.2) -> None:
        self.store = store
        self.path = path
        self.interval = interval
        self._last: str | None = None
        self._task: asyncio.Task | None = None

    async def write_once(self) -> bool:
        text = await snapshot(self.store)
        if text == self._last:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)
        self._last = text
        return True

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
