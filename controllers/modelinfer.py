"""The ModelInfer reconciler: inference groups of role instances, each an entry pod and its
workers, kept at the asked number, rebuilt when they fail, rolled group by group.

One pass takes one kind of step — recover, scale, fill in, roll — then writes status; the
pods it creates or deletes come back as events and the next pass takes the next step. So a
pass can stop anywhere and be run again.

A failed or restarted pod is given the template's restartGracePeriodSeconds to come back by
itself (the kubelet restarts its container; ready again, it is forgiven) before the recovery
policy rebuilds its role instance or group. The grace is timed from when this controller
first saw the failure: a controller that restarts (or a new leader) starts the wait again,
so it errs towards waiting.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from infergw import api
from infergw.api import ModelInfer
from infergw.api.names import (
    DOWNLOAD_FAILED,
    DOWNLOADING_WEIGHTS,
    ENGINE_NOT_INSTALLED,
    REVISION_LABEL,
)
from infergw.api.workload import DEFAULT_RECOVERY_POLICY
from infergw.cluster.store import (
    MODEL_INFER,
    POD,
    POD_GROUP,
    SERVICE,
    AlreadyExists,
    Conflict,
    NotFound,
    Obj,
    Store,
)
from infergw.controllers import modelinfer_pods as mp
from infergw.controllers.conditions import condition, listed
from infergw.controllers.events import NO_EVENTS, Recorder, condition_events
from infergw.controllers.weights import DOWNLOAD_CONTAINER
from infergw.fetch.progress import said as progress_said

log = logging.getLogger("controllers.modelinfer")
# Pods one pass creates at most, as the ReplicaSet controller's burstReplicas: a huge
# spec.replicas fills in over many passes instead of holding the worker for good.
BURST_PODS = 500


@dataclass(slots=True)
class Groups:
    """The ModelInfer's pods by group ordinal."""

    pods: dict[int, list[Obj]] = field(default_factory=lambda: defaultdict(list))

    def ready(self, mi: ModelInfer, g: int) -> bool:
        want = {s for s in mp.slots(mi, g)}
        have = {mp.slot_of(p, mp.name_of(mi)): p for p in self.pods.get(g, [])}
        return want <= set(have) and all(mp.pod_ready(have[s]) for s in want)

    def revision(self, g: int) -> str | None:
        revs = {mp.pod_labels(p).get(REVISION_LABEL) for p in self.pods.get(g, [])}
        return revs.pop() if len(revs) == 1 else None


@dataclass(frozen=True, slots=True)
class _Failure:
    """A failure of one pod as first seen: its restarts and phase then, and when."""

    restarts: int
    phase_failed: bool
    since: float


@dataclass(slots=True)
class _Due:
    """The failed pods the recovery policy acts on now, and when to look at the others."""

    pods: set[str] = field(default_factory=set)  # pod names
    wait: float | None = None  # seconds until the next grace ends


# Progressing reasons that need a person: their Events are Warnings.
MODEL_INFER_WARNINGS = frozenset(("PodsFailed", ENGINE_NOT_INSTALLED, DOWNLOAD_FAILED))
# (namespace, pod, container) → the end of that container's log, or None (not running).
ContainerLogs = Callable[[str, str, str], Awaitable[str | None]]
# While a pod downloads its weights, its progress is read again this often (no pod event
# comes with it); the download logs a progress line every 10 s.
DOWNLOAD_LOOK_AGAIN = 5.0


@dataclass(frozen=True, slots=True)
class Fetching:
    """A pod whose weights download runs, as Progressing says it."""

    pod: str
    said: str  # its container's state and, where its log says, how far it is
    others: int  # pods downloading besides it


