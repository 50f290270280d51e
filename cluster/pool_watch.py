"""One InferencePool and the pods its selector matches, kept up to date from a store: the
picker's Kubernetes provider and the decode sidecar's allowlist both read their pool so.

Two informers: the namespace's InferencePools (the one named is used), and its Pods filtered
by the pool's selector on the server, listed again when the selector changes. Changes reach
`on_pool` and `on_pods` on the event loop; a burst of pod events (a list) is one `on_pods`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from infergw.cluster.informer import Informer
from infergw.cluster.pool import PoolError, PoolSpec, pod_problem
from infergw.cluster.store import INFERENCE_POOL, POD, Kind, Obj, Store

log = logging.getLogger("cluster.pool_watch")


class PoolWatch:
    def __init__(
        self,
        store: Store,
        pool_name: str,
        namespace: str,
        *,
        on_pool: Callable[[PoolSpec | None], None],
        on_pods: Callable[[list[Obj]], None],
        resync: float | None = None,
        skipped: Callable[[Kind], None] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.pool_name = pool_name
        self.namespace = namespace
        self.where = f"InferencePool {namespace}/{pool_name}"
        self.on_pool = on_pool
        self.on_pods = on_pods
        self.skipped = skipped
        self.log = logger or log
        self.pool: PoolSpec | None = None
        common: dict[str, Any] = {"resync": resync, "skipped": skipped, "logger": self.log}
        self.pools = Informer(store, INFERENCE_POOL, namespace, **common)
        self.pods = Informer(store, POD, namespace, check=pod_problem, **common)

    async def start(self) -> None:
        """List the pool and its pods, hand them over, then watch. PoolError (naming the pool)
        when it is missing or cannot be used; the store's errors when it cannot be read."""
        await self.pools.list_first()
        obj = self.pools.get(self.namespace, self.pool_name)
        if obj is None:
            raise PoolError(f"{self.where} not found ({INFERENCE_POOL.api_version} pools)")
        self.pool = PoolSpec.from_object(obj)
        self.pods.labels = self.pool.selector
        await self.pods.list_first()
        self.pools.add_handler(self._pool_event)
        self.pods.on_change(lambda: self.on_pods(self.pods.items()))
        self.on_pool(self.pool)
        self.on_pods(self.pods.items())
        self.pools.start()
        self.pods.start()

    async def stop(self) -> None:
        await self.pools.stop()
        await self.pods.stop()

    def _pool_event(self, event: str, obj: Obj) -> None:
        if (obj.get("metadata") or {}).get("name") != self.pool_name:
            return
        if event == "DELETED":
            self.log.warning("%s was deleted", self.where)
            self.pool = None
            self.on_pool(None)
            return
        try:
            pool = PoolSpec.from_object(obj)
        except PoolError as exc:
            self.log.error(
                "keeping the previous pool: InferencePool %s is invalid: %s", self.pool_name, exc
            )
            if self.skipped is not None:
                self.skipped(INFERENCE_POOL)
            return
        previous, self.pool = self.pool, pool
        self.on_pool(pool)
        if previous is None or previous.selector != pool.selector:
            self.log.info("pool selector is now %s; listing pods again", pool.selector)
            self.pods.select(pool.selector)
