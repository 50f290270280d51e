"""The Envoy Gateway side of a Model in a cluster: the picker's TLS Secret the controllers make
(controllers/picker_tls.py) and the EnvoyPatchPolicy that runs the Model's picker for its route
(controllers/picker_patch.py), through the API emulator, and the patches applied to an
Envoy-Gateway-shaped config that Envoy itself must accept.

No Envoy Gateway control plane runs here: the base config below is our rendering of what it
generates for two Models' HTTPRoutes (its V1 xDS names), not its output.
"""

from __future__ import annotations

import base64
import datetime
from pathlib import Path

from cryptography import x509

from infergw import api
from infergw.cluster.certs import cert_names
from infergw.cluster.store import DEPLOYMENT, ENVOY_PATCH_POLICY, SECRET
from infergw.controllers import picker_objects, picker_tls
from infergw.controllers.picker_objects import ROUTE_PATHS, PickerTLS
from infergw.controllers.picker_patch import (
    DEFAULT_LISTENER,
    FILTER_CONFIG,
    PICKER_FILTER,
    cluster_name,
    route_names,
)
from tests import envoy_gateway_recipe as recipe
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
    secret = api.to_dict(picker_tls.secret(api.ObjectMeta(name="llama-epp-tls"), cert, b"k" * 43))
    assert secret["type"] == "kubernetes.io/tls"
    assert picker_tls.renewal_problem(secret, NS, "llama-epp") is None


def test_a_certificate_is_renewed_before_it_ends_and_envoy_trusts_both_cas_meanwhile() -> None:
    old = picker_tls.issue(NS, "llama-epp")
    old_secret = api.to_dict(picker_tls.secret(api.ObjectMeta(name="s"), old, b"k" * 43))
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=picker_tls.CERT_DAYS - 29)
    assert "expires on" in (picker_tls.renewal_problem(old_secret, NS, "llama-epp", later) or "")
    assert picker_tls.renewal_problem(old_secret, NS, "other-epp") is not None  # other names
    new = picker_tls.issue(NS, "llama-epp", old_secret, later)
    bundle = new.ca.decode()
    assert old.ca.decode() in bundle and bundle.startswith(picker_tls.first_pem(new.ca).decode())
    new_secret = api.to_dict(picker_tls.secret(api.ObjectMeta(name="s"), new, b"k" * 43))
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
    # per match of the HTTPRoute the controllers write, in its order: our picker's override
    # and AI Gateway's own picker filter for the pool switched off, each one key of the map
    route = api.to_dict(picker_objects.http_route(_model()))
    assert len(route["spec"]["rules"][0]["matches"]) == len(ROUTE_PATHS)
    assert len(route_patches) == 2 * len(ROUTE_PATHS)
    assert {p["name"] for p in route_patches} == {f"{NS}/inference-gateway/{DEFAULT_LISTENER}"}
    names = route_names(NS, "llama", len(ROUTE_PATHS))
    for i, name in enumerate(names):
        ours, theirs = route_patches[2 * i : 2 * i + 2]
        for p in (ours, theirs):
            assert p["operation"]["jsonPath"] == f"..routes[?(@.name=='{name}')]"
        assert ours["operation"]["path"] == f"/typed_per_filter_config/{PICKER_FILTER}"
        switch = ours["operation"]["value"]
        # on for the route (the filter is off on the listener) with this Model's picker
        assert switch["@type"] == FILTER_CONFIG and not switch.get("disabled")
        override = switch["config"]["overrides"]
        assert override["grpc_service"]["envoy_grpc"]["cluster_name"] == cluster_name(NS, "llama")
        assert override["failure_mode_allow"] is False  # the pool fails closed
        assert theirs["operation"]["path"] == (
            f"/typed_per_filter_config/envoy.filters.http.ext_proc~1endpointpicker~1llama_{NS}_ext_proc"
        )
        assert theirs["operation"]["value"]["disabled"] is True
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


def test_two_models_patches_make_a_config_envoy_accepts(tmp_path: Path) -> None:
    """The recipe as tests/envoy_gateway_recipe.py renders it: Envoy Gateway's base, the
    Gateway-wide picker filter and two Models' patches, AI Gateway's post-translate hook."""
    gw = recipe.Gateway(NS)
    router = recipe.router_cluster(gw, "127.0.0.1", 9004, _tls().ca_bundle, "127.0.0.1")
    config = recipe.base(gw, ["llama", "code"], 8080, 9901, router)
    recipe.apply_policy(config, recipe.picker_filter_policy(gw))
    for name in ("llama", "code"):
        recipe.apply_policy(config, _policy(name))
    recipe.ai_gateway_post_translate(config, gw, ["llama", "code"])
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = [f["name"] for f in hcm["typed_config"]["http_filters"]]
    # the router's filter, ours, AI Gateway's, the router
    assert filters[0] == gw.router_filter and filters[1] == PICKER_FILTER
    assert hcm["typed_config"]["http_filters"][1]["disabled"] is True
    assert filters[-1] == "envoy.filters.http.router"
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    for r in routes:
        per_filter = r["typed_per_filter_config"]
        assert gw.router_filter in per_filter  # the router stays on for every route
        model = r["name"].split("/")[2]
        # ours is off on the listener and on for every route, with its own config each
        assert not per_filter[PICKER_FILTER].get("disabled")
        ours = per_filter[PICKER_FILTER]["config"]
        if model == recipe.NO_MODEL_ROUTE:
            assert ours["disabled"] is True
            continue
        override = ours["overrides"]["grpc_service"]["envoy_grpc"]
        assert override["cluster_name"] == cluster_name(NS, model)
        # AI Gateway's picker filters: every one off (its own by our patch)
        theirs = {k: v for k, v in per_filter.items() if "endpointpicker" in k}
        assert len(theirs) == 2 and all(v["disabled"] for v in theirs.values())
    assert_envoy_accepts(recipe.write(config, tmp_path / "envoy.yaml"))


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
    # the response id key outlives certificates: clients hold ids made with it
    key = picker_tls.stored_response_id_key(secret)
    assert key is not None and len(key) >= 32
    assert picker_tls.stored_response_id_key(renewed) == key


async def test_a_secret_made_before_response_id_keys_gets_one_and_keeps_it(
    cluster: Cluster,
) -> None:
    await cluster.apply(model_obj())
    await cluster.reconcile()
    secret = await cluster.get(SECRET, "llama-epp-tls")
    del secret["data"][picker_tls.RESPONSE_ID_KEY]
    await cluster.store.update(secret)
    await cluster.reconcile()
    upgraded = await cluster.get(SECRET, "llama-epp-tls")
    key = picker_tls.stored_response_id_key(upgraded)
    assert key is not None and len(key) >= 32
    assert upgraded["data"]["tls.crt"] == secret["data"]["tls.crt"]  # the certificate kept
    await cluster.reconcile()
    assert picker_tls.stored_response_id_key(await cluster.get(SECRET, "llama-epp-tls")) == key


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
