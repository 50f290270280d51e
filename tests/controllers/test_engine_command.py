"""What a Model's engine container runs, per engine: the full command line and environment the
controllers render for vLLM, SGLang, TRT-LLM and the simulator, checked against each engine's
documented flags (the simulator's against its own parser)."""

from __future__ import annotations

import json

import pytest

from infergw.api import Model, from_dict_as, to_dict, validate_dict
from infergw.api.names import ENGINE_LABEL
from infergw.controllers import model_objects
from infergw.controllers.engine_command import (
    PER_POD,
    KVEventSockets,
    engine_cli,
    render,
    sets,
)
from infergw.simulator.config import parse_config
from tests.paths import DEFAULT_MODEL

POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
PER_POD_EVENTS = {
    "enable_kv_cache_events": True,
    "publisher": "zmq",
    "endpoint": "tcp://*:5557",
    "replay_endpoint": "tcp://*:5600",
    "topic": "kv@$(POD_IP):8000@chat",
}
# vLLM's KVEventsConfig (vllm/config/kv_events.py): SGLang's reads the same keys.
KV_EVENTS_FIELDS = {
    "enable_kv_cache_events",
    "publisher",
    "endpoint",
    "replay_endpoint",
    "buffer_steps",
    "hwm",
    "max_queue_size",
    "topic",
}
# The flags each engine documents for what we set (vLLM 0.32 `vllm serve --help`; SGLang's
# server_args.py; `trtllm-serve --help`); the Model's own flags are the Model's business.
DOCUMENTED = {
    "vLLM": {
        "--model",
        "--served-model-name",
        "--host",
        "--port",
        "--enable-prompt-tokens-details",
        "--kv-events-config",
        "--enable-lora",
    },
    "SGLang": {
        "--model-path",
        "--served-model-name",
        "--host",
        "--port",
        "--enable-cache-report",
        "--enable-metrics",
        "--kv-events-config",
        "--enable-lora",
    },
    "TRTLLM": {"--host", "--port", "--served_model_name"},
}


def model(kind: str, image: str, **spec) -> Model:
    return from_dict_as(
        Model,
        {
            "apiVersion": "workload.infergate.io/v1alpha1",
            "kind": "Model",
            "metadata": {"name": "m", "namespace": "default", "uid": "u-1"},
            "spec": {
                "modelURI": "hf://org/model",
                "servedModelName": "chat",
                "image": image,
                "engine": {"type": kind, "args": ["--max-model-len=4096"]},
                "backend": {"aggregated": {"replicas": 1}},
                **spec,
            },
        },
    )


def container(m: Model, sockets: KVEventSockets = PER_POD) -> dict:
    [role] = to_dict(model_objects.modelinfer(m, sockets))["spec"]["template"]["roles"]
    [engine] = [c for c in role["entryTemplate"]["spec"]["containers"] if c["name"] == "engine"]
    return engine


def flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def events(args: list[str]) -> dict:
    [config] = [a for a in args if a.startswith("--kv-events-config=")]
    return json.loads(config.split("=", 1)[1])


def test_vllm_runs_vllm_serve_with_the_gateways_flags():
    c = container(model("vLLM", "vllm/vllm-openai:v0.32.0"))
    assert c["command"] == ["vllm", "serve"]
    assert c["args"] == [
        "--model=/models/base",
        "--served-model-name=chat",
        "--host=$(POD_IP)",
        "--port=8000",
        "--enable-prompt-tokens-details",
        "--kv-events-config=" + json.dumps(PER_POD_EVENTS),
        "--max-model-len=4096",
    ]
    assert c["env"] == [POD_IP_ENV]  # the kubelet expands $(POD_IP) only when it is defined
    assert c["ports"] == [
        {"name": "http", "containerPort": 8000},
        {"name": "kv-events", "containerPort": 5557},
        {"name": "kv-replay", "containerPort": 5600},
    ]
    assert set(flags(c["args"][:-1])) <= DOCUMENTED["vLLM"]
    assert set(events(c["args"])) <= KV_EVENTS_FIELDS


