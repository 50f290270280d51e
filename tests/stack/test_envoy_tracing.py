"""The local Envoy's OpenTelemetry tracer (stack/envoy_tracing.py): rendered from the same
OTEL_* settings as the other components, for gRPC and HTTP collectors, and accepted by Envoy
itself; no tracer and no collector cluster when tracing is off."""

from __future__ import annotations

import pytest
import yaml

from infergw.api.tracing import settings_from_env
from infergw.stack.envoy_config import render
from infergw.stack.envoy_tracing import COLLECTOR_CLUSTER
from tests.envoy_check import assert_envoy_accepts
from tests.envoy_settings import local_envoy_settings


def _hcm(config: dict) -> dict:
    listener = config["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def _clusters(config: dict) -> dict:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def test_off_renders_no_tracer():
    config = yaml.safe_load(render(local_envoy_settings()))
    assert "tracing" not in _hcm(config)
    assert COLLECTOR_CLUSTER not in _clusters(config)


@pytest.mark.parametrize(
    ("env", "service"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
          "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
          "OTEL_TRACES_SAMPLER_ARG": "0.25"}, "grpc_service"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector.example:4318/v1/traces",
          "OTEL_SERVICE_NAME": "edge"}, "http_service"),
    ],
)  # fmt: skip
def test_the_tracer_exports_where_the_variables_say(tmp_path, env, service):
    settings = settings_from_env(env)
    text = render(local_envoy_settings(tracing=settings))
    config = yaml.safe_load(text)
    tracing = _hcm(config)["tracing"]
    provider = tracing["provider"]["typed_config"]
    assert service in provider
    assert tracing["random_sampling"]["value"] == settings.sampled_share * 100
    cluster = _clusters(config)[COLLECTOR_CLUSTER]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    host, port, _tls = settings.host_port
    assert address["address"]["socket_address"] == {"address": host, "port_value": port}
    if service == "grpc_service":
        assert provider["service_name"] == "infergate-envoy"
        assert "typed_extension_protocol_options" in cluster  # HTTP/2 for gRPC
    else:
        assert provider["service_name"] == "edge"
        assert provider["http_service"]["http_uri"]["uri"] == settings.endpoint
        assert cluster["type"] == "STRICT_DNS"
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    assert_envoy_accepts(path)
