"""The ModelInfer reconciler on the in-memory store: groups, roles, entry and worker pods,
services, scaling order, rolling updates within maxUnavailable and partition, recovery, and
the status conditions (Available, Progressing, UpdateInProgress) each of them leads to."""

from __future__ import annotations

import asyncio
import copy
import io

import pytest

from infergw.api import ModelInfer, from_dict_as
from infergw.api.names import (
    ENTRY_LABEL,
    GROUP_LABEL,
    MODEL_LABEL,
    MODELINFER_LABEL,
    REVISION_LABEL,
    ROLE_INDEX_LABEL,
    ROLE_LABEL,
)
from infergw.cluster.store import MODEL_INFER, POD, POD_GROUP, SERVICE
from infergw.controllers import modelinfer_pods as mp
from infergw.controllers.memory_store import MemoryStore
from infergw.controllers.modelinfer import DOWNLOAD_LOOK_AGAIN, ModelInferReconciler
from infergw.controllers.runner import Controller, own_key, owner_key
from infergw.fetch.progress import Progress
from tests.controller_helpers import conds, kubelet, modelinfer, settle, since, summary


def typed(mi: dict) -> ModelInfer:
    """The ModelInfer as the reconciler reads it."""
    return from_dict_as(ModelInfer, mi)


@pytest.fixture
async def env():
    store = MemoryStore()
    return store, ModelInferReconciler(store)


async def get_mi(store, name="llm"):
    return await store.get(MODEL_INFER, "default", name)


async def pods_of(store, name="llm"):
    pods, _ = await store.list(POD, "default", {MODELINFER_LABEL: name})
    return {p["metadata"]["name"]: p for p in pods}


def env_of(pod) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}


async def edit(store, name, change) -> None:
    mi = await store.get(MODEL_INFER, "default", name)
    change(mi["spec"])
    await store.update(mi)


async def test_groups_roles_entry_and_worker_pods(env):
    store, rec = env
    await store.create(modelinfer(replicas=2))
    await settle(rec, store, "llm")
    pods = await pods_of(store)
    # per group: prefill 1 instance × (entry + 1 worker) + decode 2 instances × entry
    assert sorted(pods) == sorted(
        f"llm-{g}-{r}"
        for g in (0, 1)
        for r in ("prefill-0-0", "prefill-0-1", "decode-0-0", "decode-1-0")
    )
    worker = pods["llm-1-prefill-0-1"]
    labels = worker["metadata"]["labels"]
    assert labels[GROUP_LABEL] == "llm-1" and labels[ROLE_LABEL] == "prefill"
    assert labels[ENTRY_LABEL] == "false" and labels[ROLE_INDEX_LABEL] == "0"
    # a worker is no pool member: not the Model's label the pool selects by (the entry has it)
    assert MODEL_LABEL not in labels and "app" not in labels  # the worker template has none
    assert pods["llm-1-prefill-0-0"]["metadata"]["labels"][MODEL_LABEL] == "llm"
    assert env_of(worker) == {
        "GROUP_SIZE": "2",
        "ENTRY_ADDRESS": "llm-1-prefill-0-0.default",
        "WORKER_INDEX": "1",
    }
    assert pods["llm-0-prefill-0-0"]["metadata"]["labels"]["app"] == "llm"
    mi = await store.get(MODEL_INFER, "default", "llm")
    assert worker["metadata"]["ownerReferences"][0]["uid"] == mi["metadata"]["uid"]
    services, _ = await store.list(SERVICE, "default")
    assert len(services) == 6 and all(s["spec"]["clusterIP"] == "None" for s in services)
    # ENTRY_ADDRESS resolves to the entry alone, before it is ready (it waits for its workers)
    entry_svc = next(s for s in services if s["metadata"]["name"] == "llm-1-prefill-0-0")
    assert entry_svc["spec"]["publishNotReadyAddresses"] is True
    selector = entry_svc["spec"]["selector"].items()
    selected = [
        n for n, p in pods.items() if all(p["metadata"]["labels"].get(k) == v for k, v in selector)
    ]
    assert selected == ["llm-1-prefill-0-0"]
    st = mi["status"]
    assert st["replicas"] == st["readyReplicas"] == st["updatedReplicas"] == 2
    assert st["observedGeneration"] == 1 and st["labelSelector"] == "infergate.io/modelinfer=llm"
    assert {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]} == {
        "Available": ("True", "MinimumGroupsReady"),
        "Progressing": ("False", "AllGroupsReady"),
        "UpdateInProgress": ("False", "UpToDate"),
    }
    assert st["availableReplicas"] == st["currentReplicas"] == 2
    assert st["currentRevision"] == st["updateRevision"] == mp.revision(typed(mi))


