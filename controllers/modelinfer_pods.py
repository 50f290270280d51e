"""What a ModelInfer's pods and services should look like: names, labels, environment,
revisions, gang scheduling. Pure functions, so the reconciler's decisions can be read and
tested apart.

A role instance is an entry pod and its workers (pods 1..workerReplicas). Only the entry
serves: workers join its engine (their command says how: controllers/engine_command.py) and
find it at ENTRY_ADDRESS, the headless Service named after the entry pod, which resolves to
the entry alone and before it is ready (the entry is ready only once its workers joined). A
worker never carries the Model's label the InferencePool selects by, and ENTRY_LABEL "false"
keeps it out of any pool (cluster/pool.py).

Gang scheduling (gangPolicy.enabled, or schedulerName volcano) hands a group's pods to
Volcano: each pod names its group's PodGroup (GANG_ANNOTATION) and its role as Volcano's task
(TASK_ANNOTATION); the PodGroup's minMember and minTaskMember say how many must start
together, after gangPolicy.minRoleReplicas.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass

import msgspec

from infergw.api import ModelInfer
from infergw.api.names import (
    ENGINE_NOT_INSTALLED,
    ENTRY_ADDRESS_ENV,
    ENTRY_LABEL,
    GROUP_LABEL,
    GROUP_SIZE_ENV,
    MODEL_LABEL,
    MODELINFER_LABEL,
    REVISION_LABEL,
    ROLE_INDEX_LABEL,
    ROLE_LABEL,
    WORKER_INDEX_ENV,
)
from infergw.api.object_names import dns_label, label_value, subdomain
from infergw.api.workload import (
    DEFAULT_MAX_UNAVAILABLE,
    DEFAULT_REPLICAS,
    DEFAULT_RESTART_GRACE_SECONDS,
    DEFAULT_ROLE_REPLICAS,
    DEFAULT_WORKER_REPLICAS,
    VOLCANO,
    Role,
)
from infergw.cluster.store import Obj, owner_reference_of
from infergw.controllers.weights import is_download

# Volcano's: the PodGroup a pod belongs to, and the task (here: the role) within it that
# minTaskMember counts.
GANG_ANNOTATION = "scheduling.k8s.io/group-name"
TASK_ANNOTATION = "volcano.sh/task-spec"
POD_GROUP_API_VERSION = "scheduling.volcano.sh/v1beta1"


@dataclass(slots=True, frozen=True)
class PodSlot:
    """One pod the template asks for: group g, role instance j of role, pod k (0 = entry)."""

    group: int
    role: str
    index: int
    pod: int

    def name(self, mi_name: str) -> str:
        """`<mi>-<group>-<role>-<index>-<pod>`; for a long ModelInfer name, truncated before
        the group with a hash (api/object_names.py): slot_of reads the pod index at the end."""
        return subdomain(mi_name, f"-{self.group}-{self.role}-{self.index}-{self.pod}")


def group_name(mi_name: str, group: int) -> str:
    """`<mi>-<group>`: GROUP_LABEL's value and the group's PodGroup, so a label value (63
    characters; group_of reads the index at the end)."""
    return label_value(mi_name, f"-{group}")


def instance_label(mi_name: str) -> dict[str, str]:
    """MODELINFER_LABEL on the ModelInfer's pods, Services and PodGroups: what it lists them by."""
    return {MODELINFER_LABEL: label_value(mi_name)}


