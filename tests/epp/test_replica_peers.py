"""epp/replica_peers.py and ReplicaSync.set_peers: picker replicas in a cluster find each other
for the replica sync through a headless Service's EndpointSlices, connect to new peers and
disconnect from gone ones at run time, never follow themselves, follow at most MAX_PEERS, and
skip and count what cannot be used.

The cluster is the in-process API emulator (tests/kubeapi.py); the replicas are real ZMQ
sockets on two loopback addresses (127.0.0.1 and 127.0.0.2, as two pods' IPs)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Iterator

import pytest
from kubernetes import client

from infergw.cluster.endpoint_slices import SERVICE_NAME_LABEL, SocketAddress
from infergw.cluster.kube_store import KubeStore
from infergw.epp.app import build_picker, stop_picker
from infergw.epp.options import ServiceRef, parse_options
from infergw.epp.replica_peers import (
    SYNC_PORT_NAME,
    ReplicaPeers,
    own_ips,
    peer_endpoints,
)
from infergw.epp.replica_sync import MAX_PEERS, ReplicaSync
from infergw.stack.ports import free_port
from tests.kubeapi import KubeAPIEmulator
from tests.picker_fixtures import pool_yaml
from tests.waiting import wait_for_async

SERVICE = "epp-replicas"
POD = "10.0.0.1:8000"  # a pool member both replicas know
CHANNEL = "kv-speculative"


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def endpoint_slice(name: str, *addresses: str, port: object, service: str = SERVICE) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {SERVICE_NAME_LABEL: service},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
        "ports": [{"name": SYNC_PORT_NAME, "port": port, "protocol": "TCP"}],
    }


# ---- who is a peer -----------------------------------------------------------------------------


def test_own_addresses_are_the_pod_ip_and_the_bind_host():
    assert own_ips("tcp://10.1.0.5:9004", None) == {ip("10.1.0.5")}
    assert own_ips("tcp://*:9004", "10.1.0.5") == {ip("10.1.0.5")}
    assert own_ips("tcp://[fd00::5]:9004", "fd00::5") == {ip("fd00::5")}
    assert own_ips("tcp://0.0.0.0:9004", "") == {ip("0.0.0.0")}
    assert own_ips("ipc:///tmp/x", "not an ip") == frozenset()


def test_peer_endpoints_leave_this_replica_out_and_print_as_zmq_endpoints():
    addresses = [
        SocketAddress(ip("10.1.0.7"), 9004),
        SocketAddress(ip("10.1.0.5"), 9004),  # this pod, at any port
        SocketAddress(ip("10.1.0.5"), 9005),
        SocketAddress(ip("10.1.0.6"), 9004),
        SocketAddress(ip("10.1.0.6"), 9004),
        SocketAddress(ip("fd00::9"), 9004),
    ]
    assert peer_endpoints(addresses, frozenset({ip("10.1.0.5")})) == [
        "tcp://10.1.0.6:9004",
        "tcp://10.1.0.7:9004",
        "tcp://[fd00::9]:9004",
    ]


# ---- ReplicaSync follows a changing peer list --------------------------------------------------


@pytest.fixture
async def sync() -> Iterator[ReplicaSync]:
    replica = ReplicaSync(f"tcp://127.0.0.1:{free_port()}", [], is_member=lambda a: True)
    replica.start()
    yield replica
    await replica.close()


async def test_peers_come_and_go_and_the_own_endpoint_is_never_one(sync):
    one, two = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    sync.set_peers([one, sync.bind])
    assert sync.peers == [one]
    sync.set_peers([one, two])
    sync.set_peers([two])
    assert sync.peers == [two]
    assert dict(sync.peer_changes) == {"connected": 2, "disconnected": 1}
    sync.set_peers([two])  # no change, nothing counted
    assert dict(sync.peer_changes) == {"connected": 2, "disconnected": 1}


async def test_the_peer_list_is_capped_logged_and_counted(sync, caplog):
    many = [f"tcp://127.0.0.1:{20000 + i}" for i in range(MAX_PEERS + 5)]
    sync.set_peers(many)
    assert sync.peers == sorted(many)[:MAX_PEERS]
    assert sync.peer_changes["over_cap"] == 1
    assert "MAX_PEERS" in caplog.text
    gauge = {m.name: m for m in sync.collect()}["infergate_epp_replica_sync_peers"]
    assert gauge.samples[0].value == MAX_PEERS


async def test_an_endpoint_zmq_refuses_is_counted_not_raised(sync):
    sync.set_peers(["tcp://no port here", "tcp://127.0.0.1:1"])
    assert sync.peers == ["tcp://127.0.0.1:1"]
    assert sync.peer_changes["failed"] == 1


def test_static_peers_before_start_go_through_the_same_rules():
    bind = "tcp://127.0.0.1:1"
    many = [f"tcp://127.0.0.1:{20000 + i}" for i in range(MAX_PEERS + 1)]
    replica = ReplicaSync(bind, [bind, *many], is_member=lambda a: True)
    assert bind not in replica.peers and len(replica.peers) == MAX_PEERS


# ---- two replicas find each other through the emulator's EndpointSlices ------------------------


class Replica:
    """One picker replica's sync, found as `host`, with its records applied to `applied`."""

    def __init__(self, host: str, store: KubeStore) -> None:
        self.host, self.port = host, free_port()
        self.applied: list[tuple[str, list[int]]] = []
        self.sync = ReplicaSync(
            f"tcp://{host}:{self.port}", [], is_member=lambda address: address == POD
        )
        self.share = self.sync.channel(CHANNEL, lambda pod, keys: self.applied.append((pod, keys)))
        self.peers = ReplicaPeers(
            self.sync, store, "default", SERVICE, own=own_ips(self.sync.bind, host)
        )

    async def start(self) -> None:
        self.sync.start()
        self.peers.start()

    async def stop(self) -> None:
        await self.peers.stop()
        await self.sync.close()


