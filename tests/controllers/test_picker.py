"""A Model in a cluster yields its endpoint picker and HTTPRoute (controllers/picker_objects.py),
and its Reachable condition says whether the Gateway serves it (controllers/reachability.py):
the route accepted, the EnvoyPatchPolicies that run its picker applied, the picker Available.

Through the official client over real HTTP to the API emulator (tests/kubeapi.py): the Model
reconciler writes every object; each is checked against what consumes it — the picker's
container args parse with the picker's own parser after the kubelet's $(VAR) expansion, its
ConfigMap loads with the picker's config loader (precise scorer and all), the init container's
args with the fetch's parser, HTTPRoute → InferencePool → picker Service resolve by name, the
Role grants what the picker's provider watches, the KV-event ports agree with the engines' —
and the built-in kinds pass the Kubernetes schemas. Status follows the route's and the
Deployment's and the policies' status as the emulator is told them; deleting the Model removes
everything.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from infergw import api
from infergw.api.names import MODEL_LABEL, MODEL_NAME_HEADER, PICKER_FILTER_POLICY
from infergw.bbr.model_pools import ModelPools
from infergw.cluster.store import (
    CONFIG_MAP,
    DEPLOYMENT,
    ENVOY_PATCH_POLICY,
    HTTP_ROUTE,
    INFERENCE_POOL,
    KINDS,
    MODEL,
    MODEL_INFER,
    POD_DISRUPTION_BUDGET,
    ROLE,
    ROLE_BINDING,
    SECRET,
    SERVICE,
    SERVICE_ACCOUNT,
    labels_match,
)
from infergw.controllers import picker_objects, reachability
from infergw.controllers.app import build_controllers, build_parser
from infergw.controllers.picker_objects import TOKENIZER_DIR, PickerSettings
from infergw.controllers.runner import ControllerMetrics
from infergw.epp.providers.kubernetes import OPTIONAL_KINDS
from infergw.epp.request import api_for_path
from infergw.epp.scheduling.config import load_config, needs_kv_cache, read_config
from infergw.epp.scheduling.handle import Handle
from infergw.fetch.tokenizer import build_parser as fetch_parser
from infergw.kvindex.cache import KVCache
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.tokenize import PromptTokenizers
from tests.controller_helpers import conds, summary
from tests.envoy_gateway_status import patch_policy_status
from tests.paths import DEFAULT_MODEL, EXAMPLES
from tests.picker_cluster import (
    NS,
    SERVED,
    Cluster,
    model_obj,
    picker_container,
    picker_options,
    pod_spec,
)
from tests.waiting import wait_for_async

K8S_VERSION = "1.30"
PICKER_KINDS = (
    SERVICE_ACCOUNT, ROLE, ROLE_BINDING, CONFIG_MAP, DEPLOYMENT, POD_DISRUPTION_BUDGET, HTTP_ROUTE,
)  # fmt: skip


def object_name(kind) -> str:
    """The name of the Model llama's object of `kind` (its Services: SERVICE's own names)."""
    return {HTTP_ROUTE: "llama", CONFIG_MAP: "llama-epp-config"}.get(kind, "llama-epp")


async def versions(cluster: Cluster) -> dict[tuple[str, str], str]:
    """(kind, name) → resourceVersion of every picker object and Service in the namespace."""
    out = {}
    for kind in (*PICKER_KINDS, SERVICE):
        items, _ = await cluster.store.list(kind, NS)
        out |= {(kind.kind, o["metadata"]["name"]): o["metadata"]["resourceVersion"] for o in items}
    return out


# ---- the objects --------------------------------------------------------------------------------


async def test_a_model_yields_its_picker_and_route_and_each_object_fits_its_consumer(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.apply(model_obj())
    model = await cluster.reconcile()
    uid = model["metadata"]["uid"]
    name = "llama-epp"
    for kind in PICKER_KINDS:
        obj = await cluster.get(kind, object_name(kind))
        [ref] = obj["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["uid"], ref["controller"]) == ("Model", uid, True)
    dep = await cluster.get(DEPLOYMENT, name)
    svc = await cluster.get(SERVICE, name)
    headless = await cluster.get(SERVICE, f"{name}-replicas")

    # the Deployment: 2 replicas, never below them in a rollout, spread over nodes
    spec = dep["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"] == labels
    [spread] = pod_spec(dep)["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"] == labels
    c = picker_container(dep)
    probes = {p: c[p]["grpc"] for p in ("readinessProbe", "livenessProbe")}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}

    # its flags, as the picker reads them, with the tokenizer the init container fetched
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(DEFAULT_MODEL, tokenizer)
    secret = await cluster.get(SECRET, "llama-epp-tls")
    opts = picker_options(dep, tokenizer, secret)
    assert (opts.pool_name, opts.pool_namespace, opts.provider) == ("llama", NS, "kubernetes")
    assert probes["readinessProbe"] == {"port": opts.grpc_health_port, "service": "readiness"}
    assert probes["livenessProbe"] == {"port": opts.grpc_health_port, "service": "liveness"}
    assert ports["grpc"] == opts.grpc_port and ports["http-metrics"] == opts.metrics_port
    assert opts.secure_serving and opts.fallback_endpoints == 0
    assert opts.tokenizers == {SERVED: tokenizer}
    assert opts.replica_sync_bind == f"tcp://10.0.0.7:{ports['replica-sync']}"
    assert str(opts.replica_sync_discovery) == f"{NS}/{headless['metadata']['name']}"
    [sync_port] = headless["spec"]["ports"]
    assert headless["spec"]["clusterIP"] == "None"
    assert (sync_port["name"], sync_port["port"]) == ("replica-sync", ports["replica-sync"])

    # KV events: the picker connects to each pod's PUB and replay ports, which the engines bind
    mi = await cluster.get(MODEL_INFER, "llama")
    [role] = mi["spec"]["template"]["roles"]
    [engine] = role["entryTemplate"]["spec"]["containers"]
    [kv_flag] = [a for a in engine["args"] if a.startswith("--kv-events-config=")]
    kv = json.loads(kv_flag.partition("=")[2])
    assert opts.kv_events_mode == "per-pod"
    assert kv["endpoint"] == f"tcp://*:{opts.kv_events_pub_port}"
    assert kv["replay_endpoint"] == f"tcp://*:{opts.kv_events_replay_port}"

    # the ConfigMap, mounted where --config reads it, loads with the picker's loader: the
    # precise scorer (a KV cache with the tokenizer) and the quickstart's weights
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    cm = await cluster.get(CONFIG_MAP, f"{name}-config")
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert opts.config_file.parent == Path(mounts["config"])
    text = cm["data"][opts.config_file.name]
    doc = read_config(text)
    assert needs_kv_cache(doc)
    kv_cache = KVCache(tokenizers=PromptTokenizers(opts.tokenizers), index=KVBlockIndex())
    config = load_config(text, Handle(kv_cache=kv_cache))
    assert "precise-prefix-cache-scorer" in config.plugins
    quickstart = yaml.safe_load((EXAMPLES / "quickstart" / "epp-config.yaml").read_text())
    assert yaml.safe_load(text)["schedulingProfiles"] == quickstart["schedulingProfiles"]

    # the init container fetches the tokenizer into the volume the picker reads
    [init] = pod_spec(dep)["initContainers"]
    assert init["command"] == ["infergate", "fetch", "tokenizer"]
    fetch = fetch_parser().parse_args(init["args"])
    assert fetch.source == "hf://meta-llama/Meta-Llama-3-8B-Instruct"
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert str(fetch.dest) == init_mounts["tokenizer"] == mounts["tokenizer"] == TOKENIZER_DIR
    assert "emptyDir" in volumes["tokenizer"]
    # the source's credentials reach the fetch, the engine's other settings do not
    assert {e["name"] for e in init["env"]} == {"HOME", "HF_TOKEN"}
    assert "HF_TOKEN" not in {e["name"] for e in c["env"]}

    # TLS from the Secret epp-tls.yaml makes, where --cert-path reads it
    # and every replica's Responses API ids under the key it keeps there
    assert volumes["tls"]["secret"]["secretName"] == f"{name}-tls"
    assert f"--cert-path={mounts['tls']}" in c["args"]
    assert (opts.cert_path / "tls.crt").read_bytes() == base64.b64decode(secret["data"]["tls.crt"])
    assert opts.response_id_key is not None and len(opts.response_id_key) >= 32

    # HTTPRoute → InferencePool → picker Service → picker pods; the pool never selects pickers
    route = await cluster.get(HTTP_ROUTE, "llama")
    [parent] = route["spec"]["parentRefs"]
    assert parent == {
        "group": "gateway.networking.k8s.io", "kind": "Gateway",
        "name": "inference-gateway", "namespace": NS,
    }  # fmt: skip
    [rule] = route["spec"]["rules"]
    [backend] = rule["backendRefs"]
    assert (backend["group"], backend["kind"]) == ("inference.networking.k8s.io", "InferencePool")
    pool = await cluster.get(INFERENCE_POOL, backend["name"])
    epp = pool["spec"]["endpointPickerRef"]
    assert epp["name"] == svc["metadata"]["name"]
    [grpc] = [p for p in svc["spec"]["ports"] if p["port"] == epp["port"]["number"]]
    assert (grpc["targetPort"], grpc["appProtocol"]) == ("grpc", "http2")
    assert svc["spec"]["selector"].items() <= labels.items()
    picker_pod = {"metadata": {"labels": labels}}
    assert not labels_match(picker_pod, pool["spec"]["selector"]["matchLabels"])
    assert MODEL_LABEL not in labels
    # every inference path the picker parses, for requests the body-based router in front
    # sends to this pool: the header value is what bbr/ sets for the Model's served name
    paths = [m["path"]["value"] for m in rule["matches"]]
    assert paths and all(api_for_path(p) for p in paths)
    stored = [await cluster.get(MODEL, "llama"), pool]
    chosen = ModelPools.build(stored, NS).choose(SERVED, {}, paths[0], random.Random(0))
    assert chosen is not None
    for match in rule["matches"]:
        assert match["headers"] == [
            {"type": "Exact", "name": MODEL_NAME_HEADER, "value": chosen.pool}
        ]

    # RBAC: read-only, namespaced, on what the picker's provider and peer discovery watch
    role_obj = await cluster.get(ROLE, name)
    granted = {
        (g, r, v) for rule in role_obj["rules"] for g in rule["apiGroups"]
        for r in rule["resources"] for v in rule["verbs"]
    }  # fmt: skip
    watched = {*OPTIONAL_KINDS.values(), INFERENCE_POOL, KINDS["Pod"]}
    for kind in watched:
        assert {(kind.group, kind.plural, v) for v in ("get", "list", "watch")} <= granted
    assert {v for _, _, v in granted} == {"get", "list", "watch"}
    binding = await cluster.get(ROLE_BINDING, name)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": name,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": NS}]
    assert pod_spec(dep)["serviceAccountName"] == name

    pdb = await cluster.get(POD_DISRUPTION_BUDGET, name)
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == labels


async def test_the_built_in_objects_pass_the_kubernetes_schemas(cluster: Cluster) -> None:
    await cluster.apply(model_obj())
    model = api.from_dict(await cluster.reconcile())
    for want in picker_objects.desired(model, PickerSettings()):
        if want.kind == "HTTPRoute":
            continue  # a CRD's kind: not in the built-in schemas
        doc = api.to_dict(want)
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc}")


async def test_a_second_pass_writes_nothing_and_drift_is_written_back(cluster: Cluster) -> None:
    await cluster.apply(model_obj())
    await cluster.reconcile()
    before = await versions(cluster)
    assert len(before) == len(PICKER_KINDS) + 2  # and the two Services
    await cluster.reconcile()
    after = await versions(cluster)
    assert after == before
    # someone edits the ConfigMap and the Role: the next pass puts them back
    cm = await cluster.get(CONFIG_MAP, "llama-epp-config")
    cm["data"]["epp-config.yaml"] = "kind: Nonsense\n"
    await cluster.store.update(cm)
    role = await cluster.get(ROLE, "llama-epp")
    role["rules"][0]["verbs"] = ["*"]
    await cluster.store.update(role)
    await cluster.reconcile()
    assert (
        "precise-prefix-cache-scorer"
        in (await cluster.get(CONFIG_MAP, "llama-epp-config"))["data"]["epp-config.yaml"]
    )
    assert "*" not in (await cluster.get(ROLE, "llama-epp"))["rules"][0]["verbs"]


@pytest.mark.parametrize(
    "uri",
    [
        "file:///models/llama",
        "pvc://weights/llama",
        "ms://org/llama",
        "https://models.example/llama.zip",  # a zip's index is at its end: not streamed
    ],
)
async def test_without_a_tokenizer_source_the_picker_scores_prefixes_approximately(
    cluster: Cluster, uri: str, tmp_path: Path
) -> None:
    await cluster.apply(model_obj(uri))
    await cluster.reconcile()
    dep = await cluster.get(DEPLOYMENT, "llama-epp")
    assert "initContainers" not in pod_spec(dep)
    secret = await cluster.get(SECRET, "llama-epp-tls")
    opts = picker_options(dep, tmp_path, secret)
    assert opts.tokenizers == {}
    text = (await cluster.get(CONFIG_MAP, "llama-epp-config"))["data"]["epp-config.yaml"]
    assert not needs_kv_cache(read_config(text))
    assert "prefix-cache-scorer" in load_config(text).plugins


@pytest.mark.parametrize("scheme", ["s3", "obs"])
async def test_an_s3_model_fetches_its_tokenizer_with_the_models_s3_settings(
    cluster: Cluster, scheme: str
) -> None:
    env = [
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "id"}}},
        {"name": "AWS_ENDPOINT_URL", "value": "http://minio.storage:9000"},
        {"name": "OTHER", "value": "x"},
    ]
    await cluster.apply(model_obj(f"{scheme}://models/llama-3", env=env))
    await cluster.reconcile()
    [init] = pod_spec(await cluster.get(DEPLOYMENT, "llama-epp"))["initContainers"]
    assert fetch_parser().parse_args(init["args"]).source == f"{scheme}://models/llama-3"
    assert [e for e in init["env"] if e["name"] != "HOME"] == env[:2]


async def test_a_tar_archive_models_tokenizer_is_streamed_out_of_it(cluster: Cluster) -> None:
    uri = f"https://models.example/llama.tar.gz#sha256={'a' * 64}"
    await cluster.apply(model_obj(uri))
    await cluster.reconcile()
    [init] = pod_spec(await cluster.get(DEPLOYMENT, "llama-epp"))["initContainers"]
    assert fetch_parser().parse_args(init["args"]).source == uri
    text = (await cluster.get(CONFIG_MAP, "llama-epp-config"))["data"]["epp-config.yaml"]
    assert needs_kv_cache(read_config(text))


async def test_the_tokenizer_is_fetched_at_the_models_revision(cluster: Cluster) -> None:
    """The picker's pod cannot read the node's weights cache: it fetches the tokenizer from
    the same source at the same revision as the weights download."""
    await cluster.apply(model_obj(modelRevision="0123abc"))
    await cluster.reconcile()
    [init] = pod_spec(await cluster.get(DEPLOYMENT, "llama-epp"))["initContainers"]
    assert fetch_parser().parse_args(init["args"]).revision == "0123abc"


async def test_lora_adapters_are_tokenized_with_the_base_models_tokenizer(
    cluster: Cluster, tmp_path: Path
) -> None:
    """vLLM tokenizes every LoRA request with the base model's tokenizer, even when the adapter
    ships one (README, "LoRA adapters' tokenizers"): the picker gets the base's alone (the KV
    facade maps an adapter to its base, kvindex/cache.py), and nothing fetches an adapter's."""
    adapters = [{"name": "sql-lora", "artifactURL": "hf://org/sql-lora"}]
    await cluster.apply(model_obj(loraAdapters=adapters))
    await cluster.reconcile()
    dep = await cluster.get(DEPLOYMENT, "llama-epp")
    [init] = pod_spec(dep)["initContainers"]
    source = fetch_parser().parse_args(init["args"]).source
    assert source == "hf://meta-llama/Meta-Llama-3-8B-Instruct"
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(DEFAULT_MODEL, tokenizer)
    secret = await cluster.get(SECRET, "llama-epp-tls")
    assert picker_options(dep, tokenizer, secret).tokenizers == {SERVED: tokenizer}


