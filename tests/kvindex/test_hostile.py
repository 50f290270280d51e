"""Hostile KV events over real ZMQ: a bad message costs that message only, outsiders cannot
touch a pod's entries, and the index's counters and tables stay bounded (issue 12)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import zmq
import zmq.asyncio

from infergw.kvindex import subscriber as subscriber_module
from infergw.kvindex.events import BlockRemoved, BlockStored, KVEventDecodeError, decode_message
from infergw.kvindex.index import MAX_INTERNED_SLOTS, KVBlockIndex
from infergw.kvindex.subscriber import KVEventSubscriber
from infergw.kvindex.translate import MAX_KEYS_PER_HASH, EventTranslator
from tests.conftest import free_port
from tests.kv_wire import (
    RECORDED_MODEL,
    central_pubs,
    recorded_frames,
    sourced_pub,
    until,
    wait_heard,
)

POD = "127.0.0.2:8000"  # publishes from 127.0.0.2, as a pod on its own address does
OTHER = "127.0.0.3:8000"  # another pod of the pool
TOPIC = f"kv@{POD}@{RECORDED_MODEL}".encode()
REPLAY_END = (2**64 - 1).to_bytes(8, "big")


def reference_index(frames: list[list[bytes]]) -> KVBlockIndex:
    """What the index holds after these messages, applied directly."""
    idx = KVBlockIndex(max_entries=100_000)
    sink = EventTranslator(idx)
    for f in frames:
        msg = decode_message(f)
        for event in msg.batch.events:
            sink.apply(POD, RECORDED_MODEL, event)
    return idx


_NEST = "@nested@"


def poisoned(frames: list[bytes], nest: int = 0, **fields) -> list[bytes]:
    """The message with its BlockStored's fields replaced; the string _NEST in them becomes
    a list nested `nest` deep (spliced as bytes: encoding it would hit the recursion limit)."""
    ts, events, rank = msgspec.msgpack.decode(frames[2])
    stored = next(e for e in events if e["type"] == "BlockStored")
    stored.update(fields)
    payload = msgspec.msgpack.encode([ts, events, rank])
    payload = payload.replace(msgspec.msgpack.encode(_NEST), b"\x91" * nest + b"\xc0")
    return [frames[0], frames[1], payload]


def poisons(frames: list[bytes]) -> list[list[bytes]]:
    """The two messages that ended the receive task on main, and kin."""
    n_tokens = len(msgspec.msgpack.decode(frames[2])[1][0]["token_ids"])
    return [
        poisoned(frames, token_ids=[2**64 - 1] + [1] * (n_tokens - 1)),  # numpy → float64
        poisoned(frames, 950, extra_keys=[_NEST]),  # RecursionError in _freeze
        poisoned(frames, token_ids=[-1] * n_tokens),
        poisoned(frames, 100, extra_keys=[{"a": _NEST}]),
    ]


@pytest.mark.parametrize("which", range(4))
def test_poison_values_are_malformed_at_decode(which):
    bad = poisons(recorded_frames(TOPIC)[0])[which]
    with pytest.raises(KVEventDecodeError, match=r"BlockStored\.(token_ids|extra_keys)"):
        decode_message(bad)


@pytest.fixture
async def central():
    index = KVBlockIndex(max_entries=100_000)
    members = {POD, OTHER}
    replay_of: dict[str, str] = {}
    sub = KVEventSubscriber(
        EventTranslator(index), is_member=members.__contains__, replay_endpoint_for=replay_of.get
    )
    async with central_pubs(sub, {POD: "127.0.0.2", OTHER: "127.0.0.3"}) as pods:
        yield sub, index, pods, replay_of


async def test_poison_messages_cost_one_message_not_the_central_loop(central):
    sub, index, pods, _ = central
    recorded = recorded_frames(TOPIC)
    for bad in poisons(recorded[0]):
        pods[POD].send_multipart(bad)
    for frames in recorded:
        pods[POD].send_multipart(frames)
    want = reference_index(recorded).keys_of(POD)
    await until(lambda: index.keys_of(POD) == want, "the valid messages after the poison applied")
    assert sub.dropped["malformed"] == 4


async def test_a_failing_index_costs_one_event_not_the_loop(central):
    sub, index, pods, _ = central

    def broken(pod, model, event):
        raise RuntimeError("a bug in the index")

    index_apply, sub.sink.apply = sub.sink.apply, broken
    pods[POD].send_multipart(recorded_frames(TOPIC)[0])
    await until(lambda: sub.counts["rejected_by_index"] == 1, "the event rejected")
    sub.sink.apply = index_apply
    recorded = recorded_frames(TOPIC)
    for frames in recorded[1:]:
        pods[POD].send_multipart(frames)
    await until(lambda: sub.counts["events"] > 0 and index.keys_of(POD), "later events applied")


async def test_topics_of_pods_outside_the_pool_allocate_nothing(central):
    sub, index, pods, _ = central
    for i, frames in enumerate(recorded_frames(b"kv@10.9.9.9:8000@tiny")):
        pods[POD].send_multipart(frames)
        pods[POD].send_multipart([f"kv@10.9.{i}.1:80@m".encode(), *frames[1:]])
    await until(lambda: sub.dropped["unknown_pod"] == 36, "every outsider's message dropped")
    assert index.stats()["pods"] == 0 and not sub._pods


async def test_forged_sequence_numbers_cannot_flush_a_pod(central):
    sub, index, pods, _ = central
    recorded = recorded_frames(TOPIC)
    for frames in recorded:
        pods[POD].send_multipart(frames)
    want = reference_index(recorded).keys_of(POD)
    await until(lambda: index.keys_of(POD) == want, "the pod's own messages applied")
    # Another member (or anyone) claims POD restarted: seq 0 again, and a cleared cache.
    forged = [TOPIC, (0).to_bytes(8, "big"), msgspec.msgpack.encode([0.0, [["AllBlocksCleared"]]])]
    pods[OTHER].send_multipart(forged)
    pods[OTHER].send_multipart([TOPIC, *recorded[0][1:]])
    own_topic = f"kv@{OTHER}@{RECORDED_MODEL}".encode()
    pods[OTHER].send_multipart([own_topic, *recorded[0][1:]])  # its own message: applied
    await until(lambda: index.keys_of(OTHER), "the other pod's own message applied")
    assert sub.dropped["peer_mismatch"] == 2 and sub.counts["restarts"] == 0
    assert index.keys_of(POD) == want


async def _serve_replay(router: zmq.asyncio.Socket, replies: list[list[bytes]]) -> None:
    while True:
        identity, *_ = await router.recv_multipart()
        for frames in replies:
            await router.send_multipart([identity, *frames])


async def test_poison_in_a_replay_costs_one_message_not_the_replay(central):
    sub, index, pods, replay_of = central
    recorded = recorded_frames(TOPIC)
    replies = [
        [b"", *poisons(recorded[0])[0]],
        [b"", *poisons(recorded[0])[1]],
        [b"", b"not a seq", b"x"],
        [b"", TOPIC, (0).to_bytes(8, "big"), b"\xc1"],
        *([b"", *frames] for frames in recorded[:5]),
        [b"", b"", REPLAY_END, b""],
    ]
    actx = zmq.asyncio.Context()
    router = actx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    replay_of[POD] = f"tcp://127.0.0.1:{port}"
    server = asyncio.create_task(_serve_replay(router, replies))
    try:
        for frames in recorded[5:]:  # first seen mid-stream: replayed from 0 first
            pods[POD].send_multipart(frames)
        want = reference_index(recorded).keys_of(POD)
        await until(lambda: index.keys_of(POD) == want, "the replay and the live stream applied")
        assert sub.dropped["malformed"] == 4 and sub.counts["replays"] == 1
    finally:
        server.cancel()
        router.close(0)
        actx.term()


async def test_live_messages_held_during_a_replay_are_bounded(central, monkeypatch):
    sub, _, pods, replay_of = central
    monkeypatch.setattr(subscriber_module, "MAX_BUFFERED", 5)
    actx = zmq.asyncio.Context()
    router = actx.socket(zmq.ROUTER)  # a replay socket that never answers
    router.setsockopt(zmq.LINGER, 0)
    replay_of[POD] = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    try:
        for frames in recorded_frames(TOPIC)[5:]:  # mid-stream: a replay starts, 13 arrive
            pods[POD].send_multipart(frames)
        await until(lambda: sub.dropped["replay_buffer_full"] == 8, "the overflow dropped")
        assert len(sub._pods[POD].buffered) == 5
    finally:
        router.close(0)
        actx.term()


async def test_poison_on_a_per_pod_socket_costs_one_message():
    index = KVBlockIndex(max_entries=100_000)
    sub = KVEventSubscriber(EventTranslator(index))
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub.connect_pod(POD, f"tcp://127.0.0.1:{port}", None)
    try:
        await wait_heard(sub, pub)
        recorded = recorded_frames(TOPIC)
        for bad in poisons(recorded[0]):
            pub.send_multipart(bad)
        for frames in recorded:
            pub.send_multipart(frames)
        want = reference_index(recorded).keys_of(POD)
        await until(lambda: index.keys_of(POD) == want, "the valid messages after the poison")
        assert sub.dropped["malformed"] == 4
    finally:
        pub.close(0)
        ctx.term()
        await sub.close()


async def test_a_receive_loop_that_fails_is_restarted(monkeypatch):
    monkeypatch.setattr(subscriber_module, "RESTART_DELAY_S", 0.0)
    sub = KVEventSubscriber(EventTranslator(KVBlockIndex()))
    runs = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise zmq.ZMQError(zmq.EFSM)

    await sub._supervise("a flaky loop", flaky)
    assert len(runs) == 3 and sub.counts["task_restarts"] == 2
    await sub.close()


# --- the index's own bounds


def test_a_block_stored_2_pow_20_times_stays_on_gpu():
    index = KVBlockIndex(block_size=4, max_entries=1000)
    sink = EventTranslator(index)
    sink.apply(POD, "m", BlockStored((7,), None, (1, 2, 3, 4), 4))
    # A CPU-offload-shaped store (no tokens) repeating one hash: 2**20 more GPU copies.
    sink.apply(POD, "m", BlockStored((7,) * 2**20, None, (), 4))
    assert index.keys_of(POD, "cpu") == set()
    assert len(index.keys_of(POD, "gpu")) == 1
    sink.apply(POD, "m", BlockRemoved((7,)))  # one copy fewer: still held
    assert len(index.keys_of(POD, "gpu")) == 1


def test_the_slot_table_stays_bounded_however_often_a_block_is_stored():
    index = KVBlockIndex(block_size=4, max_entries=1000)
    sink = EventTranslator(index)
    sink.apply(POD, "m", BlockStored((7,), None, (1, 2, 3, 4), 4))
    before = index.memory_bytes()
    again = BlockStored((7,), None, (), 4)  # one more copy: a new slot value each time
    for _ in range(2 * MAX_INTERNED_SLOTS):
        sink.apply(POD, "m", again)
    # ~70 bytes per interned slot; unbounded, 2 * MAX_INTERNED_SLOTS of them would be held.
    assert index.memory_bytes() - before < 100 * MAX_INTERNED_SLOTS


def test_one_engine_hash_reused_for_many_blocks_maps_to_a_bounded_number_of_keys():
    for layout in ("dict", "packed"):
        index = KVBlockIndex(block_size=4, max_entries=10_000)
        sink = EventTranslator(index, layout)
        for i in range(MAX_KEYS_PER_HASH * 4):
            sink.apply(POD, "m", BlockStored((7,), None, (i, 1, 2, 3), 4))
        assert sink.stats()["engine_hashes"] == 1
        held = len(index.keys_of(POD))
        # The hash names the newest MAX_KEYS_PER_HASH keys only: its removal drops those.
        sink.apply(POD, "m", BlockRemoved((7,)))
        assert held - len(index.keys_of(POD)) == MAX_KEYS_PER_HASH, layout
        assert sink.stats()["engine_hashes"] == 0


async def test_the_picker_exports_drops_by_reason_and_drops_pods_outside_its_pool():
    from prometheus_client import CollectorRegistry, generate_latest

    from infergw.epp.datastore import Datastore
    from infergw.epp.kv_events import KVCacheView, KVEventOptions

    registry = CollectorRegistry()
    port = free_port()
    view = KVCacheView(Datastore(), KVEventOptions(bind=f"tcp://127.0.0.1:{port}"), registry)
    registry.register(view)
    view.start()
    ctx = zmq.Context()
    pub = sourced_pub(ctx, "127.0.0.2", port)
    try:
        await wait_heard(view.subscriber, pub)
        pub.send_multipart(recorded_frames(TOPIC)[0])  # the pool is empty: not a member
        await until(lambda: view.subscriber.dropped["unknown_pod"] == 1, "the outsider dropped")
        text = generate_latest(registry).decode()
        assert 'infergate_kvindex_dropped_messages_total{reason="unknown_pod"} 1.0' in text
        assert view.translator.stats()["pods"] == 0
    finally:
        pub.close(0)
        ctx.term()
        await view.close()


async def test_a_gap_the_replay_cannot_fill_is_replayed_once(central):
    # A batch numbered past anything the pod's replay holds (a forged or corrupt seq, or
    # batches its buffer already lost): after one replay it is applied as it is. It used to
    # come back out of the replay's buffer as a gap again and start another replay, for ever:
    # thousands a second against the pod's replay socket.
    sub, index, pods, replay_of = central
    recorded = recorded_frames(TOPIC)
    actx = zmq.asyncio.Context()
    router = actx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    replay_of[POD] = f"tcp://127.0.0.1:{port}"
    server = asyncio.create_task(_serve_replay(router, [[b"", b"", REPLAY_END, b""]]))
    try:
        pods[POD].send_multipart(recorded[0])
        last_seq = lambda: getattr(sub._pods.get(POD), "last_seq", None)  # noqa: E731
        await until(lambda: last_seq() == 0, "the first batch applied")
        far = [TOPIC, (1_000_000).to_bytes(8, "big"), recorded[1][2]]
        pods[POD].send_multipart(far)
        want = reference_index([recorded[0], recorded[1]]).keys_of(POD)
        await until(lambda: last_seq() == 1_000_000, "the far batch applied")
        assert index.keys_of(POD) == want
        assert sub.counts["replays"] == 1
    finally:
        server.cancel()
        router.close(0)
        actx.term()
