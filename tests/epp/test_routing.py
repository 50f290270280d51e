"""Model routing in the picker: which ModelRoute rule matches, weighted ModelServer choice,
the pods a server selects, the model name sent to the engine, and the errors a client sees.
(The response rewriter that gives the client its model name back is in
test_epp_response_chain.py.)"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from infergw.epp.datastore import Endpoint
from infergw.epp.errors import PickerError
from infergw.epp.routing.table import RouteTable

NET = "networking.infergate.io/v1alpha1"


def route(name="llama", rules=None, created="2026-01-01T00:00:00Z", **spec) -> dict:
    spec.setdefault("modelName", "llama")
    spec["rules"] = rules or [{"name": "default", "targetModels": [{"modelServerName": "main"}]}]
    return {
        "apiVersion": NET,
        "kind": "ModelRoute",
        "metadata": {"name": name, "creationTimestamp": created},
        "spec": spec,
    }


def server(name, labels, model="llama-3-8b", **spec) -> dict:
    return {
        "apiVersion": NET,
        "kind": "ModelServer",
        "metadata": {"name": name},
        "spec": {
            "model": model,
            "inferenceEngine": "vLLM",
            "workloadSelector": {"matchLabels": labels},
            **spec,
        },
    }


def ep(address, **labels) -> Endpoint:
    return Endpoint(name=address, pod=address, address=address, labels=labels)


MAIN = [ep("10.0.0.1:8000", app="main"), ep("10.0.0.2:8000", app="main")]
CANARY = [ep("10.0.0.3:8000", app="canary")]
SERVERS = [server("main", {"app": "main"}), server("canary", {"app": "canary"}, model="llama-4")]


def table(*routes, servers=SERVERS) -> RouteTable:
    return RouteTable.build(list(routes), list(servers), "pool")


def resolve(t: RouteTable, model="llama", headers=None, path="/v1/completions", eps=None, seed=0):
    return t.resolve(
        model, headers or {}, path, MAIN + CANARY if eps is None else eps, random.Random(seed)
    )


def test_no_route_leaves_the_request_to_the_pool():
    assert resolve(table(route()), model="other") is None
    assert resolve(RouteTable(), model="llama") is None


def test_the_server_decides_pods_and_the_engine_s_model_name():
    r = resolve(table(route()))
    assert r.server_name == "main" and r.route_name == "llama" and r.rule == "default"
    assert [e.address for e in r.candidates] == ["10.0.0.1:8000", "10.0.0.2:8000"]
    assert r.target_model == "llama-3-8b"


def test_weighted_split_is_within_five_percent_over_2000_requests():
    split = [{"modelServerName": "main", "weight": 90}, {"modelServerName": "canary", "weight": 10}]
    t = table(route(rules=[{"targetModels": split}]))
    rng = random.Random(7)
    counts = Counter(
        t.resolve("llama", {}, "/v1/completions", MAIN + CANARY, rng).server_name
        for _ in range(2000)
    )
    assert abs(counts["main"] / 2000 - 0.9) <= 0.05
    assert abs(counts["canary"] / 2000 - 0.1) <= 0.05
    assert counts["canary"] > 0  # both are really used


def test_a_target_without_ready_pods_gives_its_share_to_the_others():
    split = [{"modelServerName": "main", "weight": 50}, {"modelServerName": "canary", "weight": 50}]
    t = table(route(rules=[{"targetModels": split}]))
    servers = {resolve(t, eps=MAIN, seed=s).server_name for s in range(50)}
    assert servers == {"main"}


def test_no_ready_pod_for_any_target_is_503():
    with pytest.raises(PickerError) as err:
        resolve(table(route()), eps=CANARY)
    assert err.value.status == 503 and "no ready pod" in err.value.message
    missing = table(route(rules=[{"targetModels": [{"modelServerName": "ghost"}]}]))
    with pytest.raises(PickerError) as err:
        resolve(missing)
    assert err.value.status == 503 and "ghost" in err.value.message


def test_first_matching_rule_wins_on_headers_and_path():
    rules = [
        {
            "name": "beta",
            "modelMatch": {
                "headers": {"X-Infergate-User": {"prefix": "beta-"}},
                "uri": {"prefix": "/v1/chat"},
            },
            "targetModels": [{"modelServerName": "canary"}],
        },
        {
            "name": "regex",
            "modelMatch": {"headers": {"x-team": {"regex": "ml-[0-9]+"}}},
            "targetModels": [{"modelServerName": "canary"}],
        },
        {"name": "default", "targetModels": [{"modelServerName": "main"}]},
    ]
    t = table(route(rules=rules))
    beta = {"x-infergate-user": "beta-ann"}
    assert resolve(t, headers=beta, path="/v1/chat/completions").rule == "beta"
    assert resolve(t, headers=beta, path="/v1/completions").rule == "default"  # both must hold
    assert resolve(t, headers={"x-team": "ml-42"}).rule == "regex"
    assert (
        resolve(t, headers={"x-team": "ml-42x"}).rule == "default"
    )  # a regex matches whole values
    assert resolve(t, headers={"x-infergate-user": "alpha"}).rule == "default"


def test_no_matching_rule_is_404():
    rules = [
        {
            "modelMatch": {"headers": {"x-team": {"exact": "a"}}},
            "targetModels": [{"modelServerName": "main"}],
        }
    ]
    with pytest.raises(PickerError) as err:
        resolve(table(route(rules=rules)))
    assert err.value.status == 404


def test_lora_adapters_route_and_keep_their_name():
    t = table(route(loraAdapters=["sql-lora"]))
    r = resolve(t, model="sql-lora")
    assert r.server_name == "main" and r.target_model == "sql-lora"


def test_the_oldest_route_for_a_model_wins():
    old = route(
        "old",
        created="2026-01-01T00:00:00Z",
        rules=[{"targetModels": [{"modelServerName": "main"}]}],
    )
    new = route(
        "new",
        created="2026-02-01T00:00:00Z",
        rules=[{"targetModels": [{"modelServerName": "canary"}]}],
    )
    assert resolve(table(new, old)).route_name == "old"


def test_a_server_port_narrows_its_pods():
    servers = [server("main", {"app": "main"}, workloadPort={"port": 8001})]
    eps = [ep("10.0.0.1:8000", app="main"), ep("10.0.0.1:8001", app="main")]
    r = resolve(table(route(), servers=servers), eps=eps)
    assert [e.address for e in r.candidates] == ["10.0.0.1:8001"]


def test_traffic_policy_gives_retries_and_timeout():
    servers = [
        server(
            "main", {"app": "main"}, trafficPolicy={"timeout": "1m30s", "retry": {"attempts": 2}}
        )
    ]
    r = resolve(table(route(), servers=servers))
    assert r.retries == 2 and r.timeout_s == 90


def test_pool_targets_mean_the_whole_pool():
    t = table(route(rules=[{"targetModels": [{"inferencePoolName": "pool"}]}]))
    r = resolve(t)
    assert len(r.candidates) == 3 and r.server is None and r.target_model == "llama"
    other = table(route(rules=[{"targetModels": [{"inferencePoolName": "elsewhere"}]}]))
    with pytest.raises(PickerError):
        resolve(other)


def test_invalid_objects_are_left_out_with_a_log(caplog):
    bad = route("bad", rules=[{"targetModels": [{"modelServerName": "main", "weight": 500}]}])
    t = table(bad, route("good", modelName="other"))
    assert t.route_for("llama") is None and t.route_for("other") is not None
    assert "ignoring ModelRoute bad" in caplog.text and "weight" in caplog.text
