"""A multi-node Model and a gang through the Kubernetes API (the official client over real
HTTP to the API emulator, tests/kubeapi.py): what a cluster would run for `workerReplicas`.
The entry pod serves and is the pool's only member; its worker joins its engine at the
address of the headless Service named after the entry, which resolves to the entry alone and
before it is ready; the worker carries neither the pool's selector label nor a serving port
or probe. A gang's pods reach Volcano with their PodGroup and task named."""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import AsyncIterator

import yaml
from kubernetes import client

from infergw.api.names import ENTRY_LABEL, MODEL_LABEL
from infergw.cluster.kube_store import KubeStore
from infergw.cluster.pool import PoolSpec, members
from infergw.cluster.store import (
    INFERENCE_POOL,
    MODEL,
    MODEL_INFER,
    POD,
    POD_GROUP,
    SERVICE,
    Store,
)
from infergw.controllers import modelinfer_pods as mp
from infergw.controllers.app import build_controllers
from infergw.controllers.runner import ControllerMetrics
from tests.kubeapi import KubeAPIEmulator
from tests.paths import CRD_EXAMPLES
from tests.waiting import wait_for_async

NAME, NS = "llama-3-8b", "default"


async def kubelet(store: Store, ips: itertools.count) -> None:
    """Every pod without status runs, ready, at an address of its own."""
    pods, _ = await store.list(POD, NS)
    for p in pods:
        if (p.get("status") or {}).get("phase"):
            continue
        p = copy.deepcopy(p)
        p["status"] = {
            "phase": "Running",
            "podIP": f"10.0.0.{next(ips)}",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "engine", "restartCount": 0, "ready": True}],
        }
        await store.update_status(p)


def env(pod: dict) -> dict[str, str]:
    [engine] = [c for c in pod["spec"]["containers"] if c["name"] == "engine"]
    return {e["name"]: e.get("value", "") for e in engine.get("env") or []}


@contextlib.asynccontextmanager
async def controllers_on(created: dict) -> AsyncIterator[KubeStore]:
    """The controllers over the emulator's API, `created` written there."""
    async with KubeAPIEmulator() as api:
        kube = KubeStore(client.ApiClient(api.client_configuration()), watch_timeout=30)
        controllers, scaler = build_controllers(kube, ControllerMetrics())
        for c in controllers:
            await c.start()
        try:
            await kube.create(created)
            yield kube
        finally:
            for c in controllers:
                await c.stop()
            await scaler.close()
            kube.close()


async def until_ready(kube: KubeStore, kind, what: str) -> None:
    ips = itertools.count(1)

    async def ready():
        await kubelet(kube, ips)
        got = await kube.get(kind, NS, NAME)
        return (got.get("status") or {}).get("readyReplicas") == 1

    await wait_for_async(ready, what, within=20)


def engine_args(pod: dict) -> list[str]:
    [engine] = [c for c in pod["spec"]["containers"] if c["name"] == "engine"]
    return engine["args"]


async def test_workers_join_their_entry_and_stay_out_of_the_pool():
    model = yaml.safe_load((CRD_EXAMPLES / "model.yaml").read_text())
    del model["spec"]["autoscaling"]
    model["spec"]["replicas"] = 1
    model["spec"]["backend"]["decode"]["workerReplicas"] = 1
    async with controllers_on(model) as kube:
        await until_ready(kube, MODEL, "the multi-node Model's group ready")
        pods = {p["metadata"]["name"]: p for p in (await kube.list(POD, NS))[0]}
        entry, worker = f"{NAME}-0-decode-0-0", f"{NAME}-0-decode-0-1"
        assert set(pods) == {f"{NAME}-0-prefill-0-0", entry, worker}

        # the pool: the entries, never the worker (not selected, and not a member if it were)
        pool = PoolSpec.from_object(await kube.get(INFERENCE_POOL, NS, NAME))
        assert {m.pod for m in members(pool, pods.values())} == {
            f"{NAME}-0-prefill-0-0",
            entry,
        }
        labels = pods[worker]["metadata"]["labels"]
        assert MODEL_LABEL not in labels and labels[ENTRY_LABEL] == "false"
        assert not pool.selects(labels)

        # the worker joins the entry's engine at the entry's Service
        address = env(pods[worker])["ENTRY_ADDRESS"]
        assert address == f"{entry}.{NS}"
        svc = await kube.get(SERVICE, NS, address.split(".")[0])
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["publishNotReadyAddresses"] is True
        selector = svc["spec"]["selector"].items()
        resolves_to = [
            n
            for n, p in pods.items()
            if all(p["metadata"]["labels"].get(k) == v for k, v in selector)
        ]
        assert resolves_to == [entry]
        args = engine_args(pods[worker])
        assert "--master-addr=$(ENTRY_ADDRESS)" in args and "--headless" in args
        assert env(pods[worker])["WORKER_INDEX"] == "1"
        assert "--node-rank=$(WORKER_INDEX)" in args and "--nnodes=2" in args
        assert "--node-rank=0" in engine_args(pods[entry])
        [engine] = pods[worker]["spec"]["containers"]  # no P/D sidecar: it serves nothing
        assert "ports" not in engine and "readinessProbe" not in engine
        # the P/D sidecar, and the runtime sidecar for the Model's LoRA adapter
        entry_containers = [c["name"] for c in pods[entry]["spec"]["containers"]]
        assert entry_containers == ["engine", "connector", "runtime"]


async def test_a_gang_reaches_volcano_through_the_api():
    """gangPolicy alone: the pods name Volcano as scheduler, their group's PodGroup and
    their role as its task; the PodGroup asks minRoleReplicas of each role."""
    mi = yaml.safe_load((CRD_EXAMPLES / "modelinfer.yaml").read_text())
    del mi["spec"]["schedulerName"]
    mi["spec"]["replicas"] = 1
    mi["spec"]["gangPolicy"] = {"enabled": True, "minRoleReplicas": {"decode": 1}}
    mi["spec"]["template"]["roles"][1]["replicas"] = 3
    async with controllers_on(mi) as kube:
        await until_ready(kube, MODEL_INFER, "the gang's group ready")
        group = await kube.get(POD_GROUP, NS, f"{NAME}-0")
        assert group["spec"]["minMember"] == 2  # prefill 1 + decode min(1, 3)
        assert group["spec"]["minTaskMember"] == {"prefill": 1, "decode": 1}
        pods, _ = await kube.list(POD, NS)
        assert len(pods) == 4
        for p in pods:
            assert p["spec"]["schedulerName"] == "volcano"
            notes = p["metadata"]["annotations"]
            assert notes[mp.GANG_ANNOTATION] == f"{NAME}-0"
            assert notes[mp.TASK_ANNOTATION] == p["metadata"]["labels"]["infergate.io/role"]
