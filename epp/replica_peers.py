"""Picker replicas in a cluster find each other for the replica sync (epp/replica_sync.py).

A Deployment's pods have no stable addresses, so `--replica-sync-peers` cannot name them. A
headless Service selecting the picker's pods can: the endpoints controller lists its ready
pods in EndpointSlices, and `ReplicaPeers` watches them (cluster/informer.py, by the
`kubernetes.io/service-name` label) and hands the ready endpoints of the Service's port named
`replica-sync` to `ReplicaSync.set_peers` after each burst of changes.

Why EndpointSlices and not the pods by label: readiness is already decided there (a replica
that has not synced its pool, or is draining, is not ready, so nobody follows it), the port
comes from the Service by name instead of a second flag that must agree with the container,
and the Service's selector is the one place that says which pods are replicas.

This replica is never its own peer: endpoints at its pod IP (`$POD_IP`, the Downward API) or
at its bind are left out. What cannot be used (a malformed slice, an address that is not an
IP, a port out of range) is logged, counted and skipped; the informer lists again on errors.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily

from infergw.cluster.endpoint_slices import (
    SERVICE_NAME_LABEL,
    IPAddress,
    SocketAddress,
    ready_addresses,
)
from infergw.cluster.informer import Informer
from infergw.cluster.store import ENDPOINT_SLICE, Kind, Obj, Store
from infergw.epp.replica_sync import ReplicaSync

log = logging.getLogger("epp.replica_peers")

SYNC_PORT_NAME = "replica-sync"  # the headless Service's port the replicas' PUBs bind


def zmq_endpoint(address: SocketAddress) -> str:
    return f"tcp://{address}"


def own_ips(bind: str, pod_ip: str | None) -> frozenset[IPAddress]:
    """The addresses that are this replica: its pod IP and the host its PUB binds, if IPs."""
    host = bind.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    found = set()
    for text in (host, pod_ip or ""):
        try:
            found.add(ipaddress.ip_address(text))
        except ValueError:  # a wildcard or a name: nothing to compare with
            pass
    return frozenset(found)


def peer_endpoints(
    addresses: Iterable[SocketAddress], own: frozenset[IPAddress] = frozenset()
) -> list[str]:
    """ZMQ endpoints of the addresses that are not this replica, in a stable order."""
    return sorted({zmq_endpoint(a) for a in addresses if a.ip not in own})


class ReplicaPeers:
    """Keeps `sync`'s peers to the ready endpoints of Service `namespace/service`."""

    def __init__(
        self,
        sync: ReplicaSync,
        store: Store,
        namespace: str,
        service: str,
        *,
        own: frozenset[IPAddress] = frozenset(),
        resync: float | None = 300.0,
        close_store: Callable[[], None] | None = None,
    ) -> None:
        self.sync = sync
        self._close_store = close_store  # the API client, when the store is ours alone
        self.where = f"Service {namespace}/{service}"
        self.own = own
        self.skipped: Counter[str] = Counter()  # why parts of slices were left out
        self._slices: dict[tuple[str, str], frozenset[SocketAddress]] = {}
        self.informer = Informer(
            store,
            ENDPOINT_SLICE,
            namespace,
            labels={SERVICE_NAME_LABEL: service},
            resync=resync,
            skipped=self._nameless,
            logger=log,
        )
        self.informer.add_handler(self._slice_event)
        self.informer.on_change(self._publish)

    def start(self) -> None:
        """Watch in the background: the picker serves while the API server is unreachable,
        its replicas then just do not share (the informer retries, logging each failure)."""
        log.info(
            "replica sync: peers are the ready endpoints of %s, port %s", self.where, SYNC_PORT_NAME
        )
        self.informer.start()

    async def stop(self) -> None:
        await self.informer.stop()
        if self._close_store is not None:
            self._close_store()
            self._close_store = None

    def peers(self) -> list[str]:
        return peer_endpoints((a for s in self._slices.values() for a in s), self.own)

    def _slice_event(self, event: str, obj: Obj) -> None:
        meta = obj["metadata"]  # the informer hands over named objects only
        namespace = meta.get("namespace")
        key = (namespace if isinstance(namespace, str) else "", meta["name"])
        if event == "DELETED":
            self._slices.pop(key, None)
            return
        found = ready_addresses(obj, SYNC_PORT_NAME)
        if found.skipped:
            self.skipped.update(found.skipped)
            log.warning(
                "EndpointSlice %s of %s: left out %s",
                meta["name"], self.where, ", ".join(sorted(set(found.skipped))),
            )  # fmt: skip
        self._slices[key] = found.addresses

    def _publish(self) -> None:
        self.sync.set_peers(self.peers())

    def _nameless(self, kind: Kind) -> None:
        self.skipped["malformed"] += 1

    def collect(self):
        """Prometheus: parts of EndpointSlices left out, by reason."""
        family = CounterMetricFamily(
            "infergate_epp_replica_sync_discovery_skipped",
            "Parts of the replicas' EndpointSlices left out (malformed, address_type, no_port, "
            "bad_port, not_an_ip, too_many_endpoints), by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(self.skipped.items()):
            family.add_metric([reason], n)
        yield family
