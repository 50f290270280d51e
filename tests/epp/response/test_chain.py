"""epp/response/: one framer feeding a chain of stages — the usage event the picker asked for
is removed (strip_usage.py), the served model name is given back as the one asked for
(rewrite.py) — whatever the chunking, line ends, encoding or size of the answer."""

from __future__ import annotations

import gzip
import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infergw.epp import protocol
from infergw.epp.response import response_chain
from infergw.epp.response.chain import MAX_HELD, ResponseChain
from infergw.epp.response.rewrite import ModelNameRewriter
from infergw.epp.response.strip_usage import MAX_USAGE_EVENT, UsageEventStripper
from infergw.epp.response.usage import Usage, UsageReader
from tests.allocations import peak_allocated
from tests.fuzzing import fuzz_settings


def through(chain: ResponseChain, chunks) -> bytes:
    out = b"".join(b"".join(chain.feed(c)) for c in chunks) + b"".join(chain.flush())
    assert chain.held_bytes == 0
    return out


def in_chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def event(doc: dict | str, space: bytes = b" ", end: bytes = b"\n") -> bytes:
    payload = doc if isinstance(doc, str) else json.dumps(doc, separators=(",", ":"))
    return b"data:" + space + payload.encode() + end + end


SERVED = "llama-3-8b"
TOKEN = {"id": "c", "model": "llama-3-8b", "choices": [{"text": "a"}], "usage": None}
USAGE = {
    "id": "c",
    "model": "llama-3-8b",
    "choices": [],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2},
}


USAGE_EVENT = b'data: {"choices":[],"usage":{"completion_tokens":2}}\n\n'  # 55 bytes


def stream(space: bytes = b" ", end: bytes = b"\n") -> tuple[bytes, bytes]:
    """A stream with the usage event the picker asked for, and what the client must get."""
    token, usage, done = (event(d, space, end) for d in (TOKEN, USAGE, "[DONE]"))
    sent = token + token + usage + done
    rewritten = token.replace(b'"model":"llama-3-8b"', b'"model":"llama"')
    return sent, rewritten + rewritten + done


# ---- the whole chain, as the picker builds it ------------------------------------------------


