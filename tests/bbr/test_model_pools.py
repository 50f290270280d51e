"""The router's table: a request's model -> the InferencePool that serves it, from the objects
the controllers make of two Models and from hand-written routes."""

from __future__ import annotations

import random

import pytest

from infergw.bbr.model_pools import ModelPools
from infergw.epp.errors import PickerError
from tests.bbr.objects import model, route, two_models

PATH = "/v1/chat/completions"


def pool_for(objects, name, headers=None, seed=0):
    choice = ModelPools.build(objects, "default").choose(
        name, headers or {}, PATH, random.Random(seed)
    )
    return choice.pool if choice else None


@pytest.mark.parametrize(
    ("name", "pool"),
    [("chat-7b", "chat"), ("chat-sql", "chat"), ("code-3b", "code"), ("unknown", None)],
)
def test_served_names_and_adapters_resolve_to_their_models_pool(name, pool):
    assert pool_for(two_models(), name) == pool


def test_a_model_route_name_resolves_through_its_model_server_to_the_pool():
    objects = [*two_models(), route("coder", "coder", [{"modelServerName": "code"}])]
    assert pool_for(objects, "coder") == "code"


def test_an_inference_pool_target_is_that_pool():
    objects = [*two_models(), route("direct", "direct", [{"inferencePoolName": "chat"}])]
    assert pool_for(objects, "direct") == "chat"


def test_a_split_across_pools_follows_the_weights():
    targets = [{"modelServerName": "chat", "weight": 75}, {"modelServerName": "code", "weight": 25}]
    table = ModelPools.build([*two_models(), route("split", "split", targets)], "default")
    rng = random.Random(1)
    picks = [table.choose("split", {}, PATH, rng).pool for _ in range(4000)]
    assert 0.70 < picks.count("chat") / len(picks) < 0.80


def test_rules_match_headers_as_the_picker_does():
    rules = [
        {
            "name": "beta",
            "modelMatch": {"headers": {"x-infergate-user": {"prefix": "beta-"}}},
            "targetModels": [{"modelServerName": "code"}],
        },
        {"name": "default", "targetModels": [{"modelServerName": "chat"}]},
    ]
    objects = [*two_models(), route("r", "r", [], rules)]
    assert pool_for(objects, "r", {"x-infergate-user": "beta-1"}) == "code"
    assert pool_for(objects, "r", {"x-infergate-user": "alice"}) == "chat"


def test_no_matching_rule_is_404_and_no_pool_for_the_targets_is_503():
    rules = [
        {
            "modelMatch": {"uri": {"prefix": "/v2/"}},
            "targetModels": [{"modelServerName": "chat"}],
        }
    ]
    with pytest.raises(PickerError) as info:
        pool_for([*two_models(), route("r", "r", [], rules)], "r")
    assert info.value.status == 404
    orphan = route("orphan", "orphan", [{"modelServerName": "missing"}])
    with pytest.raises(PickerError) as info:
        pool_for([*two_models(), orphan], "orphan")
    assert info.value.status == 503


def test_a_model_without_its_route_yet_resolves_by_the_model_object():
    objects = [o for o in two_models() if o["kind"] == "InferencePool"]
    objects.append(model("code", "code-3b"))
    assert pool_for(objects, "code-3b") == "code"
    assert pool_for(objects, "chat-7b") is None  # no route, no Model object: not known


def test_objects_of_other_namespaces_and_invalid_ones_are_left_out(caplog):
    other = route("elsewhere", "elsewhere", [{"modelServerName": "chat"}])
    other["metadata"]["namespace"] = "team-b"
    broken = route("broken", "broken", [{"modelServerName": "chat", "inferencePoolName": "chat"}])
    objects = [*two_models(), other, broken]
    assert pool_for(objects, "elsewhere") is None
    assert pool_for(objects, "broken") is None
    assert "broken" in caplog.text


def test_the_most_specific_pool_serves_a_server_two_pools_select():
    objects = two_models()

    def find(kind):
        return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == "chat")

    wide = find("InferencePool")
    narrow = {**wide, "metadata": {"name": "chat-narrow", "namespace": "default"}}
    labels = {"infergate.io/model": "chat", "tier": "a"}
    narrow["spec"] = {**wide["spec"], "selector": {"matchLabels": labels}}
    find("ModelServer")["spec"]["workloadSelector"]["matchLabels"]["tier"] = "a"
    assert pool_for([*objects, narrow], "chat-7b") == "chat-narrow"
