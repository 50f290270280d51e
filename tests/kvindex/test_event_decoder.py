"""Tests for kvindex.events against a real vLLM 0.32 recording and hand-built legacy payloads."""

from __future__ import annotations

import base64
import json
import re
from collections import Counter

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infergw.kvindex.events import (
    REPLAY_END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEventDecodeError,
    KVMessage,
    decode_batch,
    decode_message,
    decode_replay_frames,
    parse_topic,
)
from tests.kv_invariants import check_event_stream
from tests.paths import TINY

TOPIC = "kv@127.0.0.1:8300@tiny"


def _jsonl(name: str) -> list[dict]:
    with open(TINY / name) as f:
        return [json.loads(line) for line in f if line.strip()]


def _live_frames() -> list[list[bytes]]:
    return [
        [d["topic"].encode(), d["seq"].to_bytes(8, "big"), base64.b64decode(d["payload_b64"])]
        for d in _jsonl("events.jsonl")
    ]


def _replay_frames() -> list[list[bytes]]:
    return [[base64.b64decode(f) for f in d["frames_b64"]] for d in _jsonl("replay.jsonl")]


def _live_messages() -> list[KVMessage]:
    return [decode_message(frames) for frames in _live_frames()]


def _frames(payload: bytes, seq: int = 12, topic: bytes = TOPIC.encode()) -> list[bytes]:
    return [topic, seq.to_bytes(8, "big"), payload]


def _enc(obj: object) -> bytes:
    return msgspec.msgpack.encode(obj)


# --- the real recording


def test_fixture_live_messages_decode_and_counts_match_raw_msgpack():
    frames = _live_frames()
    messages = [decode_message(f) for f in frames]
    assert [m.seq for m in messages] == list(range(len(frames)))

    # Count independently from the raw msgpack (map-form events in vLLM 0.32).
    raw_counts: Counter[str] = Counter()
    raw_stored, raw_removed = [], []
    for f in frames:
        _ts, events, _dp_rank = msgspec.msgpack.decode(f[2])
        for e in events:
            raw_counts[e["type"]] += 1
            if e["type"] == "BlockStored":
                raw_stored += e["block_hashes"]
            elif e["type"] == "BlockRemoved":
                raw_removed += e["block_hashes"]

    stored = [e for m in messages for e in m.batch.events if isinstance(e, BlockStored)]
    removed = [e for m in messages for e in m.batch.events if isinstance(e, BlockRemoved)]
    assert len(stored) == raw_counts["BlockStored"]
    assert len(removed) == raw_counts["BlockRemoved"]
    assert [h for e in stored for h in e.block_hashes] == raw_stored
    assert [h for e in removed for h in e.block_hashes] == raw_removed
    assert len(raw_stored) == 318 and len(raw_removed) == 240
    assert set(raw_removed) <= set(raw_stored)
    assert sum(m.batch.unknown_events for m in messages) == 0

    for m in messages:
        assert m.topic == TOPIC
        assert m.batch.data_parallel_rank == 0
    for e in stored:
        assert e.block_size == 32
        assert len(e.token_ids) == e.block_size * len(e.block_hashes)
        assert e.medium == "GPU" and e.group_idx == 0 and e.kv_cache_spec_kind == "full_attention"
        assert e.extra_keys == (None,) * len(e.block_hashes)
    assert stored[0].parent_block_hash is None


def test_fixture_topic_parses():
    assert parse_topic(_live_messages()[0].topic) == ("127.0.0.1:8300", "tiny")
    assert parse_topic(TOPIC.encode()) == ("127.0.0.1:8300", "tiny")


def test_fixture_stream_satisfies_invariants():
    batches = [m.batch for m in _live_messages()]
    assert check_event_stream(batches, strict=True) == 0


def test_fixture_replay_matches_live():
    live = {m.seq: m for m in _live_messages()}
    replies = _replay_frames()
    decoded = [decode_replay_frames(f) for f in replies]
    assert decoded[-1] is None
    assert replies[-1][2] == b"\xff" * 8 and replies[-1][3] == b""
    assert all(m is not None for m in decoded[:-1])
    assert [m.seq for m in decoded[:-1]] == sorted(live)
    for m in decoded[:-1]:
        assert m == live[m.seq]


