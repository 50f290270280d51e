"""What a ModelInfer's pods and services should look like: names, labels, environment,
revisions. Pure functions, so the reconciler's decisions can be read and tested apart."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass

import msgspec

from infergw.api import ModelInfer
from infergw.api.names import (
    ENGINE_NOT_INSTALLED,
    ENTRY_LABEL,
    GROUP_LABEL,
    MODEL_LABEL,
    MODELINFER_LABEL,
    REVISION_LABEL,
    ROLE_INDEX_LABEL,
    ROLE_LABEL,
)
from infergw.api.workload import (
    DEFAULT_MAX_UNAVAILABLE,
    DEFAULT_REPLICAS,
    DEFAULT_ROLE_REPLICAS,
    DEFAULT_WORKER_REPLICAS,
    Role,
)
from infergw.cluster.store import Obj, owner_reference_of


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


def name_of(mi: ModelInfer) -> str:
    return mi.metadata.name or ""


def namespace_of(mi: ModelInfer) -> str:
    return mi.metadata.namespace or "default"


def replicas(mi: ModelInfer) -> int:
    """The serving groups asked for."""
    return DEFAULT_REPLICAS if mi.spec.replicas is None else mi.spec.replicas


def role_replicas(role: Role) -> int:
    return DEFAULT_ROLE_REPLICAS if role.replicas is None else role.replicas


def worker_replicas(role: Role) -> int:
    return DEFAULT_WORKER_REPLICAS if role.worker_replicas is None else role.worker_replicas


def pod_labels(pod: Obj) -> dict[str, str]:
    return pod["metadata"].get("labels") or {}


def group_of(pod: Obj, mi_name: str) -> int | None:
    label = pod_labels(pod).get(GROUP_LABEL, "")
    prefix = mi_name + "-"
    tail = label[len(prefix) :] if label.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else None


def revision(mi: ModelInfer) -> str:
    """A hash of the group template: pods of another revision are outdated. A role's
    replica count is left out: scaling a role adds or removes its instances in every group
    without rolling the others."""
    template = msgspec.to_builtins(mi.spec.template)
    for role in template["roles"]:
        role.pop("replicas", None)
    text = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def slots(mi: ModelInfer, group: int) -> list[PodSlot]:
    out = []
    for role in mi.spec.template.roles:
        for j in range(role_replicas(role)):
            for k in range(1 + worker_replicas(role)):
                out.append(PodSlot(group, role.name, j, k))
    return out


def pod_for(mi: ModelInfer, slot: PodSlot, rev: str) -> Obj:
    name, namespace = name_of(mi), namespace_of(mi)
    role = next(r for r in mi.spec.template.roles if r.name == slot.role)
    entry = slot.pod == 0
    template = copy.deepcopy(
        role.entry_template if entry else role.worker_template or role.entry_template
    )
    meta = template.get("metadata") or {}
    spec = template.get("spec") or {}
    entry_name = PodSlot(slot.group, slot.role, slot.index, 0).name(name)
    env = [
        {"name": "GROUP_SIZE", "value": str(1 + worker_replicas(role))},
        {"name": "ENTRY_ADDRESS", "value": f"{entry_name}.{namespace}"},
        {"name": "WORKER_INDEX", "value": str(slot.pod)},
    ]
    for c in spec.get("containers") or []:
        names = {e["name"] for e in env}
        c["env"] = [e for e in c.get("env") or [] if e.get("name") not in names] + env
    labels = {
        **(meta.get("labels") or {}),
        MODELINFER_LABEL: name,
        GROUP_LABEL: group_name(name, slot.group),
        ROLE_LABEL: slot.role,
        ROLE_INDEX_LABEL: str(slot.index),
        ENTRY_LABEL: "true" if entry else "false",
        REVISION_LABEL: rev,
    }
    model = (mi.metadata.labels or {}).get(MODEL_LABEL)
    if model is not None:
        labels[MODEL_LABEL] = model
    pod_meta = {
        "name": slot.name(name),
        "namespace": namespace,
        "labels": labels,
        "ownerReferences": [owner_reference_of(mi)],
    }
    if meta.get("annotations"):
        pod_meta["annotations"] = dict(meta["annotations"])
    if mi.spec.scheduler_name:
        spec.setdefault("schedulerName", mi.spec.scheduler_name)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": spec}


def slot_of(pod: Obj, mi_name: str) -> PodSlot | None:
    labels = pod_labels(pod)
    group = group_of(pod, mi_name)
    tail = pod["metadata"]["name"].rsplit("-", 1)[-1]
    if group is None or not tail.isdigit() or not labels.get(ROLE_INDEX_LABEL, "").isdigit():
        return None
    return PodSlot(group, labels.get(ROLE_LABEL, ""), int(labels[ROLE_INDEX_LABEL]), int(tail))


def service_for(mi: ModelInfer, slot: PodSlot) -> Obj:
    """A headless Service per role instance, named after its entry pod, so workers reach
    the entry at a stable DNS name (ENTRY_ADDRESS)."""
    mi_name = name_of(mi)
    group = group_name(mi_name, slot.group)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": PodSlot(slot.group, slot.role, slot.index, 0).name(mi_name),
            "namespace": namespace_of(mi),
            "labels": {MODELINFER_LABEL: mi_name, GROUP_LABEL: group},
            "ownerReferences": [owner_reference_of(mi)],
        },
        "spec": {
            "clusterIP": "None",
            "selector": {
                GROUP_LABEL: group,
                ROLE_LABEL: slot.role,
                ROLE_INDEX_LABEL: str(slot.index),
            },
        },
    }


def pod_group_for(mi: ModelInfer, group: int) -> Obj:
    """Volcano gang scheduling: every pod of a group starts together or not at all."""
    mi_name = name_of(mi)
    return {
        "apiVersion": "scheduling.volcano.sh/v1beta1",
        "kind": "PodGroup",
        "metadata": {
            "name": group_name(mi_name, group),
            "namespace": namespace_of(mi),
            "labels": {MODELINFER_LABEL: mi_name},
            "ownerReferences": [owner_reference_of(mi)],
        },
        "spec": {"minMember": len(slots(mi, group))},
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


def cannot_run(pod: Obj) -> str | None:
    """Why a container of the pod cannot run on its node (standalone mode: its engine is not
    installed here), or None."""
    for c in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (c.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") == ENGINE_NOT_INSTALLED:
            return f"container {c.get('name')}: {waiting.get('message', '')}"
    return None


def _rolling_update(mi: ModelInfer) -> tuple[int | str | None, int | str | None]:
    """(maxUnavailable, partition) as written, None where unset."""
    rollout = mi.spec.rollout_strategy
    config = rollout.rolling_update_configuration if rollout is not None else None
    if config is None:
        return None, None
    return config.max_unavailable, config.partition


def _count(value: int | str, groups: int) -> int:
    """An int, or a percentage of `groups` rounded down."""
    if isinstance(value, str) and value.endswith("%"):
        return groups * int(value[:-1]) // 100
    return int(value)


def max_unavailable(mi: ModelInfer) -> int:
    """maxUnavailable as a count of groups: an int, or a percentage of replicas rounded
    down; never below 1, or a rollout could not start."""
    raw = _rolling_update(mi)[0]
    return max(1, _count(DEFAULT_MAX_UNAVAILABLE if raw is None else raw, replicas(mi)))


def partition(mi: ModelInfer) -> int:
    raw = _rolling_update(mi)[1]
    return _count(0 if raw is None else raw, replicas(mi))
