"""Read token usage from a model server's answer as it streams past, cheaply.

Streaming (SSE): only `data:` lines that carry a non-null "usage" are parsed, and a line cut
between two chunks is completed from the next one. Non-streaming: the JSON body is kept (up
to a cap) and parsed once at the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_BUFFERED_BODY = 4 * 1024 * 1024


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


class UsageReader:
    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self.usage = Usage()
        self._tail = b""
        self._body = bytearray()
        self.truncated = False
        # SSE data events seen: a stand-in for output tokens when the server sends no usage.
        self.events = 0

    def feed(self, chunk: bytes) -> None:
        if not self.streaming:
            if len(self._body) + len(chunk) <= MAX_BUFFERED_BODY:
                self._body += chunk
            else:
                self.truncated = True
            return
        data = self._tail + chunk
        lines = data.split(b"\n")
        self._tail = lines.pop()  # an unfinished line waits for the next chunk
        for line in lines:
            self._line(line)

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        self.events += 1
        if b'"usage"' not in line:
            return
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        try:
            event = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return
        if not isinstance(event, dict):
            return
        if event.get("usage"):
            _from_usage_object(event["usage"], self.usage)
        elif isinstance(event.get("response"), dict):  # Responses API: response.completed
            _from_usage_object(event["response"].get("usage"), self.usage)

    def finish(self) -> Usage:
        if self.streaming:
            if self._tail:
                self._line(self._tail)
                self._tail = b""
        elif self._body and not self.truncated:
            try:
                body = json.loads(self._body)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                body = None
            if isinstance(body, dict):
                _from_usage_object(body.get("usage"), self.usage)
        return self.usage
