"""One request's spans in the picker: `gateway.request` from its headers to the answer's end,
`gateway.parse` and `gateway.response` inside it (the director, gatekeeper and scheduler add
theirs under it while it is current). Made only when tracing is on (api/tracing.py).

The parent is Envoy's ext_proc call (the `traceparent` in the gRPC stream's metadata, where
Envoy's tracer puts it), else a `traceparent` the client sent in the request's headers.
Attributes are sizes, counts, names and outcomes; never the prompt or the answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from infergw.api import tracing
from infergw.api.names import TRACEPARENT_HEADER

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from infergw.epp.context import RequestContext
    from infergw.epp.request import InferenceRequest
    from infergw.epp.scheduling.framework import ResponseInfo

TRACE_HEADERS = (TRACEPARENT_HEADER, "tracestate")
# The inference APIs as GenAI's gen_ai.operation.name says them.
OPERATIONS = {
    "chat": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "responses": "chat",
    "messages": "chat",
}


def trace_headers(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """The W3C trace context among a gRPC call's metadata."""
    found: dict[str, str] = {}
    for key, value in metadata or ():
        if key in TRACE_HEADERS and isinstance(value, str):
            found[key] = value
    return found


class RequestTrace:
    """The spans of one ext_proc stream."""

    __slots__ = ("request", "response")

    def __init__(self, metadata: Mapping[str, str], headers: Mapping[str, str]) -> None:
        parent = tracing.extract(metadata) or tracing.extract(headers)
        self.request: Span | None = tracing.start_span(
            "gateway.request",
            parent,
            {
                "http.request.method": headers.get(":method", ""),
                "url.path": headers.get(":path", "").partition("?")[0][:256],
            },
            server=True,
        )
        self.response: Span | None = None

    def parse(self):
        return tracing.span("gateway.parse")

    def parsed(self, req: InferenceRequest) -> None:
        span = self.request
        if span is None or not span.is_recording():
            return
        span.set_attributes(
            {
                "gen_ai.request.model": req.model,
                "gen_ai.operation.name": OPERATIONS.get(req.api, req.api),
                "http.request.body.size": len(req.raw_body),
                "infergate.request_id": req.request_id,
                "infergate.stream": req.stream,
            }
        )
        if req.max_tokens is not None:
            span.set_attribute("gen_ai.request.max_tokens", req.max_tokens)

    def decided(self, ctx: RequestContext) -> None:
        span = self.request
        if span is None or not span.is_recording():
            return
        attrs = {
            "gen_ai.response.model": ctx.target_model or ctx.request.model,
            "infergate.objective": ctx.objective or "",
            "infergate.priority": ctx.priority,
            "infergate.pod": ctx.targets[0] if ctx.targets else "",
            "infergate.fallbacks": max(0, len(ctx.targets) - 1),
        }
        if ctx.resolution is not None:
            attrs["infergate.route"] = ctx.resolution.route_name
        span.set_attributes(attrs)

    def response_started(self, status: int, served: str | None) -> None:
        if self.request is None:
            return
        self.response = tracing.start_span(
            "gateway.response",
            tracing_context(self.request),
            {"http.response.status_code": status, "infergate.pod": served or ""},
        )

    def finished(
        self,
        info: ResponseInfo | None,
        outcome: str,
        status: int = 0,
        streamed_tokens: int | None = None,
    ) -> None:
        """End the spans. Without usage in the answer, a stream's output tokens are its
        events counted (`streamed_tokens`)."""
        attrs: dict[str, object] = {"infergate.outcome": outcome}
        if status:
            attrs["http.response.status_code"] = status
        if info is not None:
            attrs.update(
                {
                    "gen_ai.usage.input_tokens": info.prompt_tokens,
                    "gen_ai.usage.output_tokens": info.completion_tokens
                    if info.completion_tokens is not None
                    else streamed_tokens,
                    "gen_ai.usage.cache_read.input_tokens": info.cached_tokens,
                    "infergate.ttft_seconds": info.ttft,
                }
            )
            if info.status is not None:
                attrs["http.response.status_code"] = info.status
        error = "" if outcome == "ok" else outcome
        if status >= 400:
            error = str(status)
        tracing.end(self.response, attrs, error)
        tracing.end(self.request, attrs, error)
        self.request = self.response = None


def tracing_context(span: Span):
    from opentelemetry import trace

    return trace.set_span_in_context(span)
