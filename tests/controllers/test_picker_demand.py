"""The autoscaler reads the pickers' demand (requests held for want of a ready pod) over
HTTP, summed over every picker replica of the target's pool — found through the pool's
endpointPickerRef Service (kubernetes) or given per pool (standalone) — and scales a
ModelInfer at zero replicas up to one; a picker that does not answer skips the cycle; with
no demand left it goes back to zero only after the scale-down window. The cluster's way is
run on the in-memory store and over real HTTP through the API emulator (tests/kubeapi.py)
with the controllers' Kubernetes client."""

from __future__ import annotations

import pytest
from aiohttp import web
from kubernetes import client

from infergw.api.names import MODEL_LABEL, PICKER_DEMAND_METRIC
from infergw.cluster.kube_store import KubeStore
from infergw.cluster.store import AUTOSCALING_BINDING, MODEL_INFER, POD, Store
from infergw.controllers.autoscaler import AT_ZERO_INTERVAL, AutoscalerReconciler
from infergw.controllers.memory_store import MemoryStore
from infergw.controllers.picker_demand import picker_metrics_item
from tests.conftest import free_port
from tests.controller_helpers import Clock, binding, modelinfer, policy
from tests.kubeapi import KubeAPIEmulator

PICKER_IPS = ("127.0.0.31", "127.0.0.32")


class FakePickers:
    """Picker replicas' /metrics: the demand gauge per model, settable."""

    def __init__(self) -> None:
        self.port = free_port()
        self.held: dict[str, float] = {}
        self.runners: list[web.AppRunner] = []

    async def start(self, ip: str, held: float) -> str:
        self.held[ip] = held

        async def metrics(_req, ip=ip):
            text = f'{PICKER_DEMAND_METRIC}{{name="pool",model_name="m"}} {self.held[ip]}\n'
            return web.Response(text=f"# TYPE {PICKER_DEMAND_METRIC} gauge\n{text}")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, ip, self.port).start()
        self.runners.append(runner)
        return f"http://{ip}:{self.port}/metrics"

    async def close(self) -> None:
        for r in self.runners:
            await r.cleanup()


async def cold_target(store: MemoryStore) -> None:
    """A ModelInfer at zero replicas, its pool and the pool's picker Service."""
    mi = modelinfer("llm", replicas=0)
    mi["metadata"].setdefault("labels", {})[MODEL_LABEL] = "llm"
    await store.create(mi)
    await store.create(
        {
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": "llm", "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {MODEL_LABEL: "llm"}},
                "targetPorts": [{"number": 8000}],
                "endpointPickerRef": {"name": "llm-epp", "port": {"number": 9002}},
            },
        }
    )
    await store.create(
        policy(
            behavior={
                "scaleUp": {"stablePolicy": {"stabilizationWindow": "30s"}},
                "scaleDown": {"percent": 100, "period": "15s", "stabilizationWindow": "60s"},
            }
        )
    )
    target = {"target": {"kind": "ModelInfer", "name": "llm"}, "minReplicas": 0, "maxReplicas": 4}
    await store.create(binding(homogeneousTarget=target))


async def picker_pods(store: MemoryStore, port: int) -> None:
    await store.create(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "llm-epp", "namespace": "default"},
            "spec": {"selector": {"app.kubernetes.io/name": "llm-epp"}},
        }
    )
    for i, ip in enumerate(PICKER_IPS):
        pod = await store.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"llm-epp-{i}",
                    "namespace": "default",
                    "labels": {"app.kubernetes.io/name": "llm-epp"},
                },
                "spec": {
                    "containers": [
                        {
                            "name": "epp",
                            "ports": [{"name": "http-metrics", "containerPort": port}],
                        }
                    ]
                },
            }
        )
        pod["status"] = {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}
        await store.update_status(pod)


async def size(store: MemoryStore) -> int:
    return (await store.get(MODEL_INFER, "default", "llm"))["spec"]["replicas"]


async def held(rec: AutoscalerReconciler, store: MemoryStore) -> float:
    return await rec.demand.waiting("default", await store.get(MODEL_INFER, "default", "llm"))


@pytest.fixture(params=["memory", "kubernetes"])
async def store(request):
    """The objects in memory, or behind the API emulator through the Kubernetes client."""
    if request.param == "memory":
        yield MemoryStore()
        return
    async with KubeAPIEmulator() as api:
        kube = KubeStore(client.ApiClient(api.client_configuration()))
        try:
            yield kube
        finally:
            kube.close()


@pytest.fixture
async def pickers():
    p = FakePickers()
    yield p
    await p.close()


async def test_every_picker_replicas_demand_scales_from_zero_and_idle_returns_to_zero(
    pickers, store: Store
):
    clock = Clock()
    await cold_target(store)
    await picker_pods(store, pickers.port)
    for ip in PICKER_IPS:
        await pickers.start(ip, 0.0)
    rec = AutoscalerReconciler(store, interval=15, clock=clock)  # kubernetes: via the Service
    try:
        # idle at zero, and looked at again within a second, not a whole interval
        assert await rec.reconcile("default", "b") == AT_ZERO_INTERVAL
        assert await size(store) == 0
        pickers.held[PICKER_IPS[1]] = 2.0  # one replica of two holds requests
        clock.t += 15
        assert await held(rec, store) == 2
        await rec.reconcile("default", "b")
        assert await size(store) == 1  # at once, whatever the 30 s up window
        pickers.held = dict.fromkeys(PICKER_IPS, 1.0)
        clock.t += 15
        assert await held(rec, store) == 2  # summed over the replicas
        # the pod is up and idle, nothing is held: one until the down window has passed
        pickers.held = dict.fromkeys(PICKER_IPS, 0.0)
        clock.t += 15
        await rec.reconcile("default", "b")
        assert await size(store) == 1
        clock.t += 61
        await rec.reconcile("default", "b")
        assert await size(store) == 0
    finally:
        await rec.close()


async def test_standalone_pickers_by_pool_and_a_silent_one_skips_the_cycle(pickers):
    store, clock = MemoryStore(), Clock()
    await cold_target(store)
    url = await pickers.start(PICKER_IPS[0], 3.0)
    silent = f"http://127.0.0.33:{free_port()}/metrics"
    rec = AutoscalerReconciler(store, interval=15, clock=clock, picker_metrics={"llm": [silent]})
    try:
        await rec.reconcile("default", "b")
        assert await size(store) == 0
        b = await store.get(AUTOSCALING_BINDING, "default", "b")
        ready = next(c for c in b["status"]["conditions"] if c["type"] == "Ready")
        assert ready["reason"] == "MetricsUnavailable"
        rec.demand.static = {"llm": [url]}
        await rec.reconcile("default", "b")
        assert await size(store) == 1
    finally:
        await rec.close()
    assert (await store.list(POD, "default"))[0] == []
    assert picker_metrics_item("llm=http://127.0.0.1:9/metrics") == (
        "llm",
        "http://127.0.0.1:9/metrics",
    )
