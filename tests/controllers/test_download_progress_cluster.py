"""A weights download's progress in a cluster: the controllers (kubernetes mode's set, over the
API emulator through HTTP, authorized by the install's RBAC as kube-apiserver would) read the
last lines of the pod's `weights` init container's log through the pods/log subresource, and
the ModelInfer's Progressing and the Model's Ready say how many bytes are down. Without the
grant the condition still says the container runs, the refusal is the emulator's 403, and a
log of garbage adds nothing to the status."""

from __future__ import annotations

import asyncio
import io
import json
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pytest

from infergw.controllers.download_logs import LOG_TAIL_BYTES, LOG_TAIL_LINES
from infergw.fetch.progress import Progress
from tests.controller_manifests import Authorizer
from tests.controllers_in_emulator import CONTROLLERS, TOKEN, manifest_rbac, running_controllers
from tests.kube_rbac import RBACEmulator
from tests.waiting import wait_for_async

WORKLOAD = "workload.infergate.io/v1alpha1"
MODEL = {
    "apiVersion": WORKLOAD,
    "kind": "Model",
    "metadata": {"name": "llm", "namespace": "default"},
    "spec": {
        "modelURI": "hf://org/llama",
        "image": "vllm/vllm-openai:v0.11.0",
        "engine": {"type": "vLLM"},
        "replicas": 1,
        "backend": {"aggregated": {}},
    },
}


def progress_line() -> str:
    """What `infergate download` logs every 10 s in a pod: 3 of 8 MiB, file 1 of 4."""
    progress = Progress("hf://org/llama", out=io.StringIO(), tty=False)
    progress.begin(8 << 20, 4)
    progress.advance(3 << 20)
    progress.files_done = 1
    return f"2026-12-07 19:00:00 INFO fetch.download: {progress.line()}\n"


def message(api: RBACEmulator, kind: str, condition: str) -> str:
    obj = api.get(WORKLOAD, kind, "llm") or {}
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == condition:
            return c.get("message", "")
    return ""


def downloading(api: RBACEmulator, log: str) -> None:
    """The Model's pod, its download running with `log` as its log so far, as the kubelet
    says it (the log first: any status that says the download runs was written after it)."""
    [pod] = api.list_objects("v1", "Pod")
    name = pod["metadata"]["name"]
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["weights"]
    api.write_pod_log("default", name, "weights", log)
    api.write_pod_log("default", name, "engine", "a prompt the controllers never read\n")
    pod["status"] = {
        "phase": "Pending",
        "conditions": [{"type": "Ready", "status": "False"}],
        "initContainerStatuses": [
            {"name": "weights", "restartCount": 0, "state": {"running": {"startedAt": "T0"}}}
        ],
    }
    api.put(pod)


async def scenario(api: RBACEmulator, log: str, bytes_shown: bool) -> str:
    """The Model created, its pod downloading with `log` as its download's log; the
    ModelInfer's Progressing message once it says the download runs (and, if
    `bytes_shown`, once the Model quotes its bytes)."""
    async with running_controllers(read_logs=True):
        api.put(MODEL)
        await wait_for_async(lambda: api.list_objects("v1", "Pod"), "the pod", within=30)
        downloading(api, log)
        await wait_for_async(
            lambda: "is downloading its weights" in message(api, "ModelInfer", "Progressing"),
            "DownloadingWeights",
            within=30,
        )
        if bytes_shown:
            await wait_for_async(
                lambda: "3.0 MiB of 8.0 MiB" in message(api, "Model", "Ready"),
                "the Model quotes the bytes",
                within=30,
            )
        return message(api, "ModelInfer", "Progressing")


def run(
    tmp_path: Path, monkeypatch, auth: Authorizer, log: str, bytes_shown: bool = False
) -> tuple[RBACEmulator, str]:
    api = RBACEmulator({TOKEN: (CONTROLLERS, lambda: auth)})
    with api.threaded():
        monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig", TOKEN)))
        said = asyncio.run(scenario(api, log, bytes_shown))
    return api, said


def test_the_status_shows_the_bytes_read_from_the_weights_log(tmp_path, monkeypatch) -> None:
    earlier = "2026 INFO fetch.download: hf://org/llama: 4 files, 8.0 MiB (0 B already here)\n"
    api, said = run(tmp_path, monkeypatch, manifest_rbac(), earlier + progress_line(), True)
    assert said.startswith("pod llm-0-")
    assert "container weights running since T0, 38% (3.0 MiB of 8.0 MiB, " in said
    assert said.endswith("/s), file 1 of 4")
    assert api.denied.get(CONTROLLERS.name, []) == []
    assert ("", "pods/log", "get", "default") in api.allowed[CONTROLLERS.name]


def test_without_pods_log_the_condition_says_the_container_runs(tmp_path, monkeypatch) -> None:
    rbac = manifest_rbac()
    rbac.cluster.discard(("", "pods/log", "get"))
    assert not rbac.allows("", "pods/log", "get", "default")  # the install's grant, taken away
    api, said = run(tmp_path, monkeypatch, rbac, progress_line())
    assert said.endswith("is downloading its weights: container weights running since T0")
    assert ("", "pods/log", "get", "default") in api.denied[CONTROLLERS.name]


def test_a_hostile_log_adds_nothing(tmp_path, monkeypatch) -> None:
    """Lines too long to be ours: the progress text at their ends is past limitBytes, so
    it never arrives; an escape sequence is not repeated."""
    garbage = "\x1b[2J" + "x" * (4 * LOG_TAIL_BYTES) + progress_line()
    api, said = run(tmp_path, monkeypatch, manifest_rbac(), garbage * LOG_TAIL_LINES)
    assert said.endswith("container weights running since T0")
    assert ("", "pods/log", "get", "default") in api.allowed[CONTROLLERS.name]


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ({"tailLines": "2"}, 400),  # two containers, none named
        ({"container": "nope"}, 400),
        ({"container": "weights", "tailLines": "-1"}, 400),
        ({"container": "weights", "limitBytes": "0"}, 400),
        ({"container": "weights", "tailLines": "1", "limitBytes": "5"}, 200),
    ],
)
def test_the_emulator_serves_the_log_as_the_api_server_does(query, status) -> None:
    api = RBACEmulator({})
    with api.threaded():
        api.put(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "p", "namespace": "default"},
                "spec": {
                    "initContainers": [{"name": "weights"}],
                    "containers": [{"name": "engine"}, {"name": "sidecar"}],
                },
                "status": {
                    "initContainerStatuses": [{"name": "weights", "state": {"running": {}}}]
                },
            }
        )
        api.write_pod_log("default", "p", "weights", "one\ntwo\nthree\n")
        url = f"{api.url}/api/v1/namespaces/default/pods/p/log?{urlencode(query)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                got, body = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            got, body = exc.code, exc.read()
        assert got == status, body
        assert body == b"three" if status == 200 else json.loads(body)["reason"] == "BadRequest"
