"""api/tracing.py: the OTEL_* variables read as the OpenTelemetry spec says (off when none
names an exporter, bad values refused naming the variable), nothing of the SDK imported while
off, and spans exported over OTLP — HTTP and gRPC — to receivers this test runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from infergw.api import tracing
from tests.otlp_receiver import GrpcReceiver, HttpReceiver


def test_off_when_no_variable_names_an_exporter():
    assert tracing.settings_from_env({}) is None
    # A service name or a sampler alone exports nothing: no collector was named.
    only = {"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}
    assert tracing.settings_from_env(only) is None
    assert tracing.settings_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                      "OTEL_SDK_DISABLED": "true"}) is None  # fmt: skip
    assert tracing.settings_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                      "OTEL_TRACES_EXPORTER": "none"}) is None  # fmt: skip


def test_endpoints_as_the_spec_says():
    s = tracing.settings_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"})
    assert (s.protocol, s.endpoint) == ("http/protobuf", "http://c:4318/v1/traces")
    s = tracing.settings_from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://t/x",
        }
    )
    assert s.endpoint == "https://t/x"  # the per-signal URL is used as it is
    assert s.host_port == ("t", 443, True)
    s = tracing.settings_from_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    )
    assert (s.protocol, s.endpoint, s.host_port) == ("grpc", "http://c:4317", ("c", 4317, False))
    s = tracing.settings_from_env({"OTEL_TRACES_EXPORTER": "otlp"})
    assert s.endpoint == "http://localhost:4318/v1/traces"
    assert s.sampler == "parentbased_always_on" and s.sampled_share == 1.0


def test_the_reference_tracing_flag_takes_its_defaults():
    s = tracing.settings_from_env({}, force=True)
    assert (s.protocol, s.endpoint) == ("grpc", "http://localhost:4317")
    assert (s.sampler, s.ratio) == ("parentbased_traceidratio", 0.1)
    assert s.sampled_share == 0.1
    # What the variables say wins over the reference's defaults.
    s = tracing.settings_from_env({"OTEL_TRACES_SAMPLER": "always_on"}, force=True)
    assert s.sampled_share == 1.0


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://c"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:port"},
         "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
         "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_TRACES_SAMPLER": "sometimes"},
         "OTEL_TRACES_SAMPLER"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_TRACES_SAMPLER_ARG": "half"},
         "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_TRACES_SAMPLER_ARG": "1.5"},
         "OTEL_TRACES_SAMPLER_ARG"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
    ],
)  # fmt: skip
def test_a_value_that_cannot_be_used_is_refused_by_name(env, named):
    with pytest.raises(tracing.TracingConfigError, match=named):
        tracing.settings_from_env(env)


def test_check_says_what_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def without_exporters(name, *args, **kw):
        if name.startswith("opentelemetry.exporter"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", without_exporters)
    with pytest.raises(tracing.TracingConfigError, match="opentelemetry-exporter-otlp-proto-http"):
        tracing.check({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"})
    assert tracing.check({}) is None


def test_the_exporters_import_here():
    """xds-protos ships an older opentelemetry/proto/ that, installed last, breaks the
    exporters (the Makefile and the Dockerfile reinstall opentelemetry-proto after it)."""
    for protocol in ("grpc", "http/protobuf"):
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}
        assert tracing.check(env) is not None


def test_off_imports_nothing_of_opentelemetry():
    """Every component's start with no OTEL_* set: no tracer SDK, no exporter is loaded (redis
    imports opentelemetry's API and metrics SDK itself when they are installed: not ours)."""
    code = (
        "import sys\n"
        "from infergw.api import tracing\n"
        "import infergw.epp.extproc, infergw.simulator.server, infergw.connector.server\n"
        "import infergw.controllers.runner, infergw.bbr.extproc, infergw.runtime.sidecar\n"
        "assert tracing.start('epp', env={}) is None\n"
        "assert not tracing.enabled()\n"
        "with tracing.span('x'):\n"
        "    pass\n"
        "tracer = ('opentelemetry.sdk.trace', 'opentelemetry.exporter')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(tracer))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.fixture
def stopped():
    yield
    tracing.stop()


def _spans_of_one_trace(env: dict) -> None:
    assert tracing.start("test", env=env) is not None
    parent = tracing.start_span("outer", server=True)
    with tracing.current(parent), tracing.span("inner", {"gen_ai.request.model": "m"}):
        headers: dict[str, str] = {}
        tracing.inject(headers)
    tracing.end(parent, {"gen_ai.usage.input_tokens": 3})
    tracing.stop()  # flushes
    return headers


def test_spans_reach_an_http_collector(stopped):
    with HttpReceiver() as rx:
        headers = _spans_of_one_trace(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint, "OTEL_SERVICE_NAME": "svc"}
        )
        spans = rx.spans.wait_for(lambda s: len(s) >= 2, timeout=10)
    by_name = {s.name: s for s in spans}
    outer, inner = by_name["outer"], by_name["inner"]
    assert outer.trace_id == inner.trace_id and inner.parent_span_id == outer.span_id
    assert outer.service == "svc" and outer.attributes["gen_ai.usage.input_tokens"] == 3
    # The injected traceparent names the inner span: the next hop continues from it.
    assert headers["traceparent"].split("-")[1:3] == [inner.trace_id, inner.span_id]


