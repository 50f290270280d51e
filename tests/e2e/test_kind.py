"""tests/e2e/kind.sh: the cluster path on a real cluster. It runs when there is one (KUBECONFIG
set and kubectl on PATH; IMAGE, NAMESPACE, TIMEOUT pass through to it) and is skipped, saying
why, when there is not. Without a cluster, the script's offline parts are still checked: its
syntax, the Model it applies (our CRDs' validation; the engine args the controllers write for
it parse with the simulator's own parser), the install it applies (every infergate container
runs IMAGE, the controllers' args parse with their own parser and give Models' pickers IMAGE)
and its filter of the install to the kinds a cluster serves."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infergw.api import Model, from_dict_as, to_dict, validate_dict
from infergw.controllers import model_objects
from infergw.controllers.app import build_parser as controllers_parser
from infergw.simulator.config import parse_config
from infergw.simulator.tokenization import DEFAULT_MODEL_DIR
from tests.e2e.served_only import split

SCRIPT = Path(__file__).resolve().parent / "kind.sh"
IMAGE_MODEL_DIR = "/opt/infergate/models/infergate-sim"  # where the Dockerfile puts it
TEST_IMAGE = "registry.test/infergate:e2e"


def printed(flag: str) -> list[dict]:
    """What the script prints with `flag`, offline: no KUBECONFIG, this interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    out = subprocess.run(
        ["bash", str(SCRIPT), flag],
        capture_output=True,
        text=True,
        check=True,
        env={**env, "PYTHON": sys.executable, "IMAGE": TEST_IMAGE},
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def printed_manifests() -> list[dict]:
    return printed("--print-manifests")


def containers(doc: dict) -> list[dict]:
    spec = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


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


def test_the_install_it_applies_runs_its_image_everywhere() -> None:
    docs = printed("--print-install")
    ours = [c for d in docs for c in containers(d) if "infergate" in c["image"]]
    assert ours and all(c["image"] == TEST_IMAGE for c in ours)
    [controllers] = [
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "infergate-controllers"
    ]
    [c] = containers(controllers)
    assert c["imagePullPolicy"] == "IfNotPresent"  # an image kind loaded
    args = controllers_parser().parse_args(c["args"])
    assert args.mode == "kubernetes" and args.picker_image == TEST_IMAGE
    gateway_side = [d for d in docs if d["kind"] in ("Gateway", "Deployment", "Service")]
    assert {d["metadata"].get("namespace") for d in gateway_side} == {
        "infergate-e2e",
        "infergate-system",
    }


def test_a_cluster_without_envoy_gateway_gets_the_rest_of_the_install() -> None:
    docs = printed("--print-install")
    absent = ("gateway.envoyproxy.io/", "cert-manager.io/")  # no Envoy Gateway, no cert-manager
    served = {d["apiVersion"] for d in docs if not d["apiVersion"].startswith(absent)}
    kept, skipped = split(docs, served)
    kinds = {d["kind"] for d in kept}
    assert {"CustomResourceDefinition", "Deployment", "ValidatingWebhookConfiguration"} <= kinds
    assert not any(d["apiVersion"].startswith("gateway.envoyproxy.io/") for d in kept)
    assert skipped and all(any(f"({a}" in s for a in absent) for s in skipped)
    assert len(kept) + len(skipped) == len(docs)


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
