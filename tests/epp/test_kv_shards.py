"""epp/kv_shards.py: each pod's KV events go to one replica, chosen alike by every replica
from the live set; a replica that leaves moves only its own pods; heartbeats are believed only
from the replicas the sync follows; a view subscribes to its shard and lets the rest go."""

from __future__ import annotations

from collections import Counter

import msgspec

from infergw.epp.kv_shards import KVShards
from infergw.epp.replica_members import (
    HEARTBEAT_CHANNEL,
    LiveReplicas,
    ReplicaMembers,
    canonical,
    owner,
)
from infergw.epp.replica_sync import Record, ReplicaSync

REPLICAS = [f"tcp://10.0.0.{i}:9004" for i in range(1, 5)]
PODS = [f"10.1.{i // 250}.{i % 250}:8000" for i in range(1000)]


def test_every_replica_computes_the_same_owner_and_the_pods_spread_evenly():
    shuffled = list(reversed(REPLICAS))
    owners = {pod: owner(pod, REPLICAS) for pod in PODS}
    assert all(owner(pod, shuffled) == o for pod, o in owners.items())  # order does not matter
    counts = Counter(owners.values())
    assert set(counts) == set(REPLICAS)
    assert all(200 <= n <= 300 for n in counts.values()), counts  # 250 each, give or take


def test_a_replica_leaving_moves_its_own_pods_only():
    before = {pod: owner(pod, REPLICAS) for pod in PODS}
    gone = REPLICAS[1]
    after = {pod: owner(pod, [r for r in REPLICAS if r != gone]) for pod in PODS}
    moved = {pod for pod in PODS if before[pod] != after[pod]}
    assert moved == {pod for pod in PODS if before[pod] == gone}
    joined = {pod: owner(pod, [*REPLICAS, "tcp://10.0.0.9:9004"]) for pod in PODS}
    assert all(joined[p] in (before[p], "tcp://10.0.0.9:9004") for p in PODS)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_live_replicas_are_the_followed_peers_heard_recently():
    clock, followed = Clock(), [REPLICAS[1], REPLICAS[2]]
    live = LiveReplicas(REPLICAS[0], lambda: followed, liveness=2.0, clock=clock)
    assert live.members() == [REPLICAS[0]]
    live.heard(REPLICAS[1])
    live.heard(REPLICAS[3])  # not followed: a forged or stray heartbeat
    live.heard(REPLICAS[0])  # our own
    assert live.members() == REPLICAS[:2] and live.ignored == 1
    clock.now += 1.5
    live.heard(REPLICAS[2])
    assert live.members() == REPLICAS[:3]
    clock.now += 1.0  # REPLICAS[1] unheard for 2.5 s: gone
    assert live.members() == [REPLICAS[0], REPLICAS[2]]
    live.heard(REPLICAS[1])
    followed.remove(REPLICAS[1])  # discovery dropped it: gone at once
    assert live.members() == [REPLICAS[0], REPLICAS[2]]


def test_heartbeats_name_replicas_not_pods_and_are_counted_apart():
    sync = ReplicaSync(REPLICAS[0], REPLICAS[1:], is_member=lambda pod: False)
    view = FakeView()
    members = ReplicaMembers(sync)
    KVShards(view, members)
    frame = msgspec.msgpack.encode(Record(HEARTBEAT_CHANNEL, REPLICAS[2], [1]))
    sync.handle(frame)
    assert sync.counts["heard"] == 1 and sync.counts["unknown_pod"] == 0
    assert sync.counts["applied"] == 0  # not a routing decision
    members.check()
    assert members.members == [REPLICAS[0], REPLICAS[2]]
    assert view.subscribed == {p for p in view.pods if owner(p, members.members) == REPLICAS[0]}


class FakeView:
    """A view's side of sharding: what it is subscribed to, recomputed on sync_pods."""

    def __init__(self, pods: list[str] = PODS[:40]) -> None:
        self.pods = pods
        self.subscribed: set[str] = set()
        self.owns = lambda _pod: True

    def sync_pods(self) -> None:
        self.subscribed = {p for p in self.pods if self.owns(p)}


def test_views_of_two_replicas_split_the_pods_and_one_takes_all_when_the_other_is_gone():
    clock = Clock()
    views, shards = [FakeView(), FakeView()], []
    for i, me in enumerate(REPLICAS[:2]):
        s = ReplicaMembers(None)
        s.live = LiveReplicas(me, lambda me=me: [r for r in REPLICAS[:2] if r != me], clock=clock)
        KVShards(views[i], s)
        shards.append(s)
    assert views[0].owns(PODS[0]) is False  # nothing is ours before the first check
    for s, other in zip(shards, reversed(REPLICAS[:2]), strict=True):
        s.live.heard(other)
        s.check()
    a, b = views[0].subscribed, views[1].subscribed
    assert a and b and not a & b and a | b == set(PODS[:40])
    clock.now += 3.0  # replica 0 no longer hears replica 1 (dead, or its heartbeats lost)
    shards[1].live.heard(REPLICAS[0])
    for s in shards:
        s.check()
    assert views[0].subscribed == set(PODS[:40])  # takes replica 1's pods over
    # Replica 1, if alive, keeps its own: two subscribers for a while, never none.
    assert views[1].subscribed == b


def test_a_replica_is_named_alike_whether_its_ipv6_address_is_bracketed_or_not():
    assert canonical("tcp://fd00::7:9004") == canonical("tcp://[fd00::7]:9004")
    assert canonical("tcp://fd00::7:9004") == "tcp://[fd00::7]:9004"
    assert canonical("tcp://10.0.0.7:9004") == "tcp://10.0.0.7:9004"
    assert canonical("tcp://*:9004") == "tcp://*:9004"
    live = LiveReplicas("tcp://fd00::7:9004", lambda: ["tcp://[fd00::8]:9004"])
    live.heard("tcp://fd00::8:9004")
    assert live.members() == ["tcp://[fd00::7]:9004", "tcp://[fd00::8]:9004"]