def test_spans_reach_a_grpc_collector(stopped):
    with GrpcReceiver() as rx:
        _spans_of_one_trace(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
        )
        spans = rx.spans.wait_for(lambda s: len(s) >= 2, timeout=10)
    assert {s.name for s in spans} == {"outer", "inner"}
    assert {s.service for s in spans} == {"infergate-test"}


def test_an_unreachable_collector_never_blocks_the_caller(stopped):
    from infergw.stack.ports import free_port  # nothing listens there

    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    tracing.start("test", env=env)
    t0 = time.perf_counter()
    for _i in range(tracing.MAX_QUEUE + 500):  # more than the queue holds: the rest dropped
        with tracing.span("s"):
            pass
    # Liveness, not speed: a caller waiting on the exporter would take 5 s a batch.
    assert time.perf_counter() - t0 < 30
    stop0 = time.perf_counter()
    tracing.stop()
    # The SDK alone retries each queued batch for the export timeout (15 s for these).
    assert time.perf_counter() - stop0 < (tracing.STOP_FLUSH_MS + tracing.EXPORT_TIMEOUT_MS) / 1000


@pytest.mark.parametrize(
    "traceparent",
    ["garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "00-" + "a" * 5000, "ff-x-y-z"],
)
def test_a_hostile_traceparent_starts_a_trace_of_our_own(stopped, traceparent):
    with HttpReceiver() as rx:
        tracing.start("test", env={"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint})
        parent = tracing.extract({"traceparent": traceparent, "tracestate": "k=v," * 1000})
        span = tracing.start_span("request", parent, server=True)
        assert span.is_recording() and span.get_span_context().is_valid
        assert span.get_span_context().trace_id != 0
        tracing.end(span)
        tracing.stop()  # flushed while the receiver listens: no retries against a closed port


def _main(module: str):
    import importlib

    return importlib.import_module(f"infergw.{module}").main


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        ("simulator.app", []),
        ("connector.app", []),
        ("controllers.app", []),
        ("epp.app", ["--pool-name", "p"]),
        ("bbr.app", []),
        ("runtime.sidecar", ["--engine", "vllm", "--engine-url", "http://127.0.0.1:9",
                             "--served-model-name", "m", "--adapters-file", "a.json",
                             "--models-dir", "models"]),
    ],
)  # fmt: skip
def test_each_component_refuses_to_start_naming_the_variable(monkeypatch, caplog, module, argv):
    """Each command's main, as `infergate up` and the pods run it: exit 2 before it serves,
    the log naming the variable (in-process: a subprocess each cost seconds of imports)."""
    for name in os.environ:
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "lots")
    assert _main(module)(argv) == 2
    assert "OTEL_TRACES_SAMPLER_ARG='lots'" in caplog.text
    assert not tracing.enabled()


@pytest.mark.parametrize(
    "name", ["OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT"]
)
def test_a_span_limit_the_sdk_cannot_use_is_refused_by_name(stopped, monkeypatch, name):
    """The SDK reads these itself: a bad one was a ValueError traceback, not exit 2."""
    monkeypatch.setenv(name, "lots")
    with pytest.raises(tracing.TracingConfigError, match=name):
        tracing.start("test", env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})


def test_a_clients_huge_values_reach_the_collector_clipped(stopped, monkeypatch):
    """A model name can be as long as a body (megabytes) and a request id as long as a header:
    unclipped, every one of the export queue's spans could hold them."""
    monkeypatch.delenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", raising=False)
    monkeypatch.delenv("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", raising=False)
    with HttpReceiver() as rx:
        tracing.start("test", env={"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint})
        span = tracing.start_span("request", None, {"gen_ai.request.model": "m" * 1_000_000})
        tracing.end(span, {"infergate.request_id": "r" * 100_000, "n": 7})
        tracing.stop()
        (got,) = rx.spans.wait_for(lambda s: len(s) >= 1, timeout=10)
    assert got.attributes["gen_ai.request.model"] == "m" * tracing.MAX_ATTRIBUTE_CHARS
    assert got.attributes["infergate.request_id"] == "r" * tracing.MAX_ATTRIBUTE_CHARS
    assert got.attributes["n"] == 7


def test_an_operators_attribute_limit_is_kept(stopped, monkeypatch):
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "10")
    with HttpReceiver() as rx:
        tracing.start("test", env={"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint})
        tracing.end(tracing.start_span("request", None, {"gen_ai.request.model": "m" * 50}))
        tracing.stop()
        (got,) = rx.spans.wait_for(lambda s: len(s) >= 1, timeout=10)
    assert got.attributes["gen_ai.request.model"] == "m" * 10