async def test_reconcile_is_idempotent(env):
    store, rec = env
    await store.create(modelinfer())
    await settle(rec, store, "llm")
    _, rv = await store.list(POD)
    for _ in range(3):
        assert await rec.reconcile("default", "llm") is None
    assert (await store.list(POD))[1] == rv  # nothing was written


async def test_scale_down_takes_not_ready_groups_first_then_the_highest(env):
    store, rec = env
    await store.create(modelinfer(replicas=4))
    await settle(rec, store, "llm")
    # group 1 loses readiness
    p = (await pods_of(store))["llm-1-decode-1-0"]
    p["status"]["conditions"][0]["status"] = "False"
    await store.update_status(p)
    await edit(store, "llm", lambda s: s.update(replicas=2))
    await settle(rec, store, "llm")
    groups = {p["metadata"]["labels"][GROUP_LABEL] for p in (await pods_of(store)).values()}
    assert groups == {"llm-0", "llm-2"}
    services, _ = await store.list(SERVICE, "default")
    assert {s["metadata"]["labels"][GROUP_LABEL] for s in services} == {"llm-0", "llm-2"}
    await edit(store, "llm", lambda s: s.update(replicas=3))
    await settle(rec, store, "llm")
    groups = {p["metadata"]["labels"][GROUP_LABEL] for p in (await pods_of(store)).values()}
    assert groups == {"llm-0", "llm-1", "llm-2"}  # the lowest free ordinal comes back


async def test_rolling_update_respects_max_unavailable_and_partition(env):
    store, rec = env
    strategy = {"rollingUpdateConfiguration": {"maxUnavailable": 1, "partition": 1}}
    await store.create(modelinfer(replicas=4, rolloutStrategy=strategy))
    await settle(rec, store, "llm")
    old = mp.revision(typed(await store.get(MODEL_INFER, "default", "llm")))

    def new_image(spec):
        spec["template"]["roles"][1]["entryTemplate"]["spec"]["containers"][0]["image"] = "vllm:2"

    await edit(store, "llm", new_image)
    new = mp.revision(typed(await store.get(MODEL_INFER, "default", "llm")))
    rolled, updating = [], set()
    for _ in range(60):
        again = await rec.reconcile("default", "llm")
        updating.add(conds(await get_mi(store))["UpdateInProgress"]["status"])
        pods = (await pods_of(store)).values()
        by_group: dict[str, set[str]] = {}
        for p in pods:
            by_group.setdefault(p["metadata"]["labels"][GROUP_LABEL], set()).add(
                p["metadata"]["labels"][REVISION_LABEL]
            )
        missing = 4 - len(by_group)
        not_ready = sum(1 for p in pods if not p.get("status"))
        assert missing + (1 if not_ready else 0) <= 1, "more than maxUnavailable groups down"
        for g, revs in by_group.items():
            if revs == {new} and g not in rolled:
                rolled.append(g)
        started = await kubelet(store)
        if again is None and started == 0:
            break
    assert rolled == ["llm-3", "llm-2", "llm-1"]  # highest first; group 0 is below partition
    revs = {
        p["metadata"]["labels"][GROUP_LABEL]: p["metadata"]["labels"][REVISION_LABEL]
        for p in (await pods_of(store)).values()
    }
    assert revs["llm-0"] == old
    mi = await get_mi(store)
    st = mi["status"]
    assert st["updatedReplicas"] == 3 and st["currentRevision"] == old
    assert st["updateRevision"] == new and st["observedGeneration"] == 2
    assert st["currentReplicas"] == 1  # group 0, held at the old revision
    assert "True" in updating
    assert summary(mi)["UpdateInProgress"] == ("False", "PartitionHeld")
    assert conds(mi)["UpdateInProgress"]["message"] == (
        f"group(s) 0 kept at revision {old} below partition 1"
    )