class ModelInferReconciler:
    kind = MODEL_INFER

    def __init__(
        self,
        store: Store,
        clock: Callable[[], float] = time.monotonic,
        events: Recorder = NO_EVENTS,
        logs: ContainerLogs | None = None,
    ) -> None:
        self.store = store
        self.events = events
        self._clock = clock
        self._logs = logs
        # per ModelInfer (namespace, name), per pod uid: the failure being waited out, and
        # the failures forgiven (the pod was ready again when its grace ended)
        self._failures: dict[tuple[str, str], dict[str, _Failure]] = {}
        self._forgiven: dict[tuple[str, str], dict[str, tuple[int, bool]]] = {}

    async def reconcile(self, namespace: str, name: str) -> float | None:
        """One step towards the spec; returns seconds after which to look again, or None."""
        obj = await self.store.get(MODEL_INFER, namespace, name)
        if obj is None:
            return None
        mi = api.from_dict_as(ModelInfer, obj)  # status is written back on `obj`, as read
        if mi.metadata.deletion_timestamp:
            self._failures.pop((namespace, name), None)
            self._forgiven.pop((namespace, name), None)
            return None  # owner references take the pods with it
        pods, _ = await self.store.list(POD, namespace, mp.instance_label(name))
        groups = Groups()
        for p in pods:
            g = mp.group_of(p, name)
            if g is not None:
                groups.pods[g].append(p)
        rev = mp.revision(mi)
        due = self._due(mi, pods)
        acted = (
            await self._recover(mi, groups, due)
            or await self._scale(mi, groups, rev)
            or await self._fill(mi, groups, rev)
            or await self._roll(mi, groups, rev)
        )
        await self._ensure_services(mi, groups)
        await self._ensure_pod_groups(mi, groups)
        fetching = await self._fetching(namespace, groups)
        await self._write_status(obj, mi, groups, rev, due, fetching)
        if acted:
            return 1.0
        if fetching is not None:
            return min(due.wait or DOWNLOAD_LOOK_AGAIN, DOWNLOAD_LOOK_AGAIN)
        return due.wait

    async def _fetching(self, namespace: str, groups: Groups) -> Fetching | None:
        """The first pod (by name) whose download runs, with where it is when its log says."""
        running = sorted(
            (p["metadata"]["name"], what)
            for pods in groups.pods.values()
            for p in pods
            if (what := mp.downloading(p))
        )
        if not running:
            return None
        pod, what = running[0]
        tail = await self._logs(namespace, pod, DOWNLOAD_CONTAINER) if self._logs else None
        where = progress_said(tail) if tail else None
        return Fetching(pod, f"{what}, {where}" if where else what, len(running) - 1)

    def _due(self, mi: ModelInfer, pods: list[Obj]) -> _Due:
        """Which failed pods have had their restart grace, and are still failing."""
        key = (mp.namespace_of(mi), _name(mi))
        grace = mp.restart_grace_seconds(mi)
        now = self._clock()
        seen = self._failures.setdefault(key, {})
        forgiven = self._forgiven.setdefault(key, {})
        due = _Due()
        alive = set()
        for p in pods:
            uid = str(p["metadata"].get("uid") or p["metadata"]["name"])
            alive.add(uid)
            if not mp.pod_failed(p):
                continue
            restarts, phase_failed = mp.failure_of(p)
            if forgiven.get(uid) == (restarts, phase_failed):
                continue  # came back by itself after this failure
            first = seen.get(uid)
            if first is None or (first.restarts, first.phase_failed) != (restarts, phase_failed):
                first = seen[uid] = _Failure(restarts, phase_failed, now)  # a new failure
            left = grace - (now - first.since)
            if left > 0:
                due.wait = left if due.wait is None else min(due.wait, left)
            elif grace > 0 and mp.pod_ready(p) and not phase_failed:
                forgiven[uid] = (restarts, phase_failed)  # ready again within its grace
                del seen[uid]
            else:
                due.pods.add(p["metadata"]["name"])
        for table in (seen, forgiven):
            for uid in set(table) - alive:
                del table[uid]
        return due

    # ---- steps --------------------------------------------------------------------------

    async def _recover(self, mi: ModelInfer, groups: Groups, due: _Due) -> bool:
        policy = _recovery_policy(mi)
        if policy == "None":
            return False
        acted = False
        for g, pods in groups.pods.items():
            failed = [p for p in pods if p["metadata"]["name"] in due.pods]
            if not failed:
                continue
            if policy == "GroupRecreate":
                doomed = pods
            else:
                roles = {(mp.slot_of(p, _name(mi)) or mp.PodSlot(g, "", -1, 0)) for p in failed}
                keys = {(s.role, s.index) for s in roles}
                doomed = [
                    p for p in pods
                    if (s := mp.slot_of(p, _name(mi))) and (s.role, s.index) in keys
                ]  # fmt: skip
            log.info(
                "%s: %d failed pod(s) in group %d: recreating the %s",
                _name(mi), len(failed), g, "group" if policy == "GroupRecreate" else "role",
            )  # fmt: skip
            await self._delete_pods(doomed)
            acted = True
        return acted

    async def _scale(self, mi: ModelInfer, groups: Groups, rev: str) -> bool:
        want = mp.replicas(mi)
        have = sorted(groups.pods)
        if len(have) < want:
            free = (i for i in itertools.count() if i not in groups.pods)
            created = 0
            for _ in range(want - len(have)):
                if created >= BURST_PODS:  # the rest on the next passes
                    break
                g = next(free)
                await self._ensure_pod_group(mi, g)  # before its pods: Volcano waits for it
                for slot in mp.slots(mi, g):
                    await self._create(mp.pod_for(mi, slot, rev))
                    created += 1
            return True
        if len(have) > want:
            # not-ready groups go first, then the highest ordinal
            order = sorted(have, key=lambda g: (groups.ready(mi, g), -g))
            for g in order[: len(have) - want]:
                log.info("%s: scaling down, deleting group %d", _name(mi), g)
                await self._delete_pods(groups.pods[g])
                await self._delete(POD_GROUP, mi, mp.group_name(_name(mi), g))
            return True
        return False

    async def _fill(self, mi: ModelInfer, groups: Groups, rev: str) -> bool:
        """Recreate the missing pods of existing groups, at the group's own revision; remove
        role instances beyond their role's replicas (a role scaled down)."""
        acted = False
        name = _name(mi)
        for g, pods in groups.pods.items():
            wanted = set(mp.slots(mi, g))
            extra = [p for p in pods if mp.slot_of(p, name) not in wanted]
            if extra:
                await self._delete_pods(extra)
                acted = True
            have = {mp.slot_of(p, name) for p in pods}
            group_rev = groups.revision(g) or rev
            for slot in mp.slots(mi, g) if group_rev == rev else []:
                if slot not in have:
                    await self._create(mp.pod_for(mi, slot, rev))
                    acted = True
            if group_rev != rev and any(s not in have for s in mp.slots(mi, g)):
                # an outdated group that lost pods is rebuilt at the new revision
                await self._delete_pods(pods)
                acted = True
        return acted

    async def _roll(self, mi: ModelInfer, groups: Groups, rev: str) -> bool:
        """Delete outdated groups within maxUnavailable; _fill/_scale rebuild them."""
        floor = mp.partition(mi)
        outdated = [g for g in groups.pods if g >= floor and groups.revision(g) != rev]
        if not outdated:
            return False
        unavailable = sum(1 for g in groups.pods if not groups.ready(mi, g))
        budget = mp.max_unavailable(mi) - unavailable
        if budget <= 0:
            return False
        order = sorted(outdated, key=lambda g: (groups.ready(mi, g), -g))
        for g in order[:budget]:
            log.info("%s: rolling group %d to revision %s", _name(mi), g, rev)
            await self._delete_pods(groups.pods[g])
        return True

    async def _ensure_services(self, mi: ModelInfer, groups: Groups) -> None:
        wanted = set()
        for g in groups.pods:
            for slot in mp.slots(mi, g):
                if slot.pod == 0:
                    svc = mp.service_for(mi, slot)
                    wanted.add(svc["metadata"]["name"])
                    await self._create(svc)
        if len(groups.pods) < mp.replicas(mi):
            return  # groups being rebuilt keep their services
        labels = mp.instance_label(_name(mi))
        services, _ = await self.store.list(SERVICE, mp.namespace_of(mi), labels)
        for svc in services:
            if svc["metadata"]["name"] not in wanted:
                await self._delete(SERVICE, mi, svc["metadata"]["name"])

    async def _ensure_pod_groups(self, mi: ModelInfer, groups: Groups) -> None:
        if len(groups.pods) > mp.replicas(mi):
            return  # scaling down: the groups seen may be the ones just deleted
        for g in groups.pods:
            await self._ensure_pod_group(mi, g)

    async def _ensure_pod_group(self, mi: ModelInfer, g: int) -> None:
        """The group's PodGroup as the spec says now: a role scaled in place or a new
        minRoleReplicas changes how many of its pods must start together."""
        if not mp.gang(mi):
            return
        want = mp.pod_group_for(mi, g)
        have = await self.store.get(POD_GROUP, mp.namespace_of(mi), want["metadata"]["name"])
        if have is None:
            await self._create(want)
            return
        spec = have.get("spec") or {}
        if all(spec.get(k) == v for k, v in want["spec"].items()):
            return
        have["spec"] = {**spec, **want["spec"]}
        try:
            await self.store.update(have)
        except (NotFound, Conflict):
            pass  # deleted or changed meanwhile: the next pass looks again

    # ---- status -------------------------------------------------------------------------

    async def _write_status(
        self,
        obj: Obj,
        mi: ModelInfer,
        groups: Groups,
        rev: str,
        due: _Due,
        fetching: Fetching | None = None,
    ) -> None:
        """Counts and conditions from what this pass saw (before its own writes land):
        Available (enough groups ready), Progressing (why the groups differ from the spec),
        UpdateInProgress (groups at an older revision are being rolled)."""
        name = _name(mi)
        want = mp.replicas(mi)
        ordinals = sorted(groups.pods)
        recovering, failing = _failures(mi, groups, due)
        ready = [g for g in ordinals if g not in recovering and groups.ready(mi, g)]
        revs = {g: groups.revision(g) for g in ordinals}
        updated = [g for g in ordinals if revs[g] == rev]
        outdated = [g for g in ordinals if revs[g] != rev]
        floor = mp.partition(mi)
        rolling = [g for g in outdated if g >= floor]
        # as a StatefulSet's: the update revision becomes current once every wanted group is
        # at it and ready; until then (the last group rebuilt) the old revision stays current
        previous = mi.status.current_revision if mi.status is not None else None
        if not outdated and len(ordinals) >= want and len(ready) >= len(ordinals):
            current = rev
        else:
            old = [r for g in outdated if (r := revs[g])]
            current = old[0] if old else previous or rev
        need = max(want - mp.max_unavailable(mi), min(want, 1))
        updating = current != rev and (
            bool(rolling) or len(ordinals) < want or any(g not in ready for g in updated)
        )
        status = {
            "observedGeneration": mi.metadata.generation or 1,
            "replicas": len(ordinals),
            "readyReplicas": len(ready),
            "availableReplicas": len(ready),
            "currentReplicas": sum(1 for g in ordinals if revs[g] == current),
            "updatedReplicas": len(updated),
            "currentRevision": current,
            "updateRevision": rev,
            "labelSelector": ",".join(f"{k}={v}" for k, v in mp.instance_label(name).items()),
            "conditions": [
                condition(
                    obj,
                    "Available",
                    len(ready) >= need,
                    "MinimumGroupsReady" if len(ready) >= need else "TooFewGroupsReady",
                    f"{len(ready)}/{want} groups ready, at least {need} needed",
                ),
                condition(
                    obj,
                    "Progressing",
                    *_progress(mi, groups, want, ready, recovering, failing, fetching),
                ),
                condition(
                    obj,
                    "UpdateInProgress",
                    updating,
                    *_update(mi, rev, current, updated, rolling, outdated, floor, updating),
                ),
            ],
        }
        if obj.get("status") == status:
            return
        await condition_events(self.events, obj, status["conditions"], MODEL_INFER_WARNINGS)
        obj["status"] = status
        try:
            await self.store.update_status(obj)
        except NotFound:
            pass

    # ---- writes -------------------------------------------------------------------------

    async def _create(self, obj: Obj) -> None:
        try:
            await self.store.create(obj)
        except AlreadyExists:
            pass

    async def _delete(self, kind, mi: ModelInfer, name: str) -> None:
        try:
            await self.store.delete(kind, mp.namespace_of(mi), name)
        except NotFound:
            pass

    async def _delete_pods(self, pods: list[Obj]) -> None:
        for p in pods:
            if not p["metadata"].get("deletionTimestamp"):
                try:
                    await self.store.delete(POD, p["metadata"]["namespace"], p["metadata"]["name"])
                except NotFound:
                    pass


