"""Remove the usage event the picker asked the engine for: when a streamed request did not set
`stream_options.include_usage`, the picker sets it (output tokens are charged to rate limits
and fair shares), and the extra final event — `"choices":[]` with the usage — goes away again
before the client sees it. Whole events pass at once; only an unfinished event waits for the
rest of its bytes, and only while it is short enough to be that usage event: a longer one is
passed on as it comes, so the bytes held stay bounded and each byte is looked at once."""

from __future__ import annotations

import json

_SEPARATOR = b"\n\n"
# A usage-only event is a few hundred bytes; anything past this cannot be one.
MAX_USAGE_EVENT = 64 * 1024


class UsageEventStripper:
    def __init__(self) -> None:
        self._partial = bytearray()  # the unfinished event, while it may be the usage event
        self._passing = False  # the unfinished event is too long: passed on up to its end
        self._newline_last = False  # the last byte seen was a newline (a split separator)

    @property
    def held_bytes(self) -> int:
        return len(self._partial)

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        out = bytearray()
        if self._passing:
            end = self._separator_end(data)
            if end < 0:
                self._newline_last = data.endswith(b"\n")
                return data
            out += data[:end]
            data = data[end:]
            self._passing = False
        searched = max(0, len(self._partial) - 1)  # a separator may straddle the chunks
        self._partial += data
        self._newline_last = data.endswith(b"\n")
        end = self._partial.rfind(_SEPARATOR, searched)
        if end >= 0:
            complete = bytes(self._partial[: end + 2])
            del self._partial[: end + 2]
            out += complete if b'"usage"' not in complete else _without_usage_events(complete)
        if len(self._partial) > MAX_USAGE_EVENT:
            out += self._partial
            self._partial.clear()
            self._passing = True
        return bytes(out)

    def _separator_end(self, data: bytes) -> int:
        """Where the first event separator in `data` ends, -1 if there is none."""
        if self._newline_last and data.startswith(b"\n"):
            return 1
        at = data.find(_SEPARATOR)
        return -1 if at < 0 else at + 2

    def flush(self) -> bytes:
        rest = bytes(self._partial)
        self._partial.clear()
        return b"" if _usage_only(rest) else rest


def _without_usage_events(complete: bytes) -> bytes:
    events = complete.split(_SEPARATOR)
    return b"".join(e + _SEPARATOR for e in events[:-1] if not _usage_only(e))


def _usage_only(event: bytes) -> bool:
    line = event.strip()
    if not line.startswith(b"data:") or b'"usage"' not in line:
        return False
    try:
        doc = json.loads(line[5:])
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("choices") == [] and bool(doc.get("usage"))