async def fail(store, pod_name: str) -> None:
    p = (await pods_of(store))[pod_name]
    p["status"]["containerStatuses"][0]["restartCount"] = 1
    await store.update_status(p)


@pytest.mark.parametrize(
    ("policy", "recreated", "progressing"),
    [
        (
            "RoleRecreate",
            {"llm-0-prefill-0-0", "llm-0-prefill-0-1"},
            ("True", "RecreatingRoles", "recreating after a failed pod: group 0 role prefill-0"),
        ),
        (
            "GroupRecreate",
            {"llm-0-prefill-0-0", "llm-0-prefill-0-1", "llm-0-decode-0-0", "llm-0-decode-1-0"},
            ("True", "RecreatingGroups", "recreating after a failed pod: group 0"),
        ),
        # restarted, but running and ready again: nothing to recover, nothing to report
        ("None", set(), ("False", "AllGroupsReady", "2/2 groups ready")),
    ],
)
async def test_recovery_policies(env, policy, recreated, progressing):
    store, rec = env
    await store.create(modelinfer(replicas=2, recoveryPolicy=policy))
    await settle(rec, store, "llm")
    before = {n: p["metadata"]["uid"] for n, p in (await pods_of(store)).items()}
    await fail(store, "llm-0-prefill-0-1")  # a worker restarted
    await rec.reconcile("default", "llm")
    mi = await get_mi(store)
    c = conds(mi)["Progressing"]
    assert (c["status"], c["reason"], c["message"]) == progressing
    assert mi["status"]["readyReplicas"] == (2 if policy == "None" else 1)
    assert summary(mi)["Available"] == ("True", "MinimumGroupsReady")  # 1 of 2 is enough
    await settle(rec, store, "llm")
    after = {n: p["metadata"]["uid"] for n, p in (await pods_of(store)).items()}
    assert set(after) == set(before)
    assert {n for n in before if before[n] != after[n]} == recreated
    mi = await get_mi(store)
    assert summary(mi)["Progressing"] == ("False", "AllGroupsReady")
    assert mi["status"]["readyReplicas"] == 2


async def set_pod(store, name: str, *, phase: str, ready: bool, restarts: int) -> None:
    p = (await pods_of(store))[name]
    p["status"]["phase"] = phase
    p["status"]["conditions"][0]["status"] = "True" if ready else "False"
    p["status"]["containerStatuses"][0]["restartCount"] = restarts
    await store.update_status(p)


async def test_failed_pods_nobody_recreates_stop_progress_and_availability(env):
    store, rec = env
    await store.create(modelinfer(replicas=2, recoveryPolicy="None"))
    await settle(rec, store, "llm")
    await set_pod(store, "llm-1-decode-0-0", phase="Failed", ready=False, restarts=0)
    await settle(rec, store, "llm")  # recoveryPolicy None: nothing to do
    mi = await get_mi(store)
    assert summary(mi) == {
        "Available": ("True", "MinimumGroupsReady"),
        "Progressing": ("False", "PodsFailed"),
        "UpdateInProgress": ("False", "UpToDate"),
    }
    assert conds(mi)["Progressing"]["message"] == (
        "recoveryPolicy None: pod(s) failed: llm-1-decode-0-0"
    )
    await set_pod(store, "llm-0-prefill-0-1", phase="Running", ready=False, restarts=3)
    await settle(rec, store, "llm")
    mi = await get_mi(store)
    assert summary(mi)["Available"] == ("False", "TooFewGroupsReady")
    assert conds(mi)["Available"]["message"] == "0/2 groups ready, at least 1 needed"
    assert "llm-0-prefill-0-1, llm-1-decode-0-0" in conds(mi)["Progressing"]["message"]
    # both come back by themselves (a restarted container that is ready again serves)
    await set_pod(store, "llm-1-decode-0-0", phase="Running", ready=True, restarts=1)
    await set_pod(store, "llm-0-prefill-0-1", phase="Running", ready=True, restarts=3)
    await settle(rec, store, "llm")
    mi = await get_mi(store)
    assert summary(mi)["Available"] == ("True", "MinimumGroupsReady")
    assert summary(mi)["Progressing"] == ("False", "AllGroupsReady")


