"""check_routed_member's shortcut (two scans in C for the usual body) decides as its full
pass over the body (find_member) does, on documents with repeated, escaped, nested and quoted
copies of the member's name."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from infergw.epp.errors import PickerError
from infergw.epp.json_splice import find_member
from infergw.epp.request_body import check_routed_member
from tests.fuzzing import fuzz_settings

NAMES = ["model", "stream_options"]
KEYS = st.sampled_from([*NAMES, "x", "models", "model "])
values = st.recursive(
    st.none()
    | st.integers()
    | st.text(max_size=8)
    | st.sampled_from(['"model"', 'say \\"model\\"', "model", "é"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)
ESCAPED = {"model": '"mod\\u0065l"', "stream_options": '"stream\\u005foptions"'}


def _full_pass(raw_body: bytes, name: str, raw: msgspec.Raw) -> str | None:
    """What check_routed_member answered before the shortcut: the error, or None."""
    if not len(raw):
        return None
    member = find_member(raw_body, name)
    if member.count > 1:
        return "repeated"
    return "escaped" if member.offset is None else None


def _checked(raw_body: bytes, name: str, raw: msgspec.Raw) -> str | None:
    try:
        check_routed_member(raw_body, name, raw)
    except PickerError as exc:
        return "repeated" if "more than once" in exc.message else "escaped"
    return None


@pytest.mark.fuzz
@fuzz_settings(400)
@given(
    members=st.lists(st.tuples(KEYS, values), min_size=1, max_size=5),
    escape=st.lists(st.booleans(), max_size=5),
    ascii_only=st.booleans(),
    name=st.sampled_from(NAMES),
)
def test_the_shortcut_decides_as_the_full_pass(members, escape, ascii_only, name):
    parts = []
    for i, (key, value) in enumerate(members):
        quoted = json.dumps(key)
        if key in ESCAPED and i < len(escape) and escape[i]:
            quoted = ESCAPED[key]
        parts.append(f"{quoted}:{json.dumps(value, ensure_ascii=ascii_only)}")
    raw_body = ("{" + ",".join(parts) + "}").encode()
    raw = msgspec.json.decode(raw_body, type=dict[str, msgspec.Raw]).get(name, msgspec.Raw(b""))
    assert _checked(raw_body, name, raw) == _full_pass(raw_body, name, raw)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'{"model":"a","prompt":"x"}', None),
        (b'{"model":"a","mod\\u0065l":"b"}', "repeated"),
        (b'{"mod\\u0065l":"a"}', "escaped"),
        (b'{"model":"a","model":"b"}', "repeated"),
        (b'{"prompt":"the \\"model\\" is","model":"a"}', None),
        (b'{"x":{"model":1},"model":"a"}', None),
    ],
)
def test_known_bodies(body, error):
    raw = msgspec.json.decode(body, type=dict[str, msgspec.Raw]).get("model", msgspec.Raw(b""))
    assert _checked(body, "model", raw) == error
