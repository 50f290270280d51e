"""The local Envoy's ext_proc cluster with several pickers: one endpoint each, each
health-checked on its own gRPC health port (plaintext, beside TLS ext_proc) for a readiness
the picker serves, and ejected at its first local failure. The client listener: HTTPS with a
checked certificate (TLS 1.2+, ALPN h2 and http/1.1) when given one, on an IP address only."""

from __future__ import annotations

import pytest
import yaml

from infergw.api.names import SERVED_HEADER
from infergw.api.retries import retry_budget, retry_policy
from infergw.cluster.certs import serving_cert
from infergw.epp.app import HEALTH_SERVICES
from infergw.stack.envoy_config import ListenerTls, PoolRoute, render
from infergw.stack.ports import RouterPorts
from tests.envoy_check import assert_envoy_accepts
from tests.envoy_settings import PICKERS, local_envoy_settings


def settings(tmp_path, **kw):
    """Two pickers behind verified TLS ext_proc (the CA file, if Envoy is run, in tmp_path)."""
    return local_envoy_settings(**{"picker_tls": True, "picker_ca": str(tmp_path / "ca.crt"), **kw})


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


# ---- the client listener: HTTPS with --tls ------------------------------------------------------


def client_chain(text: str) -> dict:
    [listener] = yaml.safe_load(text)["static_resources"]["listeners"]
    [chain] = listener["filter_chains"]
    return chain


