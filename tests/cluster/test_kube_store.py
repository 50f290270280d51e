"""The controllers through the Kubernetes backend: the official client over real HTTP to the
in-process API emulator (tests/kubeapi.py stands in for kube-apiserver, which cannot run
here). A Model becomes pods; a write that loses a race gets a real 409 and is retried; a
watch that expires is listed again and the controllers still converge."""

from __future__ import annotations

import copy

import yaml
from kubernetes import client

from infergw.cluster.kube_store import KubeStore
from infergw.cluster.store import MODEL, MODEL_INFER, POD
from infergw.controllers.app import build_controllers
from infergw.controllers.runner import ControllerMetrics
from tests.controller_helpers import kubelet
from tests.kubeapi import KubeAPIEmulator
from tests.paths import CRD_EXAMPLES
from tests.waiting import wait_for_async

EXAMPLE = CRD_EXAMPLES / "model.yaml"


class RacingStore:
    """The real KubeStore, with another writer touching the ModelInfer just before our
    first update of it — so that update carries a stale resourceVersion."""

    def __init__(self, store: KubeStore) -> None:
        self._store = store
        self.raced = False

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def update(self, obj):
        if obj["kind"] == "ModelInfer" and not self.raced:
            self.raced = True
            other = await self._store.get(MODEL_INFER, "default", obj["metadata"]["name"])
            other["metadata"].setdefault("annotations", {})["someone"] = "else"
            await self._store.update(other)
        return await self._store.update(obj)


async def test_model_to_pods_over_the_kubernetes_api_with_a_conflict_and_an_expired_watch():
    async with KubeAPIEmulator() as api:
        kube = KubeStore(client.ApiClient(api.client_configuration()), watch_timeout=30)
        store = RacingStore(kube)
        metrics = ControllerMetrics()
        controllers, scaler = build_controllers(store, metrics)
        for c in controllers:
            await c.start()
        try:
            model = yaml.safe_load(EXAMPLE.read_text())
            del model["spec"]["autoscaling"]
            await kube.create(copy.deepcopy(model))

            async def ready():
                await kubelet(kube)
                m = await kube.get(MODEL, "default", "llama-3-8b")
                return (m.get("status") or {}).get("readyReplicas") == 2

            await wait_for_async(ready, "the Model's two groups ready", within=20)
            pods, _ = await kube.list(POD, "default", {"infergate.io/model": "llama-3-8b"})
            assert len(pods) == 4

            # an edit: the Model controller's first ModelInfer update loses a race (409)
            m = await kube.get(MODEL, "default", "llama-3-8b")
            m["spec"]["image"] = "vllm/vllm-openai:v0.12.0"
            await kube.update(m)

            async def rolled():
                await kubelet(kube)
                mi = await kube.get(MODEL_INFER, "default", "llama-3-8b")
                roles = mi["spec"]["template"]["roles"]
                images = {r["entryTemplate"]["spec"]["containers"][0]["image"] for r in roles}
                st = mi.get("status") or {}
                return images == {"vllm/vllm-openai:v0.12.0"} and st.get("updatedReplicas") == 2

            await wait_for_async(rolled, "the new image rolled out to both groups", within=20)
            assert store.raced
            assert metrics.reconciles.labels("Model", "conflict")._value.get() >= 1
            mi = await kube.get(MODEL_INFER, "default", "llama-3-8b")
            assert mi["metadata"]["annotations"]["someone"] == "else"  # the other write kept

            # a pod vanishes while the history is compacted: the informers list again
            victim = "llama-3-8b-0-decode-0-0"
            api.delete("v1", "Pod", victim, "default")
            api.expire_history()

            async def back():
                await kubelet(kube)
                return await kube.get(POD, "default", victim) is not None

            await wait_for_async(
                back, "the deleted pod recreated after the watch expired", within=20
            )
            assert any(i.relists for c in controllers for i in c.informers)
            # Nothing the controllers wrote was a field the CRDs do not have (a cluster
            # drops those, with a warning nobody reads).
            assert api.warnings == []
        finally:
            for c in controllers:
                await c.stop()
            await scaler.close()
            kube.close()