def test_replay_without_topic_frame():
    live = {m.seq: m for m in _live_messages()}
    for frames in _replay_frames():
        old_style = [frames[0], *frames[2:]]  # vLLM < 0.26: [b"", seq, payload]
        m = decode_replay_frames(old_style)
        if m is None:
            assert frames[2] == REPLAY_END_SEQ.to_bytes(8, "big")
            continue
        assert m.topic == ""
        assert m.seq == live[m.seq].seq and m.batch == live[m.seq].batch
    assert decode_replay_frames([b"", b"\xff" * 8, b""]) is None


# --- legacy and alternative encodings

STORED = BlockStored(
    block_hashes=(11, 2**64 - 1),
    parent_block_hash=7,
    token_ids=(1, 2, 3, 4),
    block_size=2,
    lora_id=None,
    medium="GPU",
    lora_name=None,
    extra_keys=(None, ("lora-a", ("mm", 3))),
    group_idx=0,
    kv_cache_spec_kind="full_attention",
)


def _stored_map(**over: object) -> dict:
    d = {
        "type": "BlockStored",
        "block_hashes": [11, 2**64 - 1],
        "parent_block_hash": 7,
        "token_ids": [1, 2, 3, 4],
        "block_size": 2,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": [None, ["lora-a", ["mm", 3]]],
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
    }
    d.update(over)
    return d


def test_positional_and_map_events_decode_to_same_objects():
    full_array = [
        "BlockStored",
        [11, 2**64 - 1],
        7,
        [1, 2, 3, 4],
        2,
        None,
        "GPU",
        None,
        [None, ["lora-a", ["mm", 3]]],
        0,
        "full_attention",
        None,  # + sliding_window
        "a-field-from-the-future",
    ]
    events = [
        _stored_map(),
        full_array,
        ["BlockRemoved", [11], "CPU", 1],
        {"type": "BlockRemoved", "block_hashes": [11], "medium": "CPU", "group_idx": 1},
        ["AllBlocksCleared"],
        {"type": "AllBlocksCleared"},
    ]
    batch = decode_batch(_enc([1.5, events, None]))
    removed = BlockRemoved((11,), "CPU", 1)
    assert batch == EventBatch(
        1.5, (STORED, STORED, removed, removed, AllBlocksCleared(), AllBlocksCleared()), None, 0
    )


def test_short_old_style_events_get_defaults():
    old_stored = ["BlockStored", [1, 2], None, [5, 6, 7, 8], 2, None]  # stops after lora_id
    with_medium = ["BlockStored", [3], 2, [9, 9], 2, 4, None]  # medium nil in older vLLM
    old_removed = ["BlockRemoved", [1]]
    batch = decode_batch(_enc([0, [old_stored, with_medium, old_removed]]))  # no dp rank
    assert batch.ts == 0.0 and batch.data_parallel_rank is None
    assert batch.events == (
        BlockStored((1, 2), None, (5, 6, 7, 8), 2, None, "GPU", None, None, 0, "full_attention"),
        BlockStored((3,), 2, (9, 9), 2, 4, "GPU", None, None, 0, "full_attention"),
        BlockRemoved((1,), "GPU", 0),
    )
    # Map form with omit_defaults: only the required fields present.
    minimal = {
        "type": "BlockStored",
        "block_hashes": [1],
        "parent_block_hash": None,
        "token_ids": [1, 2],
        "block_size": 2,
    }
    assert decode_batch(_enc([0.0, [minimal], 0])).events[0] == BlockStored((1,), None, (1, 2), 2)


def test_batch_encoded_as_map():
    events = [_stored_map(), ["BlockRemoved", [11], "GPU", 0]]
    as_array = decode_batch(_enc([2.25, events, 3]))
    as_map = decode_batch(_enc({"ts": 2.25, "events": events, "data_parallel_rank": 3}))
    assert as_map == as_array
    assert as_map.data_parallel_rank == 3
    assert decode_batch(_enc({"events": [], "ts": 1.0})).data_parallel_rank is None


