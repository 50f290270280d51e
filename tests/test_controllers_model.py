"""The Model reconciler: one Model becomes a ModelInfer, ModelServer, ModelRoute,
InferencePool (and autoscaling objects), each valid against our CRDs; edits propagate;
deleting the Model deletes them; its status follows the serving groups."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
import yaml

from controllers.memory_store import MemoryStore
from controllers.model import ModelReconciler
from controllers.modelinfer import ModelInferReconciler
from controllers.runner import Controller, own_key, owner_key
from controllers.store import (
    AUTOSCALING_BINDING,
    AUTOSCALING_POLICY,
    INFERENCE_POOL,
    MODEL,
    MODEL_INFER,
    MODEL_ROUTE,
    MODEL_SERVER,
    POD,
)
from infergate.api import validate_dict
from tests.controller_helpers import kubelet

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "crds" / "model.yaml"
OWNED = (MODEL_INFER, MODEL_SERVER, MODEL_ROUTE, INFERENCE_POOL, AUTOSCALING_BINDING)


def example_model() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


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
    assert "--model=meta-llama/Meta-Llama-3-8B-Instruct" in args
    assert "--max-num-seqs=256" in args and "--max-model-len=8192" in args
    assert "--lora-modules" in args
    server = await owned(store, MODEL_SERVER)
    assert server["spec"]["workloadSelector"]["pdGroup"]["groupKey"] == "infergate.io/group"
    assert server["spec"]["kvConnector"]["type"] == "nixl"
    route = await owned(store, MODEL_ROUTE)
    assert route["spec"]["loraAdapters"] == ["llama-3-8b-sql"]
    binding = await owned(store, AUTOSCALING_BINDING)
    assert binding["spec"]["policyRef"]["name"] == "llama-3-8b-load"
    assert binding["spec"]["homogeneousTarget"]["maxReplicas"] == 4


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
    mi["spec"]["replicas"] = 3  # the autoscaler's doing
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
    # without autoscaling the Model's replicas win
    model = await store.get(MODEL, "default", "llama-3-8b")
    del model["spec"]["autoscaling"]
    model["spec"]["replicas"] = 1
    await store.update(model)
    await rec.reconcile("default", "llama-3-8b")
    assert (await owned(store, MODEL_INFER))["spec"]["replicas"] == 1


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
    await rec.reconcile("default", "llama-3-8b")
    assert (await owned(store, MODEL_ROUTE))["spec"]["modelName"] == "hand-made"


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
        assert m["status"]["conditions"][0]["status"] == "True"
        pods, _ = await store.list(POD, "default", {"infergate.io/model": "llama-3-8b"})
        assert len(pods) == 4  # 2 groups × (prefill + decode)
        await store.delete(MODEL, "default", "llama-3-8b")
        assert (await store.list(POD))[0] == []
        for kind in OWNED:
            assert await owned(store, kind) is None
    finally:
        await models.stop()
        await infers.stop()
