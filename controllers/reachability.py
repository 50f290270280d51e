"""Whether a Model is reachable through its Gateway: its HTTPRoute is Accepted by that Gateway
with ResolvedRefs (the InferencePool, and through it the picker Service, resolved), the
EnvoyPatchPolicies that run its picker on the route (the install's Gateway-wide picker filter
and the Model's own, when one is written) Accepted and Programmed by Envoy Gateway for that
Gateway, and its picker Deployment is Available. The Model's `Reachable` condition, with what
is missing: route first, then the patches (without them the route fails closed), then the
picker.

Read from the objects as the Gateway's controller and the Deployment controller report them;
a report about an older generation of the route or a policy does not count. What another
controller wrote is quoted clipped (MAX_QUOTED): a hostile status cannot grow the Model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from infergw.api.core import StatusCondition, condition_of, read_deployment
from infergw.api.envoy_gateway import read_envoy_patch_policy
from infergw.api.gateway import GROUP as GATEWAY_GROUP
from infergw.api.gateway import RouteParentStatus, read_http_route
from infergw.api.networking import ParentRef
from infergw.cluster.store import Obj

REACHABLE = "Reachable"
MAX_QUOTED = 200  # characters of another controller's reason or message quoted in ours
# Why an InferencePool backendRef stays unresolved on Envoy Gateway: the recipe's missing part.
UNRESOLVED_HINT = (
    "Envoy Gateway resolves an InferencePool backendRef only with Envoy AI Gateway's "
    "InferencePool backend enabled (README, 'A Model in a cluster')"
)


def _same_gateway(have: ParentRef, want: ParentRef, own_namespace: str) -> bool:
    return (
        (have.group or GATEWAY_GROUP) == want.group
        and (have.kind or "Gateway") == want.kind
        and have.name == want.name
        and (have.namespace or own_namespace) == want.namespace
    )


def _same_parent(have: ParentRef, want: ParentRef, route_namespace: str) -> bool:
    return _same_gateway(have, want, route_namespace) and have.section_name == want.section_name


def clip(text: str, limit: int = MAX_QUOTED) -> str:
    """`text` cut to `limit` characters, saying so."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _said(c: StatusCondition) -> str:
    """A condition as a message says it: `False: Reason (message)`, each part clipped."""
    said = f"{clip(c.status)}: {clip(c.reason or 'no reason')}"
    return said + (f" ({clip(c.message)})" if c.message else "")


def _current(
    conditions: list[StatusCondition], kind: str, generation: int | None
) -> tuple[bool, StatusCondition | None, bool]:
    """(True for the current generation, the first current report, whether any was found) of
    condition `kind`; a report without observedGeneration counts as current."""
    found = [c for c in conditions if c.type == kind]
    current = [c for c in found if c.observed_generation in (None, generation)]
    ok = any(c.status == "True" for c in current)
    return ok, (current[0] if current else None), bool(found)


def _detail(kind: str, first: StatusCondition | None, found: bool) -> str:
    if first is not None:
        return f"{kind} {_said(first)}"
    return f"{kind} " + ("not reported for its current generation" if found else "not reported")


def route_problems(route: Obj | None, gateway: ParentRef) -> list[tuple[str, str]]:
    """(reason, message) for each way the route is not yet served by `gateway`."""
    where = f"Gateway {gateway.namespace}/{gateway.name}"
    if route is None:
        return [("RouteMissing", "the HTTPRoute does not exist")]
    name = route["metadata"].get("name")
    try:
        typed = read_http_route(route)
    except msgspec.ValidationError as exc:
        return [("RouteStatusUnreadable", f"HTTPRoute {name}: {clip(str(exc))}")]
    namespace = typed.metadata.namespace or ""
    generation = typed.metadata.generation
    parents: list[RouteParentStatus] = [
        p
        for p in (typed.status.parents if typed.status else None) or []
        if _same_parent(p.parent_ref, gateway, namespace)
    ]
    if not parents:
        return [("RouteNotSeen", f"no controller of {where} has reported on HTTPRoute {name} yet")]
    problems = []
    for kind, reason in (("Accepted", "RouteNotAccepted"), ("ResolvedRefs", "RouteRefsUnresolved")):
        # one condition of each type per parent: the first, as condition_of reads it
        reported = [c for p in parents if (c := condition_of(p.conditions, kind)) is not None]
        ok, first, found = _current(reported, kind, generation)
        if ok:
            continue
        detail = _detail(kind, first, found)
        if first is not None and kind == "ResolvedRefs":
            detail += f"; {UNRESOLVED_HINT}"
        problems.append((reason, f"HTTPRoute {name} on {where}: {detail}"))
    return problems