def test_bytes_hashes_use_last_8_bytes_big_endian():
    digest = bytes(range(32))
    parent = b"\x00" * 24 + (7).to_bytes(8, "big")
    ev = ["BlockStored", [digest, 5], parent, [1, 2, 1, 2], 2, None]
    batch = decode_batch(_enc([0.0, [ev, ["BlockRemoved", [digest]]], None]))
    want = int.from_bytes(digest[-8:], "big")
    assert want == 0x18191A1B1C1D1E1F
    assert batch.events[0].block_hashes == (want, 5)
    assert batch.events[0].parent_block_hash == 7
    assert batch.events[1].block_hashes == (want,)


def test_unknown_event_types_are_skipped_and_counted():
    events = [
        {"type": "BlockMoved", "block_hashes": [1]},
        ["SomeFutureEvent", 1, 2, 3],
        _stored_map(),
    ]
    batch = decode_message(_frames(_enc([1.0, events, 0]))).batch
    assert batch.events == (STORED,)
    assert batch.unknown_events == 2


# --- malformed input


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        (_frames(b"\xc1garbage"), "batch seq=12: payload is not valid msgpack"),
        (_frames(_enc([1.0, [_stored_map()], 0])[:-3]), "payload is not valid msgpack"),
        (_frames(b"")[:2], "expected 3 frames, got 2"),
        ([*_frames(b""), b""], "expected 3 frames, got 4"),
        ([TOPIC.encode(), b"\x00" * 7, _enc([1.0, [], 0])], "seq frame must be 8 bytes, got 7"),
        (_frames(_enc([1.0, {"a": 1}, 0])), "batch seq=12: events must be a list, got dict"),
        (_frames(b"\xa6\x00\x00\x00\x00\x00\x80"), "not valid msgpack"),  # bad UTF-8 str
        (_frames(b"\x91" * 100_000 + b"\xc0"), "not valid msgpack"),  # deep nesting
        (_frames(b"\xd7\xff" + b"\xff" * 8), "not valid msgpack"),  # bad timestamp ext
        (_frames(_enc("just a string")), "batch must be a msgpack array or map, got str"),
        (_frames(_enc([1.0])), "got 1 item(s)"),
        (_frames(_enc(["now", [], 0])), "ts must be a number, got str"),
        (_frames(_enc([1.0, [], "rank"])), "data_parallel_rank must be an int or nil"),
        (
            _frames(_enc([1.0, [_stored_map()] * 3 + [_stored_map(block_hashes="abc")], 0])),
            "event 3 of batch seq=12: BlockStored.block_hashes must be a list of hashes",
        ),
        (
            _frames(_enc([1.0, [_stored_map(block_hashes=["abc"])], 0])),
            "event 0 of batch seq=12: BlockStored.block_hashes [0] must be a uint64 int",
        ),
        (_frames(_enc([1.0, [_stored_map(block_hashes=[-1])], 0])), "int outside uint64"),
        (_frames(_enc([1.0, [_stored_map(token_ids=[1, "2"])], 0])), "token_ids [1] must be"),
        (_frames(_enc([1.0, [_stored_map(block_size=True)], 0])), "block_size must be a non-neg"),
        (_frames(_enc([1.0, [_stored_map(medium=3)], 0])), "BlockStored.medium must be a string"),
        (_frames(_enc([1.0, [_stored_map(lora_id="a")], 0])), "lora_id must be an int, got str"),
        (_frames(_enc([1.0, [["BlockStored", [1], None]], 0])), "BlockStored.token_ids is missing"),
        (_frames(_enc([1.0, [{"block_hashes": [1]}], 0])), "event type must be a string, got nil"),
        (_frames(_enc([1.0, [[]], 0])), "event 0 of batch seq=12: event must be a map"),
        (_frames(_enc([1.0, [], 0]), topic=b"kv@\xff\xfe@tiny"), "topic frame is not valid UTF-8"),
        ([TOPIC, b"\x00" * 8, b""], "frame 0 must be bytes, got str"),
        ("not frames", "frames must be a list"),
    ],
)
def test_malformed_live_messages_raise_decode_error(frames, expected):
    with pytest.raises(KVEventDecodeError) as info:
        decode_message(frames)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        ([b"", b"\x00" * 8], "expected 3 or 4 frames, got 2"),
        ([b"x", b"\x00" * 8, _enc([1.0, [], 0])], "first frame must be the empty delimiter"),
        ([b"", b"\x00" * 9, _enc([1.0, [], 0])], "seq frame must be 8 bytes, got 9"),
        ([b"", b"\xff", b"\x00" * 8, _enc([1.0, [], 0])], "topic frame is not valid UTF-8"),
        ([b"", b"\x00" * 8, b"\x93"], "payload is not valid msgpack"),
    ],
)
def test_malformed_replay_replies_raise_decode_error(frames, expected):
    with pytest.raises(KVEventDecodeError) as info:
        decode_replay_frames(frames)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "kv@127.0.0.1:8300",
        "kv@127.0.0.1:8300@tiny@x",
        "xx@127.0.0.1:8300@tiny",
        "kv@127.0.0.1@tiny",
        "kv@:8300@tiny",
        "kv@127.0.0.1:8300@",
    ],
)
def test_parse_topic_rejects_other_shapes(topic):
    with pytest.raises(KVEventDecodeError, match="topic"):
        parse_topic(topic)


