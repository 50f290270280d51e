"""The statuses nothing wrote before: ModelRoute Accepted/ResolvedRefs, ModelServer Ready,
AutoScalingPolicy Valid/InUse with its binding count; each through the status subresource
of the in-memory store (kube-apiserver's write semantics), lastTransitionTime moving only
when a condition's status does, observedGeneration the spec's, nothing written again when
nothing changed, and an Event when a reason changes."""

from __future__ import annotations

import copy

import pytest

from infergw.cluster.store import (
    AUTOSCALING_BINDING,
    AUTOSCALING_POLICY,
    EVENT,
    MODEL_ROUTE,
    MODEL_SERVER,
    POD,
)
from infergw.controllers import conditions
from infergw.controllers.events import EventRecorder
from infergw.controllers.memory_store import MemoryStore
from infergw.controllers.networking_status import ModelRouteStatus, ModelServerStatus
from infergw.controllers.policy_status import PolicyStatus
from tests.controller_helpers import Wall, binding, conds, policy, summary

NET = "networking.infergate.io/v1alpha1"


@pytest.fixture
def wall(monkeypatch) -> Wall:
    w = Wall()
    monkeypatch.setattr(conditions, "now_rfc3339", w)
    return w


def server(name: str = "s", app: str = "llm") -> dict:
    return {
        "apiVersion": NET,
        "kind": "ModelServer",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"inferenceEngine": "vLLM", "workloadSelector": {"matchLabels": {"app": app}}},
    }


def route(*servers: str, pool: str | None = None) -> dict:
    targets = [{"modelServerName": s} for s in servers]
    if pool:
        targets.append({"inferencePoolName": pool})
    return {
        "apiVersion": NET,
        "kind": "ModelRoute",
        "metadata": {"name": "r", "namespace": "default"},
        "spec": {"modelName": "llama", "rules": [{"targetModels": targets}]},
    }


def pod(name: str, ready: bool, app: str = "llm") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"containers": [{"name": "engine", "image": "x"}]},
    }


async def set_ready(store: MemoryStore, name: str, ready: bool) -> None:
    p = copy.deepcopy(await store.get(POD, "default", name))
    p["status"] = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    await store.update_status(p)


async def test_a_route_resolves_its_servers_and_says_which_are_missing(wall) -> None:
    store = MemoryStore()
    events = EventRecorder(store)
    rec = ModelRouteStatus(store, events)
    await store.create(route("s", "t"))
    await store.create(server("s"))
    await rec.reconcile("default", "r")
    r = await store.get(MODEL_ROUTE, "default", "r")
    assert summary(r) == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("False", "RefNotFound"),
    }
    assert "ModelServer t" in conds(r)["ResolvedRefs"]["message"]
    assert "ModelServer s" not in conds(r)["ResolvedRefs"]["message"]
    assert r["status"]["observedGeneration"] == r["metadata"]["generation"]
    warned = [e for e in (await store.list(EVENT, "default"))[0] if e["reason"] == "RefNotFound"]
    assert warned and warned[0]["type"] == "Warning"

    wall.tick()
    rv = r["metadata"]["resourceVersion"]
    await rec.reconcile("default", "r")  # nothing changed: nothing written
    assert (await store.get(MODEL_ROUTE, "default", "r"))["metadata"]["resourceVersion"] == rv

    await store.create(server("t"))
    wall.tick()
    await rec.reconcile("default", "r")
    r = await store.get(MODEL_ROUTE, "default", "r")
    assert summary(r)["ResolvedRefs"] == ("True", "ResolvedRefs")
    assert conds(r)["ResolvedRefs"]["lastTransitionTime"] == wall()  # it flipped now
    assert conds(r)["Accepted"]["lastTransitionTime"] != wall()  # it did not


async def test_a_route_naming_a_missing_pool_is_unresolved() -> None:
    store = MemoryStore()
    await store.create(route(pool="nowhere"))
    await ModelRouteStatus(store).reconcile("default", "r")
    r = await store.get(MODEL_ROUTE, "default", "r")
    assert "InferencePool nowhere" in conds(r)["ResolvedRefs"]["message"]


async def test_an_unreadable_route_is_not_accepted_and_says_why() -> None:
    store = MemoryStore()
    bad = route("s")
    bad["spec"]["rules"][0]["targetModels"][0]["weight"] = "heavy"
    await store.create(bad)
    await ModelRouteStatus(store).reconcile("default", "r")
    r = await store.get(MODEL_ROUTE, "default", "r")
    assert summary(r)["Accepted"] == ("False", "Invalid")
    assert "weight" in conds(r)["Accepted"]["message"]
    assert conds(r)["ResolvedRefs"]["status"] == "Unknown"


async def test_a_server_is_ready_while_one_of_its_pods_is(wall) -> None:
    store = MemoryStore()
    rec = ModelServerStatus(store)
    await store.create(server())
    await rec.reconcile("default", "s")
    assert summary(await store.get(MODEL_SERVER, "default", "s")) == {"Ready": ("False", "NoPods")}
    for name in ("a", "b"):
        await store.create(pod(name, False))
    await store.create(pod("other", True, app="else"))  # not selected
    await set_ready(store, "a", False)
    await rec.reconcile("default", "s")
    s = await store.get(MODEL_SERVER, "default", "s")
    assert summary(s) == {"Ready": ("False", "NoReadyPods")}
    assert conds(s)["Ready"]["message"] == "0/2 pods ready"
    wall.tick()
    await set_ready(store, "b", True)
    await rec.reconcile("default", "s")
    s = await store.get(MODEL_SERVER, "default", "s")
    assert summary(s) == {"Ready": ("True", "PodsReady")}
    assert conds(s)["Ready"]["message"] == "1/2 pods ready"
    assert conds(s)["Ready"]["lastTransitionTime"] == wall()


async def test_a_policy_is_valid_and_counts_the_bindings_that_name_it() -> None:
    store = MemoryStore()
    rec = PolicyStatus(store)
    await store.create(policy())
    await rec.reconcile("default", "p")
    p = await store.get(AUTOSCALING_POLICY, "default", "p")
    assert summary(p) == {"Valid": ("True", "Valid"), "InUse": ("False", "Unused")}
    assert p["status"]["bindings"] == 0
    for name in ("b1", "b2"):
        b = binding(homogeneousTarget={"target": {"name": "llm"}, "maxReplicas": 3})
        b["metadata"]["name"] = name
        await store.create(b)
    other = binding(homogeneousTarget={"target": {"name": "llm"}, "maxReplicas": 3})
    other["metadata"]["name"] = "b3"
    other["spec"]["policyRef"]["name"] = "another"
    await store.create(other)
    await rec.reconcile("default", "p")
    p = await store.get(AUTOSCALING_POLICY, "default", "p")
    assert summary(p)["InUse"] == ("True", "BoundByBindings")
    assert p["status"]["bindings"] == 2
    assert conds(p)["InUse"]["message"] == "used by 2 binding(s): b1, b2"
    await store.delete(AUTOSCALING_BINDING, "default", "b1")
    await rec.reconcile("default", "p")
    assert (await store.get(AUTOSCALING_POLICY, "default", "p"))["status"]["bindings"] == 1


async def test_an_invalid_policy_is_not_valid_and_says_which_field() -> None:
    store = MemoryStore()
    bad = policy(tolerancePercent=-5)
    await store.create(bad)
    await PolicyStatus(store).reconcile("default", "p")
    p = await store.get(AUTOSCALING_POLICY, "default", "p")
    assert summary(p)["Valid"] == ("False", "InvalidPolicy")
    assert "tolerancePercent" in conds(p)["Valid"]["message"]