@pytest.mark.parametrize("space", [b" ", b""], ids=["data: x", "data:x"])
@pytest.mark.parametrize("end", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_an_event_split_at_every_byte_offset_gives_the_same_answer_and_usage(space, end):
    sent, expected = stream(space, end)
    for cut in range(len(sent) + 1):
        for cut2 in (cut, min(len(sent), cut + 1), min(len(sent), cut + 13)):
            chain, usage = response_chain(
                True, strip_usage=True, served="llama-3-8b", asked="llama"
            )
            out = through(chain, [sent[:cut], sent[cut:cut2], sent[cut2:]])
            assert out == expected, (cut, cut2)
            assert usage.usage == Usage(3, 2, None) and usage.events == 4


def test_byte_by_byte_and_whole():
    sent, expected = stream()
    for size in (1, 2, 3, 5, 7, 13, len(sent)):
        chain, usage = response_chain(True, strip_usage=True, served="llama-3-8b", asked="llama")
        assert through(chain, in_chunks(sent, size)) == expected
        assert usage.usage.completion_tokens == 2


def test_a_stream_the_client_asked_usage_of_keeps_it():
    sent, _ = stream()
    chain, usage = response_chain(True, strip_usage=False)
    assert through(chain, in_chunks(sent, 5)) == sent
    assert usage.usage == Usage(3, 2, None)


def test_reading_only_passes_each_chunk_on_at_once():
    sent, _ = stream()
    chain, _usage = response_chain(True)
    for piece in in_chunks(sent, 7):
        assert chain.feed(piece) == [piece]
    assert chain.flush() == []


def test_an_edited_stream_passes_an_event_on_when_it_is_whole():
    first = event(TOKEN)
    chain, _usage = response_chain(True, served="llama-3-8b", asked="llama")
    assert chain.feed(first[:-3]) == []
    assert b"".join(chain.feed(first[-3:])) == first.replace(b"llama-3-8b", b"llama")


def test_the_last_event_without_its_blank_line_is_judged_at_the_end():
    token, usage = event(TOKEN), event(USAGE).rstrip(b"\n")
    chain, reader = response_chain(True, strip_usage=True)
    assert through(chain, [token, usage]) == token
    assert reader.usage.completion_tokens == 2


def test_a_json_answer_is_rewritten_whole_and_its_usage_read():
    body = json.dumps({"model": "llama-3-8b", "choices": [], "usage": USAGE["usage"]}).encode()
    for size in (1, 9, len(body)):
        # strip_usage is for streams only: a JSON answer keeps its usage
        chain, usage = response_chain(False, strip_usage=True, served="llama-3-8b", asked="llama")
        assert through(chain, in_chunks(body, size)) == body.replace(b"llama-3-8b", b"llama")
        assert usage.usage == Usage(3, 2, None)


def test_a_gzip_answer_passes_byte_exact_and_unread_as_before():
    sent, _ = stream()
    packed = gzip.compress(sent)
    for streaming in (True, False):
        chain, usage = response_chain(streaming, strip_usage=True, served="x", asked="y")
        assert through(chain, in_chunks(packed, 11)) == packed
        assert usage.usage == Usage()


def test_events_past_the_usage_event_size_are_never_parsed_for_stripping():
    big = {**USAGE, "pad": "p" * MAX_USAGE_EVENT}
    sent = event(big)
    chain, _usage = response_chain(True, strip_usage=True)
    assert through(chain, [sent]) == sent


# ---- bounded: what is held, and the parts of what is too long to hold ---------------------


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_a_separator_split_across_chunks_after_a_long_event_is_found(size):
    sent = b"data: " + b"y" * 100 + b"\n\n" + USAGE_EVENT + b"data: [DONE]\n\n"
    chain = ResponseChain([UsageReader(True), UsageEventStripper()], True, cap=64)
    assert through(chain, in_chunks(sent, size)) == sent.replace(USAGE_EVENT, b"")


STREAM_BYTES = 16 * 1024 * 1024
STREAM_CHUNK = 64 * 1024


def newline_less_chunks():
    yield b"data: " + b"x" * (STREAM_CHUNK - 6)
    for _ in range(STREAM_BYTES // STREAM_CHUNK - 1):
        yield b"x" * STREAM_CHUNK


def test_a_16_mib_event_is_passed_on_as_it_comes_holding_a_bounded_part():
    chain, usage = response_chain(True, strip_usage=True, served="served-model", asked="asked")
    passed = most_held = 0

    def feed():
        nonlocal passed, most_held
        for chunk in newline_less_chunks():
            passed += sum(map(len, chain.feed(chunk)))
            most_held = max(most_held, chain.held_bytes)

    peak = peak_allocated(feed)
    assert most_held <= MAX_HELD
    assert peak < MAX_HELD + 8 * STREAM_CHUNK
    tail = b'\n\ndata: {"choices":[],"usage":{"completion_tokens":2}}\n\ndata: [DONE]\n\n'
    rest = b"".join(chain.feed(tail)) + b"".join(chain.flush())
    assert passed + len(rest) == STREAM_BYTES + len(b"\n\ndata: [DONE]\n\n")  # nothing lost
    assert rest == b"\n\ndata: [DONE]\n\n"  # the usage event after it is removed
    assert usage.usage.completion_tokens == 2 and usage.lines_too_long == 1


def test_the_model_rewriter_holds_no_more_than_a_pattern_of_a_long_part():
    rewriter = ModelNameRewriter("served-model", "asked")
    passed = 0

    def feed():
        nonlocal passed
        for chunk in newline_less_chunks():
            passed += len(rewriter.part(chunk, line_open=True))

    peak = peak_allocated(feed)
    assert peak < 8 * STREAM_CHUNK
    assert passed + len(rewriter.flush()) == STREAM_BYTES


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13, 1000])
def test_the_name_is_rewritten_in_parts_split_anywhere(size):
    body = json.dumps({"model": "llama-3-8b", "x": "y" * 200, "again": {"model": "llama-3-8b"}})
    chain = ResponseChain([ModelNameRewriter("llama-3-8b", "llama")], streaming=False, cap=16)
    out = through(chain, in_chunks(body.encode(), size))
    assert out == body.replace("llama-3-8b", "llama").encode()


def test_a_json_answer_over_the_cap_is_passed_on_unread():
    body = json.dumps({"model": "m", "pad": "p" * 100, "usage": USAGE["usage"]}).encode()
    reader = UsageReader(False)
    chain = ResponseChain([reader, ModelNameRewriter("m", "asked")], streaming=False, cap=64)
    assert through(chain, in_chunks(body, 10)) == body.replace(b'"m"', b'"asked"')
    assert reader.truncated and reader.usage == Usage()


