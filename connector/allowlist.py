"""Which prefill pods the sidecar may call: those of its own InferencePool, nothing else.

x-prefiller-host-port arrives with the request. Only the picker should set it (Envoy removes a
client's copy), but the sidecar does not rely on that: it runs a prefill leg only on an address
that is a prefill pod of its pool — a ready pod matching the pool's selector whose role label
(`infergate.io/role`) is `prefill` or `both`, at one of the pool's target ports, which is what
the picker's prefill-filter chooses from. Membership is cluster/pool.py's, the picker's too; the
pool comes from the pool file (the local stack, cluster/files.py) or the Kubernetes API
(cluster/pool_watch.py: list+watch of the InferencePool and the pods its selector matches).

A pod that just left that set (deleted, or no longer ready) stays allowed for a short grace
period: the picker may have named it before it noticed, and such a request should fail over
as for any unreachable prefiller, not be refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from infergw.api.names import BOTH, PREFILL
from infergw.cluster.files import ObjectFileError, WatchedFiles
from infergw.cluster.pool import PoolSpec, find_pool, members
from infergw.cluster.store import Obj
from infergw.connector.options import ConnectorOptions
from infergw.connector.upstream import sanitized

if TYPE_CHECKING:
    from infergw.cluster.kube_store import KubeStore
    from infergw.cluster.pool_watch import PoolWatch

log = logging.getLogger("connector.allowlist")

PREFILL_ROLES = frozenset({PREFILL, BOTH})
RETRY_FIRST, RETRY_MAX = 1.0, 30.0  # seconds between attempts to load the pool at start


class Allowlist(Protocol):
    @property
    def synced(self) -> bool:
        """Whether it knows its pool yet (the sidecar is not ready before)."""
        ...

    def allows(self, host_port: str) -> bool: ...

    def refusal(self, host_port: str) -> str:
        """Why host_port is not allowed, for the client and the log."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class NoAllowlist:
    """No pool configured: the sidecar runs no prefill leg at all."""

    synced = True

    def allows(self, host_port: str) -> bool:
        return False

    def refusal(self, host_port: str) -> str:
        return (
            "this decode sidecar has no prefill allowlist (start it with --pool-name), so it "
            "calls no prefiller"
        )

    async def start(self) -> None:
        log.warning(
            "no --pool-name: every request naming a prefiller in x-prefiller-host-port is "
            "refused with 403; requests without it pass to the local engine"
        )

    async def stop(self) -> None:
        pass


# Where a pool source hands the pool and its pods (None: the pool is gone).
PoolUpdate = Callable[[PoolSpec | None, list[Obj]], None]


class PoolSource(Protocol):
    async def start(self) -> None:
        """Read the pool once (raising when it cannot), hand it over, then follow it."""
        ...

    def refresh(self) -> None:
        """Catch up with the source now, if it can (a file that changed is read again)."""
        ...

    async def stop(self) -> None: ...


