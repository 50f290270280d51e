"""The router's span (tracing on, exported to an OTLP receiver this test runs):
`router.request` continues the trace it is called in, says the model and the pool it chose
(or the status it answered), and never carries the body."""

from __future__ import annotations

import pytest

from infergw.api import tracing
from infergw.api.names import MODEL_NAME_HEADER
from tests import extproc_client as ec
from tests.bbr.router_helpers import chat, router, send
from tests.otlp_receiver import HttpReceiver

TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
SECRET = "zebra-umbrella-4711"


@pytest.fixture
def collector():
    with HttpReceiver() as rx:
        tracing.start("bbr", env={"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint})
        try:
            yield rx
        finally:
            tracing.stop()


def _router_spans(rx: HttpReceiver, count: int):
    tracing.stop()  # flushes what is queued
    spans = rx.spans.wait_for(lambda s: len(s) >= count, timeout=10)
    return [s for s in spans if s.name == "router.request"]


async def test_the_routers_span_continues_the_trace_and_names_the_pool(collector):
    body = chat("code-3b").replace(b'"hi"', f'"{SECRET}"'.encode())
    out = await send(router(), body, headers={"traceparent": TRACEPARENT})
    assert ec.set_headers(out[0])[MODEL_NAME_HEADER] == "code"
    await send(router(), chat("gpt-9"), headers={"traceparent": TRACEPARENT})
    spans = _router_spans(collector, 2)
    by_model = {s.attributes["gen_ai.request.model"]: s for s in spans}
    routed, unknown = by_model["code-3b"], by_model["gpt-9"]
    assert (routed.trace_id, routed.parent_span_id) == (TRACE_ID, PARENT_ID)
    assert routed.attributes["infergate.pool"] == "code"
    assert routed.attributes["infergate.outcome"] == "routed" and not routed.error
    assert routed.attributes["http.request.body.size"] == len(body)
    assert unknown.attributes["http.response.status_code"] == 404 and unknown.error
    assert all(SECRET not in str(s.attributes) for s in spans)


async def test_a_stream_that_ends_early_ends_its_span_as_cancelled(collector):
    await ec.process(router(), [ec.headers("/v1/chat/completions")])  # no body ever came
    (span,) = _router_spans(collector, 1)
    assert span.attributes["infergate.outcome"] == "cancelled"
