"""tests/e2e/kind.sh: the controllers against a real cluster. It runs when there is one
(KUBECONFIG set and kubectl on PATH; IMAGE, SIM_IMAGE, NAMESPACE, TIMEOUT pass through to it)
and is skipped, saying why, when there is not. Without a cluster, the script's syntax and the
Model it applies are still checked: the Model and policy pass our CRDs' validation, and the
engine args the controllers write for it parse with the simulator's own parser."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from infergw.api import Model, from_dict_as, to_dict, validate_dict
from infergw.controllers import model_objects
from infergw.simulator.config import parse_config
from infergw.simulator.tokenization import DEFAULT_MODEL_DIR

SCRIPT = Path(__file__).resolve().parent / "kind.sh"
IMAGE_MODEL_DIR = "/opt/infergate/models/infergate-sim"  # where the Dockerfile puts it


def printed_manifests() -> list[dict]:
    out = subprocess.run(
        ["bash", str(SCRIPT), "--print-manifests"],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "KUBECONFIG"},
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_the_script_is_executable_bash() -> None:
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_the_model_it_applies_is_valid_and_runs_the_simulator() -> None:
    docs = {d["kind"]: d for d in printed_manifests()}
    assert set(docs) == {"Model", "AutoScalingPolicy"}
    for doc in docs.values():
        assert validate_dict(doc) == [], doc["kind"]
    model = docs["Model"]
    assert (
        model["spec"]["autoscaling"]["policyRef"]["name"]
        == docs["AutoScalingPolicy"]["metadata"]["name"]
    )
    assert model["spec"]["modelURI"] == f"file://{IMAGE_MODEL_DIR}"
    model["metadata"]["uid"] = "uid-1"
    mi = to_dict(model_objects.modelinfer(from_dict_as(Model, model)))
    [role] = mi["spec"]["template"]["roles"]
    [engine] = role["entryTemplate"]["spec"]["containers"]
    assert engine["command"] == ["infergate", "simulate"]  # the image's CLI, on its PATH
    local = [
        a.replace(IMAGE_MODEL_DIR, str(DEFAULT_MODEL_DIR)).replace("$(POD_IP)", "10.0.0.7")
        for a in engine["args"]
    ]
    cfg = parse_config(local)
    assert cfg.host == "10.0.0.7"  # the pod's IP, from the downward API
    assert cfg.port == model_objects.ENGINE_PORT
    assert cfg.served_model_name == [model["spec"]["servedModelName"]]


def test_the_script_refuses_to_run_without_a_cluster() -> None:
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env)
    assert out.returncode != 0
    assert "KUBECONFIG is not set" in out.stderr


@pytest.mark.slow
def test_on_a_real_cluster() -> None:
    if not os.environ.get("KUBECONFIG"):
        pytest.skip("no cluster: KUBECONFIG is not set (tests/e2e/kind.sh needs one)")
    if shutil.which("kubectl") is None:
        pytest.skip("no cluster: kubectl is not on PATH (tests/e2e/kind.sh needs it)")
    timeout = int(os.environ.get("TIMEOUT", "300"))
    result = subprocess.run(["bash", str(SCRIPT)], timeout=timeout * 8 + 120)
    assert result.returncode == 0, "tests/e2e/kind.sh failed: its output says where"
