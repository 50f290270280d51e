"""Which prefill pods the sidecar may call: those of its own InferencePool, nothing else.

x-prefiller-host-port arrives with the request. Only the picker should set it (Envoy removes a
client's copy), but the sidecar does not rely on that: it runs a prefill leg only on an address
that is a prefill pod of its pool — a ready pod matching the pool's selector whose role label
(`infergate.io/role`) is `prefill` or `both`, at one of the pool's target ports, which is what
the picker's prefill-filter chooses from. The pool comes from the picker's own providers: the
pool file (the local stack) or the Kubernetes API (list+watch of the InferencePool and the
pods its selector matches).

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
from typing import Protocol

from api.names import BOTH, PREFILL, ROLE_LABEL
from connector.options import ConnectorOptions
from connector.upstream import sanitized
from epp.datastore import Datastore
from epp.providers.file import FileProvider

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


class Provider(Protocol):
    async def start(self) -> None: ...

    def refresh(self) -> None:
        """Catch up with the source now, if it can (a file that changed is read again)."""
        ...

    async def stop(self) -> None: ...


class PoolAllowlist:
    """The prefill pods of one InferencePool, kept up to date by a provider."""

    def __init__(
        self,
        pool_name: str,
        namespace: str,
        provider: Callable[[Datastore], Provider],
        *,
        grace: float,
    ) -> None:
        self.where = f"InferencePool {namespace}/{pool_name}"
        self.grace = grace
        self.datastore = Datastore()
        self.datastore.change_listeners.append(self._refresh)
        self.provider = provider(self.datastore)
        self._current: frozenset[str] = frozenset()
        self._departed: dict[str, float] = {}  # address -> when it left the set
        self._task: asyncio.Task | None = None
        self._started = False

    @property
    def synced(self) -> bool:
        return self.datastore.synced

    def _refresh(self) -> None:
        now = time.monotonic()
        current = frozenset(
            ep.address
            for ep in self.datastore.endpoints()
            if ep.labels.get(ROLE_LABEL) in PREFILL_ROLES
        )
        for address in self._current - current:
            self._departed[address] = now
        for address in current:
            self._departed.pop(address, None)
        self._departed = {a: t for a, t in self._departed.items() if now - t <= self.grace}
        if current != self._current:
            log.info("prefill pods of %s: %s", self.where, ", ".join(sorted(current)) or "none")
        self._current = current

    def allows(self, host_port: str) -> bool:
        if host_port in self._current:
            return True
        # A pod the picker already knows may be newer than our last poll of the pool:
        # catch up once before refusing (cheap: a file is read again only if it changed).
        if self._started:
            self.provider.refresh()
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
                await self.provider.start()
            except Exception as exc:  # whatever the provider raises, try again later
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
            await self.provider.stop()


def file_provider(path: Path, pool_name: str, namespace: str) -> Callable[[Datastore], Provider]:
    return lambda datastore: FileProvider(datastore, [path], pool_name, namespace)


def kubernetes_provider(pool_name: str, namespace: str) -> Callable[[Datastore], Provider]:
    def make(datastore: Datastore) -> Provider:
        from epp.providers.kubernetes import KubernetesProvider  # the client is slow to import

        return KubernetesProvider(datastore, pool_name, namespace, routing=False)

    return make


def allowlist_for(opts: ConnectorOptions) -> Allowlist:
    """The allowlist the flags ask for: the pool file's, the cluster's, or none."""
    if opts.pool_name is None:
        return NoAllowlist()
    if opts.pool_file is not None:
        source = file_provider(Path(opts.pool_file), opts.pool_name, opts.pool_namespace)
    else:
        source = kubernetes_provider(opts.pool_name, opts.pool_namespace)
    return PoolAllowlist(opts.pool_name, opts.pool_namespace, source, grace=opts.prefiller_grace)
