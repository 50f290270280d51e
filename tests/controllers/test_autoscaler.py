"""The autoscaler reconciler against pods that serve real /metrics over HTTP: it sums the
policy's metrics over ready pods, writes ModelInfer or role sizes, splits by cost, keeps
the prefill/decode ratio, and skips a cycle when a pod does not answer; its status says so with
Ready, TargetFound and RatioConstraintViolated, and per target what it decided."""

from __future__ import annotations

import pytest
from aiohttp import web

from infergw.api.engines import metric_name, metrics_path
from infergw.api.names import ENGINE_LABEL, ENTRY_LABEL
from infergw.cluster.store import AUTOSCALING_BINDING, AUTOSCALING_POLICY, MODEL_INFER, POD
from infergw.controllers.autoscaler import AutoscalerReconciler, parse_sum
from infergw.controllers.memory_store import MemoryStore
from tests.conftest import free_port
from tests.controller_helpers import Clock, binding, conds, modelinfer, policy, since, summary


class FakePods:
    """One HTTP server per pod address, answering /metrics with a settable queue length (or,
    for trtllm-serve, /prometheus/metrics in its names)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.waiting: dict[str, float] = {}
        self.runners: list[web.AppRunner] = []

    async def add(
        self,
        store,
        mi: str,
        name: str,
        ip: str,
        role: str = "server",
        waiting=0.0,
        labels: dict[str, str] | None = None,
    ):
        self.waiting[ip] = waiting
        engine = (labels or {}).get(ENGINE_LABEL, "vllm")
        metric = metric_name(engine, "waiting")

        async def metrics(_req, ip=ip):
            return web.Response(text=f'{metric}{{model_name="m"}} {self.waiting[ip]}\n')

        app = web.Application()
        app.router.add_get(metrics_path(engine), metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, ip, self.port).start()
        self.runners.append(runner)
        pod = await store.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": "default",
                    "labels": {
                        "infergate.io/modelinfer": mi,
                        "infergate.io/role": role,
                        **(labels or {}),
                    },
                },
                "spec": {"containers": [{"name": "e", "ports": [{"containerPort": self.port}]}]},
            }
        )
        pod["status"] = {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}
        await store.update_status(pod)

    async def close(self):
        for r in self.runners:
            await r.cleanup()


async def get_binding(store):
    return await store.get(AUTOSCALING_BINDING, "default", "b")


@pytest.fixture
async def env():
    store, pods, clock = MemoryStore(), FakePods(), Clock()
    rec = AutoscalerReconciler(store, interval=15, clock=clock)
    yield store, pods, clock, rec
    await rec.close()
    await pods.close()


async def replicas(store, name="llm", role=None) -> int:
    mi = await store.get(MODEL_INFER, "default", name)
    if role:
        return next(r["replicas"] for r in mi["spec"]["template"]["roles"] if r["name"] == role)
    return mi["spec"]["replicas"]


async def test_scales_up_within_the_step_limit_then_down_after_the_window(env):
    store, pods, clock, rec = env
    await store.create(modelinfer("llm", replicas=2))
    await pods.add(store, "llm", "a", "127.0.0.11", waiting=20)
    await pods.add(store, "llm", "b", "127.0.0.12", waiting=20)
    await store.create(
        policy(
            behavior={"scaleDown": {"percent": 100, "period": "15s", "stabilizationWindow": "60s"}}
        )
    )
    target = {"target": {"kind": "ModelInfer", "name": "llm"}, "minReplicas": 1, "maxReplicas": 20}
    await store.create(binding(homogeneousTarget=target))
    # 40 waiting / 4 = 10 wanted; stable scale-up allows max(2 + 1, 2 × 2) = 4 this period
    assert await rec.reconcile("default", "b") == 15
    assert await replicas(store) == 4
    status = (await store.get(AUTOSCALING_BINDING, "default", "b"))["status"]
    # the decision and its inputs: 40 waiting read, 10 recommended, the step bound held it
    assert status["targets"][0] == {
        "name": "llm",
        "currentReplicas": 2,
        "desiredReplicas": 4,
        "mode": "Stable",
        "lastScaleTime": status["targets"][0]["lastScaleTime"],
        "metrics": [{"name": "vllm:num_requests_waiting", "value": "40"}],
        "recommendedReplicas": 10,
        "reason": "RateLimited",
    }
    pods.waiting = dict.fromkeys(pods.waiting, 0.0)
    clock.t += 30
    await rec.reconcile("default", "b")
    assert await replicas(store) == 4  # the window still holds the high recommendation
    [held] = (await get_binding(store))["status"]["targets"]
    assert (held["recommendedReplicas"], held["reason"]) == (0, "StabilizationWindow")
    assert held["metrics"] == [{"name": "vllm:num_requests_waiting", "value": "0"}]
    clock.t += 61
    await rec.reconcile("default", "b")
    assert await replicas(store) == 1
    [down] = (await get_binding(store))["status"]["targets"]
    assert (down["desiredReplicas"], down["reason"]) == (1, "MinReplicas")


async def test_panic_scales_past_the_stable_limit(env):
    store, pods, _clock, rec = env
    await store.create(modelinfer("llm", replicas=1))
    await pods.add(store, "llm", "a", "127.0.0.21", waiting=40)
    await store.create(
        policy(
            behavior={"scaleUp": {"panicPolicy": {"panicThresholdPercent": 200, "percent": 1000}}}
        )
    )
    target = {"target": {"kind": "ModelInfer", "name": "llm"}, "minReplicas": 1, "maxReplicas": 20}
    await store.create(binding(homogeneousTarget=target))
    await rec.reconcile("default", "b")
    assert await replicas(store) == 10  # rec 10 ≥ 1 × 200%: panic allows up to 11
    status = (await store.get(AUTOSCALING_BINDING, "default", "b"))["status"]
    assert status["targets"][0]["mode"] == "Panic"


async def test_a_silent_pod_skips_the_cycle(env):
    store, pods, _clock, rec = env
    await store.create(modelinfer("llm", replicas=2))
    await pods.add(store, "llm", "a", "127.0.0.31", waiting=40)
    await pods.runners.pop().cleanup()  # it stops answering
    await store.create(policy())
    target = {"target": {"kind": "ModelInfer", "name": "llm"}, "minReplicas": 1, "maxReplicas": 9}
    await store.create(binding(homogeneousTarget=target))
    await rec.reconcile("default", "b")
    assert await replicas(store) == 2
    b = await get_binding(store)
    assert summary(b) == {
        "Ready": ("False", "MetricsUnavailable"),
        "TargetFound": ("True", "TargetsFound"),
    }
    assert conds(b)["Ready"]["message"].startswith("cycle skipped: a: ")
    assert b["status"]["targets"] == []  # nothing was decided


async def test_trtllm_serve_is_read_at_its_path_and_workers_are_not_asked(env):
    """A trtllm-serve pod's numbers are at /prometheus/metrics; a worker pod serves no
    metrics (its entry speaks for the group), so its silence skips no cycle."""
    store, pods, _clock, rec = env
    await store.create(modelinfer("llm", replicas=1))
    trt = {ENGINE_LABEL: "trtllm-serve"}
    await pods.add(store, "llm", "entry", "127.0.0.41", waiting=20, labels=trt)
    await pods.add(store, "llm", "worker", "127.0.0.42", labels={**trt, ENTRY_LABEL: "false"})
    await pods.runners.pop().cleanup()  # the worker answers nothing
    await store.create(policy(metrics=[{"metricName": "waiting", "targetValue": 4}]))
    target = {"target": {"kind": "ModelInfer", "name": "llm"}, "minReplicas": 1, "maxReplicas": 9}
    await store.create(binding(homogeneousTarget=target))
    await rec.reconcile("default", "b")
    assert summary(await get_binding(store))["Ready"][0] == "True"
    assert await replicas(store) > 1  # 20 waiting / 4


async def test_prefill_decode_roles_keep_their_ratio(env, wall):
    store, pods, _clock, rec = env
    await store.create(modelinfer("llm", replicas=1))  # roles prefill (1) and decode (2)
    await pods.add(store, "llm", "p", "127.0.0.41", role="prefill", waiting=0)
    await pods.add(store, "llm", "d1", "127.0.0.42", role="decode", waiting=12)
    await pods.add(store, "llm", "d2", "127.0.0.43", role="decode", waiting=12)
    await store.create(policy(behavior={"scaleDown": {"stabilizationWindow": "0s"}}))

    def side(role, hi):
        return {
            "target": {"kind": "ModelInfer", "name": "llm", "role": role},
            "minReplicas": 1,
            "maxReplicas": hi,
        }

    await store.create(
        binding(
            prefillDecode={
                "prefill": side("prefill", 8),
                "decode": side("decode", 8),
                "ratio": {"min": 0.5, "max": 2},
            }
        )
    )
    await rec.reconcile("default", "b")
    # decode: 24 / 4 = 6 wanted, limited to max(2 + 1, 4) = 4; prefill idle → 1, raised to 4 × 0.5
    assert await replicas(store, role="decode") == 4
    assert await replicas(store, role="prefill") == 2
    b = await get_binding(store)
    assert summary(b) == {
        "Ready": ("True", "Scaling"),
        "TargetFound": ("True", "TargetsFound"),
        "RatioConstraintViolated": ("True", "RatioEnforced"),
    }
    assert conds(b)["RatioConstraintViolated"]["message"] == (
        "prefill/decode kept within [0.5, 2]: prefill 1 -> 2, decode 4 -> 4"
    )
    assert conds(b)["TargetFound"]["message"] == (
        "found ModelInfer llm role prefill, ModelInfer llm role decode"
    )
    targets = [{k: v for k, v in t.items() if k != "lastScaleTime"} for t in b["status"]["targets"]]
    assert targets == [
        {
            "name": "llm",
            "role": "prefill",
            "currentReplicas": 1,
            "desiredReplicas": 2,
            "mode": "Stable",
            "metrics": [{"name": "vllm:num_requests_waiting", "value": "0"}],
            "recommendedReplicas": 0,
            "reason": "Ratio",  # idle, raised to keep the ratio
        },
        {
            "name": "llm",
            "role": "decode",
            "currentReplicas": 2,
            "desiredReplicas": 4,
            "mode": "Stable",
            "metrics": [{"name": "vllm:num_requests_waiting", "value": "24"}],
            "recommendedReplicas": 6,
            "reason": "RateLimited",
        },
    ]
    assert all("lastScaleTime" in t for t in b["status"]["targets"])
    enforced = since(b)["RatioConstraintViolated"]
    # the load fits 2 prefill and 4 decode: no role needs raising
    wall.tick()
    pods.waiting.update({"127.0.0.41": 8.0, "127.0.0.42": 8.0, "127.0.0.43": 8.0})
    await rec.reconcile("default", "b")
    b = await get_binding(store)
    assert summary(b)["RatioConstraintViolated"] == ("False", "WithinRatio")
    assert conds(b)["RatioConstraintViolated"]["message"] == (
        "prefill 2 / decode 4 is within [0.5, 2]"
    )
    assert since(b)["RatioConstraintViolated"] == wall() != enforced
    # prefill may not grow past 1: the ratio cannot be met
    wall.tick()
    b["spec"]["prefillDecode"]["prefill"]["maxReplicas"] = 1
    await store.update(b)
    await rec.reconcile("default", "b")
    b = await get_binding(store)
    assert await replicas(store, role="prefill") == 1
    assert summary(b)["RatioConstraintViolated"] == ("True", "RatioUnsatisfiable")
    assert conds(b)["RatioConstraintViolated"]["message"] == (
        "prefill 1 / decode 4 is outside [0.5, 2]: maxReplicas (prefill 1, decode 8) "
        "stops the role that is short"
    )
    assert conds(b)["RatioConstraintViolated"]["observedGeneration"] == 2


async def test_several_targets_share_one_recommendation_cheapest_first(env):
    store, pods, _clock, rec = env
    await store.create(modelinfer("big", replicas=1))
    await store.create(modelinfer("small", replicas=1))
    await pods.add(store, "big", "b1", "127.0.0.51", waiting=10)
    await pods.add(store, "small", "s1", "127.0.0.52", waiting=10)
    await store.create(policy(behavior={"scaleUp": {"stablePolicy": {"percent": 1000}}}))
    targets = [
        {
            "target": {"kind": "ModelInfer", "name": "big"},
            "minReplicas": 1,
            "maxReplicas": 5,
            "cost": 10,
        },
        {
            "target": {"kind": "ModelInfer", "name": "small"},
            "minReplicas": 1,
            "maxReplicas": 5,
            "cost": 2,
        },
    ]
    await store.create(
        binding(heterogeneousTarget={"targets": targets, "costExpansionRatePercent": 200})
    )
    await rec.reconcile("default", "b")
    # 20 waiting / 4 = 5 in all: minimums 1 + 1, then the cheap target's packages 1 and 2
    assert (await replicas(store, "big"), await replicas(store, "small")) == (1, 4)
    pods_left, _ = await store.list(POD)
    assert len(pods_left) == 2


async def test_ready_and_target_found_follow_the_policy_and_the_target(env, wall):
    store, pods, _clock, rec = env
    await store.create(policy())
    target = {"target": {"kind": "ModelInfer", "name": "llm"}, "minReplicas": 1, "maxReplicas": 4}
    await store.create(binding(homogeneousTarget=target))
    assert await rec.reconcile("default", "b") == 15
    b = await get_binding(store)
    assert summary(b) == {
        "Ready": ("False", "TargetNotFound"),
        "TargetFound": ("False", "TargetNotFound"),
    }
    assert conds(b)["TargetFound"]["message"] == "ModelInfer llm not found"
    assert b["status"]["observedGeneration"] == 1 and b["status"]["targets"] == []
    assert all(c["observedGeneration"] == 1 for c in b["status"]["conditions"])
    born = since(b)
    # the target appears, its load right for its size (8 waiting / 4 = 2 replicas)
    wall.tick()
    await store.create(modelinfer("llm", replicas=2))
    await pods.add(store, "llm", "a", "127.0.0.61", waiting=4)
    await pods.add(store, "llm", "b", "127.0.0.62", waiting=4)
    await rec.reconcile("default", "b")
    b = await get_binding(store)
    assert summary(b) == {"Ready": ("True", "Scaling"), "TargetFound": ("True", "TargetsFound")}
    assert b["status"]["targets"] == [
        {
            "name": "llm",
            "currentReplicas": 2,
            "desiredReplicas": 2,
            "mode": "Stable",
            "metrics": [{"name": "vllm:num_requests_waiting", "value": "8"}],
            "recommendedReplicas": 2,
            "reason": "WithinTolerance",
        }
    ]
    found = since(b)
    assert found["Ready"] == found["TargetFound"] == wall() != born["Ready"]
    # the same again: nothing is written
    wall.tick()
    rv = b["metadata"]["resourceVersion"]
    await rec.reconcile("default", "b")
    assert (await get_binding(store))["metadata"]["resourceVersion"] == rv
    # a spec edit is observed; the conditions keep their transition times
    b["spec"]["homogeneousTarget"]["maxReplicas"] = 9
    await store.update(b)
    await rec.reconcile("default", "b")
    b = await get_binding(store)
    assert b["status"]["observedGeneration"] == 2
    assert all(c["observedGeneration"] == 2 for c in b["status"]["conditions"])
    assert since(b) == found
    # the policy goes: not Ready, the target still found, the last decisions kept
    wall.tick()
    await store.delete(AUTOSCALING_POLICY, "default", "p")
    await rec.reconcile("default", "b")
    b = await get_binding(store)
    assert summary(b) == {
        "Ready": ("False", "PolicyNotFound"),
        "TargetFound": ("True", "TargetsFound"),
    }
    assert conds(b)["Ready"]["message"] == "policy p not found"
    assert since(b)["TargetFound"] == found["TargetFound"]
    assert since(b)["Ready"] == wall()
    assert b["status"]["targets"][0]["desiredReplicas"] == 2


async def test_a_role_that_does_not_exist_is_reported_not_scaled(env):
    store, pods, _clock, rec = env
    await store.create(modelinfer("llm", replicas=1))
    await pods.add(store, "llm", "d", "127.0.0.71", role="decode", waiting=4)
    await store.create(policy())

    def side(role):
        return {
            "target": {"kind": "ModelInfer", "name": "llm", "role": role},
            "minReplicas": 1,
            "maxReplicas": 4,
        }

    await store.create(binding(prefillDecode={"prefill": side("nope"), "decode": side("decode")}))
    assert await rec.reconcile("default", "b") == 15
    b = await get_binding(store)
    assert summary(b) == {
        "Ready": ("False", "TargetNotFound"),
        "TargetFound": ("False", "TargetNotFound"),
    }
    assert conds(b)["TargetFound"]["message"] == "role nope not found in ModelInfer llm"
    assert await replicas(store, role="decode") == 2  # untouched


def test_metric_text_sums_samples_skipping_timestamps_and_non_numbers():
    text = "\n".join(
        [
            "# HELP vllm:num_requests_waiting waiting",
            'vllm:num_requests_waiting{model_name="a"} 3',
            'vllm:num_requests_waiting{model_name="b",path="/x y"} 2 1700000000000',  # timestamp
            'vllm:num_requests_waiting{model_name="c"} NaN',
            'vllm:num_requests_waiting{model_name="d"} +Inf',
            "vllm:num_requests_running 4",
            "vllm:num_requests_running_total 100",  # another metric, not summed in
        ]
    )
    sums = parse_sum(text, {"vllm:num_requests_waiting", "vllm:num_requests_running"})
    assert sums == {"vllm:num_requests_waiting": 5.0, "vllm:num_requests_running": 4.0}