class PoolAllowlist:
    """The prefill pods of one InferencePool, kept up to date by a pool source."""

    def __init__(
        self,
        pool_name: str,
        namespace: str,
        source: Callable[[PoolUpdate], PoolSource],
        *,
        grace: float,
        host_ports: bool = False,
    ) -> None:
        self.host_ports = host_ports  # pods' one-address ports are read (pool files)
        self.where = f"InferencePool {namespace}/{pool_name}"
        self.grace = grace
        self.synced = False  # whether it knows its pool yet (the sidecar is not ready before)
        self.source = source(self._update)
        self._current: frozenset[str] = frozenset()
        self._departed: dict[str, float] = {}  # address -> when it left the set
        self._task: asyncio.Task | None = None
        self._started = False

    def _update(self, pool: PoolSpec | None, pods: list[Obj]) -> None:
        now = time.monotonic()
        found = members(pool, pods, host_ports=self.host_ports) if pool is not None else []
        current = frozenset(m.address for m in found if m.ready and m.role in PREFILL_ROLES)
        for address in self._current - current:
            self._departed[address] = now
        for address in current:
            self._departed.pop(address, None)
        self._departed = {a: t for a, t in self._departed.items() if now - t <= self.grace}
        if current != self._current:
            log.info("prefill pods of %s: %s", self.where, ", ".join(sorted(current)) or "none")
        self._current = current
        self.synced = True

    def allows(self, host_port: str) -> bool:
        if host_port in self._current:
            return True
        # A pod the picker already knows may be newer than our last poll of the pool:
        # catch up once before refusing (cheap: a file is read again only if it changed).
        if self._started:
            self.source.refresh()
            if host_port in self._current:
                return True
        left = self._departed.get(host_port)
        return left is not None and time.monotonic() - left <= self.grace

    def refusal(self, host_port: str) -> str:
        if not self.synced:
            return f"this decode sidecar has not loaded {self.where} yet"
        return f"{sanitized(host_port)} is not a prefill pod of {self.where}"

    async def start(self) -> None:
        """Load the pool in the background: the sidecar serves meanwhile (not ready)."""
        self._task = asyncio.create_task(self._load(), name="connector-pool")

    async def _load(self) -> None:
        delay = RETRY_FIRST
        while True:
            try:
                await self.source.start()
            except Exception as exc:  # whatever the source raises, try again later
                log.warning("cannot load %s yet: %s; retrying in %.0fs", self.where, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            self._started = True
            return

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._started:
            await self.source.stop()


class FilePool:
    """The pool and its pods from a pool file, read again when it changes; a bad edit keeps
    the previous pool (logged)."""

    def __init__(
        self,
        path: Path,
        pool_name: str,
        namespace: str,
        update: PoolUpdate,
        *,
        poll_interval: float = 1.0,
    ) -> None:
        self.pool_name = pool_name
        self.namespace = namespace
        self.update = update
        self.files = WatchedFiles([path], self._use, self._failed, poll_interval=poll_interval)

    def _use(self, objects: list[Obj]) -> None:
        pool_obj, pods = find_pool(objects, self.pool_name, self.namespace)
        if pool_obj is None:
            raise ObjectFileError(f"no InferencePool {self.namespace}/{self.pool_name} in the file")
        self.update(PoolSpec.from_object(pool_obj), pods)

    def _failed(self, exc: Exception) -> None:
        log.error("reading %s failed, keeping the previous pool: %s", self.files.paths[0], exc)

    async def start(self) -> None:
        await self.files.start()

    def refresh(self) -> None:
        self.files.refresh()

    async def stop(self) -> None:
        await self.files.stop()


class KubernetesPool:
    """The pool and its pods from the API server (the sidecar's own kubeconfig or service
    account), by list+watch."""

    def __init__(self, pool_name: str, namespace: str, update: PoolUpdate) -> None:
        self.pool_name = pool_name
        self.namespace = namespace
        self.update = update
        self._store: KubeStore | None = None
        self._watch: PoolWatch | None = None

    async def start(self) -> None:
        # The client is slow to import: only a sidecar in a cluster pays for it.
        from infergw.cluster.kube_store import KubeStore
        from infergw.cluster.pool_watch import PoolWatch

        store = KubeStore.from_environment()
        watch = PoolWatch(
            store,
            self.pool_name,
            self.namespace,
            on_pool=lambda pool: self.update(pool, watch.pods.items()),
            on_pods=lambda pods: self.update(watch.pool, pods),
            logger=log,
        )
        try:
            await watch.start()
        except BaseException:
            await watch.stop()
            store.close()
            raise
        self._store, self._watch = store, watch

    def refresh(self) -> None:
        """Nothing to do: the watch already delivers every change as it happens."""

    async def stop(self) -> None:
        if self._watch is not None:
            await self._watch.stop()
        if self._store is not None:
            self._store.close()


def file_pool(
    path: Path, pool_name: str, namespace: str, *, poll_interval: float = 1.0
) -> Callable[[PoolUpdate], PoolSource]:
    return lambda update: FilePool(path, pool_name, namespace, update, poll_interval=poll_interval)


def kubernetes_pool(pool_name: str, namespace: str) -> Callable[[PoolUpdate], PoolSource]:
    return lambda update: KubernetesPool(pool_name, namespace, update)


def allowlist_for(opts: ConnectorOptions) -> Allowlist:
    """The allowlist the flags ask for: the pool file's, the cluster's, or none."""
    if opts.pool_name is None:
        return NoAllowlist()
    from_file = opts.pool_file is not None
    if from_file:
        source = file_pool(Path(opts.pool_file), opts.pool_name, opts.pool_namespace)
    else:
        source = kubernetes_pool(opts.pool_name, opts.pool_namespace)
    return PoolAllowlist(
        opts.pool_name,
        opts.pool_namespace,
        source,
        grace=opts.prefiller_grace,
        host_ports=from_file,
    )
