"""Remove the usage event the picker asked the engine for: when a streamed request did not set
`stream_options.include_usage`, the picker sets it (output tokens are charged to rate limits
and fair shares), and the extra final event — `"choices":[]` with the usage — goes away again
before the client sees it. An editing stage of the response chain (`chain.py`): it looks at
whole events only; a part of an event too long to hold cannot be that event and passes."""

from __future__ import annotations

import json
from typing import ClassVar

from infergw.epp.response.chain import Bytes

# A usage-only event is a few hundred bytes; anything past this cannot be one.
MAX_USAGE_EVENT = 64 * 1024


class UsageEventStripper:
    edits: ClassVar[bool] = True

    def event(self, data: Bytes) -> Bytes:
        return b"" if len(data) <= MAX_USAGE_EVENT and _usage_only(data) else data

    def part(self, data: Bytes, line_open: bool) -> Bytes:
        return data

    def flush(self) -> bytes:
        return b""


def _usage_only(event: Bytes) -> bool:
    line = event.strip()
    if not line.startswith(b"data:") or b'"usage"' not in line:
        return False
    try:
        doc = json.loads(line[5:])
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("choices") == [] and bool(doc.get("usage"))
