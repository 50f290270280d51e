"""Whether a Model is reachable through its Gateway: its HTTPRoute is Accepted by that Gateway
with ResolvedRefs (the InferencePool, and through it the picker Service, resolved), and its
picker Deployment is Available. The Model's `Reachable` condition, with what is missing.

Read from the objects as the Gateway's controller and the Deployment controller report them;
a report about an older generation of the route does not count.
"""

from __future__ import annotations

import msgspec

from infergw.api.core import StatusCondition, condition_of, read_deployment
from infergw.api.gateway import GROUP as GATEWAY_GROUP
from infergw.api.gateway import RouteParentStatus, read_http_route
from infergw.api.networking import ParentRef
from infergw.cluster.store import Obj

REACHABLE = "Reachable"
# Why an InferencePool backendRef stays unresolved on Envoy Gateway: the recipe's missing part.
UNRESOLVED_HINT = (
    "Envoy Gateway resolves an InferencePool backendRef only with Envoy AI Gateway's "
    "InferencePool backend enabled (README, 'A Model in a cluster')"
)


def _same_parent(have: ParentRef, want: ParentRef, route_namespace: str) -> bool:
    return (
        (have.group or GATEWAY_GROUP) == want.group
        and (have.kind or "Gateway") == want.kind
        and have.name == want.name
        and (have.namespace or route_namespace) == want.namespace
        and have.section_name == want.section_name
    )


def _said(c: StatusCondition) -> str:
    """A condition as a message says it: `False: Reason (message)`."""
    return f"{c.status}: {c.reason or 'no reason'}" + (f" ({c.message})" if c.message else "")


def route_problems(route: Obj | None, gateway: ParentRef) -> list[tuple[str, str]]:
    """(reason, message) for each way the route is not yet served by `gateway`."""
    where = f"Gateway {gateway.namespace}/{gateway.name}"
    if route is None:
        return [("RouteMissing", "the HTTPRoute does not exist")]
    name = route["metadata"].get("name")
    try:
        typed = read_http_route(route)
    except msgspec.ValidationError as exc:
        return [("RouteStatusUnreadable", f"HTTPRoute {name}: {exc}")]
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
        found = [c for p in parents if (c := condition_of(p.conditions, kind)) is not None]
        current = [c for c in found if c.observed_generation in (None, generation)]
        if any(c.status == "True" for c in current):
            continue
        if not current:
            detail = "not reported for its current generation" if found else "not reported"
        else:
            detail = _said(current[0])
            if kind == "ResolvedRefs":
                detail += f"; {UNRESOLVED_HINT}"
        problems.append((reason, f"HTTPRoute {name} on {where}: {kind} {detail}"))
    return problems


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
    route: Obj | None, gateway: ParentRef, deployment: Obj | None
) -> tuple[bool, str, str]:
    """The Reachable condition's (status, reason, message): the first reason, every message."""
    problems = route_problems(route, gateway) + picker_problems(deployment)
    if problems:
        return False, problems[0][0], "; ".join(m for _, m in problems)
    where = f"Gateway {gateway.namespace}/{gateway.name}"
    return True, "RouteAccepted", f"{where} accepted the route and the endpoint picker is available"
