"""Envoy's OpenTelemetry tracer for the local stack, from the same OTEL_* settings as the
other components (api/tracing.py): the connection manager's `tracing` block and the
collector's cluster, as YAML the Envoy template (gateway-manifests/local/envoy.yaml.j2)
puts in place.

Envoy starts (or continues, from a client's `traceparent`) the request's trace; its ext_proc
call to the picker is a child span whose context rides in the gRPC stream's metadata, so
the picker's spans join it (epp/request_trace.py); the router puts the trace context in the
request to the pod.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from infergw.api.tracing import GRPC, TraceSettings, TracingConfigError
from infergw.api.tracing import check as check_tracing

__all__ = [
    "TracingConfigError",
    "as_yaml",
    "check_tracing",
    "collector_cluster",
    "describe",
    "tracing_block",
]

COLLECTOR_CLUSTER = "otel-collector"
SERVICE_NAME = "infergate-envoy"
# Where the system keeps its CA bundle, for a collector behind https.
CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")
EXPORT_TIMEOUT = "1s"
_TYPES = "type.googleapis.com/"


def describe(settings: TraceSettings) -> str:
    """One line for `infergate up`: where every component's spans go."""
    share = "" if "ratio" not in settings.sampler else f" {settings.ratio:g}"
    return (
        f"traces: OTLP {settings.protocol} to {settings.endpoint} "
        f"(sampler {settings.sampler}{share}; Envoy, pickers, router, controllers, pods)"
    )


def tracing_block(settings: TraceSettings) -> dict:
    """The HttpConnectionManager's `tracing`."""
    if settings.protocol == GRPC:
        exporter = {
            "grpc_service": {
                "envoy_grpc": {"cluster_name": COLLECTOR_CLUSTER},
                "timeout": EXPORT_TIMEOUT,
            }
        }
    else:
        exporter = {
            "http_service": {
                "http_uri": {
                    "uri": settings.endpoint,
                    "cluster": COLLECTOR_CLUSTER,
                    "timeout": EXPORT_TIMEOUT,
                },
            }
        }
    return {
        # New traces only: a request whose traceparent says sampled (or not) keeps that.
        "random_sampling": {"value": round(settings.sampled_share * 100, 6)},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                **exporter,
                "service_name": settings.service_name or SERVICE_NAME,
            },
        },
    }


def collector_cluster(settings: TraceSettings) -> dict:
    """The cluster Envoy exports to: the collector's host and port (HTTP/2 for gRPC, TLS
    verified against the system's CAs for https)."""
    from infergw.stack.envoy_config import is_ip_address  # it imports this module

    host, port, tls = settings.host_port
    cluster: dict = {
        "name": COLLECTOR_CLUSTER,
        "type": "STATIC" if is_ip_address(host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": COLLECTOR_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {
                            "address": host, "port_value": port,
                        }}}}
                    ]
                }
            ],
        },
    }  # fmt: skip
    if settings.protocol == GRPC:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _TYPES + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    if tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _TYPES + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
                "common_tls_context": {
                    "validation_context": {"trusted_ca": {"filename": _ca_bundle()}},
                },
            },
        }
    return cluster


def as_yaml(value: dict, indent: int) -> str:
    """`value` as block YAML indented for its place in the template."""
    text = yaml.safe_dump(value, sort_keys=False, width=float("inf"))
    return "\n".join(" " * indent + line for line in text.splitlines())


def _ca_bundle() -> str:
    for path in CA_BUNDLES:
        if Path(path).exists():
            return path
    raise ValueError(
        "the OTLP endpoint is https but this machine has no CA bundle for Envoy to verify "
        f"the collector with (looked for {', '.join(CA_BUNDLES)})"
    )
