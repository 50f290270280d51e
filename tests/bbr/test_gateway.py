"""`infergate bbr --gateway`: the router's table holds only the ModelRoutes whose parentRefs
name its Gateway (none: a Gateway of the route's namespace) and the Models on that Gateway;
without --gateway (the local stack's one Envoy) everything counts. Unit, then through a real
router (`serve`, file provider, plaintext on 127.0.0.1) with an ext_proc client."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random

import aiohttp
import pytest
import yaml

from infergw.api.names import MODEL_NAME_HEADER
from infergw.api.parents import GatewayName, parse_gateway
from infergw.bbr.app import serve
from infergw.bbr.model_pools import ModelPools
from infergw.bbr.options import parse_options
from tests import extproc_client as ec
from tests.bbr.objects import expanded, model, route, two_models
from tests.conftest import free_port

PATH = "/v1/chat/completions"
MINE = GatewayName("default", "inference-gateway")
OTHER = GatewayName("default", "edge")


def routed(name: str, parents: list[dict] | None, namespace: str = "default") -> dict:
    obj = route(name, name, [{"modelServerName": "code"}])
    obj["metadata"]["namespace"] = namespace
    if parents is not None:
        obj["spec"]["parentRefs"] = parents
    return obj


def on_gateway(obj: dict, gateway: dict) -> dict:
    obj["spec"]["gateway"] = gateway
    return obj


def objects() -> list[dict]:
    return [
        *two_models(),
        *expanded(on_gateway(model("edge-only", "edge-7b"), {"name": "edge"})),
        routed("no-parents", None),
        routed("names-mine", [{"name": "inference-gateway", "sectionName": "https"}]),
        routed("names-mine-by-namespace", [{"name": "inference-gateway", "namespace": "default"}]),
        routed("names-edge", [{"name": "edge"}]),
        routed("names-both", [{"name": "edge"}, {"name": "inference-gateway"}]),
        routed("names-mine-elsewhere", [{"name": "inference-gateway", "namespace": "prod"}]),
    ]


def pool_for(table: ModelPools, name: str) -> str | None:
    choice = table.choose(name, {}, PATH, random.Random(0))
    return choice.pool if choice else None


SERVED_ON_MINE = {
    "chat-7b": "chat",
    "code-3b": "code",
    "no-parents": "code",
    "names-mine": "code",
    "names-mine-by-namespace": "code",
    "names-both": "code",
    "names-edge": None,
    "names-mine-elsewhere": None,
    "edge-7b": None,
}


@pytest.mark.parametrize(("name", "pool"), SERVED_ON_MINE.items())
def test_with_a_gateway_only_what_is_served_on_it_is_in_the_table(name, pool):
    assert pool_for(ModelPools.build(objects(), "default", MINE), name) == pool


def test_on_the_other_gateway_the_other_routes_and_models_are_served():
    table = ModelPools.build(objects(), "default", OTHER)
    assert pool_for(table, "names-edge") == "code"
    assert pool_for(table, "names-both") == "code"
    assert pool_for(table, "edge-7b") == "edge-only"
    # no parentRefs: any Gateway of the route's namespace, edge too
    assert pool_for(table, "no-parents") == "code"
    for name in ("names-mine", "chat-7b", "code-3b"):
        assert pool_for(table, name) is None, name


def test_a_gateway_in_another_namespace_serves_no_route_without_parent_refs():
    table = ModelPools.build(objects(), "default", GatewayName("gateways", "inference-gateway"))
    assert pool_for(table, "no-parents") is None
    assert pool_for(table, "names-mine") is None


def test_without_a_gateway_every_route_and_model_counts():
    table = ModelPools.build(objects(), "default")
    for name in SERVED_ON_MINE:
        assert pool_for(table, name) is not None, name


def test_the_gateway_flag_defaults_its_namespace_and_refuses_junk(capsys):
    assert parse_options(["--namespace", "prod", "--gateway", "edge"]).gateway == GatewayName(
        "prod", "edge"
    )
    assert parse_options(["--gateway", "gw/edge"]).gateway == GatewayName("gw", "edge")
    assert parse_options([]).gateway is None
    for junk in ("", "Edge", "a/b/c", "x" * 300, "ns/", "UPPER/edge", "edge\n"):
        with pytest.raises(SystemExit):
            parse_options(["--gateway", junk])
        assert "--gateway" in capsys.readouterr().err
    with pytest.raises(ValueError):
        parse_gateway("a" * 64 + "/edge", "default")


# ---- through a real router ---------------------------------------------------------------------


def chat(name: str) -> bytes:
    return json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}]}).encode()


async def ask(port: int, name: str):
    messages = [ec.headers(PATH), ec.body(chat(name))]
    return await ec.exchange(f"127.0.0.1:{port}", messages)


@pytest.mark.parametrize("gateway", ["inference-gateway", None])
async def test_a_real_router_answers_routes_of_other_gateways_404(tmp_path, gateway):
    pool_file = tmp_path / "objects.yaml"
    pool_file.write_text(yaml.safe_dump_all(objects()))
    args = ["--provider", "file", "--pool-file", str(pool_file), "--host", "127.0.0.1"]
    args += ["--secure-serving=false", "--grace-period", "0"]
    args += [] if gateway is None else ["--gateway", gateway]
    opts = dataclasses.replace(
        parse_options(args),
        grpc_port=free_port(),
        grpc_health_port=free_port(),
        metrics_port=free_port(),
    )
    ready = asyncio.Event()
    task = asyncio.create_task(serve(opts, ready))
    try:
        await asyncio.wait_for(ready.wait(), 20)  # set once every server listens
        url = f"http://127.0.0.1:{opts.metrics_port}/debug/pools"
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            table = await resp.json()
        assert table["gateway"] == (None if gateway is None else f"default/{gateway}")
        assert ("names-edge" in table["routes"]) == (gateway is None)
        for name, pool in SERVED_ON_MINE.items():
            out = await ask(opts.grpc_port, name)
            if pool is None and gateway is not None:
                status, answer = ec.immediate(out)
                assert status == 404 and answer["error"]["code"] == "model_not_found", name
            else:
                assert ec.set_headers(out[0])[MODEL_NAME_HEADER] == (pool or _unfiltered(name))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _unfiltered(name: str) -> str:
    return "edge-only" if name == "edge-7b" else "code"
