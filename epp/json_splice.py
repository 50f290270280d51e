"""Set one top-level member of a JSON object in its bytes, leaving the rest as it was sent.

Rewriting a request's model must not cost a Python object tree of its body (see
epp/request_body.py), so the member's bytes are located instead: every `"key":` that opens a
member is found with one regex pass, and its nesting depth is counted on the bytes between
candidates with strings removed — linear in the body however many nested objects reuse the key.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from typing import NamedTuple

# A JSON string (the unrolled form: linear, no backtracking).
JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_CLOSE = re.compile(rb"\s*}")


def _depth_change(segment: bytes) -> int:
    """Brackets opened minus closed in `segment`, which starts and ends outside strings."""
    bare = JSON_STRING.sub(b"", segment) if b'"' in segment else segment
    return bare.count(b"{") + bare.count(b"[") - bare.count(b"}") - bare.count(b"]")


# A quote after `{`, `,` or blank space is never inside a string (there it is escaped), and a
# string followed by `:` is a member's name. (Checked on the byte before a match rather than
# by a lookbehind, which the regex engine would try at every byte of the body.)
_BEFORE_NAME = frozenset(b"{, \t\n\r\f\v")


@functools.lru_cache(maxsize=64)
def _member_pattern(name: bytes) -> re.Pattern[bytes]:
    return re.compile(rb'"' + name + rb'"\s*:\s*')


def _top_level(doc: bytes, name: bytes) -> Iterator[re.Match]:
    """The top-level members of `doc` whose name (the bytes between its quotes) matches the
    pattern `name`, in order; each match ends where the member's value starts."""
    pattern = _member_pattern(name)
    depth, last = 0, 0
    for match in pattern.finditer(doc):
        at = match.start()
        # (A match refused here holds no quote a name could start at: none is skipped.)
        if not at or doc[at - 1] not in _BEFORE_NAME:
            continue
        depth += _depth_change(doc[last:at])
        last = at
        if depth == 1:
            yield match


@functools.lru_cache(maxsize=64)  # the keys are the picker's own few member names
def _any_spelling(key: str) -> bytes:
    """A pattern for `key` (ASCII, no quote or backslash) with any of its characters written
    as a \\uXXXX escape, in either case of hex digit, as decoders read it."""
    out = b""
    for char in key:
        hex_digits = "".join(f"[{h}{h.upper()}]" if h.isalpha() else h for h in f"{ord(char):04x}")
        out += b"(?:" + re.escape(char.encode()) + rb"|\\u" + hex_digits.encode() + b")"
    return out


@functools.lru_cache(maxsize=64)
def _plain_name(key: str) -> bytes:
    return json.dumps(key).encode()


class Member(NamedTuple):
    """What one pass over `doc` finds of its top-level member `key`."""

    count: int  # members a decoder reads as `key`, however their names are spelled
    offset: int | None  # where the value of the last one written plainly starts


def find_member(doc: bytes, key: str) -> Member:
    """Count and locate `key`'s top-level members in one pass over `doc` (decoders keep the
    last of repeated keys)."""
    plain = _plain_name(key)
    count, offset = 0, None
    for match in _top_level(doc, _any_spelling(key)):
        count += 1
        if match.group().startswith(plain):
            offset = match.end()
    return Member(count, offset)


def value_offset(doc: bytes, key: str) -> int | None:
    """Where the value of `doc`'s top-level member `key` starts; None when no member is
    written under that name (absent, or its name spelled with escape sequences). Of repeated
    keys the last counts, as decoders keep the last."""
    return find_member(doc, key).offset


def member_count(doc: bytes, key: str) -> int:
    """How many top-level members of `doc` a decoder reads as `key`, however their names are
    spelled: a decoder keeps the last, value_offset finds the last written plainly."""
    return find_member(doc, key).count


def set_member(doc: bytes, key: str, value: bytes, current: bytes | None) -> bytes:
    """`doc` (a JSON object) with its top-level member `key` set to the JSON `value`.
    `current`: the member's value as a decoder read it, None when `doc` has none. Raises
    ValueError when the member is not where value_offset finds it."""
    if current is None:
        at = doc.index(b"{") + 1
        comma = b"" if _CLOSE.match(doc, at) else b","
        return b"".join((doc[:at], json.dumps(key).encode(), b":", value, comma, doc[at:]))
    at = value_offset(doc, key)
    if at is None or not doc.startswith(current, at):
        raise ValueError(f"member {key!r} is not written where a decoder reads it")
    view = memoryview(doc)
    return b"".join((view[:at], value, view[at + len(current) :]))
