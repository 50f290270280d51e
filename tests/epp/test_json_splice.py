"""epp/json_splice.py: a top-level member is set in the body's bytes, nothing else changes."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infergw.epp.json_splice import find_member, member_count, set_member, value_offset
from tests.fuzzing import fuzz_settings

KEYS = st.sampled_from(["model", "stream_options", "x", 'mo"del', "model "])
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12) | st.just('"model":"m"'),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=10,
)
documents = st.dictionaries(KEYS, values, min_size=1, max_size=5)


@pytest.mark.fuzz
@fuzz_settings(300)
@given(doc=documents, new=values, spaced=st.booleans(), key=st.sampled_from(["model", "x"]))
def test_setting_a_member_changes_only_that_member(doc, new, spaced, key):
    separators = (", ", ": ") if spaced else (",", ":")
    raw = json.dumps(doc, separators=separators).encode()
    current = json.dumps(doc[key], separators=separators).encode() if key in doc else None
    out = set_member(raw, key, json.dumps(new).encode(), current)
    assert json.loads(out) == {**doc, key: new}
    if key in doc:  # the rest of the bytes are the client's
        at = value_offset(raw, key)
        assert out[:at] == raw[:at] and out.endswith(raw[at + len(current) :])


def test_the_last_of_repeated_members_is_set_as_decoders_keep_the_last():
    raw = b'{"model":"a","tools":[{"model":"a"}],"model":"b"}'
    assert set_member(raw, "model", b'"c"', b'"b"') == raw.replace(b'"b"', b'"c"')


def test_a_member_name_written_with_escapes_is_not_found():
    raw = b'{"mod\\u0065l":"a","tools":[{"model":"a"}]}'
    assert value_offset(raw, "model") is None
    with pytest.raises(ValueError):
        set_member(raw, "model", b'"c"', b'"a"')


def test_a_missing_member_is_added_first():
    assert set_member(b'{"a":1}', "stream_options", b"{}", None) == b'{"stream_options":{},"a":1}'
    assert set_member(b"{ }", "model", b'"m"', None) == b'{"model":"m" }'


@pytest.mark.parametrize(
    ("raw", "count"),
    [
        (b'{"model":"a"}', 1),
        (b'{"model":"a","model":"b"}', 2),
        (b'{"model":"a", "mod\\u0065l":"b"}', 2),
        (b'{"\\u006D\\u006f\\u0064\\u0065\\u006c" : "a"}', 1),
        (b'{"tools":[{"model":"a"}],"x":{"mod\\u0065l":1},"model":"b"}', 1),
        (b'{"x":"mod\\u0065l","y":["model"],"models":1}', 0),
    ],
)
def test_member_count_reads_names_as_decoders_do(raw, count):
    assert len([k for k, _ in json.loads(raw, object_pairs_hook=list) if k == "model"]) == count
    assert member_count(raw, "model") == count


def reference_find_member(doc: bytes, key: str) -> tuple[int, int | None]:
    """find_member as first written: a lookbehind tried at every byte."""
    from infergw.epp.json_splice import _any_spelling, _depth_change

    pattern = re.compile(rb'(?<=[{,\s])"' + _any_spelling(key) + rb'"\s*:\s*')
    plain = b'"' + json.dumps(key).encode()[1:-1] + b'"'
    depth, last, count, offset = 0, 0, 0, None
    for match in pattern.finditer(doc):
        depth += _depth_change(doc[last : match.start()])
        last = match.start()
        if depth == 1:
            count += 1
            if match.group().startswith(plain):
                offset = match.end()
    return count, offset


spellings = st.sampled_from(
    [b'"model"', b'"mod\\u0065l"', b'"\\u006D\\u006f\\u0064\\u0065\\u006c"', b'"stream_options"']
)
pieces = st.one_of(
    spellings,
    st.sampled_from([b"{", b"}", b"[", b"]", b",", b":", b" ", b"\n", b'"', b"\\", b'"x"', b"1"]),
    st.binary(max_size=6),
)


@pytest.mark.fuzz
@fuzz_settings(500)
@given(
    doc=st.one_of(
        documents.map(lambda d: json.dumps(d).encode()),
        st.lists(pieces, max_size=30).map(b"".join),
    ),
    key=st.sampled_from(["model", "stream_options"]),
)
def test_members_are_found_as_the_lookbehind_pattern_found_them(doc, key):
    member = find_member(doc, key)
    assert (member.count, member.offset) == reference_find_member(doc, key)
