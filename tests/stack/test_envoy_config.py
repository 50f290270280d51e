"""The local Envoy's ext_proc cluster with several pickers: one endpoint each, each
health-checked on its own gRPC health port (plaintext, beside TLS ext_proc) for a readiness
the picker serves, and ejected at its first local failure."""

from __future__ import annotations

import pytest
import yaml

from infergw.api.retries import retry_budget, retry_policy
from infergw.cluster.certs import serving_cert
from infergw.epp.app import HEALTH_SERVICES
from infergw.stack.envoy_config import EnvoySettings, render
from infergw.stack.ports import PickerPorts
from tests.envoy_check import assert_envoy_accepts

PICKERS = [PickerPorts(19002, 19003, 19090, 19004), PickerPorts(19102, 19103, 19190, 19104)]


def settings(tmp_path, **kw) -> EnvoySettings:
    fields = dict(
        listen_port=18080,
        admin_port=19901,
        picker_host="127.0.0.1",
        pickers=PICKERS,
        picker_tls=True,
        picker_ca=str(tmp_path / "ca.crt"),
        failure_mode="FailOpen",
        endpoints=[("127.0.0.1", 18000)],
    )
    return EnvoySettings(**{**fields, **kw})


def picker_cluster(text: str) -> dict:
    (cluster,) = [
        c
        for c in yaml.safe_load(text)["static_resources"]["clusters"]
        if c["name"] == "endpoint-picker"
    ]
    return cluster


def test_each_picker_is_an_endpoint_checked_on_its_health_port(tmp_path):
    cluster = picker_cluster(render(settings(tmp_path)))
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    dialled = [
        (
            e["endpoint"]["address"]["socket_address"]["port_value"],
            e["endpoint"]["health_check_config"]["port_value"],
        )
        for e in endpoints
    ]
    assert dialled == [(p.grpc, p.health) for p in PICKERS]
    [check] = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] in HEALTH_SERVICES
    # The health port is plaintext while ext_proc is TLS: checks alone take the raw socket.
    criteria = check["transport_socket_match_criteria"]
    [plain] = [m for m in cluster["transport_socket_matches"] if m["match"] == criteria]
    assert plain["transport_socket"]["name"] == "envoy.transport_sockets.raw_buffer"
    assert cluster["transport_socket"]["name"] == "envoy.transport_sockets.tls"
    outliers = cluster["outlier_detection"]
    assert outliers["consecutive_local_origin_failure"] == 1
    assert outliers["max_ejection_percent"] == 100


def test_without_tls_the_checks_need_no_socket_match(tmp_path):
    cluster = picker_cluster(render(settings(tmp_path, picker_tls=False, picker_ca=None)))
    assert "transport_socket_match_criteria" not in cluster["health_checks"][0]
    assert "transport_socket_matches" not in cluster


def test_a_picker_is_required_unless_envoy_runs_without_one(tmp_path):
    with pytest.raises(ValueError, match="at least one picker"):
        render(settings(tmp_path, pickers=[]))
    assert "endpoint-picker" not in render(settings(tmp_path, pickers=[], with_picker=False))


def test_envoy_accepts_the_config_with_several_pickers(tmp_path):
    serving_cert(hosts=("127.0.0.1",)).write(tmp_path)  # Envoy reads the CA file
    path = tmp_path / "envoy.yaml"
    path.write_text(render(settings(tmp_path)))
    assert_envoy_accepts(path)


def test_the_pool_route_retries_what_the_cluster_manifests_retry(tmp_path):
    config = yaml.safe_load(render(settings(tmp_path, fallbacks=2)))
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    [route] = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["retry_policy"] == retry_policy(2)
    assert "503" in str(route["route"]["retry_policy"]["retriable_status_codes"])
    [pool] = [c for c in config["static_resources"]["clusters"] if c["name"] == "pool"]
    assert pool["circuit_breakers"]["thresholds"] == [{"retry_budget": retry_budget()}]
