"""Read token usage from a model server's answer as it streams past, cheaply: a reader stage of
the response chain (`chain.py`), which hands it whole events or the whole JSON body.

Streaming (SSE): only `data:` lines that carry a non-null "usage" are parsed; a line the
framer had to pass on in parts (longer than it holds) is counted as an event but not read.
Non-streaming: the JSON body is parsed once, at the end, unless it was too long to hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import msgspec

from infergw.epp.request_body import present
from infergw.epp.response.chain import Bytes

_DATA = b"data:"
_DATA_AFTER_NEWLINE = b"\n" + _DATA
MAX_USAGE_OBJECT = 64 * 1024  # a usage object is a few counters


@dataclass(slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None


def _from_usage_object(u: object, into: Usage) -> None:
    if not isinstance(u, dict):
        return
    # Chat/completions say prompt/completion_tokens; the Responses API says input/output.
    prompt = u.get("prompt_tokens", u.get("input_tokens"))
    completion = u.get("completion_tokens", u.get("output_tokens"))
    if isinstance(prompt, int):
        into.prompt_tokens = prompt
    if isinstance(completion, int):
        into.completion_tokens = completion
    details = u.get("prompt_tokens_details") or u.get("input_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        into.cached_tokens = details["cached_tokens"]


class _WithUsage(msgspec.Struct):
    """An answer or a streamed event, as far as its usage goes: nothing else is decoded (a
    pod's multi-MiB answer must not become an object tree to find a few counters)."""

    usage: msgspec.Raw = msgspec.Raw()
    response: msgspec.Raw = msgspec.Raw()  # the Responses API's response.completed
    message: msgspec.Raw = msgspec.Raw()  # Anthropic's message_start


_WITH_USAGE = msgspec.json.Decoder(_WithUsage)
_BAD_JSON = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)


def _read_usage(payload: Bytes, into: Usage) -> None:
    """The usage in a JSON answer or event, if it has any; anything malformed is ignored."""
    try:
        doc = _WITH_USAGE.decode(payload)
        usage = doc.usage
        for nested in (doc.response, doc.message):
            if not present(usage) and present(nested):
                usage = _WITH_USAGE.decode(nested).usage
        if present(usage) and len(usage) <= MAX_USAGE_OBJECT:
            _from_usage_object(msgspec.json.decode(usage), into)
    except _BAD_JSON:
        return


class UsageReader:
    """The usage in an answer, and how many SSE data events it had."""

    edits: ClassVar[bool] = False

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self.usage = Usage()
        self.truncated = False  # the JSON body was too long to hold: not read
        self.lines_too_long = 0  # lines passed on in parts, so not read
        # SSE data events seen: a stand-in for output tokens when the server sends no usage.
        self.events = 0
        # The first bytes (enough to tell a data line) of a line being passed on in parts.
        self._open_head: bytes | None = None

    def event(self, data: Bytes) -> Bytes:
        if self.streaming:
            self._lines(data, 0, len(data))
        else:
            _read_usage(data, self.usage)
        return data

    def part(self, data: Bytes, line_open: bool) -> Bytes:
        if not self.streaming:
            self.truncated = True
            return data
        start = 0
        if self._open_head is not None:
            nl = data.find(b"\n")
            wanted = len(_DATA) - len(self._open_head)
            if wanted > 0:
                self._open_head += bytes(data[: wanted if nl < 0 else min(wanted, nl)])
            if nl < 0:
                return data
            self._close_open_line()
            start = nl + 1
        end = data.rfind(b"\n", start) + 1 if line_open else len(data)
        if line_open and end == 0:
            end = start  # no newline after `start`: the whole rest is the open line
        self._lines(data, start, end)
        if line_open:
            self._open_head = bytes(data[end : end + len(_DATA)])
        return data

    def flush(self) -> bytes:
        if self._open_head is not None:
            self._close_open_line()
        return b""

    def _close_open_line(self) -> None:
        self.long_line(self._open_head or b"")
        self._open_head = None

    # ---- as a lines.LineReader: a stream no stage edits is scanned, not framed ----------

    def lines(self, data: Bytes, start: int, end: int) -> None:
        if data.find(b'"usage"', start, end) >= 0:
            self._lines(data, start, end)
        else:  # nothing to parse: count the data lines in C
            first = data.startswith(_DATA, start, end)
            self.events += first + data.count(_DATA_AFTER_NEWLINE, start, end)

    def long_line(self, head: bytes) -> None:
        # Counted as an event, but not read: part of a JSON text carries no usage.
        self.lines_too_long += 1
        if head.startswith(_DATA):
            self.events += 1

    def _lines(self, data: Bytes, start: int, end: int) -> None:
        """Read the lines of data[start:end] (the last may lack its newline)."""
        while start < end:
            nl = data.find(b"\n", start, end)
            stop = end if nl < 0 else nl
            if data.startswith(_DATA, start, stop):
                self.events += 1
                if data.find(b'"usage"', start, stop) >= 0:
                    payload = bytes(data[start + len(_DATA) : stop]).strip()
                    if payload != b"[DONE]":
                        _read_usage(payload, self.usage)
            start = stop + 1
