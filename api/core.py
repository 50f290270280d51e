"""The built-in kinds the controllers write for a Model's endpoint picker (ServiceAccount,
Role, RoleBinding, ConfigMap, Service, Deployment, PodDisruptionBudget), with the fields we
set, and the Deployment status we read back.

Not our kinds: the API server validates them; nothing here does, and they are not in
`api.KINDS`. A Deployment's pod template is kept as written, as a ModelInfer's is.
"""

from __future__ import annotations

from typing import Any

import msgspec

from infergw.api.meta import ApiStruct, ObjectMeta

RBAC_GROUP = "rbac.authorization.k8s.io"


class StatusCondition(ApiStruct):
    """A condition as another controller writes it: only type and status are sure to be set."""

    type: str
    status: str
    reason: str | None = None
    message: str | None = None
    observed_generation: int | None = None


def condition_of(conditions: list[StatusCondition] | None, kind: str) -> StatusCondition | None:
    return next((c for c in conditions or [] if c.type == kind), None)


class LabelSelector(ApiStruct):
    match_labels: dict[str, str]


# ---- identity and permissions ----------------------------------------------------------------


class ServiceAccount(ApiStruct, kw_only=True):
    api_version: str = "v1"
    kind: str = "ServiceAccount"
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    automount_service_account_token: bool | None = None


class PolicyRule(ApiStruct):
    api_groups: list[str]
    resources: list[str]
    verbs: list[str]


class Role(ApiStruct, kw_only=True):
    api_version: str = f"{RBAC_GROUP}/v1"
    kind: str = "Role"
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    rules: list[PolicyRule]


class RoleRef(ApiStruct):
    api_group: str
    kind: str
    name: str


class Subject(ApiStruct):
    kind: str
    name: str
    namespace: str | None = None


class RoleBinding(ApiStruct, kw_only=True):
    api_version: str = f"{RBAC_GROUP}/v1"
    kind: str = "RoleBinding"
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    role_ref: RoleRef
    subjects: list[Subject]


# ---- configuration and networking --------------------------------------------------------------


class ConfigMap(ApiStruct, kw_only=True):
    api_version: str = "v1"
    kind: str = "ConfigMap"
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    data: dict[str, str]


class Secret(ApiStruct, kw_only=True):
    api_version: str = "v1"
    kind: str = "Secret"
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    type: str | None = None
    data: dict[str, str] | None = None  # base64, as the API server stores it


class ServicePort(ApiStruct):
    name: str
    port: int
    target_port: int | str | None = None
    protocol: str | None = None
    app_protocol: str | None = None


class ServiceSpec(ApiStruct):
    selector: dict[str, str]
    ports: list[ServicePort]
    type: str | None = None
    cluster_ip: str | None = msgspec.field(default=None, name="clusterIP")
    publish_not_ready_addresses: bool | None = None


class Service(ApiStruct, kw_only=True):
    api_version: str = "v1"
    kind: str = "Service"
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: ServiceSpec


# ---- workloads ---------------------------------------------------------------------------------


class RollingUpdate(ApiStruct):
    max_surge: int | str | None = None
    max_unavailable: int | str | None = None


class DeploymentStrategy(ApiStruct):
    type: str
    rolling_update: RollingUpdate | None = None


class DeploymentSpec(ApiStruct):
    replicas: int
    selector: LabelSelector
    template: dict[str, Any]  # a core/v1 PodTemplateSpec, kept as written
    strategy: DeploymentStrategy | None = None


class DeploymentStatus(ApiStruct):
    observed_generation: int | None = None
    replicas: int | None = None
    ready_replicas: int | None = None
    available_replicas: int | None = None
    conditions: list[StatusCondition] | None = None


class Deployment(ApiStruct, kw_only=True):
    api_version: str = "apps/v1"
    kind: str = "Deployment"
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: DeploymentSpec
    status: DeploymentStatus | None = None


class PodDisruptionBudgetSpec(ApiStruct):
    selector: LabelSelector
    min_available: int | str | None = None


class PodDisruptionBudget(ApiStruct, kw_only=True):
    api_version: str = "policy/v1"
    kind: str = "PodDisruptionBudget"
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: PodDisruptionBudgetSpec


def read_deployment(obj: dict[str, Any]) -> Deployment:
    """A Deployment as the API server returned it; msgspec.ValidationError if it is not one."""
    return msgspec.convert(obj, Deployment)
