"""Remove the usage event the picker asked the engine for: when a streamed request did not set
`stream_options.include_usage`, the picker sets it (output tokens are charged to rate limits
and fair shares), and the extra final event — `"choices":[]` with the usage — goes away again
before the client sees it. Whole events pass at once; only an unfinished event waits for the
rest of its bytes."""

from __future__ import annotations

import json

_SEPARATOR = b"\n\n"


class UsageEventStripper:
    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> bytes:
        data = self._partial + data
        end = data.rfind(_SEPARATOR)
        if end < 0:
            self._partial = data
            return b""
        complete, self._partial = data[: end + 2], data[end + 2 :]
        if b'"usage"' not in complete:
            return complete
        events = complete.split(_SEPARATOR)
        kept = [e for e in events[:-1] if not _usage_only(e)]
        return b"".join(e + _SEPARATOR for e in kept)

    def flush(self) -> bytes:
        rest, self._partial = self._partial, b""
        return b"" if _usage_only(rest) else rest


def _usage_only(event: bytes) -> bool:
    line = event.strip()
    if not line.startswith(b"data:") or b'"usage"' not in line:
        return False
    try:
        doc = json.loads(line[5:])
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("choices") == [] and bool(doc.get("usage"))
