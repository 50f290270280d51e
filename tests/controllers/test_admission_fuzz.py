"""Webhook reviews followed by a reconcile: the webhook and the controllers agree.

Valid Models, ModelInfers and autoscaling objects are mutated at random places — a null, a
value of another type or size, a key removed or added — and sent through the webhook's
decision. Every object it
admits is stored (as the API server stores it: nulls dropped) and reconciled: the Model
controller writes its objects, the ModelInfer controller its pods, the standalone runtime
reads each pod's command, environment, ports, probe and grace period, and the autoscaler runs
a binding's cycles. None of that may
raise. Every object it refuses gets a 422 whose message names the field.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from infergw.cluster.store import AUTOSCALING_BINDING, MODEL_INFER, POD, Invalid
from infergw.controllers import local_runtime
from infergw.controllers.autoscaler import AutoscalerReconciler
from infergw.controllers.local_runtime import LocalRuntime, NotInstalled
from infergw.controllers.memory_store import MemoryStore
from infergw.controllers.model import ModelReconciler
from infergw.controllers.modelinfer import ModelInferReconciler
from infergw.controllers.webhook import decide, review_for
from tests.controller_helpers import kubelet, modelinfer
from tests.fuzzing import fuzz_settings
from tests.paths import CRD_EXAMPLES

pytestmark = pytest.mark.fuzz


def _example(name: str) -> dict:
    return yaml.safe_load((CRD_EXAMPLES / name).read_text())


def _simulator_modelinfer() -> dict:
    """A ModelInfer whose template has everything the standalone runtime reads."""
    mi = modelinfer("sim", replicas=1)
    container = {
        "name": "engine",
        "args": ["--port", "8000", "--served-model-name", "$(MODEL)"],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "MODEL", "value": "m-$(POD_NAME)"},
        ],
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}},
    }
    mi["spec"]["template"]["roles"][0]["entryTemplate"] = {
        "metadata": {"labels": {"app": "sim"}, "annotations": {"a": "b"}},
        "spec": {
            "containers": [container],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 5,
        },
    }
    return mi


BASES = [
    _example("modelinfer.yaml"),
    _example("model.yaml"),
    modelinfer("llm", replicas=2),
    _simulator_modelinfer(),
    _example("autoscalingpolicy.yaml"),
    _example("autoscalingpolicybinding.yaml"),
]
# What an autoscaling object works on, stored beside it unless it is the one mutated.
PARTNERS = [_example(n) for n in ("modelinfer.yaml", "autoscalingpolicy.yaml")]
PARTNERS.append(_example("autoscalingpolicybinding.yaml"))

# Keys the schema and the pod template know, so added keys often land on a real field.
KEYS = [
    *("replicas", "workerReplicas", "labels", "annotations", "metadata", "spec", "template"),
    *("roles", "entryTemplate", "workerTemplate", "containers", "ports", "containerPort"),
    *("env", "valueFrom", "fieldRef", "fieldPath", "value", "readinessProbe", "httpGet"),
    *("port", "path", "command", "args", "name", "recoveryPolicy", "rolloutStrategy"),
    *("rollingUpdateConfiguration", "maxUnavailable", "partition", "gangPolicy", "enabled"),
    *("minRoleReplicas", "schedulerName", "restartPolicy", "terminationGracePeriodSeconds"),
    *("backend", "aggregated", "prefill", "decode", "kvConnector", "autoscaling", "engine"),
    *("securityContext", "privileged", "volumes", "hostPath", "hostNetwork", "initContainers"),
    *("lifecycle", "preStop", "sleep", "seconds"),
    *("policyRef", "metrics", "targetValue", "homogeneousTarget", "prefillDecode", "ratio"),
    *("target", "minReplicas", "maxReplicas", "tolerancePercent", "behavior", "panicThreshold"),
]

LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-2, 4)
    | st.sampled_from([2**31, 2**63, -(2**63), 10**30])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["", "http", "metadata.name", "50%", "0%", "Always", "$(POD_IP)", "a/b"])
    | st.text(max_size=6)
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


def _mutate(data: st.DataObject, obj: Any) -> Any:
    """obj with one change at a random depth; the root stays a dict."""
    children = list(obj.items()) if isinstance(obj, dict) else list(enumerate(obj))
    if isinstance(obj, dict | list) and children and data.draw(st.integers(0, 3)) > 0:
        key, child = data.draw(st.sampled_from(children))
        if isinstance(child, dict | list):
            obj[key] = _mutate(data, child)
            return obj
    op = data.draw(st.sampled_from(["replace", "null", "delete", "add"]))
    if isinstance(obj, dict):
        if op == "add" or not obj:
            obj[data.draw(st.sampled_from(KEYS))] = data.draw(VALUES)
        else:
            key = data.draw(st.sampled_from(sorted(obj)))
            if op == "delete":
                del obj[key]
            else:
                obj[key] = None if op == "null" else data.draw(VALUES)
    elif isinstance(obj, list):
        if op == "delete" and obj:
            obj.pop(data.draw(st.integers(0, len(obj) - 1)))
        elif obj and op in ("null", "replace"):
            i = data.draw(st.integers(0, len(obj) - 1))
            obj[i] = None if op == "null" else data.draw(VALUES)
        else:
            obj.append(data.draw(VALUES))
    return obj


async def _read_pod_as_the_runtime_does(pod: dict) -> None:
    local_runtime._container_ports(pod)
    local_runtime._grace_seconds(pod)
    for container in pod["spec"].get("containers") or [{}]:
        local_runtime._pre_stop_sleep(container)
        env = LocalRuntime._env(pod, container, "127.0.0.2")
        try:
            await LocalRuntime._command(container, env)
        except NotInstalled:
            pass  # refused with a message: the pod waits, the runtime goes on
        http = (container.get("readinessProbe") or {}).get("httpGet")
        if http:
            local_runtime._port(http.get("port"), container)


async def _apply_and_reconcile(obj: dict) -> None:
    store = MemoryStore()
    try:
        created = await store.create(obj)
    except Invalid:
        return  # the API server refuses such an object too (no name)
    namespace, name = created["metadata"]["namespace"], created["metadata"]["name"]
    autoscaling = obj["kind"].startswith("AutoScaling")
    for partner in PARTNERS if autoscaling else []:
        if partner["kind"] != obj["kind"]:
            await store.create(partner)
    if obj["kind"] == "Model":
        await ModelReconciler(store).reconcile(namespace, name)
        await ModelReconciler(store).reconcile(namespace, name)
    infers, _ = await store.list(MODEL_INFER)
    reconciler = ModelInferReconciler(store)
    for _ in range(2):
        for mi in infers:
            await reconciler.reconcile(mi["metadata"]["namespace"], mi["metadata"]["name"])
        await kubelet(store)
    pods, _ = await store.list(POD)
    for pod in pods:
        await _read_pod_as_the_runtime_does(pod)
    if autoscaling:
        scaler = AutoscalerReconciler(store, interval=0.0)
        try:
            for binding in (await store.list(AUTOSCALING_BINDING))[0]:
                for _ in range(2):
                    await scaler.reconcile(namespace, binding["metadata"]["name"])
        finally:
            await scaler.close()


def _check(obj: dict) -> None:
    decision = decide(review_for(obj))
    response = decision.review["response"]
    if response["allowed"]:
        asyncio.run(_apply_and_reconcile(obj))
        return
    status = response["status"]
    assert status["code"] == 422, status  # a refusal, never a validator's crash (500)
    message = status["message"]
    assert " is invalid: " in message and ": " in message.partition(" is invalid: ")[2]


PER_EXAMPLE = 4  # objects per hypothesis example: many inputs at the cost of a few draws


@fuzz_settings(100)
@given(st.data())
def test_every_admitted_object_reconciles_and_every_refusal_names_a_field(data) -> None:
    for _ in range(PER_EXAMPLE):
        base = data.draw(st.sampled_from(BASES))
        obj = copy.deepcopy(base)
        for _ in range(data.draw(st.integers(1, 3))):
            obj = _mutate(data, obj)
        obj["apiVersion"], obj["kind"] = base["apiVersion"], base["kind"]
        _check(obj)