def test_parse_topic_ipv6_pod():
    assert parse_topic("kv@[fd00::1]:8000@org/model") == ("[fd00::1]:8000", "org/model")


# --- fuzzing: nothing but KVEventDecodeError may escape

_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=8) | st.integers(0, 3), inner, max_size=5)
    ),
    max_leaves=30,
)
# BlockStored's fields in vLLM's positional order (its legacy array form)
_NAMES = [
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
]
_field_names = st.sampled_from(["type", *_NAMES])
_tags = st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "Other"])
# Near-valid events reach the field converters instead of failing at the top level.
_events = st.builds(
    lambda tag, fields: [tag, *fields], _tags, st.lists(_msgpack_values, max_size=12)
) | st.builds(
    lambda tag, d: {**d, "type": tag},
    _tags,
    st.dictionaries(_field_names, _msgpack_values, max_size=11),
)
_batches = (
    st.tuples(
        st.floats() | st.integers(0, 2**40),
        st.lists(_events, max_size=4),
        st.none() | st.integers(0, 8),
    ).map(list)
    | _msgpack_values
)


def _decodes_or_raises_decode_error(frames: list) -> None:
    try:
        decode_message(frames)
    except KVEventDecodeError:
        pass
    try:
        decode_replay_frames([b"", *frames])
    except KVEventDecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=10), st.binary(max_size=30))
def test_fuzz_random_bytes(payload, seq, topic):
    _decodes_or_raises_decode_error([topic, seq, payload])
    _decodes_or_raises_decode_error([topic, b"\x00" * 8, payload])


@settings(max_examples=500, deadline=None)
@given(_batches)
def test_fuzz_random_msgpack_objects(obj):
    payload = _enc(obj)
    try:
        batch = decode_batch(payload)
    except KVEventDecodeError:
        return
    assert isinstance(batch, EventBatch)
    _decodes_or_raises_decode_error([TOPIC.encode(), b"\x00" * 8, payload])


# --- the invariant checker itself


def _stored(hashes, parent=None, block_size=2, tokens=None):
    tokens = tuple(range(block_size * len(hashes))) if tokens is None else tokens
    return BlockStored(tuple(hashes), parent, tokens, block_size)


def _batch(*events):
    return EventBatch(0.0, tuple(events), 0)


def test_invariants_accept_a_good_stream():
    stream = [
        _batch(_stored([1, 2]), _stored([3], parent=2)),
        _batch(BlockRemoved((3,)), _stored([4], parent=2)),
        _batch(AllBlocksCleared(), _stored([1])),
        _batch(_stored([9], parent=1), BlockRemoved((9, 1))),
    ]
    assert check_event_stream(stream) == 0


