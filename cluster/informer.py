"""List, then watch from the list's resourceVersion; keep a cache; call handlers on changes.
The one list-and-watch of the house: the controllers' reconcilers, the picker's Kubernetes
provider and the decode sidecar's allowlist all stand on it.

A watch that ends is resumed from the last resourceVersion seen; one that answers Gone
(410: the history was compacted), fails, or outlives `resync` makes the informer list again,
and the differences between the old cache and the new list reach the handlers as if watched.
Objects that cannot be used (no name, or what `check` refuses) are logged, counted through
`skipped`, and kept out of the cache: the previous version, if any, stays.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from infergw.cluster.store import Gone, Kind, Obj, Store, StoreError

Handler = Callable[[str, Obj], None]  # (ADDED|MODIFIED|DELETED, object)
Check = Callable[[Any], str | None]  # why an object cannot be used, or None
EVENTS = ("ADDED", "MODIFIED", "DELETED")
MAX_BACKOFF = 10.0


class Informer:
    def __init__(
        self,
        store: Store,
        kind: Kind,
        namespace: str | None = None,
        *,
        labels: dict[str, str] | None = None,
        resync: float | None = None,
        check: Check | None = None,
        skipped: Callable[[Kind], None] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.store = store
        self.kind = kind
        self.namespace = namespace
        self.labels = labels  # only objects with these labels (the API server filters)
        self.resync = resync  # seconds between full lists even when nothing failed
        self.check = check
        self.skipped = skipped
        self.log = logger or logging.getLogger("cluster.informer")
        self.cache: dict[tuple[str, str], Obj] = {}
        self.handlers: list[Handler] = []
        self.listeners: list[Callable[[], None]] = []
        self._change_due = False
        self.synced = asyncio.Event()
        self.relists = 0  # lists after an expired (410) watch
        self._rv: str | None = None  # where the next watch starts; None: list first
        self._relist_due: float | None = None  # loop time of the next resync
        self._watching: asyncio.Timeout | None = None  # the running watch's deadline
        self._task: asyncio.Task | None = None

    def add_handler(self, handler: Handler) -> None:
        self.handlers.append(handler)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` once after each burst of changes (a list's, or events that arrived
        together), on the next turn of the loop: a reader of items() rebuilds once, not once
        per object."""
        self.listeners.append(listener)

    def get(self, namespace: str, name: str) -> Obj | None:
        return self.cache.get((namespace, name))

    def items(self, namespace: str | None = None) -> list[Obj]:
        return [o for (ns, _), o in self.cache.items() if namespace is None or ns == namespace]

    async def list_first(self) -> None:
        """The first list, now, raising what it raises (for a component that must not start
        without these objects); start() then watches from it."""
        self._rv = await self._relist()
        self.synced.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"informer {self.kind.kind}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def select(self, labels: dict[str, str] | None) -> None:
        """Follow objects with these labels from now on: lists again at once, and what no
        longer matches reaches the handlers as DELETED."""
        if labels == self.labels:
            return
        self.labels = labels
        self._rv = None
        if self._watching is not None:
            try:
                self._watching.reschedule(asyncio.get_running_loop().time())
            except RuntimeError:  # its deadline passed already: the list is on its way
                pass

    # ---- the loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                if self._rv is None:
                    first = not self.synced.is_set()
                    self._rv = await self._relist()
                    self.synced.set()
                    if not first:
                        self.log.info("re-listed %s: %d", self.kind.plural, len(self.cache))
                    if self._rv is None:
                        continue
                backoff = 0.1
                await self._watch()
            except Gone:
                self.relists += 1
                self._rv = None
                self.log.info("%s watch expired (410 Gone): listing again", self.kind.plural)
            except (StoreError, OSError) as exc:
                self._rv = None
                self.log.warning(
                    "%s list/watch failed: %s; listing again in %.1fs",
                    self.kind.plural, exc, backoff,
                )  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _watch(self) -> None:
        """Watch from self._rv until the server ends the watch (resume from where it was), or
        a list is due (resync, select): then self._rv is None."""
        if self._relist_due is None and self.resync is not None:
            self._relist_due = asyncio.get_running_loop().time() + self.resync
        events = self.store.watch(self.kind, self.namespace, self._rv or "", labels=self.labels)
        try:
            async with asyncio.timeout_at(self._relist_due) as self._watching:
                async for event, obj in events:
                    if self._rv is None:  # select() asked for a list meanwhile
                        break
                    self._rv = _resource_version(obj) or self._rv
                    if event != "BOOKMARK":
                        self._apply(event, obj)
        except TimeoutError:
            self._rv = None  # the resync is due
        finally:
            self._watching = None
            await events.aclose()  # type: ignore[attr-defined]

    async def _relist(self) -> str | None:
        """List, bring the cache and the handlers up to date; the resourceVersion to watch
        from, or None when select() changed the labels meanwhile (list again)."""
        self._relist_due = None
        labels = self.labels
        items, rv = await self.store.list(self.kind, self.namespace, labels)
        fresh = {}
        for obj in items:
            if (key := self._usable("listed", obj)) is not None:
                fresh[key] = obj
        for key, old in list(self.cache.items()):
            if key not in fresh:
                del self.cache[key]
                self._notify("DELETED", old)
        for key, obj in fresh.items():
            old = self.cache.get(key)
            if old is None or _resource_version(old) != _resource_version(obj):
                self.cache[key] = obj
                self._notify("ADDED" if old is None else "MODIFIED", obj)
        return rv if self.labels == labels else None

    def _apply(self, event: str, obj: Any) -> None:
        if event == "DELETED" and (key := _key(obj)) is not None:  # its name is enough
            self.cache.pop(key, None)
            self._notify(event, obj)
            return
        if event not in EVENTS:
            self._skip(event, obj, f"unexpected event type {event!r}")
        elif (key := self._usable(event, obj)) is not None:
            self.cache[key] = obj
            self._notify(event, obj)

    def _usable(self, event: str, obj: Any) -> tuple[str, str] | None:
        """The cache key of an object that can be used; None (logged, counted) otherwise."""
        key = _key(obj)
        problem = "no metadata.name" if key is None else self.check(obj) if self.check else None
        if problem is None:
            return key
        self._skip(event, obj, problem)
        return None

    def _skip(self, event: str, obj: Any, problem: str) -> None:
        key = _key(obj)
        name = key[1] if key else "<unnamed>"
        self.log.warning("skipping %s %s (%s): %s", self.kind.kind, name, event, problem)
        if self.skipped is not None:
            self.skipped(self.kind)

    def _notify(self, event: str, obj: Obj) -> None:
        if self.listeners and not self._change_due:
            self._change_due = True
            asyncio.get_running_loop().call_soon(self._changed)
        for handler in self.handlers:
            try:
                handler(event, obj)
            except Exception:  # a handler bug must not stop the informer
                self.log.exception("%s handler failed on %s", self.kind.kind, _key(obj))

    def _changed(self) -> None:
        self._change_due = False
        for listener in self.listeners:
            try:
                listener()
            except Exception:  # a listener bug must not stop the others
                self.log.exception("%s change listener failed", self.kind.kind)


def _key(obj: Any) -> tuple[str, str] | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        return None
    namespace = meta.get("namespace")
    return (namespace if isinstance(namespace, str) else ""), name


def _resource_version(obj: Any) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return rv if isinstance(rv, str) else None
