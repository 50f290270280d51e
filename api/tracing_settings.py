"""The OTEL_* variables as tracing reads them (api/tracing.py): which ones, their defaults, and
the settings they make, each bad value a TracingConfigError that names its variable. No
OpenTelemetry import here: a launcher checks the variables before anything starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
TRACES_PROTOCOL = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
SAMPLER = "OTEL_TRACES_SAMPLER"
SAMPLER_ARG = "OTEL_TRACES_SAMPLER_ARG"
SERVICE_NAME = "OTEL_SERVICE_NAME"
EXPORTER = "OTEL_TRACES_EXPORTER"
SDK_DISABLED = "OTEL_SDK_DISABLED"
# What a process passes on to the components it writes (the controllers, to the pickers'
# Deployments): every variable it reads but the service name, which is each component's own.
# (Not the exporter's headers: they may hold a token, and a Deployment's env is no Secret.)
PASSED_ON = (
    ENDPOINT, TRACES_ENDPOINT, PROTOCOL, TRACES_PROTOCOL, SAMPLER, SAMPLER_ARG, EXPORTER,
    SDK_DISABLED,
)  # fmt: skip

GRPC, HTTP = "grpc", "http/protobuf"
DEFAULT_ENDPOINTS = {GRPC: "http://localhost:4317", HTTP: "http://localhost:4318"}
SAMPLERS = (
    "always_on", "always_off", "traceidratio",
    "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio",
)  # fmt: skip
# The reference picker's --tracing defaults (its helm chart's inferenceExtension.tracing):
# OTLP over gRPC to a collector on localhost, a tenth of new traces, parents' choice kept.
REFERENCE_SAMPLER, REFERENCE_RATIO = "parentbased_traceidratio", 0.1


class TracingConfigError(ValueError):
    """An OTEL_* variable this process cannot use; the message names it."""


@dataclass(frozen=True, slots=True)
class TraceSettings:
    """Where and how spans go, read from the environment once at start."""

    protocol: str  # GRPC or HTTP
    # gRPC: scheme://host:port; http/protobuf: the full URL of the traces route.
    endpoint: str
    sampler: str
    ratio: float  # for the *traceidratio samplers
    service_name: str | None  # OTEL_SERVICE_NAME, else each component's own

    @property
    def host_port(self) -> tuple[str, int, bool]:
        """The collector's host, port and whether it speaks TLS (https)."""
        url = urlsplit(self.endpoint)
        tls = url.scheme == "https"
        return url.hostname or "localhost", url.port or (443 if tls else 80), tls

    @property
    def path(self) -> str:
        return urlsplit(self.endpoint).path or "/"

    @property
    def sampled_share(self) -> float:
        """The share of new traces sampled (Envoy's random_sampling, as a fraction)."""
        if self.sampler.endswith("always_off"):
            return 0.0
        if self.sampler.endswith("traceidratio"):
            return self.ratio
        return 1.0


def settings_from_env(
    env: Mapping[str, str] | None = None, *, force: bool = False
) -> TraceSettings | None:
    """The settings, or None when tracing is off. `force` (the reference's --tracing) turns
    it on with the reference's defaults for whatever the variables leave unsaid. Raises
    TracingConfigError naming the variable whose value cannot be used."""
    env = os.environ if env is None else env
    if env_value(env, SDK_DISABLED).lower() == "true":
        return None
    exporter = env_value(env, EXPORTER).lower()
    if exporter not in ("", "otlp", "none"):
        raise TracingConfigError(f"{EXPORTER}={exporter!r}: only 'otlp' or 'none' are supported")
    named = env_value(env, TRACES_ENDPOINT) or env_value(env, ENDPOINT)
    if exporter == "none" or not (named or exporter == "otlp" or force):
        return None
    protocol = _protocol(env, default=GRPC if force else HTTP)
    endpoint = _endpoint(env, protocol)
    default_sampler = REFERENCE_SAMPLER if force else "parentbased_always_on"
    sampler = env_value(env, SAMPLER).lower() or default_sampler
    if sampler not in SAMPLERS:
        raise TracingConfigError(f"{SAMPLER}={sampler!r}: one of {', '.join(SAMPLERS)}")
    ratio = _ratio(env, REFERENCE_RATIO if force and not env_value(env, SAMPLER) else 1.0)
    return TraceSettings(protocol, endpoint, sampler, ratio, env_value(env, SERVICE_NAME) or None)


def env_value(env: Mapping[str, str], name: str) -> str:
    return env.get(name, "").strip()


def _protocol(env: Mapping[str, str], default: str) -> str:
    for name in (TRACES_PROTOCOL, PROTOCOL):
        value = env_value(env, name).lower()
        if value:
            if value not in (GRPC, HTTP):
                raise TracingConfigError(f"{name}={value!r}: '{GRPC}' or '{HTTP}'")
            return value
    return default


def _endpoint(env: Mapping[str, str], protocol: str) -> str:
    traces, base = env_value(env, TRACES_ENDPOINT), env_value(env, ENDPOINT)
    name, value = (TRACES_ENDPOINT, traces) if traces else (ENDPOINT, base)
    value = value or DEFAULT_ENDPOINTS[protocol]
    url = urlsplit(value)
    try:
        url.port  # noqa: B018 — raises for a port that is not a number
    except ValueError:
        raise TracingConfigError(f"{name}={value!r}: the port is not a number") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise TracingConfigError(f"{name}={value!r}: an http:// or https:// URL with a host")
    if protocol == GRPC:
        port = url.port or (443 if url.scheme == "https" else 4317)
        return f"{url.scheme}://{_bracketed(url.hostname)}:{port}"
    if name == ENDPOINT or not traces:  # the base URL: the traces route is appended
        return value.rstrip("/") + "/v1/traces"
    return value


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _ratio(env: Mapping[str, str], default: float) -> float:
    text = env_value(env, SAMPLER_ARG)
    if not text:
        return default
    try:
        ratio = float(text)
    except ValueError:
        raise TracingConfigError(f"{SAMPLER_ARG}={text!r}: a number from 0 to 1") from None
    if not 0.0 <= ratio <= 1.0:
        raise TracingConfigError(f"{SAMPLER_ARG}={text!r}: a number from 0 to 1")
    return ratio


def passed_on(env: Mapping[str, str] | None = None) -> tuple[tuple[str, str], ...]:
    """The PASSED_ON variables `env` sets, by name, for the env of what a process writes."""
    env = os.environ if env is None else env
    return tuple((name, env[name]) for name in PASSED_ON if env_value(env, name))