async def test_conditions_follow_the_groups_and_keep_their_transition_times(env, wall):
    store, rec = env
    await store.create(modelinfer(replicas=2))
    await rec.reconcile("default", "llm")  # creates the pods; this pass saw none
    mi = await get_mi(store)
    assert summary(mi) == {
        "Available": ("False", "TooFewGroupsReady"),
        "Progressing": ("True", "CreatingGroups"),
        "UpdateInProgress": ("False", "UpToDate"),
    }
    assert mi["status"]["replicas"] == 0 and mi["status"]["observedGeneration"] == 1
    assert all(c["observedGeneration"] == 1 for c in mi["status"]["conditions"])
    born = since(mi)
    assert set(born.values()) == {wall()}
    wall.tick()
    await rec.reconcile("default", "llm")  # the pods exist, none is running yet
    mi = await get_mi(store)
    assert summary(mi)["Progressing"] == ("True", "GroupsNotReady")
    assert conds(mi)["Progressing"]["message"] == "group(s) not ready: 0, 1"
    assert since(mi) == born  # reasons and messages changed, no status did
    wall.tick()
    await settle(rec, store, "llm")
    mi = await get_mi(store)
    assert summary(mi) == {
        "Available": ("True", "MinimumGroupsReady"),
        "Progressing": ("False", "AllGroupsReady"),
        "UpdateInProgress": ("False", "UpToDate"),
    }
    settled = since(mi)
    assert settled["Available"] == settled["Progressing"] == wall() != born["Available"]
    assert settled["UpdateInProgress"] == born["UpdateInProgress"]
    # a pass that changes nothing writes nothing
    wall.tick()
    rv = mi["metadata"]["resourceVersion"]
    assert await rec.reconcile("default", "llm") is None
    assert (await get_mi(store))["metadata"]["resourceVersion"] == rv
    # a spec edit: the new generation is observed; Available holds (2 of 3 is enough)
    await edit(store, "llm", lambda s: s.update(replicas=3))
    await rec.reconcile("default", "llm")
    mi = await get_mi(store)
    assert mi["status"]["observedGeneration"] == 2
    assert all(c["observedGeneration"] == 2 for c in mi["status"]["conditions"])
    assert summary(mi)["Progressing"] == ("True", "CreatingGroups")
    assert conds(mi)["Progressing"]["message"] == "2/3 groups exist"
    assert conds(mi)["Available"]["message"] == "2/3 groups ready, at least 2 needed"
    assert since(mi)["Available"] == settled["Available"]
    assert since(mi)["Progressing"] == wall()


async def test_a_group_whose_pod_downloads_its_weights_says_how_far(env):
    store, _ = env
    progress = Progress("s3://bucket/model", out=io.StringIO(), tty=False)
    progress.begin(10 << 20, 7)
    progress.advance(4 << 20)
    progress.files_done = 3
    logs: dict[tuple[str, str, str], str] = {}

    async def log_tail(namespace: str, pod: str, container: str) -> str | None:
        return logs.get((namespace, pod, container))

    rec = ModelInferReconciler(store, logs=log_tail)
    await store.create(modelinfer(replicas=2))
    await rec.reconcile("default", "llm")
    pods = sorted((await pods_of(store)).values(), key=lambda p: p["metadata"]["name"])
    for p in pods:  # Pending, the download running in every one
        p["status"] = {
            "phase": "Pending",
            "conditions": [{"type": "Ready", "status": "False"}],
            "initContainerStatuses": [
                {"name": "weights", "restartCount": 0, "state": {"running": {"startedAt": "T0"}}}
            ],
        }
        await store.update_status(p)
    first = pods[0]["metadata"]["name"]
    # What the download logs: a line every 10 s, as infergate download writes it.
    logs["default", first, "weights"] = f"2026 INFO fetch.download: {progress.line()}\n"
    assert await rec.reconcile("default", "llm") <= DOWNLOAD_LOOK_AGAIN  # looks again
    mi = await get_mi(store)
    assert summary(mi)["Progressing"] == ("True", "DownloadingWeights")
    message = conds(mi)["Progressing"]["message"]
    assert message.startswith(
        f"pod {first} is downloading its weights: container weights running since T0, "
        "40% (4.0 MiB of 10.0 MiB, "
    )
    assert message.endswith(f"/s), file 3 of 7 (and {len(pods) - 1} more pods)")
    for p in (await pods_of(store)).values():  # downloaded, the engines starting
        p["status"]["initContainerStatuses"][0]["state"] = {"terminated": {"exitCode": 0}}
        await store.update_status(p)
    assert await rec.reconcile("default", "llm") is None
    assert summary(await get_mi(store))["Progressing"] == ("True", "GroupsNotReady")