def test_sglang_runs_launch_server_with_its_own_flag_names():
    m = model(
        "SGLang",
        "lmsysorg/sglang:v0.5.0",
        loraAdapters=[{"name": "sql", "artifactURL": "hf://org/sql-lora"}],
    )
    c = container(m)
    assert c["command"] == ["python", "-m", "sglang.launch_server"]
    assert c["args"] == [
        "--model-path=/models/base",
        "--served-model-name=chat",
        "--host=$(POD_IP)",
        "--port=8000",
        "--enable-cache-report",
        "--enable-metrics",
        "--kv-events-config=" + json.dumps(PER_POD_EVENTS),
        "--max-model-len=4096",
        "--enable-lora",  # the adapters: loaded at run time by the runtime sidecar
    ]
    assert c["env"] == [POD_IP_ENV]
    own = {"--max-model-len"}
    assert set(flags(c["args"])) - own <= DOCUMENTED["SGLang"]
    assert set(events(c["args"])) <= KV_EVENTS_FIELDS
    labels = to_dict(model_objects.modelinfer(m))["spec"]["template"]["roles"][0]
    assert labels["entryTemplate"]["metadata"]["labels"][ENGINE_LABEL] == "sglang"


def test_trtllm_takes_the_model_as_its_argument_and_no_kv_event_flag():
    c = container(model("TRTLLM", "nvcr.io/nvidia/tensorrt-llm/release:1.0.0"))
    assert c["command"] == ["trtllm-serve"]
    assert c["args"] == [
        "/models/base",
        "--served_model_name=chat",
        "--host=$(POD_IP)",
        "--port=8000",
        "--max-model-len=4096",
    ]
    assert set(flags(c["args"][:-1])) <= DOCUMENTED["TRTLLM"]
    assert c["ports"] == [{"name": "http", "containerPort": 8000}]  # binds no KV socket
    labels = to_dict(model_objects.modelinfer(model("TRTLLM", "x")))["spec"]["template"]
    # the picker and the autoscaler read trtllm-serve's metric names (api/engines.py)
    assert labels["roles"][0]["entryTemplate"]["metadata"]["labels"][ENGINE_LABEL] == (
        "trtllm-serve"
    )


@pytest.mark.parametrize(
    ("engine", "image"),
    [
        ("Simulator", "anything:1"),
        ("vLLM", "infergate/simulator:dev"),
        ("vLLM", "ghcr.io/infergate/infergate:latest"),
        ("vLLM", "localhost:5000/infergate/simulator@sha256:abc"),
    ],
)
def test_the_simulator_runs_only_when_asked_for_and_its_parser_takes_every_flag(engine, image):
    m = model(engine, image, modelURI=f"file://{DEFAULT_MODEL}")
    c = container(m, KVEventSockets.central("127.0.0.1:5557"))
    assert c["command"] == ["infergate", "simulate"]
    expanded = [a.replace("$(POD_IP)", "127.0.0.9") for a in c["args"]]
    cfg = parse_config(expanded)  # the simulator's own parser: nothing it does not know
    assert cfg.host == "127.0.0.9" and cfg.port == 8000 and cfg.served_model_name == ["chat"]
    assert cfg.enable_prompt_tokens_details
    sent = cfg.kv_events
    assert sent.enable_kv_cache_events and sent.publisher == "zmq"
    assert sent.endpoint == "tcp://127.0.0.9:0;127.0.0.1:5557"  # from the pod's address
    assert sent.replay_endpoint == "tcp://127.0.0.9:5600"
    assert sent.topic == "kv@127.0.0.9:8000@chat"
    # central mode: the PUB connects out; only the replay socket is bound
    assert c["ports"][1:] == [{"name": "kv-replay", "containerPort": 5600}]


def test_per_pod_on_one_machine_binds_each_pods_own_address():
    """Standalone pods share a machine (one loopback address each) and several pickers connect
    to each: the simulator binds its PUB on its own address (its flag overrides vLLM's rule of
    connecting to an address); vLLM, which cannot, binds `*` (one such pod per machine)."""
    sockets = KVEventSockets.per_pod_address()
    sim = container(
        model("vLLM", "infergate/simulator:dev", modelURI=f"file://{DEFAULT_MODEL}"), sockets
    )
    cfg = parse_config([a.replace("$(POD_IP)", "127.0.0.9") for a in sim["args"]])
    assert cfg.kv_events.endpoint == "tcp://127.0.0.9:5557"
    assert cfg.kv_events.replay_endpoint == "tcp://127.0.0.9:5600"
    assert cfg.kv_events_bind_pub  # bound, though it names one address
    assert [p["name"] for p in sim["ports"][1:]] == ["kv-events", "kv-replay"]
    vllm = container(model("vLLM", "vllm/vllm-openai:v0.32.0"), sockets)
    assert events(vllm["args"])["endpoint"] == "tcp://*:5557"
    assert "--sim-kv-events-bind" not in vllm["args"]


