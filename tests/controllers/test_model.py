"""The Model reconciler: one Model becomes a ModelInfer, ModelServer, ModelRoute,
InferencePool (and autoscaling objects), each valid against our CRDs; edits propagate;
deleting the Model deletes them; its status follows the serving groups: Initialized, Active,
Failed and Ready, each turned True and False by real reconciles."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import msgspec
import pytest
import yaml

from infergw.api import Model, from_dict_as, prune_nulls, to_dict, validate_dict
from infergw.api.lora_adapters import MAX_ADAPTERS
from infergw.cluster.store import (
    AUTOSCALING_BINDING,
    AUTOSCALING_POLICY,
    INFERENCE_POOL,
    MODEL,
    MODEL_INFER,
    MODEL_ROUTE,
    MODEL_SERVER,
    POD,
    Invalid,
)
from infergw.controllers import model_objects
from infergw.controllers.memory_store import MemoryStore
from infergw.controllers.model import NOT_OURS_RETRY, ModelReconciler
from infergw.controllers.modelinfer import ModelInferReconciler
from infergw.controllers.runner import Controller, own_key, owner_key
from tests.controller_helpers import conds, kubelet, modelinfer, since, summary
from tests.paths import EXAMPLES
from tests.waiting import wait_for_async

EXAMPLE = EXAMPLES / "crds" / "model.yaml"
OWNED = (MODEL_INFER, MODEL_SERVER, MODEL_ROUTE, INFERENCE_POOL, AUTOSCALING_BINDING)


def example_model(path: Path = EXAMPLE) -> dict:
    return yaml.safe_load(path.read_text())


def stored(model: dict) -> dict:
    """As the store hands it to the reconciler: with a uid."""
    model["metadata"].setdefault("uid", "0000-uid")
    return model


async def get_model(store, name="llama-3-8b"):
    return await store.get(MODEL, "default", name)


async def settle_both(store, models, infers, *, ready=True, name="llama-3-8b") -> None:
    """Both reconcilers and the kubelet, until nothing changes; the Model last."""
    for _ in range(60):
        await models.reconcile("default", name)
        again = await infers.reconcile("default", name)
        started = await kubelet(store, ready=ready)
        if again is None and started == 0:
            await models.reconcile("default", name)
            return
    raise AssertionError("did not settle")


async def mark_ready(store) -> None:
    for p in (await store.list(POD))[0]:
        p["status"]["conditions"][0]["status"] = "True"
        await store.update_status(p)


@pytest.fixture
async def env():
    store = MemoryStore()
    return store, ModelReconciler(store)


async def owned(store, kind, name="llama-3-8b"):
    return await store.get(kind, "default", name)


async def test_a_model_expands_into_valid_objects_it_owns(env):
    store, rec = env
    model = await store.create(example_model())
    await rec.reconcile("default", "llama-3-8b")
    for kind in OWNED:
        obj = await owned(store, kind)
        assert obj is not None, kind.kind
        assert obj["metadata"]["ownerReferences"][0]["uid"] == model["metadata"]["uid"]
        assert validate_dict(obj) == [], (kind.kind, validate_dict(obj))
    mi = await owned(store, MODEL_INFER)
    roles = {r["name"]: r for r in mi["spec"]["template"]["roles"]}
    assert set(roles) == {"prefill", "decode"} and mi["spec"]["replicas"] == 2
    args = roles["decode"]["entryTemplate"]["spec"]["containers"][0]["args"]
    assert "--model=/models/base" in args  # downloaded there first (weights.py)
    assert "--max-num-seqs=256" in args and "--max-model-len=8192" in args
    # LoRA on; the adapters are the runtime sidecar's to load (adapters.py), named nowhere here
    assert "--enable-lora" in args and not any("sql" in a for a in args)
    server = await owned(store, MODEL_SERVER)
    assert server["spec"]["workloadSelector"]["pdGroup"]["groupKey"] == "infergate.io/group"
    pd = server["spec"]["workloadSelector"]["pdGroup"]
    assert pd["prefillLabels"] == {"infergate.io/role": "prefill"}
    assert pd["decodeLabels"] == {"infergate.io/role": "decode"}
    assert "kvConnector" not in server["spec"]  # the sidecar is the Model's, not the server's
    route = await owned(store, MODEL_ROUTE)
    assert route["spec"]["loraAdapters"] == ["llama-3-8b-sql"]
    binding = await owned(store, AUTOSCALING_BINDING)
    assert binding["spec"]["policyRef"]["name"] == "llama-3-8b-load"
    assert binding["spec"]["homogeneousTarget"]["maxReplicas"] == 4


POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
# per-pod KV events (the default): the engine binds its PUB and replay sockets
KV_PORTS = [
    {"name": "kv-events", "containerPort": 5557},
    {"name": "kv-replay", "containerPort": 5600},
]


def role_templates(model: dict) -> dict[str, dict]:
    roles = model_objects.roles(from_dict_as(Model, stored(model)))
    return {r.name: msgspec.to_builtins(r) for r in roles}


def by_name(containers: list[dict]) -> dict[str, dict]:
    return {c["name"]: c for c in containers}


@pytest.mark.parametrize("kind", ["nixl", "http", "sglang"])
def test_a_kv_connector_puts_the_sidecar_before_the_decode_engine(kind):
    model = example_model()
    model["spec"]["backend"]["kvConnector"] = {"type": kind}
    model["spec"]["backend"]["decode"]["workerReplicas"] = 1
    roles = role_templates(model)
    decode = roles["decode"]["entryTemplate"]["spec"]["containers"]
    # the engine stays first; the runtime sidecar loads the Model's LoRA adapter
    assert [c["name"] for c in decode] == ["engine", "connector", "runtime"]
    engine, sidecar = by_name(decode)["engine"], by_name(decode)["connector"]
    # the sidecar owns the pod's serving port, which the pool targets
    assert sidecar["command"] == ["infergate", "connector"]
    assert sidecar["args"] == [
        "--host=$(POD_IP)",
        "--port=8000",
        "--engine-url=http://$(POD_IP):8200",
        f"--kv-connector={kind}",
        # it calls only the prefill pods of the Model's pool, read with its own account
        f"--pool-name={model['metadata']['name']}",
        f"--pool-namespace={model['metadata'].get('namespace', 'default')}",
    ]
    spec = roles["decode"]["entryTemplate"]["spec"]
    assert spec["serviceAccountName"] == model_objects.CONNECTOR_SERVICE_ACCOUNT
    assert "serviceAccountName" not in roles["prefill"]["entryTemplate"]["spec"]
    assert sidecar["env"] == [POD_IP_ENV]
    assert sidecar["ports"] == [{"name": "http", "containerPort": 8000}]
    assert sidecar["readinessProbe"] == {"httpGet": {"path": "/health", "port": "http"}}
    assert sidecar["image"] == model_objects.CONNECTOR_IMAGE
    # the engine behind it on 8200, probed there; its own args, env and resources kept
    assert "--port=8200" in engine["args"] and "--port=8000" not in engine["args"]
    assert "--max-num-seqs=256" in engine["args"]
    assert engine["ports"] == [{"name": "engine", "containerPort": 8200}, *KV_PORTS]
    assert engine["readinessProbe"] == {"httpGet": {"path": "/health", "port": "engine"}}
    # POD_IP first (its --host and KV-event topic use it), then the Model's env
    assert [e["name"] for e in engine["env"]][:2] == ["POD_IP", "HF_TOKEN"]
    assert engine["resources"]["limits"]
    ports = [p["name"] for c in decode for p in c["ports"]]
    assert len(ports) == len(set(ports))  # port names are unique in a pod
    # decode workers do not serve: the engine alone, on 8000, as before
    worker = roles["decode"]["workerTemplate"]["spec"]["containers"]
    assert [c["name"] for c in worker] == ["engine"] and "--port=8000" in worker[0]["args"]
    # prefill pods answer the sidecar's prefill legs on 8000 themselves
    prefill = roles["prefill"]["entryTemplate"]["spec"]["containers"]
    assert [c["name"] for c in prefill] == ["engine", "runtime"]
    assert "--port=8000" in prefill[0]["args"]
    assert prefill[0]["ports"] == [{"name": "http", "containerPort": 8000}, *KV_PORTS]
    # what routes to the pods is unchanged: port 8000
    typed = from_dict_as(Model, stored(model))
    assert to_dict(model_objects.inferencepool(typed))["spec"]["targetPorts"] == [{"number": 8000}]
    assert to_dict(model_objects.modelserver(typed))["spec"]["workloadPort"]["port"] == 8000
    assert validate_dict(to_dict(model_objects.modelinfer(typed))) == []


def test_no_kv_connector_no_sidecar():
    model = example_model()
    del model["spec"]["backend"]["kvConnector"]
    del model["spec"]["loraAdapters"]  # no runtime sidecar either
    for role in role_templates(model).values():
        (engine,) = role["entryTemplate"]["spec"]["containers"]
        assert engine["name"] == "engine" and "--port=8000" in engine["args"]
        assert engine["ports"] == [{"name": "http", "containerPort": 8000}, *KV_PORTS]
    model["spec"]["backend"] = {"aggregated": {"replicas": 1}}
    (server,) = role_templates(model).values()
    (engine,) = server["entryTemplate"]["spec"]["containers"]
    assert engine["ports"] == [{"name": "http", "containerPort": 8000}, *KV_PORTS]
    assert engine["readinessProbe"] == {"httpGet": {"path": "/health", "port": "http"}}
    assert engine["env"][0] == POD_IP_ENV  # every engine listens on the pod's IP


def test_engine_args_naming_the_pod_ip_get_it_from_the_downward_api():
    """$(POD_IP) in engine args (a KV-event topic) is only expanded by the kubelet when the
    container defines POD_IP; the topic keeps naming the serving port 8000, which is what
    the picker knows, even with the engine behind the sidecar on 8200."""
    model = example_model(EXAMPLES / "pd" / "model.yaml")
    roles = role_templates(model)
    for role in ("prefill", "decode"):
        engine = by_name(roles[role]["entryTemplate"]["spec"]["containers"])["engine"]
        assert engine["env"][0] == POD_IP_ENV
        (events,) = [a for a in engine["args"] if a.startswith("--kv-events-config=")]
        assert '"topic": "kv@$(POD_IP):8000@infergate-sim"' in events
    decode = roles["decode"]["entryTemplate"]["spec"]["containers"]
    assert "--port=8200" in by_name(decode)["engine"]["args"]
    assert "--kv-connector=nixl" in by_name(decode)["connector"]["args"]
    model["spec"]["env"] = [{"name": "POD_IP", "value": "10.0.0.9"}]  # the Model's own wins
    prefill = role_templates(model)["prefill"]["entryTemplate"]["spec"]["containers"]
    assert prefill[0]["env"][0] == {"name": "POD_IP", "value": "10.0.0.9"}


def test_nixl_engines_get_their_connector_role_and_announce_the_pod_ip():
    """vLLM needs --kv-transfer-config for NIXL, and its side channel must announce the pod's
    IP (by default it announces localhost, which the other pod cannot reach)."""
    model = example_model(EXAMPLES / "pd" / "model.yaml")
    for role in model["spec"]["backend"].values():
        if isinstance(role, dict):
            role.pop("args", None)  # the example's own configs set aside: ours are added
    roles = role_templates(model)
    for name, kv_role in (("prefill", "kv_producer"), ("decode", "kv_consumer")):
        engine = by_name(roles[name]["entryTemplate"]["spec"]["containers"])["engine"]
        (config,) = [a for a in engine["args"] if a.startswith("--kv-transfer-config=")]
        assert json.loads(config.split("=", 1)[1]) == {
            "kv_connector": "NixlConnector",
            "kv_role": kv_role,
        }
        host = next(e for e in engine["env"] if e["name"] == "VLLM_NIXL_SIDE_CHANNEL_HOST")
        assert host["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # A Model that configures its own transfer keeps it.
    mine = example_model(EXAMPLES / "pd" / "model.yaml")
    decode = by_name(role_templates(mine)["decode"]["entryTemplate"]["spec"]["containers"])
    configs = [a for a in decode["engine"]["args"] if a.startswith("--kv-transfer-config")]
    assert len(configs) == 1 and "recompute" in configs[0]
    # http and other connectors: the Model's arguments decide.
    other = example_model(EXAMPLES / "pd" / "model.yaml")
    other["spec"]["backend"]["kvConnector"] = {"type": "http"}
    for role in other["spec"]["backend"].values():
        if isinstance(role, dict):
            role.pop("args", None)
    prefill = role_templates(other)["prefill"]["entryTemplate"]["spec"]["containers"][0]
    assert not any(a.startswith("--kv-transfer-config") for a in prefill["args"])


async def test_inline_metrics_make_a_policy_and_aggregated_makes_one_role(env):
    store, rec = env
    model = example_model()
    model["spec"]["backend"] = {"aggregated": {"replicas": 2}}
    model["spec"]["autoscaling"] = {
        "minReplicas": 1,
        "maxReplicas": 3,
        "metrics": [{"metricName": "vllm:num_requests_waiting", "targetValue": 4}],
    }
    await store.create(model)
    await rec.reconcile("default", "llama-3-8b")
    policy = await owned(store, AUTOSCALING_POLICY)
    assert policy["spec"]["metrics"][0]["targetValue"] == 4 and validate_dict(policy) == []
    mi = await owned(store, MODEL_INFER)
    assert [r["name"] for r in mi["spec"]["template"]["roles"]] == ["server"]
    assert "pdGroup" not in (await owned(store, MODEL_SERVER))["spec"]["workloadSelector"]


async def test_edits_propagate_but_an_autoscaled_replica_count_is_kept(env):
    store, rec = env
    await store.create(example_model())
    await rec.reconcile("default", "llama-3-8b")
    mi = await owned(store, MODEL_INFER)
    mi["spec"]["replicas"] = 3  # the autoscaler's doing, groups and a role's size alike
    decode = next(r for r in mi["spec"]["template"]["roles"] if r["name"] == "decode")
    decode["replicas"] = 4
    await store.update(mi)
    model = await store.get(MODEL, "default", "llama-3-8b")
    model["spec"]["image"] = "vllm/vllm-openai:v0.12.0"
    await store.update(model)
    await rec.reconcile("default", "llama-3-8b")
    mi = await owned(store, MODEL_INFER)
    images = {
        r["entryTemplate"]["spec"]["containers"][0]["image"]
        for r in mi["spec"]["template"]["roles"]
    }
    assert images == {"vllm/vllm-openai:v0.12.0"} and mi["spec"]["replicas"] == 3
    decode = next(r for r in mi["spec"]["template"]["roles"] if r["name"] == "decode")
    assert decode["replicas"] == 4
    # without autoscaling the Model's replicas win
    model = await store.get(MODEL, "default", "llama-3-8b")
    del model["spec"]["autoscaling"]
    model["spec"]["replicas"] = 1
    await store.update(model)
    await rec.reconcile("default", "llama-3-8b")
    assert (await owned(store, MODEL_INFER))["spec"]["replicas"] == 1


async def test_removing_the_adapters_takes_them_off_the_route(env):
    """The last adapter removed, or the field itself: the route answers none of them."""
    store, rec = env
    await store.create(example_model())
    await rec.reconcile("default", "llama-3-8b")
    assert (await owned(store, MODEL_ROUTE))["spec"]["loraAdapters"] == ["llama-3-8b-sql"]
    for lora in ([], None):
        model = await store.get(MODEL, "default", "llama-3-8b")
        model["spec"]["loraAdapters"] = lora
        await store.update(prune_nulls(model))
        await rec.reconcile("default", "llama-3-8b")
        route = await owned(store, MODEL_ROUTE)
        assert route["spec"]["loraAdapters"] == [], route["spec"]
        assert validate_dict(route) == []


async def test_a_model_with_as_many_adapters_as_it_may_have_gets_a_valid_route(env):
    """The route carries every adapter the Model's CRD allows; a tighter bound on the route
    would leave such a Model without a route (the API server refuses it)."""
    store, rec = env
    model = example_model()
    first = model["spec"]["loraAdapters"][0]
    model["spec"]["loraAdapters"] = [{**first, "name": f"adapter-{i}"} for i in range(MAX_ADAPTERS)]
    assert validate_dict(stored(model)) == []
    await store.create(model)
    await rec.reconcile("default", "llama-3-8b")
    route = await owned(store, MODEL_ROUTE)
    assert len(route["spec"]["loraAdapters"]) == MAX_ADAPTERS
    assert validate_dict(route) == []


async def test_an_object_that_is_not_ours_is_left_alone(env):
    store, rec = env
    await store.create(
        {
            "apiVersion": "networking.infergate.io/v1alpha1",
            "kind": "ModelRoute",
            "metadata": {"name": "llama-3-8b", "namespace": "default"},
            "spec": {"modelName": "hand-made", "rules": []},
        }
    )
    await store.create(example_model())
    # nothing tells the Model when the route goes, so the reconcile asks to run again
    assert await rec.reconcile("default", "llama-3-8b") == NOT_OURS_RETRY
    assert (await owned(store, MODEL_ROUTE))["spec"]["modelName"] == "hand-made"
    model = await get_model(store)
    why = "ModelRoute llama-3-8b exists and is not this Model's (no controller)"
    assert summary(model) == {
        "Initialized": ("False", "ObjectNotOwned"),
        "Active": ("Unknown", "ModelInferPending"),
        "Failed": ("True", "ObjectNotOwned"),
        "Ready": ("False", "ObjectNotOwned"),
        "AdaptersLoaded": ("Unknown", "NoPods"),  # its LoRA adapter (adapter_status.py)
    }
    assert conds(model)["Failed"]["message"] == conds(model)["Initialized"]["message"] == why
    # the hand-made route goes: the Model makes its own, and the failure clears
    await store.delete(MODEL_ROUTE, "default", "llama-3-8b")
    await rec.reconcile("default", "llama-3-8b")
    assert (await owned(store, MODEL_ROUTE))["spec"]["modelName"] == "llama-3-8b"
    model = await get_model(store)
    assert summary(model)["Initialized"] == ("True", "ObjectsCreated")
    assert summary(model)["Failed"] == ("False", "NoFailures")


async def test_a_modelinfer_that_is_not_ours_does_not_make_the_model_active(env):
    store, rec = env
    stranger = modelinfer("llama-3-8b", replicas=1)
    stranger = await store.create(stranger)
    stranger["status"] = {"observedGeneration": 1, "replicas": 1, "readyReplicas": 1}
    await store.update_status(stranger)
    await store.create(example_model())
    await rec.reconcile("default", "llama-3-8b")
    model = await get_model(store)
    assert summary(model)["Active"] == ("False", "ModelInferMissing")
    assert summary(model)["Failed"] == ("True", "ObjectNotOwned")
    assert model["status"]["readyReplicas"] == 0


async def test_a_rejected_write_is_a_failure_and_is_retried():
    class Rejecting(MemoryStore):
        reject: str | None = "ModelServer"

        async def create(self, obj):
            if obj["kind"] == self.reject:
                raise Invalid("ModelServer.spec.model: denied by policy")
            return await super().create(obj)

    store = Rejecting()
    rec = ModelReconciler(store)
    await store.create(example_model())
    with pytest.raises(Invalid):  # the runner retries it with backoff
        await rec.reconcile("default", "llama-3-8b")
    assert await owned(store, MODEL_INFER) is not None  # the others were written
    model = await get_model(store)
    assert summary(model)["Initialized"] == ("False", "ObjectRejected")
    assert summary(model)["Failed"] == ("True", "ObjectRejected")
    assert conds(model)["Failed"]["message"] == (
        "ModelServer llama-3-8b: ModelServer.spec.model: denied by policy"
    )
    store.reject = None
    await rec.reconcile("default", "llama-3-8b")
    model = await get_model(store)
    assert summary(model)["Initialized"] == ("True", "ObjectsCreated")
    assert summary(model)["Failed"] == ("False", "NoFailures")


async def test_an_engine_not_installed_fails_the_model_with_what_is_missing(wall):
    """Standalone mode leaves such a pod waiting (local_runtime.py): nothing will start it
    until someone installs the engine, so the Model says Failed, naming the pod and what
    is missing; once it runs, the failure clears."""
    store = MemoryStore()
    models, infers = ModelReconciler(store), ModelInferReconciler(store)
    model = example_model()
    del model["spec"]["autoscaling"]
    await store.create(model)
    await settle_both(store, models, infers, ready=False)
    pods = sorted((await store.list(POD))[0], key=lambda p: p["metadata"]["name"])
    why = "vllm is not installed in this environment (vllm is not on PATH=/usr/bin)"
    for p in pods[:2]:
        p["status"] = {
            "phase": "Pending",
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [
                {
                    "name": "engine",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": "EngineNotInstalled", "message": why}},
                }
            ],
        }
        await store.update_status(p)
    await settle_both(store, models, infers, ready=False)
    mi = await owned(store, MODEL_INFER)
    assert summary(mi)["Progressing"] == ("False", "EngineNotInstalled")
    m = await get_model(store)
    assert summary(m)["Failed"] == ("True", "EngineNotInstalled")
    assert summary(m)["Ready"] == ("False", "EngineNotInstalled")
    name = pods[0]["metadata"]["name"]
    assert conds(m)["Failed"]["message"] == (
        f"pod {name} cannot start: container engine: {why} (and 1 more pods)"
    )
    assert len((await store.list(POD))[0]) == len(pods)  # waiting pods are not recreated
    for p in (await store.list(POD))[0]:
        p["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        await store.update_status(p)
    await settle_both(store, models, infers)
    assert summary(await get_model(store))["Failed"] == ("False", "NoFailures")


async def test_conditions_follow_the_serving_groups(wall):
    store = MemoryStore()
    models, infers = ModelReconciler(store), ModelInferReconciler(store)
    model = example_model()
    del model["spec"]["autoscaling"]
    await store.create(model)
    await models.reconcile("default", "llama-3-8b")
    m = await get_model(store)
    assert summary(m) == {
        "Initialized": ("True", "ObjectsCreated"),
        "Active": ("Unknown", "ModelInferPending"),  # the ModelInfer has no status yet
        "Failed": ("False", "NoFailures"),
        "Ready": ("Unknown", "ModelInferPending"),
        "AdaptersLoaded": ("Unknown", "NoPods"),
    }
    assert m["status"]["observedGeneration"] == 1
    assert all(c["observedGeneration"] == 1 for c in m["status"]["conditions"])
    born = since(m)
    wall.tick()
    await settle_both(store, models, infers, ready=False)  # pods run, none ready
    m = await get_model(store)
    assert summary(m)["Active"] == ("False", "GroupsNotReady")
    assert summary(m)["Ready"] == ("False", "GroupsNotReady")
    assert conds(m)["Active"]["message"] == ("0/2 serving groups ready: group(s) not ready: 0, 1")
    assert m["status"]["readyReplicas"] == 0
    wall.tick()
    await mark_ready(store)
    await settle_both(store, models, infers)
    m = await get_model(store)
    assert summary(m) == {
        "Initialized": ("True", "ObjectsCreated"),
        "Active": ("True", "AllGroupsReady"),
        "Failed": ("False", "NoFailures"),
        "Ready": ("True", "GroupsReady"),
        "AdaptersLoaded": ("True", "AdaptersLoaded"),
    }
    ready = since(m)
    assert ready["Initialized"] == ready["Failed"] == born["Initialized"]
    assert ready["Active"] == ready["Ready"] == wall() != born["Active"]
    # a pass that changes nothing writes nothing
    wall.tick()
    rv = m["metadata"]["resourceVersion"]
    await models.reconcile("default", "llama-3-8b")
    assert (await get_model(store))["metadata"]["resourceVersion"] == rv
    # a spec edit: observed at once; Active waits for the ModelInfer to report, then follows
    m["spec"]["replicas"] = 3
    await store.update(m)
    await models.reconcile("default", "llama-3-8b")
    m = await get_model(store)
    assert m["status"]["observedGeneration"] == 2
    assert all(c["observedGeneration"] == 2 for c in m["status"]["conditions"])
    assert summary(m)["Active"] == ("Unknown", "ModelInferPending")
    await infers.reconcile("default", "llama-3-8b")
    await models.reconcile("default", "llama-3-8b")
    m = await get_model(store)
    assert summary(m)["Active"] == ("False", "CreatingGroups")
    assert conds(m)["Active"]["message"] == "2/3 serving groups ready: 2/3 groups exist"
    assert since(m)["Initialized"] == born["Initialized"]
    wall.tick()
    await settle_both(store, models, infers)
    m = await get_model(store)
    assert summary(m)["Ready"] == ("True", "GroupsReady")
    assert since(m)["Active"] == wall() and m["status"]["readyReplicas"] == 3


async def test_failed_pods_make_the_model_failed_until_they_are_replaced():
    store = MemoryStore()
    models, infers = ModelReconciler(store), ModelInferReconciler(store)
    model = example_model()
    del model["spec"]["autoscaling"]
    await store.create(model)
    await settle_both(store, models, infers)
    pod = await store.get(POD, "default", "llama-3-8b-1-decode-0-0")
    pod["status"]["containerStatuses"][0]["restartCount"] = 1
    await store.update_status(pod)
    await infers.reconcile("default", "llama-3-8b")  # recreates the role instance
    await models.reconcile("default", "llama-3-8b")
    m = await get_model(store)
    assert summary(m) == {
        "Initialized": ("True", "ObjectsCreated"),
        "Active": ("False", "RecreatingRoles"),
        "Failed": ("True", "PodsFailing"),
        "Ready": ("False", "PodsFailing"),
        # the pods there hold their adapters (the role instance's are being recreated)
        "AdaptersLoaded": ("True", "AdaptersLoaded"),
    }
    assert conds(m)["Failed"]["message"] == ("recreating after a failed pod: group 1 role decode-0")
    await settle_both(store, models, infers)
    m = await get_model(store)
    assert summary(m)["Failed"] == ("False", "NoFailures")
    assert summary(m)["Ready"] == ("True", "GroupsReady")
    # failed pods nobody recreates (a ModelInfer with recoveryPolicy None reports PodsFailed)
    mi = await owned(store, MODEL_INFER)
    mi["status"]["conditions"] = [
        c
        if c["type"] != "Progressing"
        else {**c, "status": "False", "reason": "PodsFailed", "message": "pod(s) failed: x"}
        for c in mi["status"]["conditions"]
    ]
    await store.update_status(mi)
    await models.reconcile("default", "llama-3-8b")
    m = await get_model(store)
    assert summary(m)["Failed"] == ("True", "PodsFailed")
    assert conds(m)["Failed"]["message"] == "pod(s) failed: x"


async def test_model_to_pods_and_back_through_both_controllers():
    store = MemoryStore()
    models = Controller(
        store,
        ModelReconciler(store),
        [(MODEL, own_key), (MODEL_INFER, owner_key(MODEL))],
    )
    infers = Controller(
        store, ModelInferReconciler(store), [(MODEL_INFER, own_key), (POD, owner_key(MODEL_INFER))]
    )
    await models.start()
    await infers.start()
    try:
        model = example_model()
        del model["spec"]["autoscaling"]
        await store.create(copy.deepcopy(model))
        for _ in range(300):
            await kubelet(store)
            m = await store.get(MODEL, "default", "llama-3-8b")
            if (m.get("status") or {}).get("readyReplicas") == 2:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"the Model never became ready: {m.get('status')}")
        assert summary(m)["Ready"] == ("True", "GroupsReady")
        assert summary(m)["Active"] == ("True", "AllGroupsReady")
        pods, _ = await store.list(POD, "default", {"infergate.io/model": "llama-3-8b"})
        assert len(pods) == 4  # 2 groups × (prefill + decode)
        containers = {
            p["metadata"]["name"]: [c["name"] for c in p["spec"]["containers"]] for p in pods
        }
        want = [["engine", "connector", "runtime"]] * 2 + [["engine", "runtime"]] * 2
        assert sorted(containers.values()) == want
        assert all(n.endswith("-decode-0-0") for n, c in containers.items() if "connector" in c)
        await store.delete(MODEL, "default", "llama-3-8b")
        assert (await store.list(POD))[0] == []
        for kind in OWNED:
            assert await owned(store, kind) is None
    finally:
        await models.stop()
        await infers.stop()


async def test_defaults_the_api_server_adds_do_not_make_the_model_write_again(env):
    store, rec = env
    await store.create(example_model())
    await rec.reconcile("default", "llama-3-8b")
    pool = await owned(store, INFERENCE_POOL)
    pool["spec"]["endpointPickerRef"].update(group="", kind="Service")  # as defaulted
    pool["spec"]["appProtocol"] = "http"
    await store.update(pool)
    mi = await owned(store, MODEL_INFER)
    mi["spec"]["template"]["restartGracePeriodSeconds"] = 0
    await store.update(mi)
    versions = {
        k.kind: (await owned(store, k))["metadata"]["resourceVersion"]
        for k in (INFERENCE_POOL, MODEL_INFER)
    }
    await rec.reconcile("default", "llama-3-8b")
    assert versions == {
        k.kind: (await owned(store, k))["metadata"]["resourceVersion"]
        for k in (INFERENCE_POOL, MODEL_INFER)
    }
    # a real difference is still written
    pool = await owned(store, INFERENCE_POOL)
    pool["spec"]["targetPorts"] = [{"number": 9999}]
    await store.update(pool)
    await rec.reconcile("default", "llama-3-8b")
    assert (await owned(store, INFERENCE_POOL))["spec"]["targetPorts"] == [{"number": 8000}]


def test_covers_allows_extra_keys_but_not_other_values():
    from infergw.controllers.model import covers

    assert covers({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": 2}})
    assert covers([{"x": 1, "y": 2}], [{"x": 1}])
    assert not covers({"a": 1}, {"a": 2}) and not covers({"b": {}}, {"b": {"c": 2}})
    assert not covers([1, 2], [1]) and not covers({"a": [1]}, {"a": 1})


async def test_a_model_that_cannot_be_read_is_counted_and_waits_for_an_edit():
    """A Model that bypassed validation (a bare store) is not a crash retried forever: the
    pass counts it unreadable, and its next edit is read again."""
    store = MemoryStore()
    models = Controller(store, ModelReconciler(store), [(MODEL, own_key)])
    results = models.metrics.reconciles

    def count(result: str) -> float:
        return results.labels(models.name, result)._value.get()

    model = example_model()
    engine = model["spec"].pop("engine")  # required by the CRD
    await models.start()
    try:
        await store.create(copy.deepcopy(model))
        await wait_for_async(lambda: count("unreadable") >= 1, "the unreadable Model counted")
        assert count("error") == 0 and await owned(store, MODEL_INFER) is None
        have = await get_model(store)
        have["spec"]["engine"] = engine
        await store.update(have)
        await wait_for_async(lambda: owned(store, MODEL_INFER), "the edited Model's ModelInfer")
        assert count("error") == 0
    finally:
        await models.stop()