async def warm_up(store) -> int:
    """Mark running pods that are not ready ready; returns how many."""
    changed = 0
    for p in (await pods_of(store)).values():
        ready = p.get("status", {}).get("conditions") or [{}]
        if p.get("status", {}).get("phase") == "Running" and ready[0].get("status") == "False":
            ready[0]["status"] = "True"
            await store.update_status(p)
            changed += 1
    return changed


async def test_one_group_is_not_available_until_it_is_ready(env):
    store, rec = env
    await store.create(modelinfer(replicas=1))
    await rec.reconcile("default", "llm")
    await kubelet(store, ready=False)
    await rec.reconcile("default", "llm")
    mi = await get_mi(store)
    assert summary(mi)["Available"] == ("False", "TooFewGroupsReady")
    assert conds(mi)["Available"]["message"] == "0/1 groups ready, at least 1 needed"
    await warm_up(store)
    await settle(rec, store, "llm")
    assert summary(await get_mi(store))["Available"] == ("True", "MinimumGroupsReady")


async def test_update_in_progress_lasts_until_the_last_group_is_back(env):
    store, rec = env
    await store.create(modelinfer(replicas=2))
    await settle(rec, store, "llm")
    old = mp.revision(typed(await get_mi(store)))

    def new_image(spec):
        spec["template"]["roles"][0]["entryTemplate"]["spec"]["containers"][0]["image"] = "vllm:2"

    await edit(store, "llm", new_image)
    new = mp.revision(typed(await get_mi(store)))
    seen = []
    for _ in range(60):
        again = await rec.reconcile("default", "llm")
        mi = await get_mi(store)
        st = mi["status"]
        c = conds(mi)["UpdateInProgress"]
        seen.append(
            (c["status"], st["currentRevision"], st["updatedReplicas"], st["readyReplicas"])
        )
        if c["status"] == "True":
            assert c["reason"] == "RollingUpdate" and f"from {old}" in c["message"]
        # pods take a pass to become ready, so a pass sees the last group there but not ready
        warmed = await warm_up(store)
        started = await kubelet(store, ready=False)
        if again is None and started == warmed == 0:
            break
    flags = [s[0] for s in seen]
    done = flags.index("False")
    assert done > 1 and "True" not in flags[done:]
    assert all(cur == old for _, cur, _, _ in seen[:done])  # current until the end
    assert seen[done] == ("False", new, 2, 2)  # both groups updated and ready
    mi = await get_mi(store)
    assert summary(mi)["UpdateInProgress"] == ("False", "UpToDate")
    assert mi["status"]["currentReplicas"] == mi["status"]["updatedReplicas"] == 2
    assert mi["status"]["currentRevision"] == mi["status"]["updateRevision"] == new


async def test_gang_scheduling_makes_a_pod_group_per_group(env):
    store, rec = env
    await store.create(modelinfer(replicas=2, schedulerName="volcano"))
    await settle(rec, store, "llm")
    groups, _ = await store.list(POD_GROUP, "default")
    assert {g["metadata"]["name"]: g["spec"]["minMember"] for g in groups} == {
        "llm-0": 4,
        "llm-1": 4,
    }
    assert all(p["spec"]["schedulerName"] == "volcano" for p in (await pods_of(store)).values())


