"""A namespace in the API emulator with the Model reconciler in kubernetes mode: what the tests
of a Model's picker objects (its Deployment, route, Secret, patch) share, and how the kubelet
reads a container's command line ($(VAR) expansion, downward-API env)."""

from __future__ import annotations

import base64
import copy
import re
import tempfile
from pathlib import Path

import pytest
from kubernetes import client

from infergw.cluster.kube_store import KubeStore
from infergw.cluster.store import MODEL
from infergw.controllers.model import ModelReconciler
from infergw.controllers.picker_objects import TLS_DIR, TOKENIZER_DIR, PickerSettings
from infergw.epp.options import parse_options
from tests.kubeapi import KubeAPIEmulator

WORKLOAD = "workload.infergate.io/v1alpha1"
NS = "team-a"
SERVED = "llama-3-8b-instruct"


def model_obj(uri: str = "hf://meta-llama/Meta-Llama-3-8B-Instruct", **spec) -> dict:
    return {
        "apiVersion": WORKLOAD,
        "kind": "Model",
        "metadata": {"name": "llama", "namespace": NS},
        "spec": {
            "modelURI": uri,
            "servedModelName": SERVED,
            "image": "vllm/vllm-openai:v0.11.0",
            "engine": {"type": "vLLM"},
            "env": [
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                {"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"},
            ],
            "backend": {"aggregated": {"replicas": 1}},
            **spec,
        },
    }


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion of a container's args (unknown names stay as written)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)


def container_env(container: dict, pod_ip: str, namespace: str = NS) -> dict[str, str]:
    """The container's env as the kubelet would resolve it for a pod at `pod_ip`."""
    field_values = {"status.podIP": pod_ip, "metadata.namespace": namespace}
    out = {}
    for e in container.get("env") or []:
        if "value" in e:
            out[e["name"]] = e["value"]
        elif "fieldRef" in (e.get("valueFrom") or {}):
            out[e["name"]] = field_values[e["valueFrom"]["fieldRef"]["fieldPath"]]
    return out


class Cluster:
    """The emulator, a KubeStore over it and a Model reconciler in kubernetes mode."""

    def __init__(self, emu: KubeAPIEmulator) -> None:
        self.emu = emu
        self.store = KubeStore(client.ApiClient(emu.client_configuration()), watch_timeout=30)
        self.reconciler = ModelReconciler(self.store, picker=PickerSettings())

    async def apply(self, obj: dict) -> dict:
        return await self.store.create(copy.deepcopy(obj))

    async def reconcile(self, name: str = "llama") -> dict:
        await self.reconciler.reconcile(NS, name)
        return await self.store.get(MODEL, NS, name)

    async def get(self, kind, name: str) -> dict:
        obj = await self.store.get(kind, NS, name)
        assert obj is not None, f"no {kind.kind} {name}"
        return obj

    def set_status(self, kind, name: str, status: dict) -> None:
        obj = self.emu.get(kind.api_version, kind.kind, name, NS)
        obj["status"] = status
        self.emu.put(obj)


@pytest.fixture
async def cluster():
    async with KubeAPIEmulator() as emu:
        c = Cluster(emu)
        try:
            yield c
        finally:
            c.store.close()


def pod_spec(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]


def picker_container(dep: dict) -> dict:
    [c] = pod_spec(dep)["containers"]
    return c


def picker_options(dep: dict, tokenizer_dir: Path, secret: dict):
    """The picker container's command line through `infergate epp`'s own parser, with the
    tokenizer volume's path standing for a directory the init container filled, and the TLS
    volume's for a directory beside it holding the Secret's files as the kubelet mounts them."""
    c = picker_container(dep)
    assert c["command"] == ["infergate", "epp"]
    [volume] = [v for v in pod_spec(dep)["volumes"] if v["name"] == "tls"]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    tls_dir = Path(tempfile.mkdtemp(prefix="tls-", dir=tokenizer_dir.parent))
    for item in volume["secret"]["items"]:  # a key the Secret lacks: the pod would not start
        (tls_dir / item["path"]).write_bytes(base64.b64decode(secret["data"][item["key"]]))
    env = container_env(c, "10.0.0.7")
    args = [
        expand(a, env).replace(TOKENIZER_DIR, str(tokenizer_dir)).replace(TLS_DIR, str(tls_dir))
        for a in c["args"]
    ]
    return parse_options(args)
