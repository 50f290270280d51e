"""One trace through the real local stack: with the OTEL_* variables naming a collector this
test runs (gRPC: Envoy's OpenTelemetry tracer speaks it; the picker and simulator pods too),
a request yields spans from Envoy, the picker and the simulator pod that share one trace id,
the picker's under Envoy's ext_proc call and the pod's under Envoy's request; the picker's
phases and plugins, and the pod's prefill and decode, under theirs. No span carries the
prompt or the completion."""

from __future__ import annotations

import json

import pytest
import requests

from tests.e2e.stack_fixtures import make_stack
from tests.otlp_receiver import GrpcReceiver, HttpReceiver, ReceivedSpan

pytestmark = pytest.mark.slow

SECRET = "zebra-umbrella-4711"  # in the prompt; must appear in no span
PICKER_PHASES = {"gateway.parse", "gateway.route", "gateway.flow_control", "gateway.schedule"}


def _complete(stack, stream: bool) -> str:
    r = requests.post(
        f"{stack.url}/v1/chat/completions",
        json={
            "model": "infergate-sim",
            "messages": [{"role": "user", "content": f"tell me about {SECRET} " * 8}],
            "max_tokens": 5,
            "stream": stream,
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.text


def _one_trace(spans: list[ReceivedSpan]) -> list[ReceivedSpan] | None:
    """The spans of the first trace that has the picker's and the pod's request spans."""
    by_trace: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, []).append(s)
    for trace in by_trace.values():
        names = {s.name for s in trace}
        services = {s.service for s in trace}
        if {"gateway.request", "simulator.request", "simulator.decode"} <= names and (
            "infergate-envoy" in services
        ):
            return trace
    return None


def _check_trace(trace: list[ReceivedSpan], stream: bool) -> None:
    ids = {s.span_id: s for s in trace}
    envoy = [s for s in trace if s.service == "infergate-envoy"]
    (request,) = [s for s in trace if s.name == "gateway.request"]
    (pod,) = [s for s in trace if s.name == "simulator.request"]
    # The picker continues Envoy's trace: its request span's parent is Envoy's ext_proc call.
    assert request.service == "infergate-epp"
    assert ids[request.parent_span_id].service == "infergate-envoy"
    # The pod continues it too, from the traceparent in the request Envoy (or the picker) sent.
    assert pod.service == "infergate-simulator"
    assert ids[pod.parent_span_id].service in ("infergate-envoy", "infergate-epp")
    # Envoy's own spans are the trace's root and its children.
    roots = [s for s in trace if s.parent_span_id == "" or s.parent_span_id not in ids]
    assert len(roots) == 1 and roots[0] in envoy

    def under(span: ReceivedSpan, ancestor: ReceivedSpan) -> bool:
        while span.parent_span_id in ids:
            span = ids[span.parent_span_id]
            if span is ancestor:
                return True
        return False

    picker = [s for s in trace if s.service == "infergate-epp" and s is not request]
    assert PICKER_PHASES <= {s.name for s in picker}
    assert all(under(s, request) for s in picker)
    plugins = {s.attributes["infergate.plugin.type"] for s in picker if s.name == "gateway.plugin"}
    assert {"queue-scorer", "precise-prefix-cache-scorer", "max-score-picker"} <= plugins
    (lookup,) = [s for s in picker if s.name == "kvindex.lookup"]
    assert ids[lookup.parent_span_id].attributes["infergate.plugin.type"] == (
        "precise-prefix-cache-scorer"
    )
    phases = {s.name for s in trace if s.service == "infergate-simulator" and under(s, pod)}
    assert {"simulator.queue", "simulator.prefill", "simulator.decode"} <= phases
    # What the request span says: model, sizes, counts, pod, outcome.
    a = request.attributes
    assert a["gen_ai.request.model"] == "infergate-sim"
    assert a["gen_ai.operation.name"] == "chat"
    assert a["http.request.body.size"] > 0
    if stream:  # no usage asked: its events counted (chat's role-only first one among them)
        assert a["gen_ai.usage.output_tokens"] in (5, 6)
    else:
        assert a["gen_ai.usage.output_tokens"] == 5 and a["gen_ai.usage.input_tokens"] > 0
    assert a["infergate.outcome"] == "ok" and a["http.response.status_code"] == 200
    assert ":" in a["infergate.pod"]
    assert pod.attributes["gen_ai.usage.output_tokens"] == 5


def _no_prompt_anywhere(spans: list[ReceivedSpan], answers: list[str]) -> None:
    words = {SECRET}
    for answer in answers:  # the completions' text too
        for line in answer.splitlines():
            line = line.removeprefix("data: ").strip()
            if not line.startswith("{"):
                continue
            for choice in json.loads(line).get("choices", []):
                text = (choice.get("message") or choice.get("delta") or {}).get("content")
                if text and len(text.strip()) > 3:
                    words.add(text.strip())
    for s in spans:
        dumped = json.dumps([s.name, s.attributes], default=str)
        for word in words:
            assert word not in dumped, (s.name, word)


@pytest.mark.parametrize("stream", [False, True])
def test_one_trace_from_envoy_through_the_picker_to_the_pod(tmp_path, monkeypatch, stream):
    with GrpcReceiver() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
        stack = make_stack(tmp_path, pods=2)
        try:
            answers = [_complete(stack, stream) for _ in range(2)]
            spans = collector.spans.wait_for(lambda s: _one_trace(s) is not None, timeout=30)
        finally:
            stack.stop()
    trace = _one_trace(spans)
    assert trace is not None, sorted({(s.service, s.name) for s in spans})
    _check_trace(trace, stream)
    _no_prompt_anywhere(spans, answers)


def test_over_http_protobuf_too(tmp_path, monkeypatch):
    """OTLP/HTTP for every component: Envoy's http_service, the SDK's HTTP exporter."""
    with HttpReceiver() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        stack = make_stack(tmp_path, pods=1)
        try:
            answers = [_complete(stack, False)]
            spans = collector.spans.wait_for(lambda s: _one_trace(s) is not None, timeout=30)
        finally:
            stack.stop()
    trace = _one_trace(spans)
    assert trace is not None, sorted({(s.service, s.name) for s in spans})
    _check_trace(trace, stream=False)
    _no_prompt_anywhere(spans, answers)
