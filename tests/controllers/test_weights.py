"""Where a Model's engine reads its weights, as the controllers render it (controllers/weights.py):
an init container per downloaded artifact (`infergate download`, its args those of the real
parser), the cache and link volumes, claims mounted read-only, the simulator and file:// left
as they were; standalone mode's folders; a failed download read back from a pod's status."""

from __future__ import annotations

from pathlib import Path

import pytest

from infergw import api
from infergw.api import validate_dict
from infergw.api.workload import model_infer_host_powers
from infergw.controllers import modelinfer_pods as mp
from infergw.controllers.app import build_parser
from infergw.controllers.weights import (
    PVC_ROOT,
    WeightsLayout,
    cache_volume_of,
)
from infergw.fetch.download import build_parser as download_parser
from tests.model_templates import SECRET_TOKEN, model, templates


def engine_args(pod: dict) -> list[str]:
    return pod["containers"][0]["args"]


def test_an_hf_model_is_downloaded_before_the_engine_on_every_node() -> None:
    mi, entry, worker = templates(model("hf://org/llama"))
    for pod in (entry, worker):  # each node loads its part of the weights
        [init] = pod["initContainers"]
        assert init["name"] == "weights" and init["command"] == ["infergate", "download"]
        opts = download_parser().parse_args(init["args"])
        assert opts.uri == "hf://org/llama" and str(opts.dest) == "/models/base"
        assert str(opts.termination_log) == "/dev/termination-log"
        assert init["env"] == [{"name": "HOME", "value": "/tmp"}, SECRET_TOKEN]  # nothing else
        assert "--model=/models/base" in engine_args(pod)
        mounts = {v["name"]: v for v in pod["containers"][0]["volumeMounts"]}
        assert mounts["weights-cache"]["mountPath"] == str(opts.cache_dir)
        assert mounts["weights-cache"]["readOnly"] and mounts["models"]["readOnly"]
        assert {v["name"]: v for v in pod["volumes"]}["weights-cache"]["emptyDir"] == {}
    assert validate_dict(api.to_dict(mi)) == []
    assert model_infer_host_powers(mi) == []  # an emptyDir: no power over the node


@pytest.mark.parametrize(
    ("files", "include", "exclude", "no_default"),
    [
        (None, [], None, False),  # the downloader's default beside safetensors
        ({"include": ["*.safetensors", "*.json"]}, ["*.safetensors", "*.json"], None, False),
        ({"exclude": ["original/*"]}, [], ["original/*"], False),
        ({"exclude": []}, [], None, True),  # nothing left out
    ],
)
def test_the_models_revision_and_files_are_the_downloads(files, include, exclude, no_default):
    spec = {"modelRevision": "v2.0"} | ({"modelFiles": files} if files is not None else {})
    _, entry, _ = templates(model("hf://org/llama", **spec))
    [init] = entry["initContainers"]
    opts = download_parser().parse_args(init["args"])
    assert opts.revision == "v2.0" and opts.uri == "hf://org/llama"
    assert (opts.include, opts.exclude, opts.no_default_exclude) == (include, exclude, no_default)


def test_an_https_archive_is_downloaded_and_unpacked_before_the_engine() -> None:
    url = f"https://models.example.com/llama.tar.gz#sha256={'a' * 64}"  # its checksum kept
    mi, entry, _ = templates(model(url))
    [init] = entry["initContainers"]
    assert download_parser().parse_args(init["args"]).uri == url
    assert "--model=/models/base" in engine_args(entry)
    assert validate_dict(api.to_dict(mi)) == []


def test_without_a_revision_the_download_reads_main() -> None:
    _, entry, _ = templates(model("s3://bucket/llama"))
    assert download_parser().parse_args(entry["initContainers"][0]["args"]).revision == "main"


def test_a_node_shared_cache_is_a_host_path_the_webhook_asks_a_label_for() -> None:
    layout = WeightsLayout.cluster(cache_volume_of("hostPath:/var/cache/infergate"))
    mi, entry, _ = templates(model("s3://bucket/llama"), layout)
    volume = {v["name"]: v for v in entry["volumes"]}["weights-cache"]
    assert volume["hostPath"] == {"path": "/var/cache/infergate", "type": "DirectoryOrCreate"}
    assert any("hostPath" in why for why in model_infer_host_powers(mi))
    claim = cache_volume_of("pvc:node-cache")
    assert claim == {"persistentVolumeClaim": {"claimName": "node-cache"}}


