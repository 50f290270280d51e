"""What a ModelInfer's pods and services should look like: names, labels, environment,
revisions. Pure functions, so the reconciler's decisions can be read and tested apart."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass

from api.names import (
    ENTRY_LABEL,
    GROUP_LABEL,
    MODEL_LABEL,
    MODELINFER_LABEL,
    REVISION_LABEL,
    ROLE_INDEX_LABEL,
    ROLE_LABEL,
)
from controllers.store import Obj, owner_reference


@dataclass(slots=True, frozen=True)
class PodSlot:
    """One pod the template asks for: group g, role instance j of role, pod k (0 = entry)."""

    group: int
    role: str
    index: int
    pod: int

    def name(self, mi_name: str) -> str:
        return f"{group_name(mi_name, self.group)}-{self.role}-{self.index}-{self.pod}"


def group_name(mi_name: str, group: int) -> str:
    return f"{mi_name}-{group}"


def group_of(pod: Obj, mi_name: str) -> int | None:
    label = pod["metadata"].get("labels", {}).get(GROUP_LABEL, "")
    prefix = mi_name + "-"
    tail = label[len(prefix) :] if label.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else None


def revision(mi: Obj) -> str:
    """A hash of the group template: pods of another revision are outdated. A role's
    replica count is left out: scaling a role adds or removes its instances in every group
    without rolling the others."""
    template = copy.deepcopy(mi["spec"].get("template", {}))
    for role in template.get("roles", []):
        role.pop("replicas", None)
    text = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def roles(mi: Obj) -> list[dict]:
    return mi["spec"].get("template", {}).get("roles", [])


def slots(mi: Obj, group: int) -> list[PodSlot]:
    out = []
    for role in roles(mi):
        for j in range(int(role.get("replicas", 1))):
            for k in range(1 + int(role.get("workerReplicas", 0))):
                out.append(PodSlot(group, role["name"], j, k))
    return out


def pod_for(mi: Obj, slot: PodSlot, rev: str) -> Obj:
    m = mi["metadata"]
    role = next(r for r in roles(mi) if r["name"] == slot.role)
    entry = slot.pod == 0
    template = copy.deepcopy(
        role["entryTemplate"] if entry else role.get("workerTemplate") or role["entryTemplate"]
    )
    meta = template.get("metadata") or {}
    spec = template.get("spec") or {}
    entry_name = PodSlot(slot.group, slot.role, slot.index, 0).name(m["name"])
    env = [
        {"name": "GROUP_SIZE", "value": str(1 + int(role.get("workerReplicas", 0)))},
        {"name": "ENTRY_ADDRESS", "value": f"{entry_name}.{m.get('namespace', 'default')}"},
        {"name": "WORKER_INDEX", "value": str(slot.pod)},
    ]
    for c in spec.get("containers") or []:
        names = {e["name"] for e in env}
        c["env"] = [e for e in c.get("env") or [] if e.get("name") not in names] + env
    labels = {
        **(meta.get("labels") or {}),
        MODELINFER_LABEL: m["name"],
        GROUP_LABEL: group_name(m["name"], slot.group),
        ROLE_LABEL: slot.role,
        ROLE_INDEX_LABEL: str(slot.index),
        ENTRY_LABEL: "true" if entry else "false",
        REVISION_LABEL: rev,
    }
    if MODEL_LABEL in (m.get("labels") or {}):
        labels[MODEL_LABEL] = m["labels"][MODEL_LABEL]
    pod_meta = {
        "name": slot.name(m["name"]),
        "namespace": m.get("namespace", "default"),
        "labels": labels,
        "ownerReferences": [owner_reference(mi)],
    }
    if meta.get("annotations"):
        pod_meta["annotations"] = dict(meta["annotations"])
    if mi["spec"].get("schedulerName"):
        spec.setdefault("schedulerName", mi["spec"]["schedulerName"])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": spec}


def slot_of(pod: Obj, mi_name: str) -> PodSlot | None:
    labels = pod["metadata"].get("labels", {})
    group = group_of(pod, mi_name)
    tail = pod["metadata"]["name"].rsplit("-", 1)[-1]
    if group is None or not tail.isdigit() or not labels.get(ROLE_INDEX_LABEL, "").isdigit():
        return None
    return PodSlot(group, labels.get(ROLE_LABEL, ""), int(labels[ROLE_INDEX_LABEL]), int(tail))


def service_for(mi: Obj, slot: PodSlot) -> Obj:
    """A headless Service per role instance, named after its entry pod, so workers reach
    the entry at a stable DNS name (ENTRY_ADDRESS)."""
    m = mi["metadata"]
    name = PodSlot(slot.group, slot.role, slot.index, 0).name(m["name"])
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": m.get("namespace", "default"),
            "labels": {MODELINFER_LABEL: m["name"], GROUP_LABEL: group_name(m["name"], slot.group)},
            "ownerReferences": [owner_reference(mi)],
        },
        "spec": {
            "clusterIP": "None",
            "selector": {
                GROUP_LABEL: group_name(m["name"], slot.group),
                ROLE_LABEL: slot.role,
                ROLE_INDEX_LABEL: str(slot.index),
            },
        },
    }


def pod_group_for(mi: Obj, group: int) -> Obj:
    """Volcano gang scheduling: every pod of a group starts together or not at all."""
    m = mi["metadata"]
    members = len(slots(mi, group))
    return {
        "apiVersion": "scheduling.volcano.sh/v1beta1",
        "kind": "PodGroup",
        "metadata": {
            "name": group_name(m["name"], group),
            "namespace": m.get("namespace", "default"),
            "labels": {MODELINFER_LABEL: m["name"]},
            "ownerReferences": [owner_reference(mi)],
        },
        "spec": {"minMember": members},
    }


def pod_ready(pod: Obj) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    for c in pod.get("status", {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def pod_failed(pod: Obj) -> bool:
    """Failed, or restarted: the group or role must be rebuilt per the recovery policy."""
    status = pod.get("status") or {}
    if status.get("phase") == "Failed":
        return True
    return any(int(c.get("restartCount", 0)) > 0 for c in status.get("containerStatuses") or [])


def max_unavailable(mi: Obj) -> int:
    """maxUnavailable as a count of groups: an int, or a percentage of replicas rounded
    down; never below 1, or a rollout could not start."""
    cfg = (mi["spec"].get("rolloutStrategy") or {}).get("rollingUpdateConfiguration") or {}
    raw = cfg.get("maxUnavailable", 1)
    replicas = int(mi["spec"].get("replicas", 1))
    if isinstance(raw, str) and raw.endswith("%"):
        value = replicas * int(raw[:-1]) // 100
    else:
        value = int(raw)
    return max(1, value)


def partition(mi: Obj) -> int:
    cfg = (mi["spec"].get("rolloutStrategy") or {}).get("rollingUpdateConfiguration") or {}
    raw = cfg.get("partition", 0)
    replicas = int(mi["spec"].get("replicas", 1))
    if isinstance(raw, str) and raw.endswith("%"):
        return replicas * int(raw[:-1]) // 100
    return int(raw)
