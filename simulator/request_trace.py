"""A simulated request's spans (api/tracing.py; only when tracing is on): `simulator.request`
for the HTTP exchange, continuing the `traceparent` the gateway (or the P/D sidecar) sent,
and under it the engine's phases as vLLM's metrics name them — `simulator.queue` (waiting),
`simulator.prefill` (scheduled to first token, a decode leg's KV pull included) and
`simulator.decode` (first to last token) — timed from the engine's own timestamps.
Token counts and the model, never the prompt or the output."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from infergw.api import tracing

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from infergw.simulator.request import SimRequest


def begin(headers: Mapping[str, str], path: str, model: str) -> Span | None:
    if not tracing.enabled():
        return None
    return tracing.start_span(
        "simulator.request",
        tracing.extract(headers),
        {"url.path": path, "gen_ai.request.model": model},
        server=True,
    )


def finish(span: Span | None, reqs: list[SimRequest], status: int) -> None:
    """The engine's phases of each of `reqs` as children of `span`, then `span` ends."""
    if span is None:
        return
    if span.is_recording():
        parent = _context(span)
        for r in reqs:
            _phases(parent, r)
    inputs = sum(len(r.prompt_token_ids) for r in reqs)
    outputs = sum(len(r.output_token_ids) for r in reqs)
    tracing.end(
        span,
        {
            "gen_ai.usage.input_tokens": inputs,
            "gen_ai.usage.output_tokens": outputs,
            "gen_ai.usage.cache_read.input_tokens": sum(max(0, r.num_cached_tokens) for r in reqs),
            "http.response.status_code": status,
        },
        error=str(status) if status >= 400 else "",
    )


def _phases(parent, r: SimRequest) -> None:
    points = (r.arrival_time, r.first_scheduled_time, r.first_token_time, r.last_token_time)
    names = ("simulator.queue", "simulator.prefill", "simulator.decode")
    attrs = {"infergate.request_id": r.request_id}
    for name, start, end in zip(names, points, points[1:], strict=False):
        if start is None or end is None or not start:
            break
        span = tracing.start_span(name, parent, attrs, start_time=_epoch_ns(start))
        tracing.end(span, end_time=_epoch_ns(end))


def _epoch_ns(monotonic: float) -> int:
    """A time.monotonic() reading as the wall clock's nanoseconds (what spans carry)."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


def _context(span: Span):
    from opentelemetry import trace

    return trace.set_span_in_context(span)