def test_invariants_count_restores_unless_strict():
    stream = [_batch(_stored([1]), _stored([1])), _batch(BlockRemoved((1,)), BlockRemoved((1,)))]
    assert check_event_stream(stream) == 1
    with pytest.raises(AssertionError, match="re-stores"):
        check_event_stream(stream, strict=True)
    # Ref-counted: a third removal of the twice-stored hash is an error.
    with pytest.raises(AssertionError, match="not currently stored"):
        check_event_stream([*stream, _batch(BlockRemoved((1,)))])


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        ([_batch(_stored([1, 2], tokens=(1, 2, 3)))], "3 token ids for 2 blocks of size 2"),
        ([_batch(_stored([1], parent=5))], "parent 0x5 is not currently stored"),
        ([_batch(_stored([1]), BlockRemoved((1,)), _stored([2], parent=1))], "parent 0x1"),
        ([_batch(_stored([1, 1]))], "repeats a hash"),
        ([_batch(_stored([1])), _batch(BlockRemoved((2,)))], "batch 1 (ts=0.0) event 0"),
        ([_batch(_stored([1]), AllBlocksCleared(), BlockRemoved((1,)))], "not currently stored"),
        ([_batch(_stored([1]), BlockRemoved((1,), medium="CPU"))], "not currently stored"),
    ],
)
def test_invariants_reject_bad_streams(stream, expected):
    with pytest.raises(AssertionError) as info:
        check_event_stream(stream)
    assert expected in str(info.value)


# --- the typed fast path answers exactly as the generic decoder


_VALUES = (
    st.none()
    | st.booleans()
    | st.integers(-1, 3)
    | st.sampled_from([2**32 - 1, 2**32, 2**63, 2**64 - 1])
    | st.sampled_from(["GPU", "cpu", "", "full_attention", "x"])
    | st.sampled_from([b"", b"\x01" * 9])
    | st.floats(allow_nan=False)
)
_LISTS = st.lists(_VALUES, max_size=4) | st.lists(st.integers(0, 9), max_size=8)
_FIELD = _VALUES | _LISTS | st.lists(_LISTS, max_size=2)
_GOOD_STORED = st.fixed_dictionaries(
    {
        "block_hashes": st.lists(st.integers(0, 2**64 - 1) | st.binary(min_size=1), max_size=3),
        "parent_block_hash": st.none() | st.integers(0, 2**64 - 1),
        "token_ids": st.lists(st.integers(0, 2**32 - 1), max_size=6),
        "block_size": st.integers(0, 4),
    },
    optional={
        "lora_id": st.none() | st.integers(-2, 2),
        "medium": st.none() | st.sampled_from(["GPU", "cpu", ""]),
        "lora_name": st.none() | st.sampled_from(["", "lora-a"]),
        "extra_keys": st.none() | st.lists(st.none() | st.lists(st.text(max_size=2)), max_size=2),
        "group_idx": st.none() | st.integers(0, 2),
        "kv_cache_spec_kind": st.none() | st.sampled_from(["", "full_attention", "sliding"]),
    },
)
_ANY_EVENT = st.fixed_dictionaries({"type": _tags}, optional={n: _FIELD for n in _NAMES})


def _as_array(event: dict) -> list:
    fields = [event.get(n, None) for n in _NAMES]
    while fields and fields[-1] is None and len(fields) > 4:
        fields.pop()
    return [event.get("type", "BlockStored"), *fields]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        _GOOD_STORED.map(lambda e: {"type": "BlockStored", **e})
        | _GOOD_STORED.map(lambda e: {"type": "BlockRemoved", **e})
        | _ANY_EVENT,
        max_size=4,
    ),
    st.booleans(),
    st.floats(allow_nan=False) | st.integers(0, 9) | st.booleans() | st.none(),
    st.none() | st.integers(0, 3) | st.booleans(),
)
def test_the_typed_fast_path_decodes_as_the_generic_one(events, arrays, ts, rank):
    from infergw.kvindex.events import _decode_generic

    payload = msgspec.msgpack.encode([ts, [_as_array(e) if arrays else e for e in events], rank])
    try:
        want = _decode_generic(payload, None)
    except KVEventDecodeError as e:
        with pytest.raises(KVEventDecodeError, match=re.escape(str(e))):
            decode_batch(payload)
        return
    assert decode_batch(payload) == want
