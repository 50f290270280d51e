"""The runnable example directories (`infergate up DIR`): each holds one Model that passes
its CRD's schema and CEL rules and the controllers' own validation, and a picker config;
whatever else they hold for the controllers (routes, servers, objectives) passes too and
fits together; reading, counting pods and the --pods/engine-argument copy behave."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest
import yaml

from infergw.api import Model, from_dict_as, to_dict
from infergw.controllers.manifests import read_objects
from infergw.controllers.model_objects import desired
from infergw.epp.app import _flow_control
from infergw.epp.scheduling.config import load_config
from infergw.epp.trust import Users
from infergw.stack.example import Example, ExampleError
from tests.crd_eval import KINDS as OUR_KINDS
from tests.crd_eval import all_cel_errors, schema_errors
from tests.paths import ROOT

RUNNABLE = ["quickstart", "pd", "fairness", "two-models", "lifecycle"]
# What each example gives the controllers besides its Model.
OTHER_KINDS = {
    "quickstart": [],
    "pd": [],
    "fairness": ["InferenceObjective"] * 2 + ["ModelRoute"] * 2 + ["ModelServer"],
    "two-models": ["Model", "ModelRoute"],  # a second Model, and a route to it
    "lifecycle": ["AutoScalingPolicy"],  # its LocalObjectStore is the stack's
}


@pytest.mark.parametrize("name", RUNNABLE)
def test_example_model_is_valid_everywhere_it_is_checked(name):
    example = Example.read(ROOT / "examples" / name)
    assert schema_errors("Model", example.model) == []
    assert all_cel_errors("Model", example.model) == []
    # What the controllers watch (the gateway's SecurityPolicy and Secret are Envoy's)
    objects, problems = read_objects(example.directory)
    assert problems == []  # the picker's config and Envoy's policy beside it are no problem
    kinds = sorted(o["kind"] for _, o in objects)
    assert kinds == sorted(["Model", *OTHER_KINDS[name]])
    for _, obj in objects:
        if obj["kind"] in OUR_KINDS:
            assert schema_errors(obj["kind"], obj) == [], obj["metadata"]["name"]
            assert all_cel_errors(obj["kind"], obj) == [], obj["metadata"]["name"]
    assert example.picker_config is not None
    text = example.picker_config.read_text()
    _flow_control(text, load_config(text))  # its flowControl section, if any, parses
    if example.each[0].tokenizer_source is None:  # else fetched before the picker starts
        assert example.tokenizer_dir is not None
        assert (example.tokenizer_dir / "tokenizer.json").is_file()


def test_pod_counts_follow_groups_roles_and_workers():
    assert Example.read(ROOT / "examples" / "quickstart").pod_count() == 4
    assert Example.read(ROOT / "examples" / "pd").pod_count() == 4  # 2 groups × (1 P + 1 D)
    assert Example.read(ROOT / "examples" / "fairness").pod_count() == 1


def test_fairness_example_fits_together():
    """Its routes name servers that exist (its own or the Model's), its canary serves the
    Model's LoRA adapter on the Model's pods, its objectives name the Model's pool, flow
    control is on, and every tenant has an API key; the objectives `users` gives tenants
    exist."""
    example = Example.read(ROOT / "examples" / "fairness")
    assert example.auth is not None
    tenants = {client for client, _ in example.auth.api_keys.credentials}
    objects = [o for _, o in read_objects(example.directory)[0]]
    stored = copy.deepcopy(example.model)
    stored["metadata"]["uid"] = "u"  # as the store would have it
    generated = [
        to_dict(o) for o in desired(from_dict_as(Model, stored))
    ]  # what the controllers make
    servers = {o["metadata"]["name"]: o for o in objects + generated if o["kind"] == "ModelServer"}
    routes = [o for o in objects if o["kind"] == "ModelRoute"]
    assert {r["spec"]["modelName"] for r in routes} == {"limited", "split"}
    for route in routes:
        for rule in route["spec"]["rules"]:
            for target in rule["targetModels"]:
                assert target["modelServerName"] in servers, target
    split = next(r for r in routes if r["spec"]["modelName"] == "split")
    weights = {t["modelServerName"]: t["weight"] for t in split["spec"]["rules"][0]["targetModels"]}
    assert weights == {"fairness": 90, "fairness-canary": 10}
    adapters = [a["name"] for a in example.model["spec"]["loraAdapters"]]
    canary = servers["fairness-canary"]["spec"]
    assert canary["model"] in adapters
    pool = next(o for o in generated if o["kind"] == "InferencePool")
    assert canary["workloadSelector"]["matchLabels"] == pool["spec"]["selector"]["matchLabels"]
    engine = next(o for o in generated if o["kind"] == "ModelInfer")
    args = engine["spec"]["template"]["roles"][0]["entryTemplate"]["spec"]["containers"][0]
    assert "--enable-lora" in args["args"] and "--max-num-seqs=16" in args["args"]
    limited = next(r for r in routes if r["spec"]["modelName"] == "limited")
    assert limited["spec"]["rateLimit"]["inputTokensPerUnit"] > 0
    objectives = {
        o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "InferenceObjective"
    }
    assert {n: o["priority"] for n, o in objectives.items()} == {"interactive": 10, "batch": -1}
    assert {o["poolRef"]["name"] for o in objectives.values()} == {example.pool_name}
    text = example.picker_config.read_text()
    flow = _flow_control(text, load_config(text))
    assert flow is not None and flow.saturation.queue_depth_threshold < 1
    users = Users.from_config(yaml.safe_load(text)).by_name
    assert set(users) <= tenants
    assert {u.objective for u in users.values()} <= set(objectives)


def write(directory: Path, *docs: dict, name: str = "model.yaml") -> None:
    directory.mkdir(exist_ok=True)
    (directory / name).write_text(yaml.safe_dump_all(docs))


def model(name: str = "m", **spec) -> dict:
    return {
        "apiVersion": "workload.infergate.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": name},
        "spec": {"modelURI": "hf://org/m", "image": "x", "backend": {"aggregated": {}}, **spec},
    }


def test_workers_count_as_pods(tmp_path):
    backend = {"prefill": {"replicas": 2, "workerReplicas": 1}, "decode": {"replicas": 1}}
    write(tmp_path, model(replicas=3, backend=backend))
    assert Example.read(tmp_path).pod_count() == 3 * (2 * 2 + 1)
    assert Example.read(tmp_path).tokenizer_dir is None  # a hub model: no local tokenizer


def test_an_example_needs_models_of_distinct_names(tmp_path):
    write(tmp_path, {"kind": "EndpointPickerConfig"})
    with pytest.raises(ExampleError, match="holds no Model"):
        Example.read(tmp_path)
    write(tmp_path, model("a"), model("a"), name="two.yaml")
    with pytest.raises(ExampleError, match="two Models share a name"):
        Example.read(tmp_path)
    write(tmp_path, model("a"), model("b", replicas=2), name="two.yaml")
    example = Example.read(tmp_path)
    assert example.several and [m.pool_name for m in example.each] == ["a", "b"]
    assert example.pod_count() == 3 and example.model["metadata"]["name"] == "a"
    with pytest.raises(ExampleError, match="not a directory"):
        Example.read(tmp_path / "missing")


def test_changes_go_to_a_copy_and_leave_the_example_alone(tmp_path):
    source = tmp_path / "src"
    write(source, model(replicas=1, engine={"type": "vLLM", "args": ["--a"]}))
    write(source, {"kind": "EndpointPickerConfig"}, name="epp-config.yaml")
    before = (source / "model.yaml").read_text()
    copy = Example.read(source).with_changes(tmp_path / "copy", replicas=5, engine_args=["--b"])
    assert (source / "model.yaml").read_text() == before
    again = Example.read(tmp_path / "copy")
    assert again.model["spec"]["replicas"] == 5
    assert again.model["spec"]["engine"]["args"] == ["--a", "--b"]
    assert copy.picker_config == tmp_path / "copy" / "epp-config.yaml"
    assert again.pod_count() == 5


def test_up_takes_flags_on_either_side_of_the_directory_and_engine_args_after_dashes():
    from infergw.up import build_parser, split_engine_args

    ours, engine = split_engine_args(
        ["examples/pd", "--no-auth", "--pods", "3", "--", "--block-size=32", "--seed", "1"]
    )
    args = build_parser().parse_args(ours)
    assert args.example == Path("examples/pd") and args.no_auth and args.pods == 3
    assert engine == ["--block-size=32", "--seed", "1"]
    assert split_engine_args(["--pods", "2"]) == (["--pods", "2"], [])


def test_several_pickers_need_pods_that_bind_their_own_address(tmp_path):
    """--pickers N: every picker connects to every pod's KV-event PUB, bound on the pod's
    own loopback address, which the simulator does and vLLM (binding `*`) does only for
    one pod per machine."""
    from infergw.up import build_parser, pickers_problem

    assert build_parser().parse_args(["--pickers", "3"]).pickers == 3
    sim = Example.read(ROOT / "examples" / "quickstart")
    assert pickers_problem(1, sim) is None and pickers_problem(4, sim) is None
    model = copy.deepcopy(sim.model)
    model["spec"]["engine"] = {
        "type": "vLLM",
        "command": ["python", "-m", "vllm.entrypoints.openai.api_server"],
    }
    model["spec"]["image"] = "vllm/vllm-openai:v0.32.0"
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(model))
    (tmp_path / "epp-config.yaml").write_text(sim.picker_config.read_text())
    vllm = Example.read(tmp_path)
    assert vllm.pod_count() > 1 and not vllm.runs_simulator
    assert pickers_problem(1, vllm) is None
    assert "vLLM" in pickers_problem(2, vllm)
    assert pickers_problem(2, vllm.with_changes(tmp_path / "one", replicas=1)) is None


SHIPPED = [ROOT / "examples", ROOT / "gateway-manifests"]


def test_no_shipped_config_lets_a_client_pin_a_pod():
    """header-based-testing-filter picks the pod a request header names: in a shipped
    picker config (an example's, or one inside a manifest's ConfigMap) any client could
    pin a pod. Tests that pin pods add it to a config of their own."""
    carrying = [
        str(path.relative_to(ROOT))
        for top in SHIPPED
        for path in sorted(top.rglob("*.y*ml"))
        for doc in yaml.safe_load_all(path.read_text().replace("{{", "").replace("}}", ""))
        if "header-based-testing-filter" in yaml.safe_dump(doc)
    ]
    assert carrying == []


def test_an_example_with_a_billion_laughs_or_a_fifo_is_refused(tmp_path):
    """`infergate up DIR` reads an example an operator wrote: a document whose anchors
    expand to 10**9 values, or a FIFO named *.yaml, is refused with its file named."""
    write(tmp_path, model())
    laughs = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    laughs += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb = "laughs:\n" + "".join(f"- {x}\n" for x in laughs) + "kind: *l9\n"
    (tmp_path / "bomb.yaml").write_text(bomb)
    with pytest.raises(ExampleError, match=r"bomb.yaml: .*expands through its aliases"):
        Example.read(tmp_path)
    (tmp_path / "bomb.yaml").unlink()
    os.mkfifo(tmp_path / "fifo.yaml")
    with pytest.raises(ExampleError, match=r"fifo.yaml: .*not a regular file"):
        Example.read(tmp_path)


def test_up_tells_where_each_model_is_served(tmp_path, monkeypatch):
    """With several Models, `infergate up` names the router and, per Model, its pickers and
    pods (the stack is not started: its pickers' answers are stood in)."""
    from infergw.stack.local import LocalStack, StackConfig
    from infergw.stack.ports import StackPorts
    from infergw.up import _serving_lines

    example = Example.read(ROOT / "examples" / "two-models")
    stack = LocalStack(StackConfig.from_example(example, tmp_path, StackPorts()))
    pods = {0: ["127.0.0.2:8000", "127.0.0.3:8000"], 1: ["127.0.0.4:8000"]}
    monkeypatch.setattr(stack, "picker_endpoints", lambda i=0: {a: {} for a in pods[i]})
    text = _serving_lines(stack, example)
    assert "body-based router (127.0.0.1:9012" in text
    assert (
        "Model 'chat' ('chat-sim')" in text and "2 pods on 127.0.0.2:8000, 127.0.0.3:8000" in text
    )
    assert "Model 'code' ('code-sim')" in text and "1 pods on 127.0.0.4:8000" in text
    assert "127.0.0.1:9102" in text  # the second pool's picker


def test_the_lifecycle_example_serves_its_files_from_the_s3_its_model_names(tmp_path):
    example = Example.read(ROOT / "examples" / "lifecycle")
    [store] = example.object_stores
    [lifecycle] = example.each
    env = dict(lifecycle.tokenizer_source.env)
    assert env["AWS_ENDPOINT_URL"] == store.endpoint
    assert lifecycle.tokenizer_source.uri == f"s3://{store.bucket}/tiny"
    keys = {key for upload in store.uploads for key, _ in upload.objects()}
    assert {"tiny/tokenizer.json", "tiny-sql/adapter_config.json"} <= keys
    adapter = lifecycle.model["spec"]["loraAdapters"][0]["artifactURL"]
    assert adapter == f"s3://{store.bucket}/tiny-sql"
    assert lifecycle.scales_to_zero and example.pods_to_wait_for() == 0
    assert example.pod_count() == 1

    moved = example.with_changes(tmp_path / "copy", object_store="http://127.0.0.1:12345")
    again = Example.read(tmp_path / "copy")
    for ex in (moved, again):
        assert ex.object_stores[0].endpoint == "http://127.0.0.1:12345"
        assert dict(ex.each[0].tokenizer_source.env)["AWS_ENDPOINT_URL"] == (
            "http://127.0.0.1:12345"
        )
    assert store.endpoint == "http://127.0.0.1:9700"  # the example itself unchanged


def store_doc(**spec) -> dict:
    base = {"endpoint": "http://127.0.0.1:9700", "bucket": "models", "uploads": []}
    return {"kind": "LocalObjectStore", "metadata": {"name": "s3"}, "spec": base | spec}


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"endpoint": "http://10.0.0.1:9700"}, "spec.endpoint"),
        ({"endpoint": "https://127.0.0.1:9700"}, "spec.endpoint"),
        ({"endpoint": "http://127.0.0.1"}, "spec.endpoint"),
        ({"endpoint": "http://127.0.0.1:99999"}, "spec.endpoint"),
        ({"endpoint": "http://user@127.0.0.1:9700"}, "spec.endpoint"),
        ({"bucket": "Models_1"}, "spec.bucket"),
        ({"uploads": {"prefix": "x"}}, "spec.uploads"),
        ({"uploads": [{"prefix": "../x", "files": {"a": "b"}}]}, "prefix"),
        ({"uploads": [{"prefix": "x"}]}, "one of directory or files"),
        ({"uploads": [{"prefix": "x", "directory": "d", "files": {"a": "b"}}]}, "one of"),
        ({"uploads": [{"prefix": "x", "files": {"../a": "b"}}]}, "file names"),
        ({"uploads": [{"prefix": "x", "files": {"a": 1}}]}, "file names"),
    ],
)
def test_a_local_object_store_that_is_not_a_loopback_s3_is_refused(tmp_path, spec, says):
    write(tmp_path, model(), store_doc(**spec))
    with pytest.raises(ExampleError, match=re.escape(says)):
        Example.read(tmp_path)


