"""epp/replica_sync.py: picker replicas tell each other their recent decisions over ZMQ. A
speculative KV entry one replica adds lands in the other's index for the same pod; what one
replica's approximate prefix scorer records, the other's scores; a bad record (malformed, an
unknown channel or pod, too many keys or keys out of range) is counted, not applied."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from infergw.epp.datastore import Endpoint
from infergw.epp.kv_events import KV_SPECULATIVE
from infergw.epp.replica_sync import MAX_KEYS, ReplicaSync
from infergw.epp.scheduling.framework import ProfileResult, SchedulingResult
from infergw.epp.scheduling.handle import Handle
from infergw.epp.scheduling.plugins.prefix_cache import PrefixCacheScorer
from infergw.kvindex.cache import KVCache, Prompt
from infergw.kvindex.dict_index import DictBlockIndex
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.tokenize import PromptTokenizers
from infergw.stack.ports import free_port
from tests.fuzzing import fuzz_settings
from tests.request_fixtures import bare_context

ALL = [Endpoint(name=f"{p}-rank-0", pod=p, address=f"10.0.0.{i}:8000") for i, p in enumerate("abc")]
A = ALL[0]
POD = A.address


def send(scorer: PrefixCacheScorer, prompt: str, target: Endpoint) -> None:
    """What the director does after scheduling: pre_request with the chosen endpoint."""
    ctx = bare_context(model="m", prompt_text=prompt)
    scorer.pre_request(ctx, SchedulingResult({"p": ProfileResult([target])}, "p"))


def scores(scorer: PrefixCacheScorer, prompt: str) -> list[float]:
    return scorer.score(bare_context(model="m", prompt_text=prompt), ALL)


def cache() -> KVCache:
    return KVCache(tokenizers=PromptTokenizers({}), index=KVBlockIndex(block_size=16))


def held(kv: KVCache, keys: list[int]) -> int:
    return kv.matched_blocks(Prompt(tokens=16 * len(keys), keys=keys), [POD]).get(POD, 0)


def pair() -> tuple[ReplicaSync, ReplicaSync]:
    ends = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    members = {e.address for e in ALL}
    return tuple(ReplicaSync(end, ends, is_member=members.__contains__) for end in ends)


async def until(done: Callable[[], bool], act: Callable[[], None]) -> None:
    """Act until done: a SUB that has just connected misses what was sent before (ZMQ's
    slow joiner), so the first records may be lost."""
    for _ in range(100):
        act()
        await asyncio.sleep(0.05)
        if done():
            return
    raise AssertionError("the peer never got the record")


async def test_a_speculative_add_reaches_the_other_replicas_index():
    sync_a, sync_b = pair()
    a, b = cache(), cache()
    for sync, kv in ((sync_a, a), (sync_b, b)):
        kv.speculative_listeners.append(sync.channel(KV_SPECULATIVE, kv.add_speculative_keys))
    assert sync_a.peers == [sync_b.bind]  # its own endpoint is skipped
    sync_a.start()
    sync_b.start()
    try:
        keys = [11, 22, 33]
        await until(lambda: held(b, keys) == 3, lambda: a.add_speculative(POD, Prompt(48, keys)))
        assert sync_b.counts["applied"] >= 1 and sync_a.counts["published"] >= 1
        assert sync_b.counts["published"] == 0  # applied records are not echoed back
    finally:
        await sync_a.close()
        await sync_b.close()


async def test_what_one_approximate_scorer_records_the_others_score():
    """Without it each replica learns its own map and a shared prefix spreads over pods."""
    sync_a, sync_b = pair()
    a = PrefixCacheScorer.create("prefix", {"blockSizeTokens": 1}, Handle(replicas=sync_a))
    b = PrefixCacheScorer.create("prefix", {"blockSizeTokens": 1}, Handle(replicas=sync_b))
    sync_a.start()
    sync_b.start()
    try:
        prompt = "the same long system prompt"
        assert scores(b, prompt) == [0.0, 0.0, 0.0]
        await until(lambda: scores(b, prompt)[0] == 1.0, lambda: send(a, prompt, A))
        assert scores(b, prompt) == [1.0, 0.0, 0.0]
    finally:
        await sync_a.close()
        await sync_b.close()


def test_a_lone_scorer_shares_nothing():
    lone = PrefixCacheScorer.create("prefix", {"blockSizeTokens": 1}, Handle())
    send(lone, "hello there", A)
    assert scores(lone, "hello there") == [1.0, 0.0, 0.0]


def test_bad_records_are_counted_and_dropped():
    kv = cache()
    sync = ReplicaSync("tcp://127.0.0.1:1", [], is_member=lambda a: a == POD)
    sync.channel("kv", kv.add_speculative_keys)
    encode = msgspec.msgpack.encode
    sync.handle(b"\xc1not msgpack")
    sync.handle(encode({"channel": "kv", "pod": POD, "keys": [1]}))  # a map, not the array
    sync.handle(encode(["kv", POD, ["1"]]))
    sync.handle(encode(["other", POD, [1]]))
    sync.handle(encode(["kv", "10.9.9.9:8000", [1, 2]]))
    sync.handle(encode(["kv", POD, []]))
    sync.handle(encode(["kv", POD, list(range(MAX_KEYS + 1))]))
    sync.handle(encode(["kv", POD, [-1]]))
    assert dict(sync.counts) == {
        "malformed": 3,
        "unknown_channel": 1,
        "unknown_pod": 1,
        "bad_keys": 3,
    }
    assert held(kv, [11, 12]) == 0
    sync.handle(encode(["kv", POD, [11, 12]]))
    assert sync.counts["applied"] == 1 and held(kv, [11, 12]) == 2


def test_a_channel_has_one_owner_and_nothing_is_published_before_start():
    sync = ReplicaSync("tcp://127.0.0.1:1", [], is_member=lambda a: True)
    share = sync.channel("kv", lambda pod, keys: None)
    try:
        sync.channel("kv", lambda pod, keys: None)
    except ValueError:
        pass
    else:
        raise AssertionError("a second owner of a channel was accepted")
    share(POD, [1])
    share(POD, [])
    assert sync.counts["published"] == 0


# A peer's frame: random bytes, or msgpack of anything near a record's shape.
# What msgpack can carry: any int from -2**63 to 2**64 - 1.
_KEY = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([0, 1, 2**64 - 1, -1]))
_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), _KEY, st.text(max_size=20), st.binary(max_size=20)),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=20,
)
_RECORDISH = st.tuples(
    st.sampled_from(["kv", "other", ""]) | st.text(max_size=5),
    st.sampled_from([POD, "10.9.9.9:8000"]) | st.text(max_size=10),
    st.lists(_KEY, max_size=40) | _VALUE,
).map(list)
_FRAME = st.binary(max_size=200) | _RECORDISH.map(msgspec.msgpack.encode)
_FRAME = _FRAME | _VALUE.map(msgspec.msgpack.encode)


@pytest.mark.fuzz
@pytest.mark.parametrize("layout", [KVBlockIndex, DictBlockIndex])
@fuzz_settings(300)
@given(frames=st.lists(_FRAME, max_size=20))
def test_any_peer_frame_is_applied_or_counted_never_raised(layout, frames):
    index = layout(block_size=16)
    kv = KVCache(tokenizers=PromptTokenizers({}), index=index)
    sync = ReplicaSync("tcp://127.0.0.1:1", [], is_member=lambda a: a == POD)
    sync.channel("kv", kv.add_speculative_keys)
    for frame in frames:
        sync.handle(frame)  # never raises: the receive loop must outlive any peer
    assert sum(sync.counts.values()) == len(frames)
    assert all(0 <= k < 2**64 for k in index.keys_of(POD))
