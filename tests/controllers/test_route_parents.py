"""A ModelRoute's parentRefs attach the HTTPRoutes of the Models it targets to the Gateways
they name (controllers/route_parents.py): pure resolution first, then the controllers over
the API emulator, where adding, editing and deleting a ModelRoute attaches and detaches
without a Model event (the ModelRoute watch), and the Model's own Gateway stays first."""

from __future__ import annotations

import pytest

from infergw import api
from infergw.api.networking import ModelRoute, ModelServer, ParentRef
from infergw.cluster.store import HTTP_ROUTE, MODEL_ROUTE
from infergw.controllers.app import build_controllers
from infergw.controllers.picker_objects import PickerSettings, gateway_of
from infergw.controllers.route_parents import MAX_PARENTS, merge_parents, route_parents
from infergw.controllers.runner import ControllerMetrics
from tests.picker_cluster import NS, Cluster, model_obj
from tests.waiting import wait_for_async

GROUP = "gateway.networking.k8s.io"


def route_obj(name: str, targets: list[dict], parents: list[dict] | None) -> dict:
    spec: dict = {"modelName": name, "rules": [{"targetModels": targets}]}
    if parents is not None:
        spec["parentRefs"] = parents
    return {
        "apiVersion": "networking.infergate.io/v1alpha1",
        "kind": "ModelRoute",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def server_obj(name: str, labels: dict[str, str]) -> dict:
    return {
        "apiVersion": "networking.infergate.io/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"inferenceEngine": "vLLM", "workloadSelector": {"matchLabels": labels}},
    }


def parents_of(routes: list[dict], servers: list[dict] = (), pools=None) -> list[tuple]:
    model = api.from_dict(model_obj())
    found = route_parents(
        model,
        {"app": "llama"},
        [api.from_dict_as(ModelRoute, r) for r in routes],
        [api.from_dict_as(ModelServer, s) for s in servers],
        pools or {},
    )
    return [(p.namespace, p.name, p.section_name) for p in found]


def test_routes_targeting_the_models_pool_add_their_gateways_sorted_once():
    routes = [
        route_obj("a", [{"inferencePoolName": "llama"}], [{"name": "edge"}]),
        route_obj("b", [{"modelServerName": "llama-srv"}], [{"name": "b2b", "namespace": "gw"}]),
        route_obj("c", [{"inferencePoolName": "llama"}], [{"name": "edge"}]),  # again
        route_obj("d", [{"inferencePoolName": "llama"}], [{"name": "edge", "sectionName": "h"}]),
    ]
    servers = [server_obj("llama-srv", {"app": "llama", "tier": "gold"})]
    assert parents_of(routes, servers) == [
        ("gw", "b2b", None),
        (NS, "edge", None),
        (NS, "edge", "h"),
    ]


def test_routes_that_do_not_reach_the_model_add_nothing():
    routes = [
        route_obj("other-pool", [{"inferencePoolName": "mistral"}], [{"name": "edge"}]),
        route_obj("no-parents", [{"inferencePoolName": "llama"}], None),
        route_obj(
            "weight-0",
            [{"inferencePoolName": "llama", "weight": 0}, {"inferencePoolName": "x", "weight": 1}],
            [{"name": "edge"}],
        ),
        # its server's pods are in the more specific pool, not this Model's
        route_obj("elsewhere", [{"modelServerName": "srv"}], [{"name": "edge"}]),
        route_obj("no-such-server", [{"modelServerName": "gone"}], [{"name": "edge"}]),
    ]
    servers = [server_obj("srv", {"app": "llama", "tier": "gold"})]
    pools = {"gold": {"app": "llama", "tier": "gold"}}
    assert parents_of(routes, servers, pools) == []


def test_the_models_own_gateway_comes_first_once_and_the_list_is_bounded():
    model = api.from_dict(model_obj())
    own = gateway_of(model)
    again = ParentRef(name=own.name, namespace=own.namespace, group=GROUP, kind="Gateway")
    many = [ParentRef(name=f"gw-{i:02d}", namespace=NS) for i in range(40)]
    merged = merge_parents(own, [again, *many], "llama")
    assert merged[0] == own and merged.count(own) == 1 and again not in merged[1:]
    assert len(merged) == MAX_PARENTS


def _parents(route: dict) -> list[tuple]:
    return [
        (p.get("namespace"), p["name"], p.get("sectionName")) for p in route["spec"]["parentRefs"]
    ]


async def test_the_controllers_attach_and_detach_with_the_model_route(cluster: Cluster) -> None:
    controllers, scaler = build_controllers(
        cluster.store, ControllerMetrics(), picker=PickerSettings()
    )
    own = (NS, "inference-gateway", None)
    try:
        for c in controllers:
            await c.start()
        await cluster.apply(model_obj())

        async def parents_are(want: list[tuple]) -> bool:
            route = await cluster.store.get(HTTP_ROUTE, NS, "llama")
            return route is not None and _parents(route) == want

        await wait_for_async(lambda: parents_are([own]), "the route on the Model's Gateway")
        parents = [{"name": "edge", "namespace": "gateways", "sectionName": "https"}]
        public = route_obj("public-llama", [{"inferencePoolName": "llama"}], parents)
        await cluster.apply(public)
        edge = ("gateways", "edge", "https")
        await wait_for_async(lambda: parents_are([own, edge]), "attached to the route's Gateway")

        # an edit naming another Gateway moves it; no Model event is needed for either
        stored = await cluster.store.get(MODEL_ROUTE, NS, "public-llama")
        stored["spec"]["parentRefs"] = [{"name": "b2b"}]
        await cluster.store.update(stored)
        await wait_for_async(lambda: parents_are([own, (NS, "b2b", None)]), "moved to b2b")

        await cluster.store.delete(MODEL_ROUTE, NS, "public-llama")
        await wait_for_async(lambda: parents_are([own]), "detached once the route is gone")
    finally:
        for c in controllers:
            await c.stop()
        await scaler.close()


@pytest.mark.parametrize(
    "parents",
    [
        [{"name": "edge", "namespace": "gateways"}],
        [{"name": "inference-gateway"}],  # the Model's own: named once
    ],
)
async def test_one_reconcile_writes_the_parents(cluster: Cluster, parents) -> None:
    await cluster.apply(model_obj())
    await cluster.apply(route_obj("r", [{"inferencePoolName": "llama"}], parents))
    await cluster.reconcile()
    route = await cluster.get(HTTP_ROUTE, "llama")
    want = [(NS, "inference-gateway", None)]
    ref = parents[0]
    named = (ref.get("namespace", NS), ref["name"], None)
    assert _parents(route) == (want if named in want else [*want, named])
    for parent in route["spec"]["parentRefs"]:
        assert parent["group"] == GROUP and parent["kind"] == "Gateway"
