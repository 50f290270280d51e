"""Helpers for reconcile tests: a ModelInfer factory, and a stand-in for the kubelet that
marks pods running and ready (on a real cluster the kubelet does; in standalone mode the
local process runtime does)."""

from __future__ import annotations

import copy

from infergw.cluster.store import POD, Obj, Store


def modelinfer(name: str = "llm", replicas: int = 2, **spec) -> Obj:
    roles = [
        {
            "name": "prefill",
            "replicas": 1,
            "workerReplicas": 1,
            "entryTemplate": {
                "metadata": {"labels": {"app": "llm"}},
                "spec": {"containers": [{"name": "engine", "image": "vllm:1"}]},
            },
            "workerTemplate": {"spec": {"containers": [{"name": "engine", "image": "vllm:1"}]}},
        },
        {
            "name": "decode",
            "replicas": 2,
            "workerReplicas": 0,
            "entryTemplate": {"spec": {"containers": [{"name": "engine", "image": "vllm:1"}]}},
        },
    ]
    return {
        "apiVersion": "workload.infergate.io/v1alpha1",
        "kind": "ModelInfer",
        "metadata": {"name": name, "namespace": "default", "labels": {"infergate.io/model": name}},
        "spec": {"replicas": replicas, "template": {"roles": roles}, **spec},
    }


async def kubelet(store: Store, *, ready: bool = True) -> int:
    """Mark every pod without status Running (and Ready); returns how many changed."""
    pods, _ = await store.list(POD)
    changed = 0
    for p in pods:
        if p.get("status", {}).get("phase"):
            continue
        p = copy.deepcopy(p)
        p["status"] = {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [{"name": "engine", "restartCount": 0, "ready": ready}],
        }
        await store.update_status(p)
        changed += 1
    return changed


async def settle(reconciler, store: Store, name: str, *, passes: int = 50, ready=True) -> int:
    """Reconcile and let the kubelet start pods until nothing changes; returns the passes."""
    for n in range(1, passes + 1):
        again = await reconciler.reconcile("default", name)
        started = await kubelet(store, ready=ready)
        if again is None and started == 0:
            return n
    raise AssertionError(f"{name} did not settle in {passes} passes")


class Wall:
    """Stands in for the wall clock conditions are stamped with: moves only on tick()."""

    def __init__(self) -> None:
        self.t = 0

    def __call__(self) -> str:
        return f"2030-01-01T00:{self.t // 60:02d}:{self.t % 60:02d}Z"

    def tick(self) -> None:
        self.t += 1


def conds(obj) -> dict[str, dict]:
    return {c["type"]: c for c in obj["status"]["conditions"]}


def summary(obj) -> dict[str, tuple[str, str]]:
    return {t: (c["status"], c["reason"]) for t, c in conds(obj).items()}


def since(obj) -> dict[str, str]:
    return {t: c["lastTransitionTime"] for t, c in conds(obj).items()}


WORKLOAD = "workload.infergate.io/v1alpha1"


def policy(**spec) -> dict:
    return {
        "apiVersion": WORKLOAD,
        "kind": "AutoScalingPolicy",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {
            "metrics": [{"metricName": "vllm:num_requests_waiting", "targetValue": 4}],
            **spec,
        },
    }


def binding(**spec) -> dict:
    return {
        "apiVersion": WORKLOAD,
        "kind": "AutoScalingPolicyBinding",
        "metadata": {"name": "b", "namespace": "default"},
        "spec": {"policyRef": {"name": "p"}, **spec},
    }


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t
