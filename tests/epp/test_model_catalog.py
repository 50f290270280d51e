"""epp/model_catalog.py: GET /v1/models[/{id}] answered from the routes and the pods' models."""

from __future__ import annotations

import pytest

from infergw.epp.datastore import Datastore, PoolSpec
from infergw.epp.errors import ModelNotFound
from infergw.epp.model_catalog import answer, epoch_seconds, model_cards
from tests.director_fixtures import NET, pod

ROUTE_CREATED = "2026-01-02T03:04:05Z"


def route(name: str, model: str, adapters=(), created=ROUTE_CREATED) -> dict:
    return {
        "apiVersion": NET,
        "kind": "ModelRoute",
        "metadata": {"name": name, "namespace": "team", "creationTimestamp": created},
        "spec": {
            "modelName": model,
            **({"loraAdapters": list(adapters)} if adapters else {}),
            "rules": [{"targetModels": [{"inferencePoolName": "pool"}]}],
        },
    }


def datastore(models: dict[str, set[str] | None], routes=()) -> Datastore:
    ds = Datastore()
    ds.set_pool(PoolSpec("pool", "ns", {"app": "vllm"}, [8000]))
    pods = []
    for i, name in enumerate(models):
        p = pod(name, f"10.0.0.{i + 1}")
        p["metadata"]["creationTimestamp"] = f"2026-01-0{i + 1}T00:00:00Z"
        pods.append(p)
    ds.replace_pods(pods)
    for i, names in enumerate(models.values()):
        endpoint = ds.endpoint(f"10.0.0.{i + 1}:8000")
        endpoint.models = None if names is None else frozenset(names)
    ds.set_routes(list(routes), [])
    return ds


def ids(ds: Datastore) -> list[str]:
    return [c["id"] for c in model_cards(ds)]


def test_routes_then_the_pods_models_each_once():
    ds = datastore(
        {"a": {"base", "sql-lora"}, "b": {"base", "other"}, "c": None},
        [route("chat", "chat-model", ["chat-lora"]), route("same", "base")],
    )
    assert ids(ds) == ["base", "chat-lora", "chat-model", "other", "sql-lora"]
    cards = {c["id"]: c for c in model_cards(ds)}
    assert cards["chat-model"] == {
        "id": "chat-model",
        "object": "model",
        "created": epoch_seconds(ROUTE_CREATED),
        "owned_by": "team",
    }
    assert cards["base"]["owned_by"] == "team"  # a route answers it: listed as the route
    # a pod's model: its earliest pod's creation, owned by the pool's namespace
    assert cards["other"] == {
        "id": "other",
        "object": "model",
        "created": epoch_seconds("2026-01-02T00:00:00Z"),
        "owned_by": "ns",
    }


def test_replicas_reading_the_same_state_answer_the_same():
    def build() -> Datastore:
        return datastore({"a": {"m1", "m2"}, "b": {"m2"}}, [route("r", "public")])

    assert answer(build(), "GET", "/v1/models") == answer(build(), "GET", "/v1/models")


def test_the_oldest_route_owns_a_name():
    older = route("older", "shared", created="2025-01-01T00:00:00Z")
    newer = route("newer", "shared")
    ds = datastore({"a": set()}, [newer, older])
    (card,) = model_cards(ds)
    assert card["created"] == epoch_seconds("2025-01-01T00:00:00Z")


def test_models_unknown_yet_leave_only_the_routes():
    ds = datastore({"a": None}, [route("r", "public")])
    assert answer(ds, "GET", "/v1/models") == {
        "object": "list",
        "data": [model_cards(ds)[0]],
    }
    assert ids(ds) == ["public"]


def test_one_model_by_id_and_unknown_ones_404():
    ds = datastore({"a": {"meta-llama/Llama-3.1-8B"}})
    assert answer(ds, "GET", "/v1/models/meta-llama/Llama-3.1-8B")["id"] == (
        "meta-llama/Llama-3.1-8B"
    )
    with pytest.raises(ModelNotFound) as info:
        answer(ds, "GET", "/v1/models/" + "x" * 100_000)
    assert info.value.status == 404
    error = info.value.body()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert len(error["message"]) < 2000  # a huge id is not echoed whole


@pytest.mark.parametrize(
    "method, path",
    [("POST", "/v1/models"), ("DELETE", "/v1/models/m"), ("GET", "/v1/models/"),
     ("GET", "/v1/modelsX"), ("GET", "/v1/responses/r")],
)  # fmt: skip
def test_other_requests_are_not_the_catalogs(method, path):
    assert answer(datastore({"a": {"m"}}), method, path) is None


def test_unreadable_timestamps_are_zero():
    assert epoch_seconds(None) == 0 and epoch_seconds("yesterday") == 0
