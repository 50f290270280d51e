"""The two shapes of a log line: JSON (one object a line, for a cluster's log collector) and
text (for a person at a terminal). Both carry the same fields: time, level, logger, message,
the request's id and trace id when the line was written for one (api/log_context.py), and the
structured fields a call passes as `extra={...}`.

Whatever a line holds may come from a client (a model name, a header): JSON encoding escapes
it; text mode escapes newlines and control characters, so no value can start a forged line.
Messages are clipped, so one hostile value cannot make a line unbounded.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from types import ModuleType

from infergw.api import log_context

# A message (or field) longer than this is clipped: a log line stays a line.
MAX_MESSAGE = 8192
MAX_FIELD = 1024

# The attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# What ends a line for someone: C0 and C1 controls, and Unicode's line and paragraph separators;
# and lone surrogates (a JSON body's "\ud800" decodes to one), which no UTF-8 stream can write.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# What JSON leaves raw outside ASCII: DEL and C1 controls (a terminal acts on \x9b as on ESC [),
# line breaks for readers that split lines as Python does, and lone surrogates.
_JSON_RAW = re.compile(r"[\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or f"\\x{ord(c):02x}"


def escape(text: str) -> str:
    """One line of text, whatever `text` holds."""
    return _CONTROL.sub(_escape_char, text)


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…(+{len(text) - limit} chars)"


def rfc3339(created: float) -> str:
    """UTC with milliseconds: 2026-12-07T15:04:05.123Z."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def _opentelemetry_trace() -> ModuleType | None:
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace


class _TraceIds:
    """The trace a line belongs to: OpenTelemetry's current span when one is live (the picker's
    own span continues the request's trace), else the request's traceparent header."""

    def __init__(self) -> None:
        self.otel = _opentelemetry_trace()

    def __call__(self, fields: log_context.RequestFields | None) -> tuple[str | None, str | None]:
        if self.otel is not None:
            ctx = self.otel.get_current_span().get_span_context()
            if ctx.is_valid:
                return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
        if fields is None:
            return None, None
        return fields.trace_id, fields.span_id


def line_fields(record: logging.LogRecord, trace_ids: _TraceIds) -> dict[str, object]:
    """The request's fields and the call's `extra` fields of one record, in that order."""
    out: dict[str, object] = {}
    fields = log_context.current()
    if fields is not None and fields.request_id is not None:
        out["request_id"] = fields.request_id
    trace_id, span_id = trace_ids(fields)
    if trace_id is not None:
        out["trace_id"], out["span_id"] = trace_id, span_id
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_"):
            out[key] = field_value(value)
    return out


def field_value(value: object) -> object:
    """A call's field as a line carries it: a number as it is, anything else as its text,
    clipped (a model name or header may be the client's, and any size)."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value  # NaN and infinity are not JSON: as text, below
    return clip(str(value), MAX_FIELD)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, then the request's and the
    call's fields, then `exception` (the traceback) when there is one."""

    def __init__(self) -> None:
        super().__init__()
        self.trace_ids = _TraceIds()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": clip(record.getMessage()),
        }
        for key, value in line_fields(record, self.trace_ids).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = clip(self.formatException(record.exc_info))
        if record.stack_info:
            out["stack"] = clip(self.formatStack(record.stack_info))
        text = json.dumps(out, ensure_ascii=False)
        return _JSON_RAW.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class TextFormatter(logging.Formatter):
    """`2026-12-07 15:04:05,123 INFO epp.extproc: message request_id=… trace_id=… key=value`;
    a traceback follows on lines of its own, each indented, so none looks like a log line."""

    FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

    def __init__(self) -> None:
        super().__init__(self.FORMAT)
        self.trace_ids = _TraceIds()

    def format(self, record: logging.LogRecord) -> str:
        head = logging.LogRecord.__new__(logging.LogRecord)
        head.__dict__.update(vars(record))
        head.msg, head.args = escape(clip(record.getMessage())), None
        head.exc_info, head.exc_text, head.stack_info = None, None, None
        line = super().format(head)
        fields = line_fields(record, self.trace_ids)
        if fields:
            line += " " + " ".join(f"{key}={escape(str(value))}" for key, value in fields.items())
        extra = []
        if record.exc_info:
            extra.append(self.formatException(record.exc_info))
        if record.stack_info:
            extra.append(self.formatStack(record.stack_info))
        for block in extra:
            line += "".join(f"\n  {escape(part)}" for part in clip(block).splitlines())
        return line
