"""The ModelInfer reconciler: inference groups of role instances, each an entry pod and its
workers, kept at the asked number, rebuilt when they fail, rolled group by group.

One pass takes one kind of step — recover, scale, fill in, roll — then writes status; the
pods it creates or deletes come back as events and the next pass takes the next step. So a
pass can stop anywhere and be run again.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from controllers import modelinfer_pods as mp
from controllers.conditions import condition
from controllers.store import (
    MODEL_INFER,
    POD,
    POD_GROUP,
    SERVICE,
    AlreadyExists,
    NotFound,
    Obj,
    Store,
)

log = logging.getLogger("controllers.modelinfer")


@dataclass(slots=True)
class Groups:
    """The ModelInfer's pods by group ordinal."""

    pods: dict[int, list[Obj]] = field(default_factory=lambda: defaultdict(list))

    def ready(self, mi: Obj, g: int) -> bool:
        want = {s for s in mp.slots(mi, g)}
        have = {mp.slot_of(p, mi["metadata"]["name"]): p for p in self.pods.get(g, [])}
        return want <= set(have) and all(mp.pod_ready(have[s]) for s in want)

    def revision(self, g: int) -> str | None:
        revs = {p["metadata"]["labels"].get(mp.L_REVISION) for p in self.pods.get(g, [])}
        return revs.pop() if len(revs) == 1 else None


class ModelInferReconciler:
    kind = MODEL_INFER

    def __init__(self, store: Store) -> None:
        self.store = store

    async def reconcile(self, namespace: str, name: str) -> float | None:
        """One step towards the spec; returns seconds after which to look again, or None."""
        mi = await self.store.get(MODEL_INFER, namespace, name)
        if mi is None or mi["metadata"].get("deletionTimestamp"):
            return None  # owner references take the pods with it
        pods, _ = await self.store.list(POD, namespace, {mp.L_MODELINFER: name})
        groups = Groups()
        for p in pods:
            g = mp.group_of(p, name)
            if g is not None:
                groups.pods[g].append(p)
        rev = mp.revision(mi)
        acted = (
            await self._recover(mi, groups)
            or await self._scale(mi, groups, rev)
            or await self._fill(mi, groups, rev)
            or await self._roll(mi, groups, rev)
        )
        await self._ensure_services(mi, groups)
        await self._write_status(mi, groups, rev)
        return 1.0 if acted else None

    # ---- steps --------------------------------------------------------------------------

    async def _recover(self, mi: Obj, groups: Groups) -> bool:
        policy = mi["spec"].get("recoveryPolicy", "RoleRecreate")
        if policy == "None":
            return False
        acted = False
        for g, pods in groups.pods.items():
            failed = [p for p in pods if mp.pod_failed(p)]
            if not failed:
                continue
            if policy == "GroupRecreate":
                doomed = pods
            else:
                roles = {
                    (mp.slot_of(p, mi["metadata"]["name"]) or mp.PodSlot(g, "", -1, 0))
                    for p in failed
                }
                keys = {(s.role, s.index) for s in roles}
                doomed = [
                    p for p in pods
                    if (s := mp.slot_of(p, mi["metadata"]["name"])) and (s.role, s.index) in keys
                ]  # fmt: skip
            log.info(
                "%s: %d failed pod(s) in group %d: recreating the %s",
                _name(mi), len(failed), g, "group" if policy == "GroupRecreate" else "role",
            )  # fmt: skip
            await self._delete_pods(doomed)
            acted = True
        return acted

    async def _scale(self, mi: Obj, groups: Groups, rev: str) -> bool:
        want = int(mi["spec"].get("replicas", 1))
        have = sorted(groups.pods)
        if len(have) < want:
            free = (i for i in range(10**6) if i not in groups.pods)
            for _ in range(want - len(have)):
                g = next(free)
                for slot in mp.slots(mi, g):
                    await self._create(mp.pod_for(mi, slot, rev))
                await self._ensure_pod_group(mi, g)
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

    async def _fill(self, mi: Obj, groups: Groups, rev: str) -> bool:
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

    async def _roll(self, mi: Obj, groups: Groups, rev: str) -> bool:
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

    async def _ensure_services(self, mi: Obj, groups: Groups) -> None:
        wanted = set()
        for g in groups.pods:
            for slot in mp.slots(mi, g):
                if slot.pod == 0:
                    svc = mp.service_for(mi, slot)
                    wanted.add(svc["metadata"]["name"])
                    await self._create(svc)
        if len(groups.pods) < int(mi["spec"].get("replicas", 1)):
            return  # groups being rebuilt keep their services
        ns = mi["metadata"].get("namespace", "default")
        services, _ = await self.store.list(SERVICE, ns, {mp.L_MODELINFER: _name(mi)})
        for svc in services:
            if svc["metadata"]["name"] not in wanted:
                await self._delete(SERVICE, mi, svc["metadata"]["name"])

    async def _ensure_pod_group(self, mi: Obj, g: int) -> None:
        if (mi["spec"].get("gangPolicy") or {}).get("enabled") or mi["spec"].get(
            "schedulerName"
        ) == "volcano":
            await self._create(mp.pod_group_for(mi, g))

    # ---- status -------------------------------------------------------------------------

    async def _write_status(self, mi: Obj, groups: Groups, rev: str) -> None:
        ready = sum(1 for g in groups.pods if groups.ready(mi, g))
        updated = sum(1 for g in groups.pods if groups.revision(g) == rev)
        want = int(mi["spec"].get("replicas", 1))
        revs = [groups.revision(g) for g in sorted(groups.pods)]
        current = rev if updated == len(groups.pods) else next((r for r in revs if r != rev), rev)
        available = ready >= want - mp.max_unavailable(mi)
        progressing = updated < want or ready < want or len(groups.pods) != want
        status = {
            "observedGeneration": mi["metadata"].get("generation", 1),
            "replicas": len(groups.pods),
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "currentRevision": current,
            "updateRevision": rev,
            "labelSelector": f"{mp.L_MODELINFER}={_name(mi)}",
            "conditions": [
                _condition(mi, "Available", available, f"{ready}/{want} groups ready"),
                _condition(mi, "Progressing", progressing, f"{updated}/{want} groups at {rev}"),
            ],
        }
        if mi.get("status") == status:
            return
        mi["status"] = status
        try:
            await self.store.update_status(mi)
        except NotFound:
            pass

    # ---- writes -------------------------------------------------------------------------

    async def _create(self, obj: Obj) -> None:
        try:
            await self.store.create(obj)
        except AlreadyExists:
            pass

    async def _delete(self, kind, mi: Obj, name: str) -> None:
        try:
            await self.store.delete(kind, mi["metadata"].get("namespace", "default"), name)
        except NotFound:
            pass

    async def _delete_pods(self, pods: list[Obj]) -> None:
        for p in pods:
            if not p["metadata"].get("deletionTimestamp"):
                try:
                    await self.store.delete(POD, p["metadata"]["namespace"], p["metadata"]["name"])
                except NotFound:
                    pass


def _condition(mi: Obj, kind: str, ok: bool, message: str) -> dict:
    return condition(mi, kind, ok, kind if ok else f"Not{kind}", message)


def _name(mi: Obj) -> str:
    return mi["metadata"]["name"]
