"""epp/replica_sync.py: picker replicas tell each other their speculative KV entries over ZMQ;
a peer's add lands in the local index as a speculative entry of the same pod, and a bad
message (malformed, an unknown pod, too many keys or keys out of range) is counted, not applied."""

from __future__ import annotations

import asyncio

import msgspec

from infergw.epp.replica_sync import MAX_KEYS, ReplicaSync
from infergw.kvindex.cache import KVCache, Prompt
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.tokenize import PromptTokenizers
from infergw.stack.ports import free_port

POD = "10.0.0.1:8000"


def cache() -> KVCache:
    return KVCache(tokenizers=PromptTokenizers({}), index=KVBlockIndex(block_size=16))


def held(kv: KVCache, keys: list[int]) -> int:
    return kv.matched_blocks(Prompt(tokens=16 * len(keys), keys=keys), [POD]).get(POD, 0)


def sync_for(kv: KVCache, bind: str, peers: list[str]) -> ReplicaSync:
    sync = ReplicaSync(bind, peers, apply=kv.add_speculative_keys, is_member=lambda a: a == POD)
    kv.speculative_listeners.append(sync.publish)
    return sync


async def test_a_speculative_add_reaches_the_other_replicas_index():
    ends = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    a, b = cache(), cache()
    sync_a, sync_b = sync_for(a, ends[0], ends), sync_for(b, ends[1], ends)
    assert sync_a.peers == [ends[1]]  # its own endpoint is skipped
    sync_a.start()
    sync_b.start()
    try:
        keys = [11, 22, 33]
        # A SUB that has just connected misses what was sent before (ZMQ's slow joiner):
        # send until the peer has it.
        for _ in range(100):
            a.add_speculative(POD, Prompt(tokens=48, keys=keys))
            await asyncio.sleep(0.05)
            if held(b, keys) == 3:
                break
        assert held(b, keys) == 3
        assert sync_b.counts["applied"] >= 1 and sync_a.counts["published"] >= 1
        # Applied entries are not published again (no echo between replicas).
        published_by_b = sync_b.counts["published"]
        assert published_by_b == 0
    finally:
        await sync_a.close()
        await sync_b.close()


def test_bad_messages_are_counted_and_dropped():
    kv = cache()
    sync = sync_for(kv, "tcp://127.0.0.1:1", [])
    encode = msgspec.msgpack.encode
    sync.handle(b"\xc1not msgpack")
    sync.handle(encode({"pod": POD, "keys": [1]}))  # a map, not the array form
    sync.handle(encode([POD, ["1"]]))
    sync.handle(encode(["10.9.9.9:8000", [1, 2]]))
    sync.handle(encode([POD, []]))
    sync.handle(encode([POD, list(range(MAX_KEYS + 1))]))
    sync.handle(encode([POD, [-1]]))
    assert dict(sync.counts) == {"malformed": 3, "unknown_pod": 1, "bad_keys": 3}
    assert held(kv, [1, 2]) == 0
    sync.handle(encode([POD, [1, 2]]))
    assert sync.counts["applied"] == 1 and held(kv, [1, 2]) == 2


def test_nothing_is_published_before_start_or_for_an_empty_prompt():
    sync = sync_for(cache(), "tcp://127.0.0.1:1", [])
    sync.publish(POD, [1])
    sync.publish(POD, [])
    assert sync.counts["published"] == 0
