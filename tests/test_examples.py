"""The runnable example directories (`infergate up DIR`): each holds one Model that passes
its CRD's schema and CEL rules and the controllers' own validation, and a picker config;
reading, counting pods and the --pods/engine-argument copy behave."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from controllers.manifests import read_objects
from epp.scheduling.config import load_config
from infergate.example import Example, ExampleError
from tests.test_crds import _all_cel_errors, _schema_errors

ROOT = Path(__file__).resolve().parent.parent
RUNNABLE = ["quickstart", "pd"]


@pytest.mark.parametrize("name", RUNNABLE)
def test_example_model_is_valid_everywhere_it_is_checked(name):
    example = Example.read(ROOT / "examples" / name)
    assert _schema_errors("Model", example.model) == []
    assert _all_cel_errors("Model", example.model) == []
    # What the controllers watch (the gateway's SecurityPolicy and Secret are Envoy's)
    objects, problems = read_objects(example.directory)
    assert problems == []  # the picker's config and Envoy's policy beside it are no problem
    assert [o["kind"] for _, o in objects] == ["Model"]
    assert example.picker_config is not None
    load_config(example.picker_config.read_text())
    assert (
        example.tokenizer_dir is not None and (example.tokenizer_dir / "tokenizer.json").is_file()
    )


def test_pod_counts_follow_groups_roles_and_workers():
    assert Example.read(ROOT / "examples" / "quickstart").pod_count() == 4
    assert Example.read(ROOT / "examples" / "pd").pod_count() == 4  # 2 groups × (1 P + 1 D)


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


def test_an_example_needs_exactly_one_model(tmp_path):
    write(tmp_path, {"kind": "EndpointPickerConfig"})
    with pytest.raises(ExampleError, match="exactly one Model, not 0"):
        Example.read(tmp_path)
    write(tmp_path, model("a"), model("b"), name="two.yaml")
    with pytest.raises(ExampleError, match="exactly one Model, not 2"):
        Example.read(tmp_path)
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