def test_the_client_listener_serves_https_with_the_given_certificate(tmp_path) -> None:
    made = serving_cert(hosts=("127.0.0.1",)).write(tmp_path)
    tls = ListenerTls(made / "tls.crt", made / "tls.key")
    chain = client_chain(render(settings(tmp_path, listener_tls=tls)))
    socket = chain["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    context = socket["typed_config"]["common_tls_context"]
    assert context["tls_params"] == {"tls_minimum_protocol_version": "TLSv1_2"}
    assert context["alpn_protocols"] == ["h2", "http/1.1"]
    [pair] = context["tls_certificates"]
    assert pair == {
        "certificate_chain": {"filename": str(tls.cert_file)},
        "private_key": {"filename": str(tls.key_file)},
    }
    assert chain["filters"][0]["name"] == "envoy.filters.network.http_connection_manager"
    assert "transport_socket" not in client_chain(render(settings(tmp_path)))  # plain HTTP
    path = tmp_path / "envoy.yaml"
    path.write_text(render(settings(tmp_path, listener_tls=tls, listen_host="::")))
    assert_envoy_accepts(path)


def test_a_path_with_quotes_stays_one_yaml_string(tmp_path) -> None:
    odd = tmp_path / 'a "quoted": dir'
    made = serving_cert(hosts=("127.0.0.1",)).write(odd)
    tls = ListenerTls(made / "tls.crt", made / "tls.key")
    [pair] = client_chain(render(settings(tmp_path, listener_tls=tls)))["transport_socket"][
        "typed_config"
    ]["common_tls_context"]["tls_certificates"]
    assert pair["certificate_chain"]["filename"] == str(tls.cert_file)


def test_listener_tls_files_are_checked_before_envoy_sees_them(tmp_path) -> None:
    made = serving_cert(hosts=("127.0.0.1",)).write(tmp_path)
    missing = ListenerTls(tmp_path / "nope.crt", made / "tls.key")
    with pytest.raises(ValueError, match=r"nope\.crt"):
        render(settings(tmp_path, listener_tls=missing))
    (tmp_path / "other.key").write_bytes(serving_cert(hosts=("127.0.0.1",)).key)
    foreign = ListenerTls(made / "tls.crt", tmp_path / "other.key")
    with pytest.raises(ValueError, match="not the certificate's key"):
        render(settings(tmp_path, listener_tls=foreign))


@pytest.mark.parametrize("host", ["localhost", '127.0.0.1"', ""])
def test_the_listen_address_must_be_an_ip_address(tmp_path, host) -> None:
    with pytest.raises(ValueError, match="must be an IP address"):
        render(settings(tmp_path, listen_host=host))


def test_the_pool_route_retries_what_the_cluster_manifests_retry(tmp_path):
    config = yaml.safe_load(render(settings(tmp_path, fallbacks=2)))
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    [route] = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["retry_policy"] == retry_policy(2)
    assert "503" in str(route["route"]["retry_policy"]["retriable_status_codes"])
    [pool] = [c for c in config["static_resources"]["clusters"] if c["name"] == "pool"]
    assert pool["circuit_breakers"]["thresholds"] == [{"retry_budget": retry_budget()}]


def _picker_filter(doc: dict) -> dict:
    (listener,) = doc["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (ext_proc,) = [f for f in manager["http_filters"] if f["name"].endswith(".ext_proc")]
    return ext_proc["typed_config"]


@pytest.mark.parametrize(
    ("bodies", "headers", "modes"),
    [
        (True, True, ("SEND", "FULL_DUPLEX_STREAMED", "SEND")),
        (False, True, ("SEND", "NONE", "SKIP")),
        (False, False, ("SKIP", "NONE", "SKIP")),
    ],
)
def test_what_of_the_response_the_picker_sees_is_a_proxy_setting(tmp_path, bodies, headers, modes):
    doc = yaml.safe_load(
        render(local_envoy_settings(response_bodies=bodies, response_headers=headers))
    )
    config = _picker_filter(doc)
    mode = config["processing_mode"]
    assert (mode["response_header_mode"], mode["response_body_mode"]) == modes[:2]
    assert mode["response_trailer_mode"] == modes[2]
    assert mode["request_body_mode"] == "FULL_DUPLEX_STREAMED"  # the picker needs it
    (listener,) = doc["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (vhost,) = manager["route_config"]["virtual_hosts"]
    added = vhost.get("response_headers_to_add", [])
    added = {h["header"]["key"]: h["header"]["value"] for h in added}
    # Without response headers the picker cannot name the pod that answered: Envoy does.
    assert added == ({} if headers else {SERVED_HEADER: "%UPSTREAM_REMOTE_ADDRESS%"})
    assert ("response_attributes" in config) == headers
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert_envoy_accepts(path)


FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
EXT_PROC_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"


@pytest.mark.parametrize("several_pools", [False, True], ids=["one-pool", "bbr"])
def test_the_picker_filter_is_off_on_the_listener_and_on_on_every_route(tmp_path, several_pools):
    # Envoy's own reply to a request with no route (a 431 for a header flood) has a filter
    # chain without the picker; every request with a route has it, whatever its route is
    # when Envoy builds the chain (before the body-based router names the pool).
    pools = [PoolRoute(n, PICKERS, cluster=f"pool-{n}", picker_cluster=f"picker-{n}") for n in "ab"]
    extra = {"pools": pools, "router": RouterPorts(19500, 19501, 19502)} if several_pools else {}
    doc = yaml.safe_load(render(local_envoy_settings(**extra)))
    (listener,) = doc["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (picker,) = [f for f in manager["http_filters"] if f["name"].endswith(".ext_proc")]
    assert picker["disabled"] is True
    # Its mode stays the filter's own (the routes override only where the picker is).
    assert picker["typed_config"]["processing_mode"]["response_header_mode"] == "SEND"
    (vhost,) = manager["route_config"]["virtual_hosts"]
    routes = vhost["routes"]
    if several_pools:
        # CONNECT (no request of ours) is Envoy's 405 at once, with no filter of ours: the
        # router, waiting for a body its stream never ends, held it for ever.
        connect, *routes = routes
        assert connect["match"] == {"connect_matcher": {}}
        assert connect["direct_response"]["status"] == 405
        assert connect["typed_per_filter_config"] == {
            "infergate.bbr": {"@type": FILTER_CONFIG, "disabled": True}
        }
    switches = [r["typed_per_filter_config"][picker["name"]] for r in routes]
    assert all(s["@type"] == FILTER_CONFIG and not s.get("disabled") for s in switches)
    if not several_pools:
        assert switches == [{"@type": FILTER_CONFIG, "config": {}}]
    else:
        *pool_routes, no_pool = [s["config"] for s in switches]
        assert [
            r["overrides"]["grpc_service"]["envoy_grpc"]["cluster_name"] for r in pool_routes
        ] == [
            "picker-a",
            "picker-b",
        ]
        assert no_pool == {"@type": EXT_PROC_PER_ROUTE, "disabled": True}
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert_envoy_accepts(path)


def test_response_bodies_through_the_picker_need_its_response_headers():
    with pytest.raises(ValueError, match="response headers"):
        render(local_envoy_settings(response_bodies=True, response_headers=False))
