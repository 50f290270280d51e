"""OpenTelemetry tracing from the standard OTEL_* variables, one setup for every component
(picker, simulator, P/D sidecar, controllers; `stack/envoy_tracing.py` renders the same
settings for Envoy).

Off unless an OTLP endpoint is named (or OTEL_TRACES_EXPORTER=otlp, or the reference
picker's --tracing): then nothing of the OpenTelemetry SDK is imported and every hook is one
check of a module global. On: a BatchSpanProcessor with a bounded queue exports from its own
thread, so an unreachable collector drops spans and never blocks or slows a request.

What spans carry: sizes, token counts, model, pod, objective and outcome — never a prompt or
a completion (README, "Tracing").
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

from infergw.api.names import TRACEPARENT_HEADER
from infergw.api.tracing_settings import (
    ENDPOINT,
    GRPC,
    TRACES_ENDPOINT,
    TraceSettings,
    TracingConfigError,
    env_value,
    settings_from_env,
)
from infergw.api.tracing_settings import passed_on as passed_on  # what callers of tracing use

log = logging.getLogger("api.tracing")

# The export queue: spans beyond it are dropped (a down collector costs no memory).
MAX_QUEUE = 2048
EXPORT_TIMEOUT_MS = 5000
# At exit, what is queued gets this long; the rest is dropped, so a collector that is down
# delays no component's stop by more (the SDK alone retries each batch for the timeout).
STOP_FLUSH_MS = 2000
# A span attribute's value is clipped to this many characters, unless the SDK's own
# OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT says otherwise: model names and request ids are the
# client's (as long as a body or a header), and the queue holds MAX_QUEUE spans of them.
MAX_ATTRIBUTE_CHARS = 1024

# infergw depends on them; an environment that lost them gets them back with:
INSTALL_HINT = (
    "pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc "
    "opentelemetry-exporter-otlp-proto-http"
)
PROTO_FIX = "pip install --force-reinstall --no-deps opentelemetry-proto"


def check(env: Mapping[str, str] | None = None) -> TraceSettings | None:
    """What settings_from_env says, and that the SDK and the exporter they need import (a
    launcher checks before it starts anything)."""
    settings = settings_from_env(env)
    if settings is not None:
        _exporter_class(settings.protocol)
    return settings


def _exporter_class(protocol: str) -> Any:
    """The OTLP span exporter for `protocol`; TracingConfigError saying what to install."""
    try:
        import opentelemetry.sdk.trace  # noqa: F401

        if protocol == GRPC:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        if getattr(exc, "name", None) and str(exc.name).startswith("opentelemetry.proto"):
            # xds-protos (Envoy's protos, which the picker needs) ships an older copy of
            # opentelemetry/proto/; installed after opentelemetry-proto, it replaces it.
            raise TracingConfigError(
                f"the OTLP exporter cannot import ({exc}): opentelemetry-proto's files were "
                f"overwritten by xds-protos' older copy; {PROTO_FIX}"
            ) from None
        raise TracingConfigError(
            f"tracing is on (an OTEL_* variable is set) but the OpenTelemetry SDK or its OTLP "
            f"exporter is not installed ({exc}): {INSTALL_HINT}"
        ) from None
    return OTLPSpanExporter


# ---- the process's tracer ------------------------------------------------------------------

_tracer: Tracer | None = None
_provider: Any = None
_span_exporter: Any = None


def start(
    component: str, env: Mapping[str, str] | None = None, *, force: bool = False
) -> TraceSettings | None:
    """Export this process's spans as `env` says (None: off, nothing imported). Raises
    TracingConfigError for a value it cannot use, or when the SDK is not installed."""
    global _tracer, _provider, _span_exporter
    settings = settings_from_env(env, force=force)
    if settings is None:
        return None
    exporter = _exporter(settings)  # first: it says what is missing
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create(
        {
            "service.name": settings.service_name or f"infergate-{component}",
            "infergate.component": component,
        }
    )
    provider = TracerProvider(
        resource=resource, sampler=_sampler(settings), span_limits=_span_limits()
    )
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=MAX_QUEUE,
            schedule_delay_millis=500,
            export_timeout_millis=EXPORT_TIMEOUT_MS,
        )
    )
    _provider, _tracer, _span_exporter = provider, provider.get_tracer("infergate"), exporter
    named = env if env is not None else os.environ
    if force and not (env_value(named, TRACES_ENDPOINT) or env_value(named, ENDPOINT)):
        log.warning(
            "tracing: --tracing without %s: spans go to the reference picker's default, %s "
            "(a collector beside the picker); set %s to send them elsewhere",
            ENDPOINT, settings.endpoint, ENDPOINT,
        )  # fmt: skip
    log.info(
        "tracing: exporting spans over OTLP %s to %s (sampler %s%s)",
        settings.protocol,
        settings.endpoint,
        settings.sampler,
        f", ratio {settings.ratio}" if "ratio" in settings.sampler else "",
    )
    return settings


def started(component: str, *, force: bool = False) -> bool:
    """start() for a command's main: False, with the reason logged, when it cannot."""
    try:
        start(component, force=force)
    except TracingConfigError as exc:
        log.error("cannot start: %s", exc)
        return False
    return True


