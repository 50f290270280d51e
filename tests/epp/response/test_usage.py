"""epp/response/usage.py: UsageReader, a stage of the response chain, takes token usage from a
streamed or buffered answer."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infergw.epp.response.chain import MAX_HELD, ResponseChain
from infergw.epp.response.usage import Usage, UsageReader
from tests.allocations import peak_allocated


def sse(*events) -> bytes:
    out = b""
    for event in events:
        payload = event if isinstance(event, str) else json.dumps(event)
        out += f"data: {payload}\n\n".encode()
    return out


CHUNK = {"id": "c", "object": "chat.completion.chunk", "choices": [{"delta": {"content": "hi"}}]}
FINAL_USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 7,
    "total_tokens": 19,
    "prompt_tokens_details": {"cached_tokens": 4},
}
CHAT_STREAM = sse(
    {**CHUNK, "usage": None},
    {**CHUNK, "usage": None},
    {"id": "c", "choices": [], "usage": FINAL_USAGE},
    "[DONE]",
)
EXPECTED = Usage(prompt_tokens=12, completion_tokens=7, cached_tokens=4)


def reader_over(chunks, streaming: bool, cap: int = MAX_HELD) -> UsageReader:
    r = UsageReader(streaming)
    chain = ResponseChain([r], streaming, cap)
    for c in chunks:
        assert chain.feed(c) == ([c] if c else [])  # a reader passes each chunk on at once
    assert chain.flush() == []
    return r


def read(streaming: bool, *chunks: bytes) -> Usage:
    return reader_over(chunks, streaming).usage


# ---- streaming ----------------------------------------------------------------------------


def test_streaming_usage_from_the_final_chunk():
    assert read(True, CHAT_STREAM) == EXPECTED


def test_streaming_without_usage_reports_nothing():
    assert read(True, sse(CHUNK, CHUNK, "[DONE]")) == Usage()


def test_streaming_line_split_at_every_offset():
    for cut in range(len(CHAT_STREAM) + 1):
        assert read(True, CHAT_STREAM[:cut], CHAT_STREAM[cut:]) == EXPECTED, cut


def test_streaming_byte_by_byte():
    assert read(True, *(CHAT_STREAM[i : i + 1] for i in range(len(CHAT_STREAM)))) == EXPECTED


def test_streaming_last_line_without_newline_is_read_at_finish():
    body = b'data: {"usage": {"prompt_tokens": 3, "completion_tokens": 2}}'
    assert read(True, body) == Usage(3, 2, None)


def test_streaming_crlf_and_no_space_after_data():
    body = b'data:{"usage": {"prompt_tokens": 3, "completion_tokens": 2}}\r\n\r\ndata: [DONE]\r\n'
    assert read(True, body) == Usage(3, 2, None)


def test_streaming_done_marker_alone_is_ignored():
    assert read(True, b"data: [DONE]\n\n") == Usage()


def test_streaming_continuous_usage_newest_wins():
    body = sse(
        {**CHUNK, "usage": {"prompt_tokens": 5, "completion_tokens": 1}},
        {**CHUNK, "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
        {**CHUNK, "usage": {"prompt_tokens": 5, "completion_tokens": 3}},
        "[DONE]",
    )
    assert read(True, body) == Usage(5, 3, None)


def test_streaming_ignores_non_data_lines_that_mention_usage():
    body = b'event: x\n: comment "usage"\nid: "usage"\n\n'
    assert read(True, body) == Usage()


def test_streaming_responses_api_completed_event():
    completed = {
        "type": "response.completed",
        "response": {
            "id": "resp_1",
            "status": "completed",
            "usage": {
                "input_tokens": 30,
                "output_tokens": 9,
                "total_tokens": 39,
                "input_tokens_details": {"cached_tokens": 16},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        },
    }
    body = (
        b"event: response.created\n"
        b'data: {"type":"response.created","response":{"id":"resp_1","usage":null}}\n\n'
        b"event: response.output_text.delta\n"
        b'data: {"type":"response.output_text.delta","delta":"hi"}\n\n'
        b"event: response.completed\n" + f"data: {json.dumps(completed)}\n\n".encode()
    )
    assert read(True, body) == Usage(30, 9, 16)


def test_streaming_anthropic_messages_events():
    start = {"type": "message_start", "message": {"id": "msg_1", "content": [],
             "usage": {"input_tokens": 12, "output_tokens": 0}}}  # fmt: skip
    delta = {"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
             "usage": {"output_tokens": 7}}  # fmt: skip
    body = (
        f"event: message_start\ndata: {json.dumps(start)}\n\n".encode()
        + b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"hi"}}\n\n'
        + f"event: message_delta\ndata: {json.dumps(delta)}\n\n".encode()
        + b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    assert read(True, body) == Usage(12, 7, None)
    # an error answer's top-level "message" is a string: no usage, and no error either
    assert read(False, b'{"object":"error","message":"bad","code":400}') == Usage()


def test_usage_without_cached_details_leaves_cached_unknown():
    body = sse({"usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    assert read(True, body).cached_tokens is None


def test_non_integer_usage_fields_are_ignored():
    body = sse({"usage": {"prompt_tokens": "12", "completion_tokens": None}})
    assert read(True, body) == Usage()


@pytest.mark.parametrize(
    "body",
    [
        b'data: {"usage": \n\n',
        b'data: ["usage"]\n\n',
        b'data: "usage"\n\n',
        b'data: {"usage": [1, 2]}\n\n',
        b'data: {"usage": "lots"}\n\n',
        b'data: \xff\xfe"usage"\n\n',
        b'data: {"response": 5, "usage": null}\n\n',
        b"\x00\x01\x02" * 100,
    ],
)
def test_streaming_garbage_is_ignored(body):
    assert read(True, body) == Usage()


def test_garbage_between_good_lines_does_not_lose_the_usage():
    body = b'data: {"usage": oops\n\n' + CHAT_STREAM + b"data: {garbage\n\n"
    assert read(True, body) == EXPECTED


# ---- non-streaming ------------------------------------------------------------------------

NON_STREAMING = json.dumps(
    {
        "id": "cmpl",
        "object": "chat.completion",
        "choices": [{"message": {"role": "assistant", "content": "data: not sse"}}],
        "usage": FINAL_USAGE,
    }
).encode()


def test_non_streaming_json_usage():
    assert read(False, NON_STREAMING) == EXPECTED


def test_non_streaming_in_many_chunks():
    chunks = [NON_STREAMING[i : i + 7] for i in range(0, len(NON_STREAMING), 7)]
    assert read(False, *chunks) == EXPECTED


def test_non_streaming_responses_api_names():
    body = json.dumps(
        {"object": "response", "usage": {"input_tokens": 8, "output_tokens": 2}}
    ).encode()
    assert read(False, body) == Usage(8, 2, None)


@pytest.mark.parametrize(
    "body", [b"", b"{not json", b"[1, 2]", b'{"usage": null}', b"\xff\xfe", b'{"error": "x"}']
)
def test_non_streaming_garbage_reports_nothing(body):
    assert read(False, body) == Usage()


def test_non_streaming_body_over_the_cap_is_not_parsed():
    half = len(NON_STREAMING) // 2
    r = reader_over([NON_STREAMING[:half], NON_STREAMING[half:]], False, cap=64)
    assert r.truncated
    assert r.usage == Usage()


def test_non_streaming_body_exactly_at_the_cap_is_parsed():
    r = reader_over([NON_STREAMING], False, cap=len(NON_STREAMING))
    assert not r.truncated
    assert r.usage == EXPECTED


def test_default_cap_is_a_few_megabytes():
    assert MAX_HELD == 4 * 1024 * 1024


def test_a_streamed_line_over_the_cap_is_counted_not_read_and_the_next_line_is():
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n'
    long_usage = b'data: {"usage":{"prompt_tokens":9,' + b" " * 100 + b'"completion_tokens":9}}\n'
    body = long_usage + usage + b"\n" + long_usage + b"data: [DONE]\n\n"
    # (The cap bounds what is held: a line that arrives whole in one chunk is read, as before.)
    for size in (1, 7, 64):
        r = reader_over([body[i : i + size] for i in range(0, len(body), size)], True, cap=80)
        assert r.usage == Usage(3, 2, None), size
        assert (r.lines_too_long, r.events) == (2, 4), size


# ---- properties ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(CHAT_STREAM)), max_size=12))
def test_any_chunking_of_a_stream_gives_the_same_usage(cuts):
    bounds = [0, *sorted(cuts), len(CHAT_STREAM)]
    chunks = [CHAT_STREAM[a:b] for a, b in itertools.pairwise(bounds)]
    assert read(True, *chunks) == EXPECTED


@settings(max_examples=300, deadline=None)
@given(
    streaming=st.booleans(),
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.sampled_from(
                [b"data: ", b'"usage"', b"{", b"}", b"\n", b"[DONE]", b'{"usage":', b":1", b"null"]
            ),
        ),
        max_size=30,
    ),
)
def test_arbitrary_bytes_never_raise(streaming, chunks):
    result = read(streaming, *chunks)
    assert isinstance(result, Usage)


@pytest.mark.parametrize("streaming", [True, False])
def test_deeply_nested_json_is_garbage_not_a_crash(streaming):
    nested = b'{"usage": ' + b"[" * 100_000
    body = b"data: " + nested + b"\n\n" if streaming else nested
    assert read(streaming, body) == Usage()


# ---- a stream without newlines: bounded bytes held, each byte handled once ----------------

STREAM_BYTES = 16 * 1024 * 1024
STREAM_CHUNK = 64 * 1024


def newline_less_chunks():
    chunk = b"data: " + b"x" * (STREAM_CHUNK - 6)
    yield chunk
    for _ in range(STREAM_BYTES // STREAM_CHUNK - 1):
        yield b"x" * STREAM_CHUNK


def test_a_16_mib_stream_without_newlines_holds_a_bounded_tail():
    reader = UsageReader(True)
    chain = ResponseChain([reader], streaming=True)
    most_held = 0

    def feed():
        nonlocal most_held
        for chunk in newline_less_chunks():
            chain.feed(chunk)
            most_held = max(most_held, chain.held_bytes)

    peak = peak_allocated(feed)
    assert most_held <= MAX_HELD
    # The line held (until it outgrows the cap) and a chunk: never the whole stream.
    assert peak < MAX_HELD + 8 * STREAM_CHUNK
    chain.feed(b'\ndata: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n')
    chain.flush()
    assert reader.usage == Usage(prompt_tokens=3, completion_tokens=2)
    assert reader.lines_too_long == 1 and reader.events == 2  # the long line still counted


def test_a_4_mib_answer_of_empty_objects_is_read_without_an_object_tree():
    pad = b",".join([b"{}"] * (MAX_HELD // 3 - 100))
    answer = b'{"choices":[' + pad + b'],"usage":{"prompt_tokens":3,"completion_tokens":2}}'
    reader = UsageReader(False)
    chain = ResponseChain([reader], streaming=False)
    chain.feed(answer)
    del pad
    peak = peak_allocated(chain.flush)
    assert reader.usage == Usage(prompt_tokens=3, completion_tokens=2)
    assert peak < len(answer)  # json.loads held ~25 times the answer


@pytest.mark.parametrize(
    "event",
    [
        b'{"usage":{"prompt_tokens":' + b"9" * 5000 + b"}}",
        b'{"usage":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"usage":"\\ud800"}',
        b'{"response":{"usage":[' + b"{}," * 30_000 + b"{}]}}",
    ],
)
def test_hostile_usage_from_a_pod_is_ignored(event):
    assert read(True, b"data: " + event + b"\n\n") == Usage()
    assert read(False, event) == Usage()
