"""LoRA adapters are the runtime sidecar's (controllers/adapters.py): the pod template names no
adapter, so adding or removing one keeps the ModelInfer's revision (no pod is rolled); the
sidecar sits beside every serving engine with its readiness probe; the adapters file says what
to load, from where, and whether to download it first."""

from __future__ import annotations

import json

from aiohttp import web
from aiohttp.test_utils import TestServer

from infergw import api
from infergw.api import validate_dict
from infergw.api.lora_adapters import parse
from infergw.api.names import MODEL_LABEL, RUNTIME_PORT
from infergw.controllers import adapters, model_objects
from infergw.controllers import modelinfer_pods as mp
from infergw.controllers.adapter_status import NOT_LOADED, adapters_loaded, sidecar_says
from infergw.controllers.memory_store import MemoryStore
from infergw.controllers.weights import WeightsLayout
from infergw.runtime.sidecar import build_parser as runtime_parser
from tests.conftest import free_port
from tests.model_templates import SECRET_TOKEN, model, templates

SQL = {"name": "sql", "artifactURL": "hf://org/sql-lora"}
CHAT = {"name": "chat", "artifactURL": "s3://bucket/chat-lora"}


def containers(pod: dict) -> dict[str, dict]:
    return {c["name"]: c for c in pod["containers"]}


def test_adding_or_removing_an_adapter_keeps_the_pod_template() -> None:
    revisions = set()
    for lora in ([], [SQL], [SQL, CHAT], [CHAT]):
        mi, entry, _ = templates(model("hf://org/llama", loraAdapters=lora))
        revisions.add(mp.revision(mi))
        assert "--enable-lora" in containers(entry)["engine"]["args"]
        assert not any("lora" in a for a in containers(entry)["engine"]["args"][1:] if "=" in a)
        assert validate_dict(api.to_dict(mi)) == []
    assert len(revisions) == 1
    off, _, _ = templates(model("hf://org/llama"))
    assert mp.revision(off) not in revisions  # LoRA on or off is an engine flag


