"""Any valid Model name (a DNS-1123 subdomain of 1 to 253 characters) gets every object the
controllers derive from it, through the API emulator, which refuses what kube-apiserver
refuses: Service names that are not DNS-1035 labels of at most 63 characters, other names
that are not subdomains, label values over 63 characters (tests/kubeapi.py). And the derived
names still point at each other: the pool at the picker's Service, the route at the pool,
the pool's selector at the serving pod, a worker's ENTRY_ADDRESS at its entry's Service."""

from __future__ import annotations

import asyncio
import copy

import pytest
from hypothesis import HealthCheck, example, given, settings
from kubernetes import client

from infergw.api.names import ENTRY_ADDRESS_ENV, MODEL_NAME_HEADER
from infergw.bbr.model_pools import ModelPools
from infergw.cluster.kube_store import KubeStore
from infergw.cluster.pool import PoolSpec
from infergw.cluster.store import (
    CONFIG_MAP,
    DEPLOYMENT,
    HTTP_ROUTE,
    INFERENCE_POOL,
    MODEL,
    MODEL_INFER,
    POD,
    POD_DISRUPTION_BUDGET,
    ROLE_BINDING,
    SECRET,
    SERVICE,
    SERVICE_ACCOUNT,
    labels_match,
)
from infergw.controllers.model import ModelReconciler
from infergw.controllers.modelinfer import ModelInferReconciler
from infergw.controllers.picker_objects import PickerSettings
from tests.kubeapi import KubeAPIEmulator
from tests.name_strategies import subdomains
from tests.picker_cluster import NS, SERVED, model_obj


@pytest.fixture(scope="module")
def emulator():
    with KubeAPIEmulator().threaded() as emu:
        yield emu


def multinode_model(name: str) -> dict:
    """A Model with a worker per serving group: its entry gets a headless Service."""
    obj = model_obj(backend={"aggregated": {"replicas": 1, "workerReplicas": 1}})
    obj["metadata"]["name"] = name
    return obj


async def get(store: KubeStore, kind, name: str) -> dict:
    obj = await store.get(kind, NS, name)
    assert obj is not None, f"no {kind.kind} {name!r}"
    return obj


async def check_model(emu: KubeAPIEmulator, name: str) -> None:
    store = KubeStore(client.ApiClient(emu.client_configuration()), watch_timeout=30)
    try:
        if await store.get(MODEL, NS, name) is None:  # hypothesis may draw a name twice
            await store.create(copy.deepcopy(multinode_model(name)))
        # an object the API server refuses raises here (ObjectRejected)
        await ModelReconciler(store, picker=PickerSettings()).reconcile(NS, name)
        workload = ModelInferReconciler(store)
        for _ in range(2):  # the first pass makes the pods, the next their entry Services
            await workload.reconcile(NS, name)

        model = await get(store, MODEL, name)
        pool = await get(store, INFERENCE_POOL, name)
        picker = await get(store, SERVICE, pool["spec"]["endpointPickerRef"]["name"])
        dep = await get(store, DEPLOYMENT, picker["metadata"]["name"])
        pod_spec = dep["spec"]["template"]["spec"]
        await get(store, SERVICE_ACCOUNT, pod_spec["serviceAccountName"])
        await get(store, ROLE_BINDING, pod_spec["serviceAccountName"])
        await get(store, POD_DISRUPTION_BUDGET, dep["metadata"]["name"])
        volumes = {v["name"]: v for v in pod_spec["volumes"]}
        await get(store, CONFIG_MAP, volumes["config"]["configMap"]["name"])
        await get(store, SECRET, volumes["tls"]["secret"]["secretName"])
        [epp] = pod_spec["containers"]
        [sync] = [a for a in epp["args"] if a.startswith("--replica-sync-discovery=")]
        headless = await get(store, SERVICE, sync.partition("=")[2])
        assert headless["spec"]["selector"] == picker["spec"]["selector"]
        assert f"--pool-name={name}" in epp["args"]  # the pool keeps the Model's name

        # the route: the pool, for the header the body-based router sets for the served name
        route = await get(store, HTTP_ROUTE, name)
        [rule] = route["spec"]["rules"]
        assert [b["name"] for b in rule["backendRefs"]] == [name]
        chosen = ModelPools.build([model, pool], NS).choose(
            SERVED, {}, "/v1/chat/completions", None
        )
        assert chosen is not None and chosen.pool == name
        for match in rule["matches"]:
            [header] = match["headers"]
            assert (header["name"], header["value"]) == (MODEL_NAME_HEADER, name)

        # the serving pods: the pool selects the entry, whose worker finds it by its Service
        mi = await get(store, MODEL_INFER, name)
        assert mi["status"]["labelSelector"]
        pods = {p["metadata"]["name"]: p for p in (await store.list(POD, NS))[0]}
        mine = [
            p for p in pods.values() if labels_match(p, _selector(mi["status"]["labelSelector"]))
        ]
        assert len(mine) == 2, sorted(pods)
        selected = PoolSpec.from_object(pool)
        entries = [p["metadata"]["name"] for p in mine if selected.selects(p["metadata"]["labels"])]
        assert len(entries) == 1
        [worker] = [p for p in mine if p["metadata"]["name"] not in entries]
        [engine] = worker["spec"]["containers"]
        address = {e["name"]: e.get("value") for e in engine["env"]}[ENTRY_ADDRESS_ENV]
        service_name, _, namespace = address.partition(".")
        assert namespace == NS
        entry_service = await get(store, SERVICE, service_name)
        assert [p for p in mine if labels_match(p, entry_service["spec"]["selector"])] == [
            pods[entries[0]]
        ]
    finally:
        store.close()


def _selector(text: str) -> dict[str, str]:
    return dict(term.split("=", 1) for term in text.split(","))


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=subdomains())
@example(name="a" * 253)
@example(name="m" * 51)  # `m-epp-replicas` just over 63
@example(name="7b.instruct.v2")  # a digit first and dots: no Service may be named so
def test_every_valid_model_name_gets_all_its_objects(emulator, name: str) -> None:
    asyncio.run(check_model(emulator, name))