def test_a_model_whose_weights_are_downloaded_has_its_tokenizer_fetched(tmp_path):
    secret = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}}
    env = [{"name": "HF_ENDPOINT", "value": "http://mirror"}, {"name": "OTHER", "value": "x"}]
    vllm = {"type": "vLLM"}
    cases = {
        "hf": model("hf", engine=vllm, env=[*env, secret], modelRevision="v1"),
        "sim": model("sim", engine={"type": "Simulator"}),  # its own tokenizer
        "file": model("file", engine=vllm, modelURI="file://simulator/default_model"),
        "pvc": model("pvc", engine=vllm, modelURI="pvc://claim/llama"),
        "obs": model("obs", engine=vllm, modelURI="obs://bucket/llama", env=env),
    }
    write(tmp_path, *cases.values())
    sources = {m.pool_name: m.tokenizer_source for m in Example.read(tmp_path).each}
    assert sources["sim"] is None and sources["file"] is None and sources["pvc"] is None
    hf = sources["hf"]
    assert (hf.uri, hf.revision) == ("hf://org/m", "v1")
    assert hf.env == (("HF_ENDPOINT", "http://mirror"),)  # the source's settings alone
    assert sources["obs"].uri == "obs://bucket/llama"


def test_up_without_moto_stops_before_starting_anything_and_names_the_extra(
    tmp_path, monkeypatch, capsys
):
    from infergw import up

    monkeypatch.setattr(up, "moto_installed", lambda: False)
    lifecycle = ROOT / "examples" / "lifecycle"
    assert up.main([str(lifecycle), "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "moto" in err and "pip install 'infergw[local-s3]'" in err and str(lifecycle) in err
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written
    assert up.object_store_problem(Example.read(ROOT / "examples" / "quickstart"), tmp_path) is None
