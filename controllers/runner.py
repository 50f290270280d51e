"""Run reconcilers: informers enqueue keys, workers take them from a rate-limited queue.

Events only enqueue keys (the object's own, or its controlling owner's); a reconcile reads
everything it needs itself, so a missed or repeated event costs nothing but a pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram

from infergw.api import ApiError, tracing
from infergw.cluster.informer import Informer
from infergw.cluster.store import Conflict, Kind, Obj, Store, StoreError, controller_of
from infergw.controllers.events import NO_EVENTS, WARNING, Recorder
from infergw.controllers.workqueue import WorkQueue

log = logging.getLogger("controllers.runner")


class Reconciler(Protocol):
    kind: Kind

    async def reconcile(self, namespace: str, name: str) -> float | None: ...


def own_key(obj: Obj) -> list[Hashable]:
    m = obj["metadata"]
    return [(m.get("namespace", ""), m["name"])]


def same_namespace_keys(owners: Informer) -> Callable[[Obj], list[Hashable]]:
    """Every object `owners` holds in the event's namespace: for an object that may concern
    any of them (a ModelRoute and the Models it targets)."""

    def keys(obj: Obj) -> list[Hashable]:
        ns = obj["metadata"].get("namespace", "")
        return [(ns, o["metadata"]["name"]) for o in owners.items(ns)]

    return keys


def owner_key(owner_kind: Kind) -> Callable[[Obj], list[Hashable]]:
    def keys(obj: Obj) -> list[Hashable]:
        ref = controller_of(obj)
        if ref and ref.get("kind") == owner_kind.kind:
            return [(obj["metadata"].get("namespace", ""), ref["name"])]
        return []

    return keys


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.reconciles = Counter(
            "infergate_controller_reconcile_total",
            "Reconcile passes by controller and result.",
            ["controller", "result"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "infergate_controller_reconcile_seconds",
            "Time of one reconcile pass.",
            ["controller"],
            registry=self.registry,
        )


class Controller:
    def __init__(
        self,
        store: Store,
        reconciler: Reconciler,
        watches: list[tuple[Kind, Callable[[Obj], list[Hashable]]]],
        metrics: ControllerMetrics | None = None,
        workers: int = 2,
        namespace: str | None = None,
        optional: tuple[Kind, ...] = (),
        events: Recorder = NO_EVENTS,
    ) -> None:
        """`optional`: kinds whose informers are not waited for at start (a CRD that may not
        be installed: its informer keeps listing until it is, and enqueues what it finds)."""
        self.store = store
        self.reconciler = reconciler
        self.queue = WorkQueue()
        self.metrics = metrics or ControllerMetrics()
        self.workers = workers
        self.informers: list[Informer] = []
        self.optional = optional
        self.namespace = namespace
        self.events = events
        for kind, to_keys in watches:
            self.watch(kind, to_keys)
        self._tasks: list[asyncio.Task] = []

    def watch(self, kind: Kind, to_keys: Callable[[Obj], list[Hashable]]) -> Informer:
        """Reconcile the keys `to_keys` gives for each change of a `kind` object (before
        start)."""
        inf = Informer(self.store, kind, self.namespace)
        inf.add_handler(lambda _event, obj: self._enqueue(to_keys(obj)))
        self.informers.append(inf)
        return inf

    def informer(self, kind: Kind) -> Informer:
        """The informer of a watched kind: its cache, for a key function that fans out."""
        return next(inf for inf in self.informers if inf.kind == kind)

    @property
    def name(self) -> str:
        return self.reconciler.kind.kind

    def _enqueue(self, keys: list[Hashable]) -> None:
        for k in keys:
            self.queue.add(k)

    async def start(self) -> None:
        for inf in self.informers:
            inf.start()
        await asyncio.gather(
            *(inf.synced.wait() for inf in self.informers if inf.kind not in self.optional)
        )
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]

    async def stop(self) -> None:
        self.queue.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for inf in self.informers:
            await inf.stop()

    async def _invalid(self, ns: str, name: str, exc: ApiError) -> None:
        """A Warning on an object its reconciler cannot read (the recorder counts repeats)."""
        try:
            obj = await self.store.get(self.reconciler.kind, ns, name)
        except StoreError:
            return
        if obj is not None:
            await self.events.event(obj, WARNING, "InvalidSpec", "Reconcile", str(exc))

    async def _work(self) -> None:
        while True:
            key = await self.queue.get()
            ns, name = key
            t0 = time.monotonic()
            try:
                # A trace per reconcile pass (tracing on): its Kubernetes calls' time, whole.
                with tracing.span(
                    "controller.reconcile",
                    {"infergate.controller": self.name, "k8s.namespace.name": ns,
                     "infergate.object": name},
                ):  # fmt: skip
                    again = await self.reconciler.reconcile(ns, name)
            except Conflict:
                self.metrics.reconciles.labels(self.name, "conflict").inc()
                self.queue.add_rate_limited(key)  # read again and retry
            except ApiError as exc:
                # The object itself cannot be read: another pass would read the same. Its next
                # edit is an event that enqueues it again.
                self.metrics.reconciles.labels(self.name, "unreadable").inc()
                self.queue.forget(key)
                log.warning("%s %s/%s: %s; waiting for it to change", self.name, ns, name, exc)
                await self._invalid(ns, name, exc)
            except (StoreError, OSError) as exc:
                self.metrics.reconciles.labels(self.name, "error").inc()
                delay = self.queue.add_rate_limited(key)
                log.warning("%s %s/%s: %s; retry in %.2fs", self.name, ns, name, exc, delay)
            except Exception:
                self.metrics.reconciles.labels(self.name, "error").inc()
                delay = self.queue.add_rate_limited(key)
                log.exception("%s %s/%s failed; retry in %.2fs", self.name, ns, name, delay)
            else:
                self.metrics.reconciles.labels(self.name, "ok").inc()
                self.queue.forget(key)
                if again is not None:
                    self.queue.add_after(key, again)
            finally:
                self.metrics.duration.labels(self.name).observe(time.monotonic() - t0)
                self.queue.done(key)