def test_the_sidecar_runs_beside_the_serving_engine_only() -> None:
    _, entry, worker = templates(model("hf://org/llama", loraAdapters=[SQL]))
    assert "runtime" not in containers(worker)  # a worker serves nothing
    engine, runtime = containers(entry)["engine"], containers(entry)["runtime"]
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in engine["env"]
    assert runtime["command"] == ["infergate", "runtime"]
    assert runtime["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "runtime"}
    assert runtime["ports"] == [{"name": "runtime", "containerPort": RUNTIME_PORT}]
    names = [e["name"] for e in runtime["env"]]
    assert names == ["POD_IP", "HOME", "HF_TOKEN"]  # the source's settings, nothing else
    assert SECRET_TOKEN in runtime["env"]
    mounts = {m["name"]: m for m in runtime["volumeMounts"]}
    assert mounts["adapters"] == {
        "name": "adapters",
        "mountPath": "/etc/infergate/adapters",
        "readOnly": True,
    }
    assert not mounts["weights-cache"].get("readOnly") and not mounts["models"].get("readOnly")
    volumes = {v["name"]: v for v in entry["volumes"]}
    assert volumes["adapters"] == {"name": "adapters", "configMap": {"name": "llama-adapters"}}
    assert "adapters" not in {v["name"] for v in worker.get("volumes", [])}
    opts = runtime_parser().parse_args(runtime["args"])
    assert opts.engine == "vllm" and opts.engine_url == "http://$(POD_IP):8000"
    assert str(opts.adapters_file) == "/etc/infergate/adapters/adapters.json"
    assert opts.models_dir == "/models" and str(opts.cache_dir) == "/var/cache/infergate/models"
    assert opts.served_model_name == "llama"


def test_sglang_gets_its_own_api_and_a_decode_pod_the_engine_behind_its_connector() -> None:
    m = model(
        "hf://org/llama",
        engine="SGLang",
        image="lmsysorg/sglang",
        loraAdapters=[SQL],
        backend={"prefill": {}, "decode": {}, "kvConnector": {"type": "http"}},
    )
    roles = api.to_dict(model_objects.modelinfer(m))["spec"]["template"]["roles"]
    for role in roles:
        runtime = containers(role["entryTemplate"]["spec"])["runtime"]
        opts = runtime_parser().parse_args(runtime["args"])
        assert opts.engine == "sglang"
        port = 8200 if role["name"] == "decode" else 8000
        assert opts.engine_url == f"http://$(POD_IP):{port}"
        engine = containers(role["entryTemplate"]["spec"])["engine"]
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in {e["name"] for e in engine["env"]}


def test_the_configmap_says_what_to_load_and_from_where() -> None:
    pvc = {"name": "local", "artifactURL": "pvc://adapters/local"}
    m = model("hf://org/llama", loraAdapters=[SQL, CHAT, pvc])
    objects = model_objects.desired(m, weights=WeightsLayout.cluster())
    [cm] = [o for o in objects if o.kind == "ConfigMap"]
    assert cm.metadata.name == "llama-adapters" and cm.metadata.owner_references
    wanted, refused = parse(cm.data["adapters.json"], "/models")
    assert refused == []
    assert [(a.name, a.path, a.download) for a in wanted.values()] == [
        ("sql", "/models/lora/sql", True),
        ("chat", "/models/lora/chat", True),
        ("local", "/mnt/pvc/adapters/local", False),
    ]
    assert not [o for o in model_objects.desired(model("hf://org/llama")) if o.kind == "ConfigMap"]


def test_a_simulator_model_loads_from_the_uri_and_mounts_no_cache() -> None:
    m = model("hf://org/llama", engine="Simulator", image="infergate/simulator", loraAdapters=[SQL])
    _, entry, _ = templates(m)
    runtime = containers(entry)["runtime"]
    assert [v["name"] for v in runtime["volumeMounts"]] == ["adapters"]
    [cm] = [o for o in model_objects.desired(m) if o.kind == "ConfigMap"]
    wanted, _ = parse(cm.data["adapters.json"], "/models")
    assert wanted["sql"].path == "org/sql-lora" and not wanted["sql"].download


def test_standalone_writes_the_file_beside_the_links(tmp_path) -> None:
    layout = WeightsLayout.standalone(tmp_path / "cache", tmp_path / "models")
    m = model("file:///weights/llama", loraAdapters=[SQL])
    assert not [o for o in model_objects.desired(m, weights=layout) if o.kind == "ConfigMap"]
    assert adapters.write_local(m, layout) is True
    assert adapters.write_local(m, layout) is False  # unchanged: not written again
    path = (tmp_path / "models").resolve() / "team" / "llama" / "adapters.json"
    [item] = json.loads(path.read_text())["adapters"]
    assert item["path"] == f"{path.parent}/lora/sql" and item["download"]
    _, entry, _ = templates(m, layout)
    opts = runtime_parser().parse_args(containers(entry)["runtime"]["args"])
    assert opts.adapters_file == path


async def test_the_model_condition_quotes_a_sidecar_but_not_blindly() -> None:
    """A pod runs the Model's image: its sidecar's answer is kept only as a condition reason
    and a clipped, printable message."""
    answers = [
        {"reason": "SourceNotFound", "message": "adapter gone: HTTP 404"},
        {"reason": "Not a reason!", "message": "x\x00y" + "z" * 2000},
        ["not", "an", "object"],
    ]

    async def status(_request):
        return web.json_response(answers.pop(0))

    app = web.Application()
    app.router.add_get("/status", status)
    async with TestServer(app, host="127.0.0.1") as server:
        said = await sidecar_says("127.0.0.1", server.port)
        assert said == ("SourceNotFound", "adapter gone: HTTP 404")
        reason, message = await sidecar_says("127.0.0.1", server.port)
        assert reason == NOT_LOADED and message.startswith("x y") and len(message) == 500
        assert await sidecar_says("127.0.0.1", server.port) is None
    assert await sidecar_says("127.0.0.1", free_port()) is None  # nobody there


async def test_the_model_condition_follows_the_sidecars_readiness() -> None:
    store = MemoryStore()
    m = model("hf://org/llama", loraAdapters=[SQL])
    assert (await adapters_loaded(store, m))[:2] == (None, "NoPods")

    def pod(name: str, ready: bool) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "team", "labels": {MODEL_LABEL: "llama"}},
            "spec": {"containers": [{"name": "engine"}, {"name": "runtime"}]},
            "status": {"containerStatuses": [{"name": "runtime", "ready": ready}]},
        }

    await store.create(pod("llama-0", True))
    assert (await adapters_loaded(store, m))[:2] == (True, "AdaptersLoaded")
    await store.create(pod("llama-1", False))  # no podIP yet: nobody to ask
    ok, reason, message = await adapters_loaded(store, m)
    assert (ok, reason) == (False, NOT_LOADED)
    assert message.startswith("1/2 pod(s) without every adapter; pod llama-1:")


def test_our_sidecars_get_the_controllers_trace_env_and_the_engine_does_not() -> None:
    """In a cluster the controllers' OTEL_* reach the P/D connector and the LoRA runtime
    sidecar (api/tracing.py reads them there as the controllers do); the engine's env stays
    the Model's."""
    from infergw.api import tracing

    m = model(
        "hf://org/llama",
        loraAdapters=[SQL],
        backend={"prefill": {}, "decode": {}, "kvConnector": {"type": "http"}},
    )
    wants = model_objects.desired(m, weights=WeightsLayout.cluster())
    trace_env = tracing.passed_on(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SERVICE_NAME": "x"}
    )
    model_objects.pass_trace_env(wants, trace_env)
    [infer] = [w for w in wants if w.kind == "ModelInfer"]
    seen = set()
    for role in api.to_dict(infer)["spec"]["template"]["roles"]:
        for name, c in containers(role["entryTemplate"]["spec"]).items():
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            traced = tracing.settings_from_env({k: v for k, v in env.items() if v is not None})
            if name in model_objects.OUR_SIDECARS:
                seen.add(name)
                assert traced is not None and traced.endpoint == "http://collector:4318/v1/traces"
            else:
                assert traced is None and "OTEL_SERVICE_NAME" not in env
    assert seen == {"connector", "runtime"}