@pytest.fixture
async def kube():
    async with KubeAPIEmulator() as api:
        yield api


@pytest.fixture
async def replicas(kube):
    api_client = client.ApiClient(kube.client_configuration())
    store = KubeStore(api_client, watch_timeout=5)
    a, b = Replica("127.0.0.1", store), Replica("127.0.0.2", store)
    yield a, b
    for r in (a, b):
        await r.stop()
    api_client.close()


async def until(done: Callable[[], bool], act: Callable[[], None], what: str) -> None:
    """Act until done: a SUB that has just connected misses what was sent before it did."""
    for _ in range(200):
        act()
        await asyncio.sleep(0.05)
        if done():
            return
    raise AssertionError(f"timed out: {what}")


async def test_replicas_find_each_other_share_and_let_go(kube, replicas):
    a, b = replicas
    # One slice per replica, as the endpoints controller may write them, and a hostile one
    # of the same Service: skipped and counted, the others still used.
    kube.put(endpoint_slice("epp-a", a.host, port=a.port))
    kube.put(endpoint_slice("epp-b", b.host, port=b.port))
    kube.put(endpoint_slice("epp-bad", "not-an-ip", port=70000))
    kube.put(endpoint_slice("other", "127.0.0.3", port=1, service="another-service"))
    for r in (a, b):
        await r.start()

    await wait_for_async(lambda: a.sync.peers == [b.sync.bind], "a follows b, not itself")
    await wait_for_async(lambda: b.sync.peers == [a.sync.bind], "b follows a, not itself")
    assert a.peers.skipped == {"bad_port": 1} and b.peers.skipped == {"bad_port": 1}

    await until(lambda: bool(b.applied), lambda: a.share(POD, [1, 2, 3]), "a's record at b")
    assert b.applied[0] == (POD, [1, 2, 3]) and b.sync.counts["applied"] >= 1

    # b's pod goes: its endpoint leaves the Service, a disconnects from it.
    kube.delete("discovery.k8s.io/v1", "EndpointSlice", "epp-b")
    await wait_for_async(lambda: a.sync.peers == [], "a lets b go")
    assert a.sync.peer_changes["disconnected"] == 1
    await asyncio.sleep(0.2)  # what b sent before a let go may still arrive
    heard = len(a.applied)
    for _ in range(10):
        b.share(POD, [4, 5])
        await asyncio.sleep(0.05)
    assert len(a.applied) == heard  # a no longer hears b

    # It comes back (ready again): a follows it again.
    kube.put(endpoint_slice("epp-b", b.host, port=b.port))
    await wait_for_async(lambda: a.sync.peers == [b.sync.bind], "a follows b again")
    await until(lambda: len(a.applied) > heard, lambda: b.share(POD, [6]), "b's record at a")