def test_a_simulator_standing_in_for_sglang_speaks_sglangs_metric_names():
    c = container(model("SGLang", "infergate/simulator:dev", modelURI=f"file://{DEFAULT_MODEL}"))
    assert c["command"] == ["infergate", "simulate"]
    assert parse_config(c["args"]).engine == "sglang"


def test_a_real_image_is_never_served_by_the_simulator():
    for engine, image in [("vLLM", "vllm/vllm-openai:v0.32.0"), ("vLLM", "simulator:1")]:
        assert engine_cli(engine, image).program == "vLLM"


def test_the_models_command_and_flags_win():
    m = model(
        "vLLM",
        "vllm/vllm-openai:v0.32.0",
        engine={
            "type": "vLLM",
            "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
            "args": [
                "--host=0.0.0.0",
                '--kv-events-config={"enable_kv_cache_events": false}',
                "--no-enable-prompt-tokens-details",
            ],
        },
    )
    c = container(m)
    assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert c["args"] == [
        "--model=/models/base",
        "--served-model-name=chat",
        "--port=8000",
        "--host=0.0.0.0",
        '--kv-events-config={"enable_kv_cache_events": false}',
        "--no-enable-prompt-tokens-details",
    ]
    assert c["ports"] == [{"name": "http", "containerPort": 8000}]  # its own KV config


def test_role_args_count_as_the_models_own():
    m = model("vLLM", "v", backend={"aggregated": {"args": ["--host", "10.0.0.1"]}})
    role = m.spec.backend.aggregated
    assert role is not None
    args = render(m, role, "chat").args
    assert "--host=$(POD_IP)" not in args and args[-2:] == ["--host", "10.0.0.1"]


def test_sets_reads_every_spelling_of_a_flag():
    assert sets(["--host", "x"], "--host") and sets(["--host=x"], "--host")
    assert sets(["--no-enable-metrics"], "--enable-metrics")
    assert not sets(["--hostname=x", "--port=1"], "--host")


def test_command_is_validated_and_lora_needs_an_engine_that_takes_it():
    def problems(**spec):
        return validate_dict(to_dict(model("vLLM", "v", **spec)))

    ok = {"type": "SGLang", "command": ["python3", "-m", "sglang.launch_server"]}
    assert problems(engine=ok) == []
    assert problems(engine={"command": []}) == ["spec.engine.command: must have 1..16 items"]
    assert problems(engine={"command": [""]}) == [
        "spec.engine.command[0]: must be 1..4096 characters"
    ]
    lora = [{"name": "a", "artifactURL": "hf://o/a"}]
    assert problems(engine={"type": "TRTLLM"}, loraAdapters=lora) == [
        "spec: loraAdapters need an engine that loads them at run time: vLLM, SGLang or Simulator"
    ]
    assert problems(engine={"type": "Simulator"}, loraAdapters=lora) == []


# ---- multi-node: workerReplicas -----------------------------------------------------------------

# The flags by which each engine spans nodes (vLLM 0.32's multiprocessing multi-node serving:
# `vllm serve --help=ParallelConfig`; SGLang's server_args.py), beside those above.
NODE_FLAGS = {
    "vLLM": {
        "--nnodes",
        "--node-rank",
        "--master-addr",
        "--master-port",
        "--headless",
        "--tensor-parallel-size",
        "--pipeline-parallel-size",
    },
    "SGLang": {"--nnodes", "--node-rank", "--dist-init-addr", "--tp-size"},
}


def nodes(kind: str, image: str, workers: int = 1, spec=None, **role) -> tuple[dict, dict]:
    """The entry and worker engine containers of an aggregated Model with workers."""
    backend = {"aggregated": {"workerReplicas": workers, **role}}
    m = model(kind, image, backend=backend, **(spec or {}))
    [r] = to_dict(model_objects.modelinfer(m))["spec"]["template"]["roles"]
    assert r["workerReplicas"] == workers
    [entry] = r["entryTemplate"]["spec"]["containers"]
    [worker] = r["workerTemplate"]["spec"]["containers"]
    return entry, worker


