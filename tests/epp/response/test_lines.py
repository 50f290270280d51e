"""epp/response/lines.py: a stream only readers look at is scanned for its lines, not framed
into events — and its readers must learn exactly what they learn from the framed events
(chain.Framer), however the stream is cut, its lines end or outgrow the cap."""

from __future__ import annotations

import itertools
import json

from hypothesis import given
from hypothesis import strategies as st

from infergw.epp.response.chain import ResponseChain
from infergw.epp.response.lines import LineScanner
from infergw.epp.response.usage import UsageReader
from tests.fuzzing import fuzz_settings


class FramedReader:
    """A UsageReader the chain cannot scan (no `lines`): it gets framed events and parts."""

    edits = False

    def __init__(self) -> None:
        self.reader = UsageReader(True)

    def event(self, data):
        return self.reader.event(data)

    def part(self, data, line_open):
        return self.reader.part(data, line_open)

    def flush(self):
        return self.reader.flush()


def read_both(chunks: list[bytes], cap: int, release_at: set[int] = frozenset()):
    scanned, framed = UsageReader(True), FramedReader()
    chains = ResponseChain([scanned], True, cap), ResponseChain([framed], True, cap)
    assert chains[0]._scanner is not None and chains[1]._scanner is None
    for i, chunk in enumerate(chunks):
        for chain in chains:
            assert chain.feed(chunk) == ([chunk] if chunk else [])
            assert chain.held_bytes <= cap + len(chunk)
            if i in release_at:
                assert chain.release() == []
            assert chain.held_bytes == (chain._scanner or chain.framer).held_bytes  # kept current
    for chain in chains:
        assert chain.flush() == [] and chain.held_bytes == 0
    return scanned, framed.reader


def learned(r: UsageReader):
    return r.usage, r.events, r.lines_too_long


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
lines = st.one_of(
    st.sampled_from(
        [
            b"data: " + json.dumps({"choices": [{"text": "a"}]}).encode(),
            b"data: " + json.dumps(USAGE).encode(),
            b'data:{"usage":{"prompt_tokens":5,"completion_tokens":9},"choices":[]}',
            b'data: {"usage": null}',
            b"data: [DONE]",
            b"data:",
            b"event: message",
            b': comment "usage"',
            b"id: 7",
            b"",
            b"dat",
            b"x" * 90,
            b"data: " + b"y" * 120,
        ]
    ),
    st.binary(max_size=40),
)
streams = st.lists(st.tuples(lines, st.sampled_from([b"\n", b"\r\n", b"\n\n", b"\r\n\r\n"])))


@fuzz_settings(500)
@given(
    stream=streams,
    cuts=st.lists(st.integers(0, 3000), max_size=12),
    cap=st.sampled_from([1, 4, 16, 64, 100, 4096]),
    last_newline=st.booleans(),
    release_at=st.sets(st.integers(0, 12), max_size=3),
)
def test_scanned_lines_teach_the_readers_what_framed_events_do(
    stream, cuts, cap, last_newline, release_at
):
    data = b"".join(line + end for line, end in stream)
    if not last_newline:
        data = data.rstrip(b"\r\n")
    scanned, framed = read_both(cut(data, cuts), cap, release_at)
    assert learned(scanned) == learned(framed)


@fuzz_settings(500)
@given(chunks=st.lists(st.binary(max_size=64), max_size=20), cap=st.integers(1, 80))
def test_arbitrary_bytes_teach_the_same(chunks, cap):
    scanned, framed = read_both(chunks, cap)
    assert learned(scanned) == learned(framed)


def test_a_line_byte_by_byte_is_read_once_it_ends():
    event = b"data: " + json.dumps(USAGE).encode() + b"\r\n\r\n"
    scanned, framed = read_both([event[i : i + 1] for i in range(len(event))], cap=4096)
    assert scanned.usage.completion_tokens == 2 and learned(scanned) == learned(framed)


def test_only_the_unfinished_line_is_held_and_a_proxy_chunk_is_not_copied():
    scanner = LineScanner([UsageReader(True)], cap=100)
    tail = b"data: {"
    chunk = b'data: {"a":1}\n\ndata: {"b":2}\n' + tail
    scanner.feed(chunk)
    assert scanner.held_bytes == len(tail)
    held = scanner._held
    assert held == tail
    scanner.feed(b"}\n\n")
    assert scanner.held_bytes == 0 and scanner.readers[0].events == 3


def test_a_line_past_the_cap_is_counted_unread_and_the_next_one_read():
    reader = UsageReader(True)
    scanner = LineScanner([reader], cap=10)
    scanner.feed(b"data: " + b"z" * 20)  # past the cap, unfinished: not held
    assert scanner.held_bytes == 0
    scanner.feed(b"z" * 5)
    scanner.feed(b'\ndata: {"usage":{"completion_tokens":4}}\n')
    scanner.flush()
    assert (reader.events, reader.lines_too_long, reader.usage.completion_tokens) == (2, 1, 4)
