"""The one interface reconcilers use to read and write API objects, whatever holds them:
a Kubernetes API server (kube_store.py) or memory (memory_store.py, for standalone mode).

Objects are plain dicts shaped as the API serves them. Semantics follow kube-apiserver:
every write bumps metadata.resourceVersion; an update carrying a stale resourceVersion is a
Conflict; a spec change bumps metadata.generation; writes to an object keep its status and
status writes keep everything else; deleting an owner deletes its dependents.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from infergw.api.upstream import (
    LEGACY_OBJECTIVE_GROUP_VERSION,
    OBJECTIVE_GROUP_VERSION,
    POOL_GROUP_VERSION,
)

if TYPE_CHECKING:
    from infergw.api import Model, ModelInfer

Obj = dict[str, Any]


@dataclass(slots=True, frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]


POD = Kind("v1", "Pod", "pods")
NAMESPACE = Kind("v1", "Namespace", "namespaces", namespaced=False)  # read by the webhook only
SERVICE = Kind("v1", "Service", "services")
LEASE = Kind("coordination.k8s.io/v1", "Lease", "leases")
# Read by the picker only: its replicas find each other through a headless Service's slices.
ENDPOINT_SLICE = Kind("discovery.k8s.io/v1", "EndpointSlice", "endpointslices")
# What the controllers report (controllers/events.py) and `infergate status` reads.
EVENT = Kind("events.k8s.io/v1", "Event", "events")
INFERENCE_POOL = Kind(POOL_GROUP_VERSION, "InferencePool", "inferencepools")
# Named priorities the picker reads; no controller reconciles them (standalone mode applies
# them from manifests and exports them to the picker's pool file). llm-d router's group; the
# picker also reads the Inference Extension's older one where that CRD is installed.
INFERENCE_OBJECTIVE = Kind(OBJECTIVE_GROUP_VERSION, "InferenceObjective", "inferenceobjectives")
LEGACY_INFERENCE_OBJECTIVE = Kind(
    LEGACY_OBJECTIVE_GROUP_VERSION, "InferenceObjective", "inferenceobjectives"
)
MODEL = Kind("workload.infergate.io/v1alpha1", "Model", "models")
MODEL_INFER = Kind("workload.infergate.io/v1alpha1", "ModelInfer", "modelinfers")
AUTOSCALING_POLICY = Kind(
    "workload.infergate.io/v1alpha1", "AutoScalingPolicy", "autoscalingpolicies"
)
AUTOSCALING_BINDING = Kind(
    "workload.infergate.io/v1alpha1", "AutoScalingPolicyBinding", "autoscalingpolicybindings"
)
MODEL_SERVER = Kind("networking.infergate.io/v1alpha1", "ModelServer", "modelservers")
MODEL_ROUTE = Kind("networking.infergate.io/v1alpha1", "ModelRoute", "modelroutes")
POD_GROUP = Kind("scheduling.volcano.sh/v1beta1", "PodGroup", "podgroups")
# What a Model's endpoint picker runs as in a cluster (controllers/picker_objects.py), and the
# HTTPRoute that attaches its InferencePool to a Gateway.
DEPLOYMENT = Kind("apps/v1", "Deployment", "deployments")
CONFIG_MAP = Kind("v1", "ConfigMap", "configmaps")
SERVICE_ACCOUNT = Kind("v1", "ServiceAccount", "serviceaccounts")
ROLE = Kind("rbac.authorization.k8s.io/v1", "Role", "roles")
ROLE_BINDING = Kind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings")
POD_DISRUPTION_BUDGET = Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets")
HTTP_ROUTE = Kind("gateway.networking.k8s.io/v1", "HTTPRoute", "httproutes")
SECRET = Kind("v1", "Secret", "secrets")  # a Model's picker certificate (picker_tls.py)
ENVOY_PATCH_POLICY = Kind(
    "gateway.envoyproxy.io/v1alpha1", "EnvoyPatchPolicy", "envoypatchpolicies"
)  # a Model's picker in Envoy Gateway's xDS (picker_patch.py)

# Written by the controllers in a cluster only: standalone mode runs its own picker and Envoy,
# and takes none of these from a manifest directory.
CLUSTER_ONLY = frozenset(
    (
        DEPLOYMENT,
        CONFIG_MAP,
        SERVICE_ACCOUNT,
        ROLE,
        ROLE_BINDING,
        POD_DISRUPTION_BUDGET,
        HTTP_ROUTE,
        SECRET,
        ENVOY_PATCH_POLICY,
    )
)

KINDS = {
    k.kind: k
    for k in (
        POD,
        SERVICE,
        LEASE,
        EVENT,
        INFERENCE_POOL,
        INFERENCE_OBJECTIVE,
        MODEL,
        MODEL_INFER,
        AUTOSCALING_POLICY,
        AUTOSCALING_BINDING,
        MODEL_SERVER,
        MODEL_ROUTE,
        POD_GROUP,
        *CLUSTER_ONLY,
    )
}


def kind_of(obj: Obj) -> Kind:
    try:
        return KINDS[obj["kind"]]
    except KeyError:
        raise ValueError(f"unknown kind {obj.get('kind')!r}") from None


class StoreError(Exception):
    code = 500


class NotFound(StoreError):
    code = 404


class AlreadyExists(StoreError):
    code = 409


class Conflict(StoreError):
    """The object changed since it was read: read it again and retry."""

    code = 409


class Gone(StoreError):
    """A watch's resourceVersion is too old: list again."""

    code = 410


class Invalid(StoreError):
    code = 422


class Unavailable(StoreError):
    """The API server could not be reached or did not answer."""

    code = 503


class Store(Protocol):
    async def get(self, kind: Kind, namespace: str, name: str) -> Obj | None: ...

    async def list(
        self, kind: Kind, namespace: str | None = None, labels: dict[str, str] | None = None
    ) -> tuple[list[Obj], str]:
        """The objects and the resourceVersion to watch from."""
        ...

    async def create(self, obj: Obj) -> Obj: ...

    async def update(self, obj: Obj) -> Obj: ...

    async def update_status(self, obj: Obj) -> Obj: ...

    async def delete(self, kind: Kind, namespace: str, name: str) -> None: ...

    def watch(
        self,
        kind: Kind,
        namespace: str | None,
        resource_version: str,
        labels: dict[str, str] | None = None,
    ) -> AsyncIterator[tuple[str, Obj]]:
        """(ADDED|MODIFIED|DELETED, object) after resource_version; raises Gone. With labels,
        only objects that have them: one that stops matching comes as DELETED."""
        ...


def meta(obj: Obj) -> dict[str, Any]:
    return obj.setdefault("metadata", {})


def owner_reference(owner: Obj, *, controller: bool = True) -> dict[str, Any]:
    m = owner["metadata"]
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": m["name"],
        "uid": m["uid"],
        "controller": controller,
        "blockOwnerDeletion": True,
    }


def owner_reference_of(owner: Model | ModelInfer) -> dict[str, Any]:
    """owner_reference for a typed object of ours: the controller reference its objects get."""
    m = owner.metadata
    identity = {"name": m.name, "uid": m.uid}
    return owner_reference(
        {"apiVersion": owner.api_version, "kind": owner.kind, "metadata": identity}
    )


def controller_of(obj: Obj) -> dict[str, Any] | None:
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref
    return None


def labels_match(obj: Obj, labels: dict[str, str] | None) -> bool:
    have = obj.get("metadata", {}).get("labels") or {}
    return all(have.get(k) == v for k, v in (labels or {}).items())