def test_vllm_workers_join_the_entrys_engine_by_its_multi_node_flags():
    gpus = {"resources": {"limits": {"nvidia.com/gpu": 8}}}
    entry, worker = nodes("vLLM", "vllm/vllm-openai:v0.32.0", **gpus)
    spans = ["--nnodes=2", "--tensor-parallel-size=8", "--pipeline-parallel-size=2"]
    assert entry["command"] == worker["command"] == ["vllm", "serve"]
    for flag in [*spans, "--node-rank=0", "--master-addr=$(POD_IP)", "--master-port=29501"]:
        assert flag in entry["args"], flag
    for flag in [*spans, "--node-rank=$(WORKER_INDEX)", "--master-addr=$(ENTRY_ADDRESS)"]:
        assert flag in worker["args"], flag
    # the entry serves (rank 0), a worker is headless: no port, no readiness probe
    assert "--headless" not in entry["args"] and "--headless" in worker["args"]
    assert entry["readinessProbe"] and entry["ports"][0]["containerPort"] == 8000
    assert "readinessProbe" not in worker and "ports" not in worker
    # every node runs the same engine: the arguments differ only where the rank does
    differ = set(entry["args"]) ^ set(worker["args"])
    assert differ == {
        "--node-rank=0", "--master-addr=$(POD_IP)",
        "--node-rank=$(WORKER_INDEX)", "--master-addr=$(ENTRY_ADDRESS)", "--headless",
    }  # fmt: skip
    assert worker["resources"] == entry["resources"]
    assert set(flags(worker["args"])) <= DOCUMENTED["vLLM"] | NODE_FLAGS["vLLM"] | {
        "--max-model-len"
    }


def test_sglang_workers_join_by_dist_init_addr_with_tensor_parallelism_over_every_gpu():
    gpus = {"resources": {"limits": {"nvidia.com/gpu": "4"}}}
    entry, worker = nodes("SGLang", "lmsysorg/sglang:v0.5.0", workers=3, **gpus)
    assert entry["command"] == ["python", "-m", "sglang.launch_server"]
    for args, rank, address in (
        (entry["args"], "0", "$(POD_IP)"),
        (worker["args"], "$(WORKER_INDEX)", "$(ENTRY_ADDRESS)"),
    ):
        assert "--nnodes=4" in args and f"--node-rank={rank}" in args
        assert f"--dist-init-addr={address}:29501" in args
        assert "--tp-size=16" in args  # 4 nodes × 4 GPUs
        assert set(flags(args)) <= DOCUMENTED["SGLang"] | NODE_FLAGS["SGLang"] | {"--max-model-len"}


def test_the_models_own_parallelism_is_left_as_written():
    entry, worker = nodes("vLLM", "vllm/vllm-openai:v0.32.0", args=["--tensor-parallel-size=16"])
    for args in (entry["args"], worker["args"]):
        assert "--pipeline-parallel-size=2" not in args
        assert [a for a in args if "parallel-size" in a] == ["--tensor-parallel-size=16"]
        assert "--nnodes=2" in args


def test_a_simulator_worker_is_a_headless_node_its_parser_takes():
    entry, worker = nodes(
        "Simulator", "infergate/simulator:dev", spec={"modelURI": f"file://{DEFAULT_MODEL}"}
    )
    env = {"POD_IP": "127.0.0.9", "WORKER_INDEX": "1", "ENTRY_ADDRESS": "llm-0-server-0-0.ns"}

    def expanded(args):
        out = []
        for a in args:
            for k, v in env.items():
                a = a.replace(f"$({k})", v)
            out.append(a)
        return out

    assert not parse_config(expanded(entry["args"])).headless
    assert parse_config(expanded(worker["args"])).headless


def test_trtllm_cannot_span_pods():
    problems = validate_dict(
        to_dict(model("TRTLLM", "nvcr.io/trt:1", backend={"aggregated": {"workerReplicas": 1}}))
    )
    assert problems == [
        "spec: workerReplicas need an engine that spans pods by flag: vLLM, SGLang or Simulator"
    ]
    m = model("TRTLLM", "nvcr.io/trt:1", backend={"aggregated": {"workerReplicas": 1}})
    with pytest.raises(ValueError, match="does not span several pods"):
        model_objects.modelinfer(m)