async def test_a_gang_policy_hands_each_group_to_volcano_with_its_minimum(env):
    """gangPolicy alone selects Volcano; every pod names its group's PodGroup and its role
    as Volcano's task; minRoleReplicas sets how many instances of a role must start."""
    store, rec = env
    gang = {"enabled": True, "minRoleReplicas": {"decode": 1}}
    await store.create(modelinfer(replicas=2, gangPolicy=gang))
    await settle(rec, store, "llm")
    pods = await pods_of(store)
    for name, p in pods.items():
        group = p["metadata"]["labels"][GROUP_LABEL]
        assert p["spec"]["schedulerName"] == "volcano", name
        assert p["metadata"]["annotations"] == {
            mp.GANG_ANNOTATION: group,
            mp.TASK_ANNOTATION: p["metadata"]["labels"][ROLE_LABEL],
        }
    groups, _ = await store.list(POD_GROUP, "default")
    # prefill: 1 instance × (entry + 1 worker); decode: min(1, 2 instances) × entry
    assert {g["metadata"]["name"]: g["spec"] for g in groups} == {
        f"llm-{i}": {"minMember": 3, "minTaskMember": {"prefill": 2, "decode": 1}} for i in (0, 1)
    }

    # a role scaled in place changes what must start together: the PodGroups follow
    def scale(spec):
        spec["template"]["roles"][0]["replicas"] = 2
        spec["gangPolicy"]["minRoleReplicas"] = {}

    await edit(store, "llm", scale)
    await settle(rec, store, "llm")
    groups, _ = await store.list(POD_GROUP, "default")
    assert {g["spec"]["minMember"] for g in groups} == {6}
    assert {g["spec"]["minTaskMember"]["prefill"] for g in groups} == {4}


async def test_without_a_gang_pods_name_no_pod_group(env):
    store, rec = env
    await store.create(modelinfer(replicas=1, gangPolicy={"enabled": False}))
    await settle(rec, store, "llm")
    assert (await store.list(POD_GROUP, "default"))[0] == []
    for p in (await pods_of(store)).values():
        assert "schedulerName" not in p["spec"]
        assert mp.GANG_ANNOTATION not in (p["metadata"].get("annotations") or {})


async def test_deleting_the_modelinfer_deletes_what_it_made(env):
    store, rec = env
    await store.create(modelinfer(replicas=1))
    await settle(rec, store, "llm")
    await store.delete(MODEL_INFER, "default", "llm")
    assert await pods_of(store) == {}
    assert (await store.list(SERVICE))[0] == []


async def test_percent_max_unavailable_and_partition():
    mi = modelinfer(replicas=10)
    mi["spec"]["rolloutStrategy"] = {
        "rollingUpdateConfiguration": {"maxUnavailable": "25%", "partition": "50%"}
    }
    assert mp.max_unavailable(typed(mi)) == 2 and mp.partition(typed(mi)) == 5
    mi["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"]["maxUnavailable"] = "5%"
    assert mp.max_unavailable(typed(mi)) == 1  # never 0: a rollout must be able to start


async def test_the_controller_reconciles_from_events():
    store = MemoryStore()
    ctl = Controller(
        store,
        ModelInferReconciler(store),
        [(MODEL_INFER, own_key), (POD, owner_key(MODEL_INFER))],
    )
    await ctl.start()
    try:
        await store.create(modelinfer(replicas=1))
        for _ in range(200):
            await kubelet(store)
            mi = await store.get(MODEL_INFER, "default", "llm")
            if (mi.get("status") or {}).get("readyReplicas") == 1:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("never ready")
        # a pod deleted behind the controller's back comes back
        await store.delete(POD, "default", "llm-0-decode-1-0")
        for _ in range(200):
            if "llm-0-decode-1-0" in await pods_of(store):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the deleted pod was not recreated")
    finally:
        await ctl.stop()
    assert copy.deepcopy(ctl.metrics.reconciles.labels("ModelInfer", "ok")._value.get()) > 0


async def test_scaling_a_role_adds_and_removes_its_instances_without_a_rollout(env):
    store, rec = env
    await store.create(modelinfer(replicas=2))
    await settle(rec, store, "llm")
    before = {n: p["metadata"]["uid"] for n, p in (await pods_of(store)).items()}
    rev = mp.revision(typed(await store.get(MODEL_INFER, "default", "llm")))
    await edit(store, "llm", lambda s: s["template"]["roles"][1].update(replicas=3))
    assert mp.revision(typed(await store.get(MODEL_INFER, "default", "llm"))) == rev
    await settle(rec, store, "llm")
    after = {n: p["metadata"]["uid"] for n, p in (await pods_of(store)).items()}
    assert set(after) - set(before) == {"llm-0-decode-2-0", "llm-1-decode-2-0"}
    assert all(after[n] == uid for n, uid in before.items())  # nobody else restarted
    await edit(store, "llm", lambda s: s["template"]["roles"][1].update(replicas=1))
    await settle(rec, store, "llm")
    names = set(await pods_of(store))
    assert not any(n.endswith(("decode-1-0", "decode-2-0")) for n in names)
    services = {s["metadata"]["name"] for s in (await store.list(SERVICE, "default"))[0]}
    assert "llm-0-decode-1-0" not in services and "llm-0-decode-0-0" in services


