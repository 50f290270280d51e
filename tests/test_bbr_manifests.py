"""The body-based router's cluster manifests (gateway-manifests/bbr/), checked without a
cluster as tests/test_manifests.py checks the picker's: built-in kinds pass the Kubernetes
schemas (strict), the Deployment's args parse with the router's own parser and agree with
its ports and probes, its Role grants read verbs on exactly what it reads, and the Envoy
Gateway objects point at it as the local stack does."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
import yaml

from infergw.api.yaml_files import OWN_FILES_LOADER
from infergw.bbr.app import HEALTH_SERVICES
from infergw.bbr.options import parse_options
from infergw.bbr.sources import OPTIONAL_KINDS
from infergw.cluster.store import INFERENCE_POOL
from infergw.controllers.picker_patch import DISABLED, FILTER_CONFIG, PICKER_FILTER
from infergw.stack.envoy_config import NO_POOL_ANSWER, render
from tests.envoy_settings import local_envoy_settings
from tests.paths import ROOT

HERE = ROOT / "gateway-manifests" / "bbr"
K8S_VERSION = "1.30"
BUILT_IN = {"ServiceAccount", "Role", "RoleBinding", "Deployment", "PodDisruptionBudget", "Service"}


def docs() -> list[dict[str, Any]]:
    return [
        d
        for path in sorted(HERE.glob("*.yaml"))
        for d in yaml.load_all(path.read_text(), Loader=OWN_FILES_LOADER)
        if d
    ]


def one(kind: str, name: str = "infergate-bbr") -> dict[str, Any]:
    [found] = [d for d in docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def gateway_docs(name: str) -> list[dict[str, Any]]:
    path = ROOT / "gateway-manifests" / name
    return [d for d in yaml.load_all(path.read_text(), Loader=OWN_FILES_LOADER) if d]


@pytest.mark.parametrize(
    "doc", [d for d in docs() if d["kind"] in BUILT_IN], ids=lambda d: d["kind"]
)
def test_built_in_kinds_pass_the_kubernetes_schema(doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_no_object_names_its_namespace():
    """As the other manifests: `kubectl apply -n NS` (or kustomize's namespace) places them."""
    assert {d["metadata"].get("namespace") for d in docs()} == {None}
    assert {d["kind"] for d in docs()} >= BUILT_IN


def container() -> dict[str, Any]:
    [c] = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def test_the_deployment_args_parse_with_the_routers_parser_and_match_its_ports():
    c = container()
    assert c["command"] == ["infergate", "bbr"]
    args = [a.replace("$(POD_NAMESPACE)", "default") for a in c["args"]]
    opts = parse_options(args)
    assert opts.provider == "kubernetes" and opts.secure_serving and not opts.pass_bad_bodies
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {
        "grpc": opts.grpc_port,
        "grpc-health": opts.grpc_health_port,
        "http-metrics": opts.metrics_port,
    }
    for probe in (c["readinessProbe"], c["livenessProbe"]):
        assert probe["grpc"]["port"] == opts.grpc_health_port
        assert probe["grpc"]["service"] in HEALTH_SERVICES
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert str(opts.cert_path) == mounts["tls"]
    [volume] = one("Deployment")["spec"]["template"]["spec"]["volumes"]
    assert (
        volume["secret"]["secretName"]
        == one("Certificate", "infergate-bbr-tls")["spec"]["secretName"]
    )
    # Drained before the kubelet's SIGKILL.
    grace = one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert opts.grace_period < grace


def test_the_router_runs_active_active_and_keeps_one_up():
    deployment = one("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    budget = one("PodDisruptionBudget")
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]


def test_the_role_reads_exactly_what_the_router_reads_and_is_bound_to_it():
    granted = set()
    for rule in one("Role")["rules"]:
        assert set(rule["verbs"]) == {"get", "list", "watch"}
        granted |= {(g, r) for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {(k.group, k.plural) for k in (INFERENCE_POOL, *OPTIONAL_KINDS)}
    binding = one("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "infergate-bbr",
    }
    account = one("ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "infergate-bbr"}]
    assert (
        one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
        == (account["metadata"]["name"])
    )


def test_envoy_gateway_calls_the_router_on_every_route_before_anything_else_decides():
    policy = one("EnvoyExtensionPolicy")
    [gateway] = [d for d in gateway_docs("gateway.yaml") if d["kind"] == "Gateway"]
    assert policy["spec"]["targetRefs"] == [
        {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "name": gateway["metadata"]["name"],
        }
    ]
    [ext_proc] = policy["spec"]["extProc"]
    service = one("Service")
    [backend] = ext_proc["backendRefs"]
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert (backend["name"], backend["port"]) == (service["metadata"]["name"], grpc["port"])
    assert ext_proc["processingMode"] == {"request": {"body": "FullDuplexStreamed"}}
    assert ext_proc["failOpen"] is False
    assert ext_proc["backendSettings"]["healthCheck"]["active"]["grpc"]["service"] in (
        HEALTH_SERVICES
    )
    tls = one("BackendTLSPolicy", "infergate-bbr-tls")
    assert tls["spec"]["targetRefs"][0]["name"] == service["metadata"]["name"]
    certificate = one("Certificate", "infergate-bbr-tls")
    assert tls["spec"]["validation"]["hostname"] in certificate["spec"]["dnsNames"]
    issuers = {d["metadata"]["name"] for d in gateway_docs("epp-tls.yaml") if d["kind"] == "Issuer"}
    assert certificate["spec"]["issuerRef"]["name"] in issuers


def test_a_request_without_a_pool_gets_the_local_stacks_answer():
    route = one("HTTPRoute", "infergate-no-model")
    [rule] = route["spec"]["rules"]
    assert "headers" not in rule["matches"][0]  # what a request matches before the router
    [ref] = rule["filters"]
    answer = one("HTTPRouteFilter", ref["extensionRef"]["name"])["spec"]["directResponse"]
    assert answer["statusCode"] == 404
    assert json.loads(answer["body"]["inline"]) == NO_POOL_ANSWER


def _local_picker_filter() -> dict[str, Any]:
    """The local stack's picker filter (gateway-manifests/local/envoy.yaml.j2), FailClose."""
    config = yaml.safe_load(render(local_envoy_settings(failure_mode="FailClose")))
    [hcm] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
    [picker] = [f for f in hcm["typed_config"]["http_filters"] if f["name"].endswith("ext_proc")]
    return picker


def test_the_gateway_wide_picker_filter_is_the_local_stacks_on_every_route_but_no_models():
    policy = one("EnvoyPatchPolicy", "infergate-picker-filter")
    [gateway] = [d for d in gateway_docs("gateway.yaml") if d["kind"] == "Gateway"]
    assert policy["spec"]["targetRef"] == {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": gateway["metadata"]["name"],
    }
    cluster, listener, no_model = policy["spec"]["jsonPatches"]
    # Envoy Gateway's V1 names for the Gateway's listener (gateway.yaml's only one)
    [https] = gateway["spec"]["listeners"]
    xds_name = f"default/{gateway['metadata']['name']}/{https['name']}"
    assert listener["name"] == no_model["name"] == xds_name
    # inserted at the router's index: before it, after every filter Envoy Gateway renders
    assert (
        listener["operation"]["jsonPath"]
        == "..http_filters[?(@.name=='envoy.filters.http.router')]"
    )
    assert listener["operation"]["path"] == ""
    added = listener["operation"]["value"]
    assert added["name"] == PICKER_FILTER
    # off on the listener, as the local stack's: Envoy's reply with no route (a 431) skips it
    local_filter = _local_picker_filter()
    assert added["disabled"] is local_filter["disabled"] is True
    ours, local = added["typed_config"], local_filter["typed_config"]
    for field in ("processing_mode", "mutation_rules", "metadata_options", "response_attributes",
                  "message_timeout", "failure_mode_allow"):  # fmt: skip
        assert ours[field] == local[field], field
    assert ours["failure_mode_allow"] is False
    # its default cluster has no endpoints: a route no Model overrides fails closed
    default = ours["grpc_service"]["envoy_grpc"]["cluster_name"]
    assert cluster["name"] == cluster["operation"]["value"]["name"] == default
    assert "endpoints" not in cluster["operation"]["value"]["load_assignment"]
    # on for the no-model route (every request's first), which turns it off when it starts
    # and the request still has that route; one key of its per-filter map (the router's stays)
    route = one("HTTPRoute", "infergate-no-model")
    assert no_model["operation"]["jsonPath"] == (
        f"..routes[?(@.name=='httproute/default/{route['metadata']['name']}/rule/0/match/0/*')]"
    )
    assert no_model["operation"]["path"] == f"/typed_per_filter_config/{PICKER_FILTER}"
    switch = no_model["operation"]["value"]
    assert switch["@type"] == FILTER_CONFIG and not switch.get("disabled")
    assert switch["config"] == DISABLED
