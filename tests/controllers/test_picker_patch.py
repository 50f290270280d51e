"""The Envoy Gateway side of a Model in a cluster: the picker's TLS Secret the controllers make
(controllers/picker_tls.py) and the EnvoyPatchPolicy that runs the Model's picker for its route
(controllers/picker_patch.py), through the API emulator, and the patches applied to an
Envoy-Gateway-shaped config that Envoy itself must accept.

No Envoy Gateway control plane runs here: the base config below is our rendering of what it
generates for two Models' HTTPRoutes (its V1 xDS names), not its output.
"""

from __future__ import annotations

import base64
import copy
import datetime
from pathlib import Path

import yaml
from cryptography import x509
from jsonpath_ng.ext import parse as jsonpath

from infergw import api
from infergw.cluster.certs import cert_names
from infergw.cluster.store import DEPLOYMENT, ENVOY_PATCH_POLICY, SECRET
from infergw.controllers import picker_objects, picker_tls
from infergw.controllers.picker_objects import INFERENCE_PATHS, PickerTLS
from infergw.controllers.picker_patch import (
    DEFAULT_LISTENER,
    PICKER_FILTER,
    cluster_name,
    route_names,
)
from tests.controller_helpers import summary
from tests.envoy_check import assert_envoy_accepts
from tests.picker_cluster import NS, Cluster, model_obj

HOSTS = (f"llama-epp.{NS}.svc", f"llama-epp.{NS}.svc.cluster.local")


def _model(name: str = "llama") -> api.Model:
    obj = model_obj()
    obj["metadata"] = {"name": name, "namespace": NS, "uid": f"uid-{name}"}
    return api.from_dict_as(api.Model, obj)


def _tls(name: str = "llama") -> PickerTLS:
    cert = picker_tls.issue(NS, f"{name}-epp")
    return PickerTLS(cert.ca.decode(), picker_tls.fingerprint(cert.cert))


def _policy(name: str = "llama") -> dict:
    model = _model(name)
    return api.to_dict(picker_objects.patch_policy(model, _tls(name)))


# ---- the Secret ----------------------------------------------------------------------------------


def test_a_new_certificate_names_the_picker_service_and_its_ca_signs_it() -> None:
    cert = picker_tls.issue(NS, "llama-epp")
    leaf = x509.load_pem_x509_certificate(cert.cert)
    assert cert_names(leaf) == set(HOSTS)
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(cert.ca))
    secret = api.to_dict(picker_tls.secret(api.ObjectMeta(name="llama-epp-tls"), cert))
    assert secret["type"] == "kubernetes.io/tls"
    assert picker_tls.renewal_problem(secret, NS, "llama-epp") is None


def test_a_certificate_is_renewed_before_it_ends_and_envoy_trusts_both_cas_meanwhile() -> None:
    old = picker_tls.issue(NS, "llama-epp")
    old_secret = api.to_dict(picker_tls.secret(api.ObjectMeta(name="s"), old))
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=picker_tls.CERT_DAYS - 29)
    assert "expires on" in (picker_tls.renewal_problem(old_secret, NS, "llama-epp", later) or "")
    assert picker_tls.renewal_problem(old_secret, NS, "other-epp") is not None  # other names
    new = picker_tls.issue(NS, "llama-epp", old_secret, later)
    bundle = new.ca.decode()
    assert old.ca.decode() in bundle and bundle.startswith(picker_tls.first_pem(new.ca).decode())
    new_secret = api.to_dict(picker_tls.secret(api.ObjectMeta(name="s"), new))
    assert picker_tls.renewal_problem(new_secret, NS, "llama-epp", later) is None
    # a garbled Secret is replaced, not trusted
    assert picker_tls.renewal_problem({"data": {"tls.crt": "!"}}, NS, "llama-epp") is not None


# ---- the EnvoyPatchPolicy ------------------------------------------------------------------------