async def test_a_huge_replica_count_fills_in_a_burst_per_pass() -> None:
    """The schema lets spec.replicas be any int32: one pass creates at most BURST_PODS pods and
    asks to be run again, instead of looping over two billion groups."""
    from infergw.controllers.modelinfer import BURST_PODS

    store = MemoryStore()
    mi = modelinfer("huge", replicas=2**31 - 1)
    mi["spec"]["template"]["roles"] = mi["spec"]["template"]["roles"][1:]  # 2 pods per group
    await store.create(mi)
    reconciler = ModelInferReconciler(store)
    assert await reconciler.reconcile("default", "huge") is not None
    first, _ = await store.list(POD, "default")
    assert BURST_PODS <= len(first) < BURST_PODS + 2
    await reconciler.reconcile("default", "huge")
    second, _ = await store.list(POD, "default")
    assert len(second) == 2 * len(first)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def test_a_failed_pod_is_rebuilt_only_after_its_restart_grace():
    store, clock = MemoryStore(), Clock()
    rec = ModelInferReconciler(store, clock=clock)
    mi = modelinfer(replicas=1)
    mi["spec"]["template"]["restartGracePeriodSeconds"] = 30
    await store.create(mi)
    await settle(rec, store, "llm")
    before = {n: p["metadata"]["uid"] for n, p in (await pods_of(store)).items()}
    await set_pod(store, "llm-0-prefill-0-1", phase="Running", ready=False, restarts=1)
    # within the grace: nothing rebuilt, and the reconciler asks to look again when it ends
    assert await rec.reconcile("default", "llm") == 30
    clock.t += 29
    assert await rec.reconcile("default", "llm") == pytest.approx(1)
    assert {n: p["metadata"]["uid"] for n, p in (await pods_of(store)).items()} == before
    assert summary(await get_mi(store))["Progressing"] == ("True", "GroupsNotReady")
    clock.t += 1  # the grace is over and the pod is still not ready: its role is rebuilt
    await settle(rec, store, "llm")
    after = {n: p["metadata"]["uid"] for n, p in (await pods_of(store)).items()}
    assert {n for n in before if before[n] != after[n]} == {
        "llm-0-prefill-0-0",
        "llm-0-prefill-0-1",
    }


async def test_a_pod_ready_again_within_its_grace_is_forgiven_until_it_fails_again():
    store, clock = MemoryStore(), Clock()
    rec = ModelInferReconciler(store, clock=clock)
    mi = modelinfer(replicas=1, recoveryPolicy="GroupRecreate")
    mi["spec"]["template"]["restartGracePeriodSeconds"] = 10
    await store.create(mi)
    await settle(rec, store, "llm")
    before = {n: p["metadata"]["uid"] for n, p in (await pods_of(store)).items()}
    await set_pod(store, "llm-0-decode-1-0", phase="Running", ready=False, restarts=1)
    await rec.reconcile("default", "llm")
    await set_pod(store, "llm-0-decode-1-0", phase="Running", ready=True, restarts=1)
    clock.t += 10
    await settle(rec, store, "llm")
    assert {n: p["metadata"]["uid"] for n, p in (await pods_of(store)).items()} == before
    assert summary(await get_mi(store))["Progressing"] == ("False", "AllGroupsReady")
    # it fails again: a new grace, after which the whole group is rebuilt
    await set_pod(store, "llm-0-decode-1-0", phase="Failed", ready=False, restarts=1)
    assert await rec.reconcile("default", "llm") == 10
    clock.t += 10
    await settle(rec, store, "llm")
    after = {n: p["metadata"]["uid"] for n, p in (await pods_of(store)).items()}
    assert all(before[n] != after[n] for n in before)