async def test_spec_gateway_names_the_routes_parent(cluster: Cluster) -> None:
    gateway = {"name": "public", "namespace": "gateways", "sectionName": "https"}
    await cluster.apply(model_obj(gateway=gateway))
    await cluster.reconcile()
    [parent] = (await cluster.get(HTTP_ROUTE, "llama"))["spec"]["parentRefs"]
    assert parent == {"group": "gateway.networking.k8s.io", "kind": "Gateway", **gateway}


# ---- status -------------------------------------------------------------------------------------


def route_status(
    *conditions: tuple[str, str], gateway: str = "inference-gateway", generation: int = 1
) -> dict:
    ref = {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": gateway,
        "namespace": NS,
    }
    return {
        "parents": [
            {
                "parentRef": ref,
                "controllerName": "gateway.envoyproxy.io/gatewayclass-controller",
                "conditions": [
                    {"type": t, "status": s, "reason": "Because", "message": f"{t} is {s}",
                     "observedGeneration": generation, "lastTransitionTime": "2030-01-01T00:00:00Z"}
                    for t, s in conditions
                ],
            }
        ]
    }  # fmt: skip


AVAILABLE = {
    "readyReplicas": 2,
    "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}],
}

# The install's Gateway-wide picker filter (gateway-manifests/bbr/picker-filter.yaml), its spec
# cut to what the controllers read: none of it.
PICKER_FILTER = {
    "apiVersion": ENVOY_PATCH_POLICY.api_version,
    "kind": "EnvoyPatchPolicy",
    "metadata": {"name": PICKER_FILTER_POLICY, "namespace": NS},
    "spec": {"type": "JSONPatch", "targetRef": {"group": "gateway.networking.k8s.io",
             "kind": "Gateway", "name": "inference-gateway"}, "jsonPatches": []},
}  # fmt: skip


