"""Standalone mode end to end, autoscaling: a Model with `autoscaling` becomes one simulator
process; real HTTP load sent straight to the pods builds a queue (vllm:num_requests_waiting)
and the autoscaler scales the ModelInfer up to new, Ready processes; once the load stops the
ModelInfer returns to one group only after the scale-down stabilization window, and the
surplus processes are gone.

The policy is a named AutoScalingPolicy (the Model's `policyRef`): inline `metrics` take the
policy defaults, whose 5-minute scale-down window is too long for a test."""

from __future__ import annotations

import asyncio
import itertools
import os
import time

import aiohttp
import pytest
import yaml

from infergw.api.names import MODELINFER_LABEL
from infergw.cluster.store import AUTOSCALING_BINDING, MODEL_INFER, POD
from infergw.controllers.app import Standalone
from infergw.controllers.autoscaler import parse_sum
from infergw.controllers.modelinfer_pods import pod_ready
from tests.e2e.standalone_helpers import sim_model, wait_for_cluster

pytestmark = pytest.mark.slow
WINDOW = 8.0  # the scale-down stabilization window, seconds
INTERVAL = 0.5  # the autoscaler's cycle
WAITING = "vllm:num_requests_waiting"
TARGET_WAITING = 4  # waiting requests one replica should carry
CONCURRENCY = 24  # requests kept in flight while the load runs
MAX_TOKENS = 40  # ~0.8 s per request at 20 ms per decode step


def policy() -> dict:
    return {
        "apiVersion": "workload.infergate.io/v1alpha1",
        "kind": "AutoScalingPolicy",
        "metadata": {"name": "tiny-scaling", "namespace": "default"},
        "spec": {
            "metrics": [{"metricName": WAITING, "targetValue": TARGET_WAITING}],
            "tolerancePercent": 10,
            "behavior": {
                "scaleUp": {
                    "stablePolicy": {
                        "instances": 2,
                        "percent": 100,
                        "period": "1s",
                        "stabilizationWindow": "0s",
                    }
                },
                "scaleDown": {
                    "instances": 2,
                    "percent": 100,
                    "period": "1s",
                    "stabilizationWindow": f"{int(WINDOW)}s",
                },
            },
        },
    }


