"""The KV-event subscriber over real ZMQ sockets, fed by real simulator processes."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict

import pytest
import requests
import zmq

from infergw.kvindex.events import BlockRemoved, BlockStored, decode_replay_frames
from infergw.kvindex.subscriber import KVEventSubscriber, apply_each
from tests.conftest import free_port, running, simulator_cmd

pytestmark = pytest.mark.slow


class StoredSet:
    """The simplest faithful sink: which engine block hashes each pod holds."""

    def __init__(self) -> None:
        self.held: dict[str, set[int]] = defaultdict(set)
        self.models: set[str] = set()

    def apply(self, pod, model, event) -> None:
        self.models.add(model)
        if isinstance(event, BlockStored):
            self.held[pod].update(event.block_hashes)
        elif isinstance(event, BlockRemoved):
            self.held[pod].difference_update(event.block_hashes)

    def clear_pod(self, pod) -> None:
        self.held.pop(pod, None)

    def apply_events(self, pod, model, events) -> int:
        return apply_each(self, pod, model, events)


def held_per_replay(replay_endpoint: str) -> set[int]:
    """What a pod holds, rebuilt from scratch from its whole replay buffer."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(replay_endpoint)
    dealer.send_multipart([b"", (0).to_bytes(8, "big")])
    sink = StoredSet()
    try:
        while dealer.poll(5000):
            msg = decode_replay_frames(dealer.recv_multipart())
            if msg is None:
                return sink.held["p"]
            for ev in msg.batch.events:
                sink.apply("p", "", ev)
        raise TimeoutError("replay did not end")
    finally:
        dealer.close(0)
        ctx.term()


class Pod:
    def __init__(self, tmp_path, central: str | None, per_pod: bool = False, topic=None):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.replay = f"tcp://127.0.0.1:{free_port()}"
        self.pub = f"ipc://{tmp_path}/pub-{self.port}.sock" if per_pod else central
        self.cfg = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": self.pub,
            "replay_endpoint": self.replay,
            "topic": f"kv@{self.address}@tiny" if topic is None else topic,
        }
        self.cm = None

    def start(self):
        self.cm = running(
            simulator_cmd(
                self.port,
                "--block-size",
                "16",
                "--num-gpu-blocks-override",
                "40",
                "--kv-events-config",
                json.dumps(self.cfg),
                "--sim-time-scale",
                "0",
            ),
            ready_url=f"http://{self.address}/health",
        )
        self.cm.__enter__()
        return self

    def stop(self):
        if self.cm:
            self.cm.__exit__(None, None, None)
            self.cm = None

    def send(self, i: int, words: int = 60) -> None:
        r = requests.post(
            f"http://{self.address}/v1/completions",
            timeout=30,
            json={
                "prompt": f"prompt {i} " + " ".join(f"w{i}x{j}" for j in range(words)),
                "max_tokens": 2,
            },
        )
        r.raise_for_status()


async def settle(sub: KVEventSubscriber, pods, sink, within: float = 10.0) -> None:
    """Wait until the sink agrees with every pod's own replay buffer."""
    deadline = time.monotonic() + within
    while True:
        want = {p.address: held_per_replay(p.replay) for p in pods}
        got = {p.address: sink.held.get(p.address, set()) for p in pods}
        if want == got:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"index never matched the pods: counts={dict(sub.counts)}")
        await asyncio.sleep(0.2)


@pytest.fixture
async def central(tmp_path):
    sink = StoredSet()
    replay_of = {}
    sub = KVEventSubscriber(sink, replay_endpoint_for=replay_of.get)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sub.bind(endpoint)
    pods = [Pod(tmp_path, endpoint) for _ in range(2)]
    for p in pods:
        replay_of[p.address] = p.replay
        p.start()
    await asyncio.sleep(0.3)  # the PUBs connect; what is lost before that, replay repairs
    yield sub, sink, pods
    for p in pods:
        p.stop()
    await sub.close()


async def test_central_mode_mirrors_every_pod(central):
    sub, sink, pods = central
    for i in range(6):  # enough to evict in a 40-block cache
        for p in pods:
            await asyncio.to_thread(p.send, i)
    await settle(sub, pods, sink)
    assert sub.counts["events"] > 0 and sub.dropped["malformed"] == 0