def test_the_patch_targets_the_models_gateway_route_by_route() -> None:
    policy = _policy()
    assert policy["kind"] == "EnvoyPatchPolicy"
    assert policy["metadata"]["namespace"] == NS
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "uid-llama"
    assert policy["spec"]["targetRef"] == {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": "inference-gateway",
    }
    patches = policy["spec"]["jsonPatches"]
    route_patches = [p for p in patches if p["type"].endswith("RouteConfiguration")]
    # one per match of the HTTPRoute the controllers write, in its order
    route = api.to_dict(picker_objects.http_route(_model()))
    assert len(route_patches) == len(route["spec"]["rules"][0]["matches"]) == len(INFERENCE_PATHS)
    assert {p["name"] for p in route_patches} == {f"{NS}/inference-gateway/{DEFAULT_LISTENER}"}
    for p, name in zip(route_patches, route_names(NS, "llama", len(INFERENCE_PATHS)), strict=True):
        assert p["operation"]["jsonPath"] == f"..routes[?(@.name=='{name}')]"
        override = p["operation"]["value"][PICKER_FILTER]["overrides"]
        assert override["grpc_service"]["envoy_grpc"]["cluster_name"] == cluster_name(NS, "llama")
        assert override["failure_mode_allow"] is False  # the pool fails closed
    [cluster_patch] = [p for p in patches if p["type"].endswith("Cluster")]
    tls = cluster_patch["operation"]["value"]["transport_socket"]["typed_config"]
    assert tls["sni"] == HOSTS[0]
    ctx = tls["common_tls_context"]["validation_context"]
    assert ctx["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": HOSTS[0]}}
    ]
    assert ctx["trusted_ca"]["inline_string"].startswith("-----BEGIN CERTIFICATE-----")


def test_no_patch_for_a_gateway_in_another_namespace() -> None:
    model = _model()
    model.spec.gateway = api.from_dict_as(
        api.Model,
        {
            **model_obj(),
            "spec": {**model_obj()["spec"], "gateway": {"name": "gw", "namespace": "infra"}},
        },
    ).spec.gateway
    assert picker_objects.patch_policy(model, _tls()) is None


def _envoy_gateway_base(models: list[str]) -> dict:
    """Our rendering of what Envoy Gateway makes of the Gateway, the router's and the picker
    filters and the Models' HTTPRoutes (V1 names), before the patches."""
    routes = [
        {
            "name": name,
            "match": {
                "path": path,
                "headers": [{"name": "x-gateway-model-name", "string_match": {"exact": m}}],
            },
            "route": {"cluster": f"httproute/{NS}/{m}/rule/0"},
        }
        for m in models
        for name, path in zip(
            route_names(NS, m, len(INFERENCE_PATHS)), INFERENCE_PATHS, strict=True
        )
    ]
    ext_proc = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network"
        ".http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "https",
        "route_config": {
            "name": f"{NS}/inference-gateway/{DEFAULT_LISTENER}",
            "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            {
                "name": PICKER_FILTER,
                "typed_config": {
                    "@type": ext_proc,
                    "grpc_service": {"envoy_grpc": {"cluster_name": "no-picker"}},
                    "failure_mode_allow": False,
                    "processing_mode": {
                        "request_body_mode": "FULL_DUPLEX_STREAMED",
                        "request_trailer_mode": "SEND",
                    },
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    clusters = [{"name": "no-picker", "type": "STATIC", "connect_timeout": "1s"}] + [
        {"name": f"httproute/{NS}/{m}/rule/0", "type": "STATIC", "connect_timeout": "1s"}
        for m in models
    ]
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": f"{NS}/inference-gateway/{DEFAULT_LISTENER}",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        }
    }


def _apply(config: dict, policy: dict) -> None:
    """Envoy Gateway's application of a policy's patches, for the operations ours use."""
    static = config["static_resources"]
    for patch in policy["spec"]["jsonPatches"]:
        op = patch["operation"]
        assert op["op"] == "add"
        if patch["type"].endswith("Cluster"):
            assert op["path"] == "" and op["value"]["name"] == patch["name"]
            static["clusters"].append(copy.deepcopy(op["value"]))
            continue
        assert patch["type"].endswith("RouteConfiguration")
        [rc] = [
            f["typed_config"]["route_config"]
            for listener in static["listeners"]
            for chain in listener["filter_chains"]
            for f in chain["filters"]
            if f["typed_config"]["route_config"]["name"] == patch["name"]
        ]
        found = jsonpath(op["jsonPath"].replace("..", "$..", 1)).find(rc)
        assert len(found) == 1, f"{op['jsonPath']} selects {len(found)} routes"
        assert op["path"] == "/typed_per_filter_config"
        found[0].value["typed_per_filter_config"] = copy.deepcopy(op["value"])


def test_two_models_patches_make_a_config_envoy_accepts(tmp_path: Path) -> None:
    config = _envoy_gateway_base(["llama", "code"])
    for name in ("llama", "code"):
        _apply(config, _policy(name))
    rc = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]
    pickers = {
        r["name"].split("/")[2]: r["typed_per_filter_config"][PICKER_FILTER]["overrides"][
            "grpc_service"
        ]["envoy_grpc"]["cluster_name"]
        for r in rc["virtual_hosts"][0]["routes"]
    }
    assert pickers == {"llama": cluster_name(NS, "llama"), "code": cluster_name(NS, "code")}
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    assert_envoy_accepts(path)