@dataclass(slots=True, frozen=True)
class Patch:
    """An EnvoyPatchPolicy the route needs: its name, the object (None: missing or not the one
    we mean) and the reason to give when it is missing."""

    name: str
    obj: Obj | None
    missing: str


def patch_problems(patch: Patch, gateway: ParentRef) -> list[tuple[str, str]]:
    """(reason, message) while Envoy Gateway has not applied `patch` to `gateway`: the first of
    not seen, not Accepted, not Programmed (Accepted False leaves Programmed unreported)."""
    where = f"Gateway {gateway.namespace}/{gateway.name}"
    if patch.obj is None:
        return [(patch.missing, f"EnvoyPatchPolicy {patch.name} does not exist")]
    try:
        typed = read_envoy_patch_policy(patch.obj)
    except msgspec.ValidationError as exc:
        return [("PatchStatusUnreadable", f"EnvoyPatchPolicy {patch.name}: {clip(str(exc))}")]
    namespace = typed.metadata.namespace or ""
    generation = typed.metadata.generation
    status = typed.status
    # v1.1 and later: one entry per Gateway; before: the policy's conditions, about its only
    # target (the Gateway, which `patch` targets).
    if status is not None and status.ancestors:
        conditions = [
            c
            for a in status.ancestors
            if _same_gateway(a.ancestor_ref, gateway, namespace)
            for c in a.conditions or []
        ]
    else:
        conditions = (status.conditions if status else None) or []
    if not conditions:
        return [("PatchNotSeen", f"Envoy Gateway has not reported on EnvoyPatchPolicy "
                                 f"{patch.name} for {where} yet")]  # fmt: skip
    for kind, reason in (("Accepted", "PatchNotAccepted"), ("Programmed", "PatchNotProgrammed")):
        ok, first, found = _current(conditions, kind, generation)
        if not ok:
            detail = _detail(kind, first, found)
            return [(reason, f"EnvoyPatchPolicy {patch.name} on {where}: {detail}")]
    return []


def picker_problems(deployment: Obj | None) -> list[tuple[str, str]]:
    """(reason, message) when the picker Deployment is missing or not Available."""
    if deployment is None:
        return [("PickerMissing", "the endpoint picker's Deployment does not exist")]
    name = deployment["metadata"].get("name")
    try:
        typed = read_deployment(deployment)
    except msgspec.ValidationError as exc:
        return [("PickerStatusUnreadable", f"Deployment {name}: {exc}")]
    available = condition_of(typed.status.conditions if typed.status else None, "Available")
    if available is not None and available.status == "True":
        return []
    detail = "Available " + (_said(available) if available else "not reported yet")
    ready = (typed.status.ready_replicas if typed.status else None) or 0
    return [("PickerUnavailable", f"endpoint picker Deployment {name}: {detail}, {ready} ready")]


def reachable(
    route: Obj | None,
    gateway: ParentRef,
    deployment: Obj | None,
    patches: Sequence[Patch] = (),
) -> tuple[bool, str, str]:
    """The Reachable condition's (status, reason, message): the first reason, every message.
    `patches`: the EnvoyPatchPolicies the route needs, in the order to report them."""
    problems = route_problems(route, gateway)
    for patch in patches:
        problems += patch_problems(patch, gateway)
    problems += picker_problems(deployment)
    if problems:
        return False, problems[0][0], "; ".join(m for _, m in problems)
    where = f"Gateway {gateway.namespace}/{gateway.name}"
    applied = ", Envoy Gateway applied the picker's patches" if patches else ""
    return (
        True,
        "RouteAccepted",
        f"{where} accepted the route{applied} and the endpoint picker is available",
    )
