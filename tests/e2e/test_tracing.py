"""One trace through the real local stack: with the OTEL_* variables naming a collector this
test runs (gRPC: Envoy's OpenTelemetry tracer speaks it; the picker and simulator pods too),
a request yields spans from Envoy, the picker and the simulator pod that share one trace id,
the picker's under Envoy's ext_proc call and the pod's under Envoy's request; the picker's
phases and plugins, and the pod's prefill and decode, under theirs. No span carries the
prompt or the completion."""

from __future__ import annotations

import json
import time

import pytest
import requests

from tests.e2e.stack_fixtures import make_stack
from tests.otlp_receiver import GrpcReceiver, HttpReceiver, ReceivedSpan

pytestmark = pytest.mark.slow

SECRET = "zebra-umbrella-4711"  # in the prompt; must appear in no span
PICKER_PHASES = {"gateway.parse", "gateway.route", "gateway.flow_control", "gateway.schedule"}


def _complete(stack, stream: bool, model: str = "infergate-sim") -> str:
    r = requests.post(
        f"{stack.url}/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": f"tell me about {SECRET} " * 8}],
            "max_tokens": 5,
            "stream": stream,
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.text


def _traces(spans: list[ReceivedSpan]) -> list[list[ReceivedSpan]]:
    """The traces that have Envoy's, the picker's and the pod's spans."""
    by_trace: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, []).append(s)
    whole = []
    for trace in by_trace.values():
        names = {s.name for s in trace}
        services = {s.service for s in trace}
        if {"gateway.request", "simulator.request", "simulator.decode"} <= names and (
            "infergate-envoy" in services
        ):
            whole.append(trace)
    return whole


def _one_trace(spans: list[ReceivedSpan]) -> list[ReceivedSpan] | None:
    found = _traces(spans)
    return found[0] if found else None


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
    for answer in answers:  # each completion's whole text too (a stream's deltas joined)
        parts = []
        for line in answer.splitlines():
            line = line.removeprefix("data: ").strip()
            if not line.startswith("{"):
                continue
            for choice in json.loads(line).get("choices", []):
                parts.append((choice.get("message") or choice.get("delta") or {}).get("content"))
        text = "".join(p for p in parts if p).strip()
        assert len(text) > 8, answer  # long enough to be found only where it was copied
        words.add(text)
    for s in spans:
        dumped = json.dumps([s.name, s.attributes], default=str)
        for word in words:
            assert word not in dumped, (s.name, word)


def test_one_trace_from_envoy_through_the_picker_to_the_pod(tmp_path, monkeypatch):
    """A JSON answer's trace and a stream's, on one stack (each stack costs ~25 s to start)."""
    with GrpcReceiver() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
        stack = make_stack(tmp_path, pods=2)
        try:
            answers = {stream: _complete(stack, stream) for stream in (False, True)}
            spans = collector.spans.wait_for(lambda s: len(_traces(s)) == 2, timeout=30)
        finally:
            stack.stop()
    traces = _traces(spans)
    assert len(traces) == 2, sorted({(s.service, s.name) for s in spans})
    for trace in traces:
        (request,) = [s for s in trace if s.name == "gateway.request"]
        _check_trace(trace, stream=request.attributes["infergate.stream"])
    _no_prompt_anywhere(spans, list(answers.values()))