# ---- through the API emulator --------------------------------------------------------------------


def _trusted_ca(policy: dict) -> str:
    [patch] = [p for p in policy["spec"]["jsonPatches"] if p["type"].endswith("Cluster")]
    tls = patch["operation"]["value"]["transport_socket"]["typed_config"]
    return tls["common_tls_context"]["validation_context"]["trusted_ca"]["inline_string"]


async def test_reconcile_makes_the_secret_and_the_patch_and_keeps_them(cluster: Cluster) -> None:
    await cluster.apply(model_obj())
    await cluster.reconcile()
    secret = await cluster.get(SECRET, "llama-epp-tls")
    assert secret["metadata"]["ownerReferences"][0]["kind"] == "Model"
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    assert cert_names(cert) == set(HOSTS)
    policy = await cluster.get(ENVOY_PATCH_POLICY, "llama-epp")
    assert _trusted_ca(policy) == base64.b64decode(secret["data"]["ca.crt"]).decode()
    deployment = await cluster.get(DEPLOYMENT, "llama-epp")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations[picker_tls.TLS_ANNOTATION] == picker_tls.fingerprint(
        base64.b64decode(secret["data"]["tls.crt"])
    )
    # a second pass keeps the certificate (no rollout) ...
    await cluster.reconcile()
    again = await cluster.get(SECRET, "llama-epp-tls")
    assert again["metadata"]["resourceVersion"] == secret["metadata"]["resourceVersion"]
    # ... and a certificate that is no longer right is replaced, the patch following it
    again["data"]["tls.crt"] = base64.b64encode(b"not a certificate").decode()
    await cluster.store.update(again)
    await cluster.reconcile()
    renewed = await cluster.get(SECRET, "llama-epp-tls")
    assert picker_tls.renewal_problem(renewed, NS, "llama-epp") is None
    policy = await cluster.get(ENVOY_PATCH_POLICY, "llama-epp")
    assert _trusted_ca(policy) == base64.b64decode(renewed["data"]["ca.crt"]).decode()


async def test_a_secret_that_is_not_the_models_is_left_alone(cluster: Cluster) -> None:
    theirs = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
              "metadata": {"name": "llama-epp-tls", "namespace": NS},
              "data": {"tls.crt": "", "tls.key": ""}}  # fmt: skip
    await cluster.apply(theirs)
    await cluster.apply(model_obj())
    model = await cluster.reconcile()
    assert summary(model)["Initialized"] == ("False", "ObjectNotOwned")
    assert (await cluster.get(SECRET, "llama-epp-tls"))["data"] == theirs["data"]
    assert await cluster.store.get(ENVOY_PATCH_POLICY, NS, "llama-epp") is None