def _failures(
    mi: ModelInfer, groups: Groups, due: _Due
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Per group, what _recover is rebuilding (recovering: role instances such as
    "prefill-0", or [] for the whole group) and, with recoveryPolicy None, the failed pods
    left as they are (failing: pod names). A failed pod within its restart grace is neither:
    its group is only not ready."""
    policy = _recovery_policy(mi)
    name = _name(mi)
    recovering: dict[int, list[str]] = {}
    failing: dict[int, list[str]] = {}
    for g in sorted(groups.pods):
        failed = [
            p
            for p in groups.pods[g]
            if mp.pod_failed(p) and (policy == "None" or p["metadata"]["name"] in due.pods)
        ]
        if not failed:
            continue
        if policy == "None":
            # a pod that restarted and is ready again serves; one that is not ready does not
            bad = [p["metadata"]["name"] for p in failed if not mp.pod_ready(p)]
            if bad:
                failing[g] = sorted(bad)
        elif policy == "GroupRecreate":
            recovering[g] = []
        else:
            recovering[g] = sorted(
                {
                    f"{s.role}-{s.index}" if s else p["metadata"]["name"]
                    for p in failed
                    for s in [mp.slot_of(p, name)]
                }
            )
    return recovering, failing


def _progress(
    mi: ModelInfer,
    groups: Groups,
    want: int,
    ready: list[int],
    recovering: dict[int, list[str]],
    failing: dict[int, list[str]],
    fetching: Fetching | None = None,
) -> tuple[bool, str, str]:
    """(status, reason, message) of Progressing: True while the groups are moving towards
    the spec, False when they are there (AllGroupsReady) or stuck (PodsFailed,
    EngineNotInstalled: a pod's engine is not installed on its node, or DownloadFailed: a
    pod's weights could not be downloaded); DownloadingWeights while a not-ready group's pod
    runs its download."""
    name = _name(mi)
    if failing:
        pods = [p for g in failing for p in failing[g]]
        return False, "PodsFailed", f"recoveryPolicy None: pod(s) failed: {listed(pods)}"
    stuck = sorted(
        (p["metadata"]["name"], why)
        for pods in groups.pods.values()
        for p in pods
        if (why := mp.cannot_run(p))
    )
    if stuck:  # nothing here will start them: a person must install the engine
        pod, why = stuck[0]
        more = f" (and {len(stuck) - 1} more pods)" if len(stuck) > 1 else ""
        return False, ENGINE_NOT_INSTALLED, f"pod {pod} cannot start: {why}{more}"
    unfetched = sorted(
        (p["metadata"]["name"], why)
        for pods in groups.pods.values()
        for p in pods
        if (why := mp.download_failure(p))
    )
    if unfetched:  # retried with back-off, but the message says what a person should fix
        pod, why = unfetched[0]
        more = f" (and {len(unfetched) - 1} more pods)" if len(unfetched) > 1 else ""
        return False, DOWNLOAD_FAILED, f"pod {pod} has no weights: {why}{more}"
    if recovering:
        what = [
            f"group {g} role {', '.join(roles)}" if roles else f"group {g}"
            for g, roles in recovering.items()
        ]
        whole = not any(recovering.values())
        return (
            True,
            "RecreatingGroups" if whole else "RecreatingRoles",
            f"recreating after a failed pod: {listed(what)}",
        )
    have = len(groups.pods)
    if have < want:
        return True, "CreatingGroups", f"{have}/{want} groups exist"
    if have > want:
        return True, "DeletingGroups", f"{have} groups exist, {want} wanted"
    missing, extra = [], []
    for g in sorted(groups.pods):
        wanted = set(mp.slots(mi, g))
        slots = {mp.slot_of(p, name) for p in groups.pods[g]}
        missing += [s.name(name) for s in sorted(wanted - slots, key=_slot_key)]
        extra += [
            p["metadata"]["name"] for p in groups.pods[g] if mp.slot_of(p, name) not in wanted
        ]
    if missing:
        return True, "CreatingPods", f"pod(s) to create: {listed(missing)}"
    if extra:
        return True, "DeletingPods", f"pod(s) beyond the template: {listed(sorted(extra))}"
    not_ready = [g for g in sorted(groups.pods) if g not in ready]
    if not_ready and fetching is not None:  # a cold start's longest wait: say where it is
        more = f" (and {fetching.others} more pods)" if fetching.others else ""
        message = f"pod {fetching.pod} is downloading its weights: {fetching.said}{more}"
        return True, DOWNLOADING_WEIGHTS, message
    if not_ready:
        return True, "GroupsNotReady", f"group(s) not ready: {listed(not_ready)}"
    return False, "AllGroupsReady", f"{len(ready)}/{want} groups ready"


def _update(
    mi: ModelInfer,
    rev: str,
    current: str,
    updated: list[int],
    rolling: list[int],
    outdated: list[int],
    floor: int,
    updating: bool,
) -> tuple[str, str]:
    """(reason, message) of UpdateInProgress."""
    want = mp.replicas(mi)
    if updating:
        return (
            "RollingUpdate",
            f"{len(updated)}/{want} groups at revision {rev}, from {current}; "
            f"to roll: {listed(rolling) or 'none'} (maxUnavailable {mp.max_unavailable(mi)})",
        )
    if outdated:
        return (
            "PartitionHeld",
            f"group(s) {listed(outdated)} kept at revision {current} below partition {floor}",
        )
    return "UpToDate", f"all groups at revision {rev}"


def _slot_key(s: mp.PodSlot) -> tuple:
    return (s.group, s.role, s.index, s.pod)


def _name(mi: ModelInfer) -> str:
    return mp.name_of(mi)


def _recovery_policy(mi: ModelInfer) -> str:
    return mi.spec.recovery_policy or DEFAULT_RECOVERY_POLICY
