"""gateway.envoyproxy.io/v1alpha1 EnvoyPatchPolicy: JSON patches Envoy Gateway applies to the
xDS it renders for a Gateway. The controllers write one per Model (controllers/picker_patch.py)
to run the Model's picker on its route.

Not one of our kinds: no validation here (Envoy Gateway's CRD does it) and not in `api.KINDS`;
`read_envoy_patch_policy` decodes one the API server returned, with the status Envoy Gateway
reports (read to tell whether a Model is reachable).
"""

from __future__ import annotations

from typing import Any

import msgspec

from infergw.api.core import StatusCondition
from infergw.api.meta import ApiStruct, ObjectMeta
from infergw.api.networking import ParentRef

GROUP_VERSION = "gateway.envoyproxy.io/v1alpha1"
# The xDS resource types a patch names (Envoy's type URLs).
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ROUTE_CONFIGURATION_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"


class PolicyTargetRef(ApiStruct):
    group: str
    kind: str
    name: str


class JSONPatchOperation(ApiStruct):
    op: str  # add | remove | replace | move | copy | test
    path: str | None = None
    json_path: str | None = None  # Envoy Gateway v1.2+: select the nodes `path` is relative to
    value: Any = None


class EnvoyJSONPatch(ApiStruct):
    type: str  # an xDS type URL
    name: str  # the xDS resource's name
    operation: JSONPatchOperation


class EnvoyPatchPolicySpec(ApiStruct):
    target_ref: PolicyTargetRef
    type: str = "JSONPatch"
    json_patches: list[EnvoyJSONPatch] = msgspec.field(default_factory=list)
    priority: int | None = None


class PolicyAncestorStatus(ApiStruct):
    """Envoy Gateway's report on a policy for one of the objects it applies to (a Gateway)."""

    ancestor_ref: ParentRef
    controller_name: str | None = None
    conditions: list[StatusCondition] | None = None


class EnvoyPatchPolicyStatus(ApiStruct):
    """Accepted and Programmed, per Gateway (`ancestors`: Gateway API's PolicyStatus, Envoy
    Gateway v1.1 and later) or once for the policy (`conditions`: v0.5 to v1.0)."""

    ancestors: list[PolicyAncestorStatus] | None = None
    conditions: list[StatusCondition] | None = None


class EnvoyPatchPolicy(ApiStruct, kw_only=True):
    api_version: str = GROUP_VERSION
    kind: str = "EnvoyPatchPolicy"
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: EnvoyPatchPolicySpec
    status: EnvoyPatchPolicyStatus | None = None  # Envoy Gateway's; never written by us


def read_envoy_patch_policy(obj: dict) -> EnvoyPatchPolicy:
    """An EnvoyPatchPolicy as the API server returned it; msgspec.ValidationError if it is not
    one."""
    return msgspec.convert(obj, EnvoyPatchPolicy)