def model() -> dict:
    # two sequences at a time, 20 ms per decode step: a few dozen requests queue
    return sim_model(
        backend={"aggregated": {"replicas": 1}},
        engine_args=["--max-num-seqs=2", "--sim-decode-ms-per-step=20"],
        autoscaling={"minReplicas": 1, "maxReplicas": 3, "policyRef": {"name": "tiny-scaling"}},
    )


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_load_scales_the_modelinfer_up_and_its_end_scales_down_after_the_window(
    tmp_path,
):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "model.yaml").write_text(yaml.safe_dump_all([policy(), model()]))
    app = await Standalone(
        manifests, tmp_path / "state", tmp_path / "pool.yaml", autoscale_interval=INTERVAL
    ).start()
    store, runtime = app.store, app.parts[0]
    timeline: list[tuple[float, int]] = []  # (monotonic time, ModelInfer spec.replicas)
    desired_seen: list[int] = []  # the binding status' desiredReplicas, as it changed
    ready_ips: list[str] = []
    served: dict[str, int] = {}  # pod IP → completed requests
    stop_load = asyncio.Event()
    tasks: list[asyncio.Task] = []

    async def replicas() -> int:
        mi = await store.get(MODEL_INFER, "default", "tiny")
        return int(mi["spec"]["replicas"]) if mi else 0

    async def pods() -> list[dict]:
        return (await store.list(POD, "default", {MODELINFER_LABEL: "tiny"}))[0]

    async def desired() -> int | None:
        b = await store.get(AUTOSCALING_BINDING, "default", "tiny")
        targets = ((b or {}).get("status") or {}).get("targets") or []
        return targets[0].get("desiredReplicas") if targets else None

    async def watch() -> None:
        while True:
            timeline.append((time.monotonic(), await replicas()))
            d = await desired()
            if d is not None and (not desired_seen or desired_seen[-1] != d):
                desired_seen.append(d)
            ready_ips[:] = [p["status"]["podIP"] for p in await pods() if pod_ready(p)]
            await asyncio.sleep(0.05)

    async def load(session: aiohttp.ClientSession, n: int) -> None:
        body = {
            "model": "tiny",
            "prompt": f"request {n}: tell me a story",
            "max_tokens": MAX_TOKENS,
        }
        for i in itertools.count(n):
            if stop_load.is_set():
                return
            if not ready_ips:
                await asyncio.sleep(0.05)
                continue
            ip = ready_ips[i % len(ready_ips)]
            try:
                async with session.post(f"http://{ip}:8000/v1/completions", json=body) as r:
                    if r.status == 200:
                        await r.read()
                        served[ip] = served.get(ip, 0) + 1
                        continue
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            await asyncio.sleep(0.05)  # a pod going away, or not yet serving

    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
    try:
        tasks.append(asyncio.create_task(watch()))

        async def idle_and_ready():
            return len(ready_ips) == 1 and desired_seen[-1:] == [1]

        await wait_for_cluster(
            idle_and_ready, "one Ready pod and the autoscaler's first decision", within=40
        )
        # without load the autoscaler keeps one group
        await asyncio.sleep(3 * INTERVAL)
        assert await replicas() == 1 and desired_seen == [1]
        first = (await pods())[0]["metadata"]["name"]

        t_load = time.monotonic()
        tasks += [asyncio.create_task(load(session, n)) for n in range(CONCURRENCY)]

        async def scaled_up():
            return await replicas() > 1

        await wait_for_cluster(scaled_up, "the ModelInfer to scale up under load", within=20)

        async def three_serving():
            ps = await pods()
            if len(ps) != 3 or not all(pod_ready(p) for p in ps):
                return None
            if any(served.get(p["status"]["podIP"], 0) == 0 for p in ps):
                return None  # Ready, and really answering requests
            return ps

        # the new groups are real processes that become Ready and serve
        serving = await wait_for_cluster(three_serving, "three Ready, serving pods", within=30)
        pids = {}
        for p in serving:
            proc = runtime.process("default", p["metadata"]["name"])
            assert proc is not None and proc.returncode is None
            pids[p["metadata"]["name"]] = proc.pid
        # the load keeps a queue even at full size: the metric the autoscaler sums
        waiting = 0.0
        for p in serving:
            url = f"http://{p['status']['podIP']}:8000/metrics"
            async with session.get(url) as r:
                waiting += parse_sum(await r.text(), {WAITING})[WAITING]
        assert waiting > 2 * TARGET_WAITING, f"only {waiting} requests waiting on 3 pods"
        await asyncio.sleep(2 * INTERVAL)
        assert await replicas() == 3

        t_stop = time.monotonic()
        stop_load.set()
        for t in tasks[1:]:
            t.cancel()  # in-flight requests disconnect; the simulators abort them
        await asyncio.gather(*tasks[1:], return_exceptions=True)

        async def scaled_down():  # as the watcher saw it, so the timeline has the drop
            return timeline[-1][1] == 1

        await wait_for_cluster(scaled_down, "the scale-down", within=WINDOW + 20)
        t_down = next(t for t, r in timeline if t > t_stop and r < 3)

        during_load = [r for t, r in timeline if t_load <= t <= t_stop]
        assert max(during_load) == 3 and all(r <= 3 for _, r in timeline)
        # Once up, the load kept it up: no step down while requests were queueing.
        up_at = next(t for t, r in timeline if r == 3)
        assert all(r == 3 for t, r in timeline if up_at <= t <= t_stop)
        # The last busy sample was taken at most one cycle before the load stopped; the
        # window counts from there. 2 s of margin for slow cycles on a loaded machine.
        assert t_down - t_stop >= WINDOW - 2.0, (
            f"scaled down {t_down - t_stop:.1f}s after the load stopped, "
            f"before the {WINDOW:.0f}s stabilization window"
        )
        assert t_down - t_stop <= WINDOW + 15.0

        # the surplus pods are deleted and their processes are gone; the first one serves on
        async def surplus_gone():
            names = {p["metadata"]["name"] for p in await pods()}
            return names == {first} and all(gone(pid) for n, pid in pids.items() if n != first)

        await wait_for_cluster(surplus_gone, "the surplus pods and processes to go", within=15)
        for n in pids:
            if n != first:
                assert runtime.process("default", n) is None
        proc = runtime.process("default", first)
        assert proc is not None and proc.returncode is None and proc.pid == pids[first]
        assert served, "no request was served"

        # the binding's status followed: 1, up to 3 (perhaps via 2), back to 1
        assert desired_seen[0] == 1 and max(desired_seen) == 3 and desired_seen[-1] == 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
        await app.stop()
