"""The standalone kubelet: pods become real processes on their own loopback address, report
readiness from their probe, restart per restartPolicy and stop when deleted."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import aiohttp
import pytest

from controllers.local_runtime import LocalRuntime
from controllers.memory_store import MemoryStore
from controllers.store import POD

pytestmark = pytest.mark.slow


def sim_pod(name: str, **spec) -> dict:
    container = {
        "name": "engine",
        "args": ["--host", "$(POD_IP)", "--port", "8000", "--served-model-name", "$(MODEL)"],
        "env": [  # as in Kubernetes, $(VAR) sees only the entries before it
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "MODEL", "value": "m-$(POD_NAME)"},
        ],
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}},
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"containers": [container], **spec},
    }


async def wait_status(store, name, check, within=30.0) -> dict:
    deadline = time.monotonic() + within
    while True:
        pod = await store.get(POD, "default", name)
        if pod and check(pod.get("status") or {}):
            return pod
        assert time.monotonic() < deadline, (
            f"{name}: status never matched: {pod and pod.get('status')}"
        )
        await asyncio.sleep(0.05)


def ready(status) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))


@pytest.fixture
async def runtime(tmp_path):
    store = MemoryStore()
    rt = LocalRuntime(store, tmp_path, max_backoff=0.5, probe_interval=0.05)
    await rt.start()
    yield store, rt
    await rt.stop()


async def test_a_pod_runs_on_its_own_address_and_restarts_when_killed(runtime, tmp_path):
    store, rt = runtime
    await store.create(sim_pod("a"))
    await store.create(sim_pod("b"))
    a = await wait_status(store, "a", ready)
    b = await wait_status(store, "b", ready)
    assert a["status"]["podIP"] != b["status"]["podIP"]  # both listen on :8000
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{a['status']['podIP']}:8000/v1/models") as r:
            assert (await r.json())["data"][0]["id"] == "m-a"  # $(VAR) and fieldRef expanded
    os.killpg(rt.process("default", "a").pid, signal.SIGKILL)
    a = await wait_status(
        store, "a", lambda st: st["containerStatuses"][0]["restartCount"] == 1 and ready(st)
    )
    assert (tmp_path / "pods" / "default_a.log").stat().st_size > 0
    proc = rt.process("default", "b")
    await store.delete(POD, "default", "b")
    await asyncio.wait_for(proc.wait(), 15)


async def test_restart_policy_never_leaves_a_failed_pod(runtime):
    store, _ = runtime
    pod = sim_pod("c", restartPolicy="Never")
    pod["spec"]["containers"][0]["command"] = [sys.executable, "-c", "raise SystemExit(3)"]
    pod["spec"]["containers"][0]["args"] = []
    await store.create(pod)
    pod = await wait_status(store, "c", lambda st: st.get("phase") == "Failed")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