@pytest.mark.parametrize("bad", ["hostPath:relative", "pvc:", "nfs:x", "emptyDir:x"])
def test_the_controllers_refuse_a_cache_they_cannot_render(bad, capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([f"--weights-cache={bad}"])
    assert "emptyDir, hostPath:/DIR or pvc:CLAIM" in capsys.readouterr().err


def test_lora_adapters_are_the_sidecars_to_download_and_claims_mounted() -> None:
    """No init container per adapter (the runtime sidecar downloads them at run time:
    adapters.py), but the cache and links are there for it, and the claims for the engine."""
    adapters = [
        {"name": "sql", "artifactURL": "s3://bucket/sql-lora"},
        {"name": "chat", "artifactURL": "pvc://adapters/chat"},
    ]
    _, entry, _ = templates(model("pvc://weights/llama", loraAdapters=adapters))
    assert "initContainers" not in entry
    args = engine_args(entry)
    assert f"--model={PVC_ROOT}/weights/llama" in args and "--enable-lora" in args
    assert not any("sql" in a or "chat" in a for a in args)
    assert {"weights-cache", "models"} <= {v["name"] for v in entry["volumes"]}
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in entry["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"adapters", "weights"}
    mounts = [
        m for m in entry["containers"][0]["volumeMounts"] if m["mountPath"].startswith(PVC_ROOT)
    ]
    assert sorted(m["mountPath"] for m in mounts) == [f"{PVC_ROOT}/adapters", f"{PVC_ROOT}/weights"]
    assert all(m["readOnly"] for m in mounts)


@pytest.mark.parametrize(
    ("uri", "engine", "image", "path"),
    [
        ("hf://org/llama", "Simulator", "x", "org/llama"),  # the simulator needs no weights
        ("hf://org/llama", "vLLM", "ghcr.io/infergate/simulator:1", "org/llama"),
        ("file:///opt/models/llama", "vLLM", "vllm/vllm-openai", "/opt/models/llama"),
        ("ms://org/llama", "vLLM", "vllm/vllm-openai", "org/llama"),  # the engine's own
    ],
)
def test_what_needs_no_download_is_left_as_it_was(uri, engine, image, path) -> None:
    _, entry, _ = templates(model(uri, engine, image))
    assert "initContainers" not in entry and "volumes" not in entry
    assert "volumeMounts" not in entry["containers"][0]
    assert engine_args(entry)[0].endswith(path)


def test_standalone_mode_downloads_into_this_machines_folders(tmp_path: Path) -> None:
    layout = WeightsLayout.standalone(tmp_path / "cache", tmp_path / "models")
    _, entry, _ = templates(model("hf://org/llama"), layout)
    [init] = entry["initContainers"]
    opts = download_parser().parse_args(init["args"])
    dest = tmp_path / "models" / "team" / "llama" / "base"
    assert opts.dest == dest and opts.cache_dir == tmp_path / "cache"
    assert opts.termination_log is None  # no /dev/termination-log: the log's last line
    assert init["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert f"--model={dest}" in engine_args(entry)
    assert "volumes" not in entry and "volumeMounts" not in entry["containers"][0]
    default = WeightsLayout.standalone(None, tmp_path / "models")
    _, entry, _ = templates(model("hf://org/llama"), default)
    assert download_parser().parse_args(entry["initContainers"][0]["args"]).cache_dir is None


def test_standalone_a_claim_is_downloaded_from_its_folder_and_the_cache_bounded(
    tmp_path: Path,
) -> None:
    layout = WeightsLayout.standalone(None, tmp_path / "models", tmp_path / "claims", 1 << 30)
    _, entry, _ = templates(model("pvc://data/llama"), layout)
    [init] = entry["initContainers"]
    opts = download_parser().parse_args(init["args"])
    assert opts.uri == "pvc://data/llama" and opts.pvc_root == tmp_path / "claims"
    assert opts.cache_max_bytes == 1 << 30
    assert f"--model={opts.dest}" in engine_args(entry)
    # in a cluster the claim is mounted read-only and read in place, nothing downloaded
    _, entry, _ = templates(model("pvc://data/llama"))
    assert "initContainers" not in entry and "--model=/mnt/pvc/data/llama" in engine_args(entry)


def pod_with(init_status: dict) -> dict:
    return {"metadata": {"name": "p"}, "status": {"initContainerStatuses": [init_status]}}


def test_a_failed_download_is_read_from_the_pod_until_it_runs_again() -> None:
    message = (
        "2026 INFO progress\ninfergate download: SourceNotFound: hf://org/x: HTTP 404; check\n"
    )
    waiting = {
        "name": "weights",
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 3, "message": message}},
    }
    assert mp.download_failure(pod_with(waiting)) == (
        "container weights exited with 3: SourceNotFound: hf://org/x: HTTP 404; check"
    )
    retrying = {**waiting, "state": {"running": {}}}
    assert mp.download_failure(pod_with(retrying)) is None
    done = {"name": "weights", "state": {"terminated": {"exitCode": 0}}}
    assert mp.download_failure(pod_with(done)) is None
    theirs = {**waiting, "name": "migrate-db"}  # not one of ours
    assert mp.download_failure(pod_with(theirs)) is None


def test_a_running_download_is_said_with_its_start_and_its_try() -> None:
    first = {"name": "weights", "restartCount": 0, "state": {"running": {"startedAt": "T0"}}}
    assert mp.downloading(pod_with(first)) == "container weights running since T0"
    again = {**first, "restartCount": 2, "lastState": {"terminated": {"exitCode": 5}}}
    assert mp.downloading(pod_with(again)) == (
        "container weights running since T0, try 3 (resuming)"
    )
    done = {"name": "weights", "state": {"terminated": {"exitCode": 0}}}
    assert mp.downloading(pod_with(done)) is None
    theirs = {**first, "name": "migrate-db"}  # not one of ours
    assert mp.downloading(pod_with(theirs)) is None
