"""List, then watch from the list's resourceVersion; keep a cache; call handlers on changes.

A watch that ends is resumed from the last resourceVersion seen; one that answers Gone
(410: the history was compacted) makes the informer list again, and the differences
between the old cache and the new list reach the handlers as if watched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from cluster.store import Gone, Kind, Obj, Store, StoreError

log = logging.getLogger("cluster.informer")

Handler = Callable[[str, Obj], None]  # (ADDED|MODIFIED|DELETED, object)


class Informer:
    def __init__(self, store: Store, kind: Kind, namespace: str | None = None) -> None:
        self.store = store
        self.kind = kind
        self.namespace = namespace
        self.cache: dict[tuple[str, str], Obj] = {}
        self.handlers: list[Handler] = []
        self.synced = asyncio.Event()
        self.relists = 0
        self._task: asyncio.Task | None = None

    def add_handler(self, handler: Handler) -> None:
        self.handlers.append(handler)

    def get(self, namespace: str, name: str) -> Obj | None:
        return self.cache.get((namespace, name))

    def items(self, namespace: str | None = None) -> list[Obj]:
        return [o for (ns, _), o in self.cache.items() if namespace is None or ns == namespace]

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"informer {self.kind.kind}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                rv = await self._relist()
                self.synced.set()
                backoff = 0.1
                while True:
                    async for event, obj in self.store.watch(self.kind, self.namespace, rv):
                        rv = obj["metadata"].get("resourceVersion", rv)
                        if event == "BOOKMARK":
                            continue
                        self._apply(event, obj)
                    # the watch ended (timeout): resume from where it was
            except Gone:
                self.relists += 1
                log.info("%s watch expired: listing again", self.kind.kind)
            except (StoreError, OSError) as exc:
                log.warning(
                    "%s list/watch failed: %s; retrying in %.1fs", self.kind.kind, exc, backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _relist(self) -> str:
        items, rv = await self.store.list(self.kind, self.namespace)
        fresh = {_key(o): o for o in items}
        for key, old in list(self.cache.items()):
            if key not in fresh:
                del self.cache[key]
                self._notify("DELETED", old)
        for key, obj in fresh.items():
            old = self.cache.get(key)
            if old is None or old["metadata"].get("resourceVersion") != obj["metadata"].get(
                "resourceVersion"
            ):
                self.cache[key] = obj
                self._notify("ADDED" if old is None else "MODIFIED", obj)
        return rv

    def _apply(self, event: str, obj: Obj) -> None:
        key = _key(obj)
        if event == "DELETED":
            self.cache.pop(key, None)
        else:
            self.cache[key] = obj
        self._notify(event, obj)

    def _notify(self, event: str, obj: Obj) -> None:
        for handler in self.handlers:
            try:
                handler(event, obj)
            except Exception:  # a handler bug must not stop the informer
                log.exception("%s handler failed on %s", self.kind.kind, _key(obj))


def _key(obj: Obj) -> tuple[str, str]:
    m = obj["metadata"]
    return m.get("namespace", ""), m["name"]
