"""The simulator's KV events over real ZMQ sockets, checked against a real vLLM's recording."""

from __future__ import annotations

import base64
import json

import msgspec
import pytest
import requests
import zmq

from infergw.kvindex.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    decode_batch,
    decode_replay_frames,
    parse_topic,
)
from tests.kv_invariants import check_event_stream
from tests.kv_subscriber import TOPIC, Subscriber, start_tiny
from tests.paths import TINY


def fixture_requests() -> list[dict]:
    return [json.loads(line) for line in (TINY / "requests.jsonl").read_text().splitlines()]


def fixture_batches() -> list[EventBatch]:
    lines = (TINY / "events.jsonl").read_text().splitlines()
    return [decode_batch(base64.b64decode(json.loads(line)["payload_b64"])) for line in lines]


def replay(port: int, start: int = 0, timeout: float = 5.0):
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send_multipart([b"", start.to_bytes(8, "big")])
    out = []
    try:
        while True:
            if not dealer.poll(int(timeout * 1000)):
                raise TimeoutError("replay socket went quiet before the end marker")
            msg = decode_replay_frames(dealer.recv_multipart())
            if msg is None:
                return out
            out.append(msg)
    finally:
        dealer.close(0)
        ctx.term()


@pytest.fixture
def subscriber():
    s = Subscriber()
    yield s
    s.close()


def canonical(batches: list[EventBatch]) -> list[tuple]:
    """Events with engine hashes replaced by store order, so two engines' streams compare.

    Blocks that generated tokens completed differ in their last tokens (our output is
    synthetic), so a chained store keeps its block count but not its token ids.
    """
    label: dict[int, int] = {}
    out = []
    for batch in batches:
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                parent = None if ev.parent_block_hash is None else label[ev.parent_block_hash]
                for h in ev.block_hashes:
                    label[h] = len(label)
                tokens = ev.token_ids if parent is None else len(ev.token_ids)
                out.append(("stored", parent, tokens, ev.block_size))
            elif isinstance(ev, BlockRemoved):
                out.extend(("removed", label[h]) for h in ev.block_hashes)
            else:
                out.append(("cleared",))
    return out


@pytest.mark.slow
def test_same_event_stream_as_real_vllm(sim_factory, subscriber):
    """Replaying the recorded requests gives vLLM's stores, parents and eviction order."""
    url, replay_port = start_tiny(sim_factory, subscriber)
    for req in fixture_requests():
        r = requests.post(url + req["path"], json=req["body"], timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == req["usage"]["prompt_tokens"]
        assert r.json()["usage"]["completion_tokens"] == req["usage"]["completion_tokens"]
    live = subscriber.drain()
    replayed = replay(replay_port)
    assert [m.seq for m in replayed] == list(range(len(replayed)))
    assert [m.batch for m in live] == [m.batch for m in replayed]
    ours = [m.batch for m in replayed]
    check_event_stream(ours)
    assert canonical(ours) == canonical(fixture_batches())
    assert all(parse_topic(m.topic) == ("127.0.0.1:8300", "tiny") for m in replayed)
    # ... and the engine counters vLLM reported after the same requests
    ours_metrics = requests.get(url + "/metrics", timeout=5).text
    theirs_metrics = (TINY / "metrics.txt").read_text()
    for series in COUNTERS_VLLM_REPORTED:
        assert sample(ours_metrics, series) == sample(theirs_metrics, series), series


COUNTERS_VLLM_REPORTED = [
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total",
    'vllm:request_success_total{engine="0",finished_reason="length"',
    "vllm:time_to_first_token_seconds_count",
    "vllm:request_prompt_tokens_sum",
    "vllm:request_generation_tokens_sum",
    "vllm:kv_cache_usage_perc",
    "vllm:num_requests_running",
]


def sample(text: str, prefix: str) -> float:
    """The value of the first series whose line starts with `prefix` (name or name{labels)."""
    for line in text.splitlines():
        if line.startswith(prefix) and line[len(prefix)] in "{ ,":
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(prefix)


@pytest.mark.slow
def test_filling_the_cache_evicts_and_reset_clears(sim_factory, subscriber):
    url, replay_port = start_tiny(sim_factory, subscriber, blocks=12)
    for i in range(4):
        prompt = f"request {i}: " + " ".join(f"word{i}x{j}" for j in range(60))
        r = requests.post(
            url + "/v1/completions",
            json={"model": "tiny", "prompt": prompt, "max_tokens": 2},
            timeout=30,
        )
        assert r.status_code == 200, r.text
    assert requests.post(url + "/reset_prefix_cache", timeout=5).status_code == 200
    batches = [m.batch for m in replay(replay_port)]
    check_event_stream(batches, strict=True)
    kinds = [type(e) for b in batches for e in b.events]
    assert BlockRemoved in kinds
    assert kinds[-1] is AllBlocksCleared
    metrics = requests.get(url + "/metrics", timeout=5).text
    assert 'vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.0' in metrics


@pytest.mark.slow
def test_late_subscriber_recovers_from_replay(sim_factory, subscriber):
    url, replay_port = start_tiny(sim_factory, subscriber)
    body = {"model": "tiny", "prompt": "x " * 300, "max_tokens": 2}
    requests.post(url + "/v1/completions", json=body, timeout=30).raise_for_status()
    subscriber.drain()
    # Pretend we missed everything: a subscriber that knows nothing replays from seq 0.
    replayed = replay(replay_port, start=0)
    assert replayed and replayed[0].seq == 0
    assert [m.batch for m in replayed] == [m.batch for m in subscriber.messages]
    # ... and from the middle: only later batches come back.
    body["prompt"] = "y " * 300
    requests.post(url + "/v1/completions", json=body, timeout=30).raise_for_status()
    later = replay(replay_port, start=len(replayed))
    assert [m.seq for m in later] == list(range(len(replayed), len(replayed) + len(later)))
    assert later


@pytest.mark.slow
def test_array_format_on_the_wire(sim_factory, subscriber):
    url, _ = start_tiny(sim_factory, subscriber, "--kv-events-format", "array")
    body = {"model": "tiny", "prompt": "z " * 200, "max_tokens": 2}
    requests.post(url + "/v1/completions", json=body, timeout=30).raise_for_status()
    subscriber.drain()
    assert subscriber.raw, "no live KV event arrived"
    topic, seq, payload = subscriber.raw[0]
    _ts, events, dp_rank = msgspec.msgpack.decode(payload)
    assert isinstance(events[0], list) and events[0][0] == "BlockStored"
    assert (topic, dp_rank) == (TOPIC.encode(), 0) and len(seq) == 8
    [stored] = subscriber.messages[0].batch.events
    assert isinstance(stored, BlockStored) and stored.block_size == 32
    assert list(stored.block_hashes) == events[0][1]
    assert len(stored.token_ids) == 32 * len(stored.block_hashes)


def _debug_dump(batches):  # pragma: no cover - used by hand when the comparison fails
    for ev in canonical(batches):
        print(ev if ev[0] != "stored" else ev[:2])
