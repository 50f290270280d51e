"""The request a log line was written for: its request id and trace id, carried in a
contextvar that the server sets where it starts handling a request (the picker: the ext_proc
stream's request headers), so every line logged while handling it names them without each
call passing them on. Tasks started from there inherit it (asyncio copies the context).

Header values are the client's: clipped here, and escaped by the formatter (api/log_format.py),
so a hostile `x-request-id` can neither flood a log line nor forge one.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Mapping
from typing import NamedTuple

from infergw.api.names import REQUEST_ID_HEADER, TRACEPARENT_HEADER

# A request id longer than this is clipped in log lines (Envoy's are 36, a UUID).
MAX_REQUEST_ID = 128
# W3C Trace Context, version 00 only: lower-case hex, 55 characters.
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


class RequestFields(NamedTuple):
    """What a log line says about the request it was written for (a tuple: made once a
    request, on the hot path, where a frozen dataclass costs several times more)."""

    request_id: str | None = None
    trace_id: str | None = None  # from the request's traceparent; a live span's wins
    span_id: str | None = None


_current: contextvars.ContextVar[RequestFields | None] = contextvars.ContextVar(
    "infergate_log_request", default=None
)


def parse_traceparent(value: str | None) -> tuple[str, str] | None:
    """(trace id, parent span id) of a W3C `traceparent` header, or None unless it is exactly
    a valid version-00 value (all-zero ids are invalid, as the spec says)."""
    if value is None or len(value) != 55:
        return None
    m = _TRACEPARENT.fullmatch(value)
    if m is None:
        return None
    trace_id, span_id = m.groups()
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id


def clip(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[:limit] + "…"


def fields_from_headers(headers: Mapping[str, str]) -> RequestFields:
    """The request's fields from its headers (lower-case names, as ext_proc gives them)."""
    request_id = headers.get(REQUEST_ID_HEADER)
    trace = parse_traceparent(headers.get(TRACEPARENT_HEADER))
    return RequestFields(
        request_id=clip(request_id, MAX_REQUEST_ID) if request_id else None,
        trace_id=trace[0] if trace else None,
        span_id=trace[1] if trace else None,
    )


def bind_request(headers: Mapping[str, str]) -> None:
    """From here on in this context (and the tasks it starts), log lines name this request."""
    _current.set(fields_from_headers(headers))


def name_request(request_id: str) -> None:
    """The request's id once the server knows it (it makes one when the request had none)."""
    fields = _current.get()
    if fields is not None and fields.request_id is None:
        _current.set(fields._replace(request_id=clip(request_id, MAX_REQUEST_ID)))


def unbind_request() -> None:
    _current.set(None)


def current() -> RequestFields | None:
    return _current.get()