def entry_service_name(mi_name: str, slot: PodSlot) -> str:
    """The headless Service of the slot's role instance: its entry pod's name, as a DNS-1035
    label (a Service's name), which ENTRY_ADDRESS spells."""
    return dns_label(PodSlot(slot.group, slot.role, slot.index, 0).name(mi_name))


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
    tail = label.rpartition("-")[2]
    if not tail.isdigit() or label != group_name(mi_name, int(tail)):
        return None
    return int(tail)


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
    entry_address = f"{entry_service_name(name, slot)}.{namespace}"
    env = [
        {"name": GROUP_SIZE_ENV, "value": str(1 + worker_replicas(role))},
        {"name": ENTRY_ADDRESS_ENV, "value": entry_address},
        {"name": WORKER_INDEX_ENV, "value": str(slot.pod)},
    ]
    for c in spec.get("containers") or []:
        names = {e["name"] for e in env}
        c["env"] = [e for e in c.get("env") or [] if e.get("name") not in names] + env
    labels = {
        **(meta.get("labels") or {}),
        **instance_label(name),
        GROUP_LABEL: group_name(name, slot.group),
        ROLE_LABEL: slot.role,
        ROLE_INDEX_LABEL: str(slot.index),
        ENTRY_LABEL: "true" if entry else "false",
        REVISION_LABEL: rev,
    }
    model = (mi.metadata.labels or {}).get(MODEL_LABEL)
    if not entry:  # the pool selects the Model's pods by it: a worker must not have it
        labels.pop(MODEL_LABEL, None)
    elif model is not None:
        labels[MODEL_LABEL] = model
    pod_meta = {
        "name": slot.name(name),
        "namespace": namespace,
        "labels": labels,
        "ownerReferences": [owner_reference_of(mi)],
    }
    annotations = dict(meta.get("annotations") or {})
    if gang(mi):
        annotations[GANG_ANNOTATION] = group_name(name, slot.group)
        annotations[TASK_ANNOTATION] = slot.role
    if annotations:
        pod_meta["annotations"] = annotations
    scheduler = scheduler_name(mi)
    if scheduler:
        spec.setdefault("schedulerName", scheduler)
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
    the entry at a stable DNS name (ENTRY_ADDRESS): it selects the entry pod alone, and
    publishes its address before it is ready, since the entry is ready only once its
    workers have joined it."""
    mi_name = name_of(mi)
    group = group_name(mi_name, slot.group)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": entry_service_name(mi_name, slot),
            "namespace": namespace_of(mi),
            "labels": {**instance_label(mi_name), GROUP_LABEL: group},
            "ownerReferences": [owner_reference_of(mi)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {
                GROUP_LABEL: group,
                ROLE_LABEL: slot.role,
                ROLE_INDEX_LABEL: str(slot.index),
                ENTRY_LABEL: "true",
            },
        },
    }


def gang(mi: ModelInfer) -> bool:
    """Whether the groups are gang-scheduled: asked by gangPolicy.enabled, or by Volcano as
    the scheduler (the CRD's rule keeps the two from naming different schedulers)."""
    policy = mi.spec.gang_policy
    return bool(policy is not None and policy.enabled) or mi.spec.scheduler_name == VOLCANO


def scheduler_name(mi: ModelInfer) -> str | None:
    """The pods' scheduler: as written, else Volcano for a gang."""
    return mi.spec.scheduler_name or (VOLCANO if gang(mi) else None)


def gang_task_members(mi: ModelInfer) -> dict[str, int]:
    """Per role, the pods that must be schedulable together: every pod of
    min(minRoleReplicas, replicas) of its instances (all of them when the role is not named)."""
    floor = (mi.spec.gang_policy.min_role_replicas if mi.spec.gang_policy else None) or {}
    out = {}
    for role in mi.spec.template.roles:
        instances = role_replicas(role)
        if role.name in floor:
            instances = min(floor[role.name], instances)
        out[role.name] = instances * (1 + worker_replicas(role))
    return out


def pod_group_for(mi: ModelInfer, group: int) -> Obj:
    """Volcano gang scheduling: a group's pods start together, at least minMember of them
    and minTaskMember of each role's, or none."""
    mi_name = name_of(mi)
    tasks = gang_task_members(mi)
    return {
        "apiVersion": POD_GROUP_API_VERSION,
        "kind": "PodGroup",
        "metadata": {
            "name": group_name(mi_name, group),
            "namespace": namespace_of(mi),
            "labels": instance_label(mi_name),
            "ownerReferences": [owner_reference_of(mi)],
        },
        "spec": {"minMember": sum(tasks.values()), "minTaskMember": tasks},
    }


def restart_grace_seconds(mi: ModelInfer) -> float:
    """How long a failed or restarted pod is left to come back by itself (its container
    restarted by the kubelet, ready again) before the recovery policy rebuilds around it."""
    grace = mi.spec.template.restart_grace_period_seconds
    return float(DEFAULT_RESTART_GRACE_SECONDS if grace is None else grace)


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


def failure_of(pod: Obj) -> tuple[int, bool]:
    """What tells one failure from the next: the containers' restarts, and phase Failed."""
    status = pod.get("status") or {}
    restarts = sum(int(c.get("restartCount", 0)) for c in status.get("containerStatuses") or [])
    return restarts, status.get("phase") == "Failed"


def cannot_run(pod: Obj) -> str | None:
    """Why a container of the pod cannot run on its node (standalone mode: its engine is not
    installed here), or None."""
    for c in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (c.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") == ENGINE_NOT_INSTALLED:
            return f"container {c.get('name')}: {waiting.get('message', '')}"
    return None


def download_failure(pod: Obj) -> str | None:
    """Why the pod's weights are not there: a download init container (weights.py) whose
    last run failed and that is not running again, with its error line (the last line of its
    termination message), or None."""
    for c in (pod.get("status") or {}).get("initContainerStatuses") or []:
        if not is_download(c.get("name", "")):
            continue
        state = c.get("state") or {}
        ended = state.get("terminated") or (
            (c.get("lastState") or {}).get("terminated") if "waiting" in state else None
        )
        if ended and ended.get("exitCode"):
            lines = [line for line in str(ended.get("message") or "").splitlines() if line.strip()]
            said = lines[-1].removeprefix("infergate download: ") if lines else "no message"
            return f"container {c['name']} exited with {ended['exitCode']}: {said}"
    return None


def downloading(pod: Obj) -> str | None:
    """What the pod's download init container is doing while it runs (its bytes are in its
    log: a line every 10 s), or None when none runs."""
    for c in (pod.get("status") or {}).get("initContainerStatuses") or []:
        if not is_download(c.get("name", "")) or "running" not in (c.get("state") or {}):
            continue
        since = (c["state"]["running"] or {}).get("startedAt")
        tries = int(c.get("restartCount") or 0)
        said = f"container {c['name']} running"
        said += f" since {since}" if since else ""
        said += f", try {tries + 1} (resuming)" if tries else ""
        return said
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
