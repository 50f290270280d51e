"""Read token usage from a model server's answer as it streams past, cheaply.

Streaming (SSE): only `data:` lines that carry a non-null "usage" are parsed, and a line cut
between chunks is completed from the next ones: its pieces are kept (up to a cap) and joined
once, when its newline comes, so a stream without newlines costs linear time and bounded
memory. Non-streaming: the JSON body is kept (up to a cap) and parsed once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from epp.request_body import present

MAX_BUFFERED_BODY = 4 * 1024 * 1024
# A streamed line longer than this is not read (a usage event is a few hundred bytes; the
# Responses API's response.completed repeats the answer, still far below it).
MAX_LINE = MAX_BUFFERED_BODY
_DATA = b"data:"
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


def _head(pieces: list[bytes]) -> bytes:
    """The first bytes of a line (enough to tell a data line) from its pieces."""
    head = b""
    for piece in pieces:
        head += piece[: len(_DATA) - len(head)]
        if len(head) == len(_DATA):
            break
    return head


class _WithUsage(msgspec.Struct):
    """An answer or a streamed event, as far as its usage goes: nothing else is decoded (a
    pod's multi-MiB answer must not become an object tree to find a few counters)."""

    usage: msgspec.Raw = msgspec.Raw()
    response: msgspec.Raw = msgspec.Raw()  # the Responses API's response.completed


_WITH_USAGE = msgspec.json.Decoder(_WithUsage)
_BAD_JSON = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)


def _read_usage(payload: bytes | bytearray, into: Usage) -> None:
    """The usage in a JSON answer or event, if it has any; anything malformed is ignored."""
    try:
        doc = _WITH_USAGE.decode(payload)
        usage = doc.usage
        if not present(usage) and present(doc.response):
            usage = _WITH_USAGE.decode(doc.response).usage
        if present(usage) and len(usage) <= MAX_USAGE_OBJECT:
            _from_usage_object(msgspec.json.decode(usage), into)
    except _BAD_JSON:
        return


class UsageReader:
    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self.usage = Usage()
        self._body = bytearray()
        self.truncated = False
        # The unfinished line: its pieces, their length, and whether it outgrew MAX_LINE
        # (then only its start is kept, to count it as an event).
        self._pieces: list[bytes] = []
        self._held = 0
        self._overlong = False
        self.lines_too_long = 0  # lines not read for their size
        # SSE data events seen: a stand-in for output tokens when the server sends no usage.
        self.events = 0

    @property
    def held_bytes(self) -> int:
        return len(self._body) + self._held

    def feed(self, chunk: bytes) -> None:
        if not self.streaming:
            if not self.truncated and len(self._body) + len(chunk) <= MAX_BUFFERED_BODY:
                self._body += chunk
            else:
                self.drop_held()  # too long to parse: nothing kept for it
            return
        lines = chunk.split(b"\n")
        rest = lines.pop()  # an unfinished line waits for the next chunk
        for line in lines:
            if self._pieces:
                self._hold(line)
                line = self._take_line()
            self._line(line)
        if rest:
            self._hold(rest)

    def drop_held(self) -> None:
        """Stop buffering (no memory left for it): the body, or the unfinished line, will
        not be read for usage."""
        self._body = bytearray()
        self.truncated = True
        if self._pieces and not self._overlong:
            self._skip_line()

    def _skip_line(self) -> None:
        # Only the line's start is kept (not counted as held), to count it as an event.
        self._pieces, self._held, self._overlong = [_head(self._pieces)], 0, True

    def _hold(self, piece: bytes) -> None:
        if self._overlong:
            return
        if self._held + len(piece) > MAX_LINE:
            self._pieces.append(piece)
            self._skip_line()
            return
        self._pieces.append(piece)
        self._held += len(piece)

    def _take_line(self) -> bytes:
        line = b"".join(self._pieces)
        if self._overlong:
            self.lines_too_long += 1
            # Counted as an event, but not read: truncated JSON carries no usage.
            line = line[: len(_DATA)]
        self._pieces, self._held, self._overlong = [], 0, False
        return line

    def _line(self, line: bytes) -> None:
        if not line.startswith(_DATA):
            return
        self.events += 1
        if b'"usage"' not in line:
            return
        payload = line[5:].strip()
        if payload != b"[DONE]":
            _read_usage(payload, self.usage)

    def finish(self) -> Usage:
        if self.streaming:
            if self._pieces:
                self._line(self._take_line())
        elif self._body and not self.truncated:
            _read_usage(self._body, self.usage)
        return self.usage