async def patches_applied(cluster: Cluster, *names: str, conditions=None) -> None:
    """Envoy Gateway's report on the policies `names` (default: both) for their generation."""
    for name in names or (PICKER_FILTER_POLICY, "llama-epp"):
        generation = (await cluster.get(ENVOY_PATCH_POLICY, name))["metadata"]["generation"]
        status = patch_policy_status(NS, generation, *([conditions] if conditions else []))
        cluster.set_status(ENVOY_PATCH_POLICY, name, status)


async def test_reachable_only_when_the_route_is_accepted_with_its_refs_and_the_picker_is_available(
    cluster: Cluster,
) -> None:
    await cluster.apply(model_obj())
    reachable = conds(await cluster.reconcile())["Reachable"]
    assert (reachable["status"], reachable["reason"]) == ("False", "RouteNotSeen")
    assert "Deployment llama-epp: Available not reported yet" in reachable["message"]

    # another Gateway's report says nothing about ours
    cluster.set_status(
        HTTP_ROUTE,
        "llama",
        route_status(("Accepted", "True"), ("ResolvedRefs", "True"), gateway="other"),
    )
    assert summary(await cluster.reconcile())["Reachable"] == ("False", "RouteNotSeen")

    cluster.set_status(
        HTTP_ROUTE, "llama", route_status(("Accepted", "True"), ("ResolvedRefs", "False"))
    )
    reachable = conds(await cluster.reconcile())["Reachable"]
    assert (reachable["status"], reachable["reason"]) == ("False", "RouteRefsUnresolved")
    assert "ResolvedRefs False: Because (ResolvedRefs is False)" in reachable["message"]
    assert reachability.UNRESOLVED_HINT in reachable["message"]  # the recipe's missing part

    cluster.set_status(
        HTTP_ROUTE, "llama", route_status(("Accepted", "False"), ("ResolvedRefs", "True"))
    )
    assert summary(await cluster.reconcile())["Reachable"] == ("False", "RouteNotAccepted")

    cluster.set_status(
        HTTP_ROUTE, "llama", route_status(("Accepted", "True"), ("ResolvedRefs", "True"))
    )
    await cluster.apply(PICKER_FILTER)
    await patches_applied(cluster)
    reachable = conds(await cluster.reconcile())["Reachable"]
    assert (reachable["status"], reachable["reason"]) == ("False", "PickerUnavailable")
    assert "HTTPRoute" not in reachable["message"]

    unavailable = {
        "conditions": [
            {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"}
        ]
    }
    cluster.set_status(DEPLOYMENT, "llama-epp", unavailable)
    reachable = conds(await cluster.reconcile())["Reachable"]
    assert "Available False: MinimumReplicasUnavailable" in reachable["message"]

    cluster.set_status(DEPLOYMENT, "llama-epp", AVAILABLE)
    model = await cluster.reconcile()
    assert summary(model)["Reachable"] == ("True", "RouteAccepted")
    # the other conditions are as before: Reachable is one more, not a new meaning of Ready
    assert set(conds(model)) == {"Initialized", "Active", "Failed", "Ready", "Reachable"}

    # a report about an older generation of the route does not count
    cluster.set_status(
        HTTP_ROUTE,
        "llama",
        route_status(("Accepted", "True"), ("ResolvedRefs", "True"), generation=0),
    )
    reachable = conds(await cluster.reconcile())["Reachable"]
    assert (reachable["status"], reachable["reason"]) == ("False", "RouteNotAccepted")
    assert "not reported for its current generation" in reachable["message"]


async def test_reachable_only_once_envoy_gateway_applied_the_install_filter_and_the_models_patch(
    cluster: Cluster,
) -> None:
    await cluster.apply(model_obj())
    await cluster.reconcile()
    cluster.set_status(
        HTTP_ROUTE, "llama", route_status(("Accepted", "True"), ("ResolvedRefs", "True"))
    )
    cluster.set_status(DEPLOYMENT, "llama-epp", AVAILABLE)
    reachable = conds(await cluster.reconcile())["Reachable"]
    assert (reachable["status"], reachable["reason"]) == ("False", "PickerFilterMissing")
    assert f"EnvoyPatchPolicy {PICKER_FILTER_POLICY} does not exist" in reachable["message"]
    assert "EnvoyPatchPolicy llama-epp for Gateway" in reachable["message"]  # not seen either

    await cluster.apply(PICKER_FILTER)
    assert summary(await cluster.reconcile())["Reachable"] == ("False", "PatchNotSeen")
    await patches_applied(cluster, PICKER_FILTER_POLICY)
    reachable = conds(await cluster.reconcile())["Reachable"]
    assert (reachable["status"], reachable["reason"]) == ("False", "PatchNotSeen")
    assert PICKER_FILTER_POLICY not in reachable["message"]

    # EnvoyPatchPolicy switched off in Envoy Gateway's configuration
    disabled = (("Accepted", "False", "Disabled", "EnvoyPatchPolicy is disabled" + "!" * 5000),)
    await patches_applied(cluster, "llama-epp", conditions=disabled)
    reachable = conds(await cluster.reconcile())["Reachable"]
    assert (reachable["status"], reachable["reason"]) == ("False", "PatchNotAccepted")
    assert "EnvoyPatchPolicy llama-epp on Gateway" in reachable["message"]
    assert "Accepted False: Disabled (EnvoyPatchPolicy is disabled!!" in reachable["message"]
    assert len(reachable["message"]) < 1000  # Envoy Gateway's message quoted clipped

    # a JSON path that matches nothing (xDS names not Envoy Gateway's defaults)
    unmatched = (
        ("Accepted", "True", "Accepted", ""),
        ("Programmed", "False", "ResourceNotFound", "Unable to find xds resources"),
    )
    await patches_applied(cluster, PICKER_FILTER_POLICY, conditions=unmatched)
    await patches_applied(cluster, "llama-epp")
    reachable = conds(await cluster.reconcile())["Reachable"]
    assert (reachable["status"], reachable["reason"]) == ("False", "PatchNotProgrammed")
    assert f"EnvoyPatchPolicy {PICKER_FILTER_POLICY} on Gateway" in reachable["message"]

    await patches_applied(cluster)
    assert summary(await cluster.reconcile())["Reachable"] == ("True", "RouteAccepted")

    # a report about an older generation of the Model's patch does not count
    patch = await cluster.get(ENVOY_PATCH_POLICY, "llama-epp")
    generation = patch["metadata"]["generation"]
    cluster.set_status(ENVOY_PATCH_POLICY, "llama-epp", patch_policy_status(NS, generation - 1))
    reachable = conds(await cluster.reconcile())["Reachable"]
    assert (reachable["status"], reachable["reason"]) == ("False", "PatchNotAccepted")
    assert "not reported for its current generation" in reachable["message"]


async def test_with_its_gateway_in_another_namespace_no_patch_is_written_or_needed(
    cluster: Cluster,
) -> None:
    await cluster.apply(model_obj(gateway={"name": "public", "namespace": "gateways"}))
    await cluster.reconcile()
    assert await cluster.store.get(ENVOY_PATCH_POLICY, NS, "llama-epp") is None
    status = route_status(("Accepted", "True"), ("ResolvedRefs", "True"), gateway="public")
    status["parents"][0]["parentRef"]["namespace"] = "gateways"
    cluster.set_status(HTTP_ROUTE, "llama", status)
    cluster.set_status(DEPLOYMENT, "llama-epp", AVAILABLE)
    # as before patches: the route and the picker are all Reachable can see
    assert summary(await cluster.reconcile())["Reachable"] == ("True", "RouteAccepted")


async def test_a_route_of_that_name_that_is_not_the_models_is_left_alone_and_never_reachable(
    cluster: Cluster,
) -> None:
    theirs = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "llama", "namespace": NS},
        "spec": {"parentRefs": [{"name": "inference-gateway"}]},
    }
    await cluster.apply(theirs)
    cluster.set_status(
        HTTP_ROUTE, "llama", route_status(("Accepted", "True"), ("ResolvedRefs", "True"))
    )
    await cluster.apply(model_obj())
    model = await cluster.reconcile()
    assert summary(model)["Initialized"] == ("False", "ObjectNotOwned")
    assert summary(model)["Reachable"][1] == "RouteMissing"
    assert (await cluster.get(HTTP_ROUTE, "llama"))["spec"] == theirs["spec"]


