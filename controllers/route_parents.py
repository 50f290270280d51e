"""The Gateways a Model's HTTPRoute attaches to besides the Model's own: those named by the
parentRefs of the ModelRoutes that target the Model (an `inferencePoolName` that is its pool,
or a `modelServerName` whose pods are in its pool, api/parents.py's pool_of_server, as the
body-based router resolves it). A request for such a route on Gateway B gets the Model's pool
from B's router; the Model's HTTPRoute must be on B for Envoy to send it there.

Level-triggered: each reconcile of a Model recomputes the set from all ModelRoutes of its
namespace, so a route removed (or no longer naming B, or no longer targeting the Model)
detaches at the Model's next pass; the Model controller is woken by every ModelRoute and
ModelServer change in the namespace (controllers/app.py).

A ModelRoute without parentRefs ("the Gateways of its namespace") adds nothing here: the
controllers do not read Gateways, so such a route reaches its Models where their own
HTTPRoutes already are (README: ModelRoute and ModelServer fields).
"""

from __future__ import annotations

import logging

from infergw.api import ApiError, from_dict_as, validate
from infergw.api.gateway import GROUP as GATEWAY_GROUP
from infergw.api.networking import PARENT_KIND, ModelRoute, ModelServer, ParentRef
from infergw.api.parents import pool_of_server
from infergw.api.upstream import InferencePool
from infergw.api.workload import Model
from infergw.cluster.store import INFERENCE_POOL, MODEL_ROUTE, MODEL_SERVER, Obj, Store, StoreError

log = logging.getLogger("controllers.route_parents")

# The Gateway API's bound on an HTTPRoute's parentRefs (its CRD's maxItems).
MAX_PARENTS = 32


def route_parents(
    model: Model,
    own_pool_labels: dict[str, str],
    routes: list[ModelRoute],
    servers: list[ModelServer],
    pools: dict[str, dict[str, str]],
) -> list[ParentRef]:
    """The parents the ModelRoutes add to the Model's HTTPRoute, sorted, without duplicates.
    `pools`: the namespace's InferencePools (name -> matchLabels); the Model's own pool is
    taken as `own_pool_labels` whether or not it is written yet."""
    name = model.metadata.name or ""
    pools = {**pools, name: own_pool_labels}
    by_name = {s.metadata.name or "": s for s in servers}
    found: set[tuple[str, str, str]] = set()
    for route in routes:
        if not route.spec.parent_refs or not _targets(route, name, by_name, pools):
            continue
        own = route.metadata.namespace or "default"
        for ref in route.spec.parent_refs:
            found.add((ref.namespace or own, ref.name, ref.section_name or ""))
    return [
        ParentRef(
            group=GATEWAY_GROUP,
            kind=PARENT_KIND,
            namespace=namespace,
            name=gateway,
            section_name=section or None,
        )
        for namespace, gateway, section in sorted(found)
    ]


def _targets(
    route: ModelRoute,
    pool: str,
    servers: dict[str, ModelServer],
    pools: dict[str, dict[str, str]],
) -> bool:
    for rule in route.spec.rules:
        for target in rule.target_models:
            if target.weight == 0:  # never chosen
                continue
            if target.inference_pool_name is not None:
                if target.inference_pool_name == pool:
                    return True
                continue
            server = servers.get(target.model_server_name or "")
            labels = server.spec.workload_selector.match_labels if server else None
            if labels is not None and pool_of_server(labels, pools) == pool:
                return True
    return False


def merge_parents(
    own: ParentRef, extra: list[ParentRef], model_name: str | None
) -> list[ParentRef]:
    """The Model's own Gateway first, then the others (the own one named again is dropped),
    at most MAX_PARENTS: more would have the HTTPRoute refused whole."""
    same = (own.namespace, own.name, own.section_name)
    out = [own] + [p for p in extra if (p.namespace, p.name, p.section_name) != same]
    if len(out) > MAX_PARENTS:
        log.warning(
            "Model %s: ModelRoutes name %d Gateways; its HTTPRoute attaches to the first %d",
            model_name, len(out), MAX_PARENTS,
        )  # fmt: skip
    return out[:MAX_PARENTS]


async def read_route_parents(
    store: Store, model: Model, own_pool_labels: dict[str, str]
) -> list[ParentRef]:
    """route_parents over what the store holds in the Model's namespace. A kind whose CRD is
    missing (or that may not be listed) counts as none of it."""
    ns = model.metadata.namespace or "default"
    routes = _typed(ModelRoute, await _list(store, MODEL_ROUTE, ns))
    if not any(r.spec.parent_refs for r in routes):
        return []
    servers = _typed(ModelServer, await _list(store, MODEL_SERVER, ns))
    pools = {
        p.metadata.name or "": dict(p.spec.selector.match_labels)
        for p in _typed(InferencePool, await _list(store, INFERENCE_POOL, ns))
    }
    return route_parents(model, own_pool_labels, routes, servers, pools)


async def _list(store: Store, kind, namespace: str) -> list[Obj]:
    try:
        objs, _ = await store.list(kind, namespace)
    except StoreError as exc:
        if exc.code not in (403, 404):
            raise
        return []
    return objs


def _typed(cls, objs: list[Obj]) -> list:
    out = []
    for obj in objs:
        try:
            typed = from_dict_as(cls, obj)
        except ApiError:
            continue  # its own controller (or the webhook) reports it
        if not validate(typed):
            out.append(typed)
    return out
