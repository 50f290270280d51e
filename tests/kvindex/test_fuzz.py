"""Fuzz: ≥ 20k KV messages mutated from the recorded real vLLM events, through a real ZMQ
PUB into the central subscriber and the index (issue 12, "Prove it").

Each hypothesis example sends a storm of mutated messages (bit flips, truncation, type swaps,
huge ints, deep nesting, poison token ids, wrong frame counts, wrong topics and sequence
numbers) from one pod's address, then a sentinel message. After each storm:
- the subscriber is alive: the sentinel, sent last, is applied;
- the storm pod's entries equal a reference: a fresh index fed directly the messages that
  decode, under the subscriber's documented sequence rules (without a replay socket: a gap is
  applied, a backwards number clears the pod first);
- a victim pod loaded from the recording before any storm is untouched, though the storm
  forges its topic with every sequence number (they come from another address);
- the index's counters agree with what it holds.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.subscriber import KVEventSubscriber
from infergw.kvindex.translate import EventTranslator
from tests.conftest import free_port
from tests.fuzzing import examples, fuzz_settings
from tests.kv_invariants import check_index_consistent
from tests.kv_storms import (
    EXAMPLES,
    MESSAGES_PER_EXAMPLE,
    RECORDED,
    SENTINEL,
    STORM,
    VICTIM,
    Reference,
    storm,
    topic,
)
from tests.kv_wire import recorded_frames, sourced_pub, until, wait_heard

pytestmark = pytest.mark.fuzz


@pytest.fixture(scope="module")
def rig():
    loop = asyncio.new_event_loop()
    index = KVBlockIndex(max_entries=10_000_000)
    members = {VICTIM, STORM, SENTINEL}
    # clear_every=0: the reference clears at once (pacing: test_engine_keys_hostile.py)
    translator = EventTranslator(index, clear_every=0)
    sub = KVEventSubscriber(translator, is_member=members.__contains__)
    ctx = zmq.Context()
    port = free_port()

    async def start():
        sub.bind(f"tcp://127.0.0.1:{port}")
        victim = sourced_pub(ctx, "127.0.0.2", port)
        storm_pub = sourced_pub(ctx, "127.0.0.3", port)
        await wait_heard(sub, victim)
        await wait_heard(sub, storm_pub)
        for frames in recorded_frames(topic(VICTIM)):
            victim.send_multipart(frames)
        return victim, storm_pub

    victim, storm_pub = loop.run_until_complete(start())
    victim_ref = Reference()
    for frames in recorded_frames(topic(STORM)):
        victim_ref.feed(frames)  # the same blocks, keyed alike
    want_victim = victim_ref.index.keys_of(STORM)
    loop.run_until_complete(until(lambda: index.keys_of(VICTIM) == want_victim, "victim loaded"))
    state = {"seq": [0], "sentinel": 0, "ref": Reference()}
    yield loop, sub, index, storm_pub, want_victim, state
    victim.close(0)
    storm_pub.close(0)
    ctx.term()
    loop.run_until_complete(sub.close())
    loop.close()


@fuzz_settings(EXAMPLES)
@given(seed=st.integers(0, 2**64))  # a seed, not a stream of draws: 500 messages per example
def test_a_storm_of_mutated_messages_leaves_the_subscriber_alive_and_the_index_right(rig, seed):
    loop, sub, index, storm_pub, want_victim, state = rig
    rnd = random.Random(seed)
    ref: Reference = state["ref"]
    for frames in storm(rnd, state["seq"]):
        storm_pub.send_multipart(frames)
        ref.feed(frames)
    n = state["sentinel"]
    state["sentinel"] += 1
    storm_pub.send_multipart([topic(SENTINEL), n.to_bytes(8, "big"), RECORDED[n % 18][2]])
    sentinel_seen = lambda: getattr(sub._pods.get(SENTINEL), "last_seq", None) == n  # noqa: E731
    loop.run_until_complete(until(sentinel_seen, "the sentinel after the storm applied", 60))
    for tier in ("gpu", "cpu"):
        assert index.keys_of(STORM, tier) == ref.index.keys_of(STORM, tier)
    assert index.keys_of(VICTIM) == want_victim
    check_index_consistent(index)


def test_the_normal_run_reaches_20k_messages():
    assert examples(EXAMPLES) * MESSAGES_PER_EXAMPLE >= 20_000