# ---- the controllers, level-triggered, and garbage collection ------------------------------------


async def test_route_and_picker_status_changes_reconcile_the_model_and_deleting_it_removes_all(
    cluster: Cluster,
) -> None:
    controllers, scaler = build_controllers(
        cluster.store, ControllerMetrics(), picker=PickerSettings()
    )
    try:
        for c in controllers:
            await c.start()
        await cluster.apply(model_obj())

        async def reachable_is(status_or_reason: str) -> bool:
            model = await cluster.store.get(MODEL, NS, "llama")
            got = conds(model).get("Reachable", {}) if model.get("status") else {}
            return status_or_reason in (got.get("status"), got.get("reason"))

        async def objects_exist() -> bool:
            return (
                await cluster.store.get(DEPLOYMENT, NS, "llama-epp") is not None
                and await cluster.store.get(HTTP_ROUTE, NS, "llama") is not None
            )

        await wait_for_async(objects_exist, "the picker and the route")
        await wait_for_async(lambda: reachable_is("False"), "Reachable False")
        # no reconcile is called here: the informers on Deployments, HTTPRoutes and
        # EnvoyPatchPolicies bring it
        cluster.set_status(
            HTTP_ROUTE, "llama", route_status(("Accepted", "True"), ("ResolvedRefs", "True"))
        )
        cluster.set_status(DEPLOYMENT, "llama-epp", AVAILABLE)
        await wait_for_async(lambda: reachable_is("PickerFilterMissing"), "the install's filter")
        await patches_applied(cluster, "llama-epp")
        # the install's policy is no Model's: its status reaches every Model in its namespace
        await cluster.apply(PICKER_FILTER)
        await wait_for_async(lambda: reachable_is("PatchNotSeen"), "the install's filter seen")
        await patches_applied(cluster, PICKER_FILTER_POLICY)
        await wait_for_async(lambda: reachable_is("True"), "Reachable True")
        cluster.set_status(
            DEPLOYMENT, "llama-epp", {"conditions": [{"type": "Available", "status": "False"}]}
        )
        await wait_for_async(lambda: reachable_is("False"), "Reachable False again")
    finally:
        for c in controllers:
            await c.stop()
        await scaler.close()

    await cluster.store.delete(MODEL, NS, "llama")
    left = []
    for kind in (*PICKER_KINDS, SECRET, ENVOY_PATCH_POLICY, SERVICE, INFERENCE_POOL, MODEL_INFER):
        items, _ = await cluster.store.list(kind, NS)
        left += [(kind.kind, o["metadata"]["name"]) for o in items]
    assert left == [("EnvoyPatchPolicy", PICKER_FILTER_POLICY)]  # the install's, not the Model's


