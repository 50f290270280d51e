"""Read token usage from a model server's answer as it streams past, cheaply.

Streaming (SSE): only `data:` lines that carry a non-null "usage" are parsed, and a line cut
between chunks is completed from the next ones: its pieces are kept (up to a cap) and joined
once, when its newline comes, so a stream without newlines costs linear time and bounded
memory. Non-streaming: the JSON body is kept (up to a cap) and parsed once at the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_BUFFERED_BODY = 4 * 1024 * 1024
# A streamed line longer than this is not read (a usage event is a few hundred bytes; the
# Responses API's response.completed repeats the answer, still far below it).
MAX_LINE = MAX_BUFFERED_BODY
_DATA = b"data:"


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
        if payload == b"[DONE]":
            return
        try:
            event = json.loads(payload)
        except (ValueError, RecursionError):  # bad JSON, bad UTF-8, 5000-digit ints
            return
        if not isinstance(event, dict):
            return
        if event.get("usage"):
            _from_usage_object(event["usage"], self.usage)
        elif isinstance(event.get("response"), dict):  # Responses API: response.completed
            _from_usage_object(event["response"].get("usage"), self.usage)

    def finish(self) -> Usage:
        if self.streaming:
            if self._pieces:
                self._line(self._take_line())
        elif self._body and not self.truncated:
            try:
                body = json.loads(self._body)
            except (ValueError, RecursionError):  # bad JSON, bad UTF-8, 5000-digit ints
                body = None
            if isinstance(body, dict):
                _from_usage_object(body.get("usage"), self.usage)
        return self.usage
