"""Leader election with a coordination.k8s.io/v1 Lease, as client-go does it: the holder
renews `renewTime` every `renew_every` seconds; a candidate takes the Lease once it has not
been renewed for `lease_duration`; every write carries the resourceVersion it read, so two
candidates cannot both win. A leader that fails to renew in time stops leading (the caller
exits, and a fresh replica competes again)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from infergw.cluster.store import LEASE, AlreadyExists, Conflict, Obj, Store, StoreError

log = logging.getLogger("controllers.leader")


def _now() -> datetime:
    return datetime.now(UTC)


def _fmt(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # MicroTime


def _parse(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.strptime(text.replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z")


class LeaderElector:
    def __init__(
        self,
        store: Store,
        *,
        name: str,
        namespace: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_every: float = 5.0,
        retry_every: float = 2.0,
    ) -> None:
        self.store = store
        self.name, self.namespace, self.identity = name, namespace, identity
        self.lease_duration = lease_duration
        self.renew_every = renew_every
        self.retry_every = retry_every
        self.lost = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def acquire(self) -> None:
        """Return once this candidate holds the Lease; then keep renewing it."""
        while True:  # a Lease is polled, as client-go does
            try:
                if await self._try():
                    break
            except StoreError as exc:  # the API server hiccuped: ask again, do not crash
                log.warning("reading the lease %s/%s failed: %s", self.namespace, self.name, exc)
            await asyncio.sleep(self.retry_every)
        log.info("%s leads (lease %s/%s)", self.identity, self.namespace, self.name)
        self._task = asyncio.create_task(self._renew())

    async def release(self) -> None:
        """Stop renewing and hand the Lease back, so the next leader need not wait."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        lease = await self.store.get(LEASE, self.namespace, self.name)
        if lease and lease["spec"].get("holderIdentity") == self.identity:
            lease["spec"]["holderIdentity"] = ""
            lease["spec"]["renewTime"] = _fmt(_now())
            lease["spec"]["leaseDurationSeconds"] = 1
            try:
                await self.store.update(lease)
            except StoreError:
                pass

    async def _try(self) -> bool:
        now = _now()
        lease = await self.store.get(LEASE, self.namespace, self.name)
        if lease is None:
            try:
                await self.store.create(self._lease(now, transitions=0))
                return True
            except AlreadyExists:
                return False
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        renewed = _parse(spec.get("renewTime"))
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        if holder and holder != self.identity and renewed is not None:
            if (now - renewed).total_seconds() < duration:
                return False  # someone else holds it and keeps it fresh
        fresh = self._lease(now, transitions=int(spec.get("leaseTransitions", 0)))
        if holder != self.identity:
            fresh["spec"]["leaseTransitions"] += 1
        else:
            fresh["spec"]["acquireTime"] = spec.get("acquireTime", fresh["spec"]["acquireTime"])
        fresh["metadata"] = lease["metadata"]  # with its resourceVersion: a racing write loses
        try:
            await self.store.update(fresh)
            return True
        except (Conflict, StoreError):
            return False

    async def _renew(self) -> None:
        last = _now()
        while True:
            await asyncio.sleep(self.renew_every)
            try:
                ok = await self._try()
            except StoreError:
                ok = False
            if ok:
                last = _now()
            elif (_now() - last).total_seconds() >= self.lease_duration:
                log.error("%s lost the lease %s/%s", self.identity, self.namespace, self.name)
                self.lost.set()
                return

    def _lease(self, now: datetime, *, transitions: int) -> Obj:
        return {
            "apiVersion": LEASE.api_version,
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(self.lease_duration),
                "acquireTime": _fmt(now),
                "renewTime": _fmt(now),
                "leaseTransitions": transitions,
            },
        }