async def test_the_shared_kv_index_is_opt_in_and_its_replicas_shard_the_pods(
    cluster: Cluster, tmp_path: Path
) -> None:
    """--picker-kv-index-redis: every Model's picker reads and writes one index in Redis, each
    pod's KV events ingested by one replica (epp/kv_shards.py); without it, nothing changes."""
    await cluster.apply(model_obj())
    model = api.from_dict(await cluster.reconcile())
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(DEFAULT_MODEL, tokenizer)
    secret = await cluster.get(SECRET, "llama-epp-tls")

    def options(settings: PickerSettings):
        [dep] = [w for w in picker_objects.desired(model, settings) if w.kind == "Deployment"]
        return picker_options(api.to_dict(dep), tokenizer, secret)

    alone = options(PickerSettings())
    assert (alone.kv_index_backend, alone.kv_index_redis_shard) == ("memory", False)
    shared = options(PickerSettings(kv_index_redis="valkey.infra:6379"))
    assert shared.kv_index_backend == "redis" and shared.kv_index_redis_url == "valkey.infra:6379"
    assert shared.kv_index_redis_shard and shared.kv_index_redis_write
    assert shared.kv_events_mode == "per-pod"
    parser = build_parser()
    args = parser.parse_args(["--picker-kv-index-redis", "valkey.infra:6379"])
    assert args.picker_kv_index_redis == "valkey.infra:6379"
    for bad in ("valkey.infra", "redis://x:1/0", ":6379", "host:99999"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--picker-kv-index-redis", bad])


async def test_the_pickers_trace_where_the_controllers_do(cluster: Cluster) -> None:
    """The controllers' OTEL_* (api/tracing.py) go into every picker Deployment they write,
    but the service name (each component's own) and the exporter's headers (a token is no
    Deployment env's business); without them the picker's env names none."""
    from infergw.api import tracing

    await cluster.apply(model_obj())
    model = api.from_dict(await cluster.reconcile())
    controllers_env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.monitoring:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
        "OTEL_SERVICE_NAME": "infergate-controllers",
        "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer s3cret",
        "HOME": "/root",
    }

    def picker_env(settings: PickerSettings) -> dict[str, str]:
        [dep] = [w for w in picker_objects.desired(model, settings) if w.kind == "Deployment"]
        [epp] = [c for c in pod_spec(api.to_dict(dep))["containers"] if c["name"] == "epp"]
        return {e["name"]: e["value"] for e in epp["env"] if "value" in e}

    env = picker_env(PickerSettings(trace_env=tracing.passed_on(controllers_env)))
    assert tracing.settings_from_env(env) == tracing.settings_from_env(
        {k: v for k, v in controllers_env.items() if k != "OTEL_SERVICE_NAME"}
    )
    assert "OTEL_SERVICE_NAME" not in env and "OTEL_EXPORTER_OTLP_HEADERS" not in env
    assert env["HOME"] == "/tmp"
    assert tracing.settings_from_env(picker_env(PickerSettings())) is None
