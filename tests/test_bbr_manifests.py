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

from infergw.bbr.app import HEALTH_SERVICES
from infergw.bbr.options import parse_options
from infergw.bbr.sources import OPTIONAL_KINDS
from infergw.cluster.store import INFERENCE_POOL
from infergw.stack.envoy_config import NO_POOL_ANSWER
from tests.paths import ROOT

HERE = ROOT / "gateway-manifests" / "bbr"
K8S_VERSION = "1.30"
BUILT_IN = {"ServiceAccount", "Role", "RoleBinding", "Deployment", "PodDisruptionBudget", "Service"}


def docs() -> list[dict[str, Any]]:
    return [
        d for path in sorted(HERE.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d
    ]


def one(kind: str, name: str = "infergate-bbr") -> dict[str, Any]:
    [found] = [d for d in docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def gateway_docs(name: str) -> list[dict[str, Any]]:
    path = ROOT / "gateway-manifests" / name
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


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
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "infergate-bbr"}
    ]
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