async def test_dropped_messages_are_repaired_from_replay(central):
    sub, sink, pods = central
    await asyncio.to_thread(pods[0].send, 0)
    await settle(sub, pods, sink)
    sub.drop_next(3)
    for i in range(1, 6):
        await asyncio.to_thread(pods[0].send, i)
    await settle(sub, pods, sink)
    assert sub.counts["dropped_by_test_hook"] == 3
    assert sub.counts["gaps"] >= 1 and sub.counts["replays"] >= 1


async def test_a_restarted_engine_loses_its_old_entries(central):
    sub, sink, pods = central
    for i in range(3):
        await asyncio.to_thread(pods[0].send, i)
    await settle(sub, pods, sink)
    old = set(sink.held[pods[0].address])
    pods[0].stop()
    pods[0].start()  # same address and topic, sequence numbers start again at 0
    await asyncio.sleep(0.3)
    for i in range(100, 103):
        await asyncio.to_thread(pods[0].send, i)
    await settle(sub, pods, sink)
    assert sub.counts["restarts"] >= 1
    assert not old & sink.held[pods[0].address]


async def test_per_pod_mode_catches_up_on_connect(tmp_path):
    sink = StoredSet()
    sub = KVEventSubscriber(sink)
    pod = Pod(tmp_path, None, per_pod=True).start()
    try:
        for i in range(3):  # before anyone listens: only the replay has these
            await asyncio.to_thread(pod.send, i)
        sub.connect_pod(pod.address, pod.pub, pod.replay)
        await settle(sub, [pod], sink)
        for i in range(3, 6):
            await asyncio.to_thread(pod.send, i)
        await settle(sub, [pod], sink)
        sub.forget_pod(pod.address)
        assert pod.address not in sink.held
    finally:
        pod.stop()
        await sub.close()


async def test_per_pod_mode_takes_vllms_default_empty_topic(tmp_path):
    """vLLM publishes with topic "" unless told otherwise: per pod, the socket names the pod
    and the pod's served model names the blocks' model, live and replayed."""
    sink = StoredSet()
    sub = KVEventSubscriber(sink, model_for=lambda pod: "served-model")
    pod = Pod(tmp_path, None, per_pod=True, topic="").start()
    try:
        await asyncio.to_thread(pod.send, 0)  # only in the replay
        sub.connect_pod(pod.address, pod.pub, pod.replay)
        await settle(sub, [pod], sink)
        await asyncio.to_thread(pod.send, 1)  # live
        await settle(sub, [pod], sink)
        assert sink.models == {"served-model"} and sub.dropped["malformed"] == 0
    finally:
        pod.stop()
        await sub.close()


async def test_an_empty_topic_without_a_known_model_is_skipped_and_counted(tmp_path):
    sink = StoredSet()
    sub = KVEventSubscriber(sink)  # nothing says what the pod serves
    pod = Pod(tmp_path, None, per_pod=True, topic="").start()
    try:
        sub.connect_pod(pod.address, pod.pub, None)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(pod.send, 0)
        deadline = time.monotonic() + 5
        while sub.dropped["no_model"] == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sub.dropped["no_model"] >= 1 and not sink.held
    finally:
        pod.stop()
        await sub.close()


async def test_malformed_messages_are_counted_not_fatal(tmp_path):
    sink = StoredSet()
    sub = KVEventSubscriber(sink)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sub.bind(endpoint)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.connect(endpoint)
    try:
        await asyncio.sleep(0.3)
        # Topics naming the publisher's own address: an outsider's (another address) is
        # refused before its payload is read, as peer_mismatch.
        for frames in (
            [b"kv@127.0.0.1:80@m", b"short", b"x"],
            [b"kv@127.0.0.1:80@m", (0).to_bytes(8, "big"), b"\xc1garbage"],
            [b"kv@no-model", (0).to_bytes(8, "big"), b"\x93\x00\x90\x00"],
        ):
            pub.send_multipart(frames)
        deadline = time.monotonic() + 5
        while sub.dropped["malformed"] < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert sub.dropped["malformed"] == 3 and sub.counts["received"] == 3
    finally:
        pub.close(0)
        ctx.term()
        await sub.close()