async def test_a_replica_that_is_not_ready_is_not_followed(kube, replicas):
    a, b = replicas
    kube.put(endpoint_slice("epp", a.host, b.host, port=a.port))
    await a.start()
    await wait_for_async(lambda: a.sync.peers == [f"tcp://{b.host}:{a.port}"], "b followed")
    not_ready = endpoint_slice("epp", a.host, b.host, port=a.port)
    not_ready["endpoints"][1]["conditions"]["ready"] = False
    kube.put(not_ready)
    await wait_for_async(lambda: a.sync.peers == [], "b, no longer ready, let go")


# ---- the flag and the picker's start-up --------------------------------------------------------


def test_the_discovery_flag():
    base = ["--pool-name=p", "--provider=file", "--pool-file=/dev/null", "--pool-namespace=ns"]
    bind = "--replica-sync-bind=tcp://127.0.0.1:9004"
    opts = parse_options([*base, bind, "--replica-sync-discovery=epp-replicas"])
    assert opts.replica_sync_discovery == ServiceRef("ns", "epp-replicas")
    opts = parse_options([*base, bind, "--replica-sync-discovery=other/epp-replicas"])
    assert str(opts.replica_sync_discovery) == "other/epp-replicas"
    assert parse_options([*base, bind]).replica_sync_discovery is None
    for bad in (
        [*base, "--replica-sync-discovery=epp-replicas"],  # nothing to bind
        [*base, bind, "--replica-sync-discovery=x", "--replica-sync-peers=tcp://1.2.3.4:9"],
        [*base, bind, "--replica-sync-discovery=Not_A_Name"],
        [*base, bind, "--replica-sync-discovery=a/b/c"],
        [*base, bind, "--replica-sync-discovery=ns/"],
        [*base, bind, "--replica-sync-discovery=ns\n/name"],
        [*base, bind, f"--replica-sync-discovery={'x' * 64}"],
    ):
        with pytest.raises(SystemExit):
            parse_options(bad)


async def test_the_picker_starts_discovery_from_its_flags(kube, tmp_path, monkeypatch):
    """build_picker with --replica-sync-discovery: the Kubernetes client from $KUBECONFIG,
    its own pod IP ($POD_IP) left out, its metrics registered; stop_picker stops it."""
    monkeypatch.setenv("KUBECONFIG", str(kube.write_kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("POD_IP", "127.0.0.1")
    pool = tmp_path / "pool.yaml"
    pool.write_text(pool_yaml([free_port()]))
    port = free_port()
    kube.put(endpoint_slice("epp", "127.0.0.1", "127.0.0.2", port=port))
    opts = parse_options(
        [
            "--pool-name=pool",
            "--provider=file",
            f"--pool-file={pool}",
            f"--kv-events-bind=tcp://127.0.0.1:{free_port()}",
            f"--replica-sync-bind=tcp://127.0.0.1:{port}",
            f"--replica-sync-discovery=default/{SERVICE}",
        ]
    )
    picker = await build_picker(opts)
    try:
        assert picker.replicas is not None and picker.peers is not None
        await wait_for_async(
            lambda: picker.replicas.peers == [f"tcp://127.0.0.2:{port}"], "the other replica"
        )
        value = picker.metrics.registry.get_sample_value("infergate_epp_replica_sync_peers")
        assert value == 1.0
    finally:
        await stop_picker(picker)
