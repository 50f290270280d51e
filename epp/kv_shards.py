"""Which picker replica subscribes to which pod's KV events, with the shared index in Redis
(`--kv-index-backend redis --kv-index-redis-shard`).

Without it every replica subscribes to every pod and writes the same changes into Redis: N
replicas do N times the KV-event work (bench/pickers: the pickers' CPU per request grew 5×
from one picker to four on two cores). Sharded, each pod's events are ingested by exactly
one replica, its **owner**, and every replica reads the whole index from Redis.

Who owns a pod: epp/replica_members.py (rendezvous hashing over the live replicas, heard on
the replica sync).

Disagreement is safe in one direction: while two replicas' live sets differ (a heartbeat
lost, a replica just started) a pod may have two owners, which both write the same idempotent
bit ops (kvindex/redis_index.py). A pod with no owner — its owner died, until its heartbeat
expires — misses events for up to `liveness` seconds; the new owner subscribes with a replay
from sequence 0 (kvindex/subscriber.py), so what the pod's replay buffer still holds is
applied, idempotently, over what the old owner wrote. The replica that lets a pod go forgets
it locally (translator maps, local index) and leaves Redis alone (`release_pod`); a pod
leaving the pool is cleared in Redis as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from infergw.epp.replica_members import ReplicaMembers


class ShardedView(Protocol):
    """What KVShards drives (epp/kv_events.py's KVCacheView): whom it subscribes to."""

    owns: Callable[[str], bool]

    def sync_pods(self) -> None: ...


class KVShards:
    """Keeps this replica subscribed to the pods it owns: after every check of the live
    replicas `view` subscribes to what `members.owns` says (KVCacheView.owns)."""

    def __init__(self, view: ShardedView, members: ReplicaMembers) -> None:
        self.view = view
        self.members = members
        view.owns = members.owns
        members.listeners.append(view.sync_pods)

    def start(self) -> None:
        self.members.start()

    async def close(self) -> None:
        await self.members.close()