def test_release_passes_what_is_held_on_and_leaves_its_line_unread():
    reader = UsageReader(True)
    chain = ResponseChain([reader, UsageEventStripper()], streaming=True)
    token, usage = event(TOKEN), event(USAGE)
    out = chain.feed(token + usage[:20])
    assert b"".join(out) == token and chain.held_bytes == 20
    out = chain.release()  # the budget is spent: the unfinished usage event goes on as it is
    assert b"".join(out) == usage[:20] and chain.held_bytes == 0
    assert through(chain, [usage[20:], event(USAGE)]) == usage[20:]  # the next one is whole
    assert reader.lines_too_long == 1 and reader.usage.completion_tokens == 2


def test_release_of_a_json_answer_leaves_it_unread():
    reader = UsageReader(False)
    chain = ResponseChain([reader], streaming=False)
    chain.feed(b'{"usage":{"prompt_tokens":1}')
    assert chain.held_bytes > 0 and chain.release() == []  # a reader passed it on already
    through(chain, [b"}"])
    assert reader.truncated and reader.usage == Usage()


def test_picker_messages_carry_at_most_the_protocol_chunk():
    big = bytearray(b"z" * (protocol.MAX_CHUNK * 2 + 5))
    msgs = list(protocol.response_body_chunks([b"a", big, b""], eos=True))
    bodies = [m.response_body.response.body_mutation.streamed_response for m in msgs]
    assert b"".join(b.body for b in bodies) == b"a" + big
    assert max(len(b.body) for b in bodies) <= protocol.MAX_CHUNK
    assert [b.end_of_stream for b in bodies] == [False] * (len(bodies) - 1) + [True]
    (empty,) = protocol.response_body_chunks([], eos=False)
    assert empty.response_body.response.body_mutation.streamed_response.body == b""


# ---- properties ------------------------------------------------------------------------------

stream_events = st.lists(
    st.one_of(
        st.just(USAGE_EVENT),
        st.binary(max_size=600).map(
            lambda b: b"data: " + b.replace(b"\n", b" ").replace(b"usage", b"u") + b"\n\n"
        ),
    ),
    max_size=8,
)


@pytest.mark.fuzz
@fuzz_settings(300)
@given(events=stream_events, cuts=st.lists(st.integers(0, 6000), max_size=8))
def test_the_stripper_removes_exactly_the_usage_events_however_the_stream_is_cut(events, cuts):
    sent = b"".join(events)
    bounds = sorted({0, len(sent), *(c % (len(sent) + 1) for c in cuts)})
    chunks = [sent[a:b] for a, b in itertools.pairwise(bounds)]
    # A small cap: long events pass on in parts.
    chain = ResponseChain([UsageReader(True), UsageEventStripper()], True, cap=200)
    assert through(chain, chunks) == b"".join(e for e in events if e != USAGE_EVENT)


@pytest.mark.fuzz
@fuzz_settings(300)
@given(
    streaming=st.booleans(),
    cap=st.integers(1, 300),
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.sampled_from([b"\n", b"\r\n", b"\n\n", b"data: ", b'"model":"s"', b'"usage"']),
        ),
        max_size=30,
    ),
)
def test_any_bytes_pass_whole_with_only_the_name_rewritten(streaming, cap, chunks):
    chain = ResponseChain([UsageReader(streaming), ModelNameRewriter("s", "a")], streaming, cap)
    out = through(chain, chunks)
    assert out == b"".join(chunks).replace(b'"model":"s"', b'"model":"a"')


# ---- through the ext_proc stream -------------------------------------------------------------


async def test_the_picker_strips_the_usage_event_it_asked_for_however_envoy_cuts_the_answer():
    from infergw.epp.body_budget import BodyBudget
    from infergw.epp.extproc import _Stream
    from tests import extproc_client as ec
    from tests.director_fixtures import director_with, limited_route

    token, done = b'data: {"choices":[{"text":"a"}]}\n\n', b"data: [DONE]\n\n"
    sent = token + USAGE_EVENT + done
    for cut in range(1, len(sent)):
        budget = BodyBudget()
        stream = _Stream(director_with(limited_route(outputTokensPerUnit=50)), budget)
        stream.on_request_headers(ec.headers())
        await stream.on_request_body(ec.body({"model": "m", "prompt": "hi", "stream": True}))
        assert stream.ctx is not None and stream.ctx.strip_usage  # the picker asked for it
        stream.on_response_headers(ec.response_headers(content_type="text/event-stream"))
        out = [*stream.on_response_body(ec.response_body(sent[:cut], False))]
        out += stream.on_response_body(ec.response_body(sent[cut:], True))
        got = ec.streamed_bodies(out, "response_body")
        assert b"".join(body for body, _ in got) == token + done, cut
        assert [eos for _, eos in got][-1] is True
        assert stream.usage.usage.completion_tokens == 2
        stream.close()
        assert budget.held == 0