def test_over_http_protobuf_with_the_body_based_router(tmp_path, monkeypatch):
    """OTLP/HTTP for every component (Envoy's http_service, the SDK's HTTP exporter), on
    examples/two-models as `infergate up` runs it: the body-based router's span joins the
    trace too, under Envoy's ext_proc call to it, naming the pool it chose."""
    from infergw.stack.example import Example
    from infergw.stack.local import LocalStack, StackConfig
    from infergw.stack.ports import free_stack_ports
    from infergw.stack.resources import EXAMPLES

    with HttpReceiver() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        example = Example.read(EXAMPLES / "two-models").with_changes(
            tmp_path / "example", engine_args=["--sim-time-scale=0.2"]
        )
        ports = free_stack_ports(pods=example.pod_count(), pickers=len(example.models))
        with LocalStack(StackConfig.from_example(example, tmp_path / "stack", ports)) as stack:
            answers = [_complete(stack, False, model="code-sim")]

            def routed(spans: list[ReceivedSpan]) -> bool:
                trace = _one_trace(spans)
                return trace is not None and any(s.name == "router.request" for s in trace)

            spans = collector.spans.wait_for(routed, timeout=30)
    trace = _one_trace(spans)
    assert trace is not None, sorted({(s.service, s.name) for s in spans})
    ids = {s.span_id: s for s in trace}
    (router,) = [s for s in trace if s.name == "router.request"]
    assert router.service == "infergate-bbr"
    assert ids[router.parent_span_id].service == "infergate-envoy"
    assert router.attributes["infergate.pool"] == "code"
    assert router.attributes["gen_ai.request.model"] == "code-sim"
    (request,) = [s for s in trace if s.name == "gateway.request"]
    assert request.attributes["gen_ai.request.model"] == "code-sim"
    assert ids[request.parent_span_id].service == "infergate-envoy"
    (pod,) = [s for s in trace if s.name == "simulator.request"]
    assert pod.attributes["gen_ai.usage.output_tokens"] == 5
    _no_prompt_anywhere(spans, answers)


def test_the_pd_legs_join_the_trace(tmp_path, monkeypatch):
    """examples/pd (the controllers run the pods; each decode pod's sidecar in front of its
    engine): a long new prompt's trace holds the sidecar's prefill and decode legs, each the
    parent of the engine it called, under the picker's and Envoy's; the controllers export
    their reconciles too."""
    from infergw.stack.example import Example
    from infergw.stack.local import LocalStack, StackConfig
    from infergw.stack.ports import free_stack_ports
    from infergw.stack.resources import EXAMPLES
    from tests.e2e.pd_helpers import PD, complete, long_prompt

    with GrpcReceiver() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        example = Example.read(EXAMPLES / "pd")
        stack = LocalStack(StackConfig.from_example(example, tmp_path, free_stack_ports(pods=1)))
        with stack:
            running = PD(stack)
            deadline = time.monotonic() + 60
            while len(running.pods()) < 4:
                assert time.monotonic() < deadline, "4 ready pods in the pool file"
                time.sleep(0.2)
            r, _rid = complete(stack, long_prompt())
            assert r.status_code == 200, r.text

            def done(spans: list[ReceivedSpan]) -> bool:
                return _pd_trace(spans) is not None and any(
                    s.service == "infergate-controllers" for s in spans
                )

            spans = collector.spans.wait_for(done, timeout=30)
    trace = _pd_trace(spans)
    assert trace is not None, sorted({(s.service, s.name) for s in spans})
    ids = {s.span_id: s for s in trace}
    (prefill_leg,) = [s for s in trace if s.name == "connector.prefill"]
    (decode_leg,) = [s for s in trace if s.name == "connector.decode"]
    engines = [s for s in trace if s.name == "simulator.request"]
    assert {ids[e.parent_span_id].name for e in engines} == {
        "connector.prefill",
        "connector.decode",
    }
    (sidecar,) = [s for s in trace if s.name == "connector.request"]
    assert ids[prefill_leg.parent_span_id] is sidecar and ids[decode_leg.parent_span_id] is sidecar
    assert ids[sidecar.parent_span_id].service in ("infergate-envoy", "infergate-epp")
    assert any(s.name == "gateway.request" for s in trace)
    assert any(s.name == "controller.reconcile" for s in spans)


def _pd_trace(spans: list[ReceivedSpan]) -> list[ReceivedSpan] | None:
    by_trace: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, []).append(s)
    for trace in by_trace.values():
        names = [s.name for s in trace]
        ids = {s.span_id for s in trace}
        whole = all(s.parent_span_id in ids for s in trace if s.parent_span_id)
        if {"connector.prefill", "connector.decode", "gateway.request"} <= set(names) and (
            names.count("simulator.request") == 2 and whole  # Envoy's spans came too
        ):
            return trace
    return None