def stop() -> None:
    """Export what is queued, for at most STOP_FLUSH_MS, and stop."""
    global _tracer, _provider, _span_exporter
    if _provider is not None:
        _tracer = None  # spans from now on are not made
        # The SDK's flush at shutdown takes no timeout: the exporter's own shutdown, when it
        # is up, ends its retries, and what is left is dropped.
        deadline = threading.Timer(STOP_FLUSH_MS / 1000, _span_exporter.shutdown)
        deadline.start()
        try:
            _provider.shutdown()
        finally:
            deadline.cancel()
    _tracer = _provider = _span_exporter = None


def _sampler(settings: TraceSettings) -> Any:
    from opentelemetry.sdk.trace import sampling

    root = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "traceidratio": sampling.TraceIdRatioBased(settings.ratio),
    }[settings.sampler.removeprefix("parentbased_")]
    return sampling.ParentBased(root) if settings.sampler.startswith("parentbased_") else root


def _span_limits() -> Any:
    """The SDK's limits from its OTEL_*_LIMIT variables, attribute values bounded even when
    they say nothing. TracingConfigError for a value it refuses (its message names it)."""
    from opentelemetry.sdk.trace import SpanLimits

    try:
        limits = SpanLimits()
    except ValueError as exc:
        raise TracingConfigError(str(exc)) from None
    if limits.max_span_attribute_length is None:
        limits = SpanLimits(max_span_attribute_length=MAX_ATTRIBUTE_CHARS)
    return limits


def _exporter(settings: TraceSettings) -> Any:
    exporter = _exporter_class(settings.protocol)
    timeout = EXPORT_TIMEOUT_MS / 1000
    if settings.protocol == GRPC:
        insecure = settings.endpoint.startswith("http://")
        return exporter(endpoint=settings.endpoint, insecure=insecure, timeout=timeout)
    return exporter(endpoint=settings.endpoint, timeout=timeout)


# ---- hooks where spans start ----------------------------------------------------------------

_NOTHING = nullcontext()  # reentrant and reusable: what every hook returns when off


def enabled() -> bool:
    return _tracer is not None


def recording() -> bool:
    """Whether the current span is sampled: finer spans (one per plugin) only then."""
    if _tracer is None:
        return False
    from opentelemetry import trace

    return trace.get_current_span().is_recording()


def span(name: str, attributes: Mapping[str, Any] | None = None) -> AbstractContextManager:
    """A child of the current span for the block, or nothing when tracing is off."""
    if _tracer is None:
        return _NOTHING
    from opentelemetry import trace

    parent = trace.get_current_span()
    if parent is not trace.INVALID_SPAN and not parent.is_recording():
        return _NOTHING  # a trace not sampled: its children would not be either
    return _child(name, attributes)


@contextmanager
def _child(name: str, attributes: Mapping[str, Any] | None) -> Iterator[Span]:
    # Exceptions are not recorded: their messages may quote what a client sent. The
    # error's type (a status for the picker's errors) says what went wrong.
    with _tracer.start_as_current_span(
        name, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as s:
        try:
            yield s
        except BaseException as exc:
            if s.is_recording():
                status = getattr(exc, "status", None)
                _fail(s, str(status) if status else type(exc).__name__)
            raise


def _fail(span: Span, error: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("error.type", error)
    span.set_status(Status(StatusCode.ERROR))


def extract(headers: Mapping[str, str]) -> Context | None:
    """The W3C trace context (traceparent, tracestate) in `headers`, lower-case names."""
    if _tracer is None or TRACEPARENT_HEADER not in headers:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(headers)


def inject(headers: MutableMapping[str, str], span: Span | None = None) -> None:
    """Put `span`'s (else the current span's) traceparent in `headers`, to continue the
    trace in the next hop."""
    if _tracer is None:
        return
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    ctx = trace.set_span_in_context(span) if span is not None else None
    TraceContextTextMapPropagator().inject(headers, context=ctx)


def start_span(
    name: str,
    parent: Context | None = None,
    attributes: Mapping[str, Any] | None = None,
    *,
    server: bool = False,
    client: bool = False,
    start_time: int | None = None,
) -> Span | None:
    """A span ended by the caller (`end`), for work across callbacks; None when off. The
    parent is `parent`, else the current span."""
    if _tracer is None:
        return None
    from opentelemetry.trace import SpanKind

    kind = SpanKind.SERVER if server else SpanKind.CLIENT if client else SpanKind.INTERNAL
    return _tracer.start_span(
        name, context=parent, kind=kind, attributes=attributes, start_time=start_time
    )


@contextmanager
def current(span: Span | None) -> Iterator[None]:
    """Make `span` the current span for the block (nothing when it is None)."""
    if span is None:
        yield
        return
    from opentelemetry import trace

    with trace.use_span(span, end_on_exit=False):
        yield


def end(
    span: Span | None,
    attributes: Mapping[str, Any] | None = None,
    error: str = "",
    end_time: int | None = None,
) -> None:
    """Set the last attributes and end `span`; `error` marks it failed (its error.type)."""
    if span is None:
        return
    if attributes:
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
    if error:
        _fail(span, error)
    span.end(end_time=end_time)
