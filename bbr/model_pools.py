"""Which InferencePool serves a request's `model`: the body-based router's table.

Built from one namespace's InferencePools, ModelRoutes, ModelServers and Models (typed
through `api/`). A name resolves, in this order:

1. a ModelRoute answering it (its `modelName` or one of its `loraAdapters`; among routes for
   one name the oldest wins): the picker's own table (epp/routing/table.py) finds the route
   and the rule that matches the request's headers and path, as the picker will; a target is
   chosen by weight among those with a pool (a cross-pool split is decided here, the picker
   then picks among its own pool's targets). An `inferencePoolName` target is that pool; a
   `modelServerName` target is the pool whose selector the server's `workloadSelector`
   satisfies (every pod the server selects is a member);
2. a Model whose `servedModelName` (or name) or LoRA adapter it is: the Model's pool, which
   the controllers name after the Model (a Model before its ModelRoute exists).

Anything else is not served here: None, which the router answers 404 `model_not_found`.

With the router's Gateway known (`--gateway`), a ModelRoute whose parentRefs do not name it
and a Model on another Gateway are left out, so their names are "not served here" on this
Gateway (api/parents.py says what each names). The pools stay: a route served here may target
a Model whose own Gateway is another (the controllers attach that Model's HTTPRoute here too).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, TypeVar

from infergw.api import ApiError, Model, from_dict_as, validate
from infergw.api.meta import ApiStruct
from infergw.api.networking import ModelRoute, ModelServer
from infergw.api.parents import GatewayName, model_gateway, pool_of_server, route_served_on
from infergw.api.upstream import InferencePool
from infergw.epp.errors import PickerError
from infergw.epp.model_catalog import epoch_seconds, listed, route_cards
from infergw.epp.routing.table import RouteTable, rule_matches

log = logging.getLogger("bbr.model_pools")

Obj = dict[str, Any]
T = TypeVar("T", bound=ApiStruct)


@dataclass(frozen=True, slots=True)
class Choice:
    """Where one request goes: the pool (the header's value) and what named it."""

    pool: str
    via: str  # "ModelRoute <name>" or "Model <name>": for the log line and debugging


@dataclass(slots=True)
class ModelPools:
    routes: RouteTable = field(default_factory=RouteTable)
    # pool name -> its selector's matchLabels
    pools: dict[str, dict[str, str]] = field(default_factory=dict)
    # a Model's served name and adapters -> (the Model's pool, the Model's name)
    models: dict[str, tuple[str, str]] = field(default_factory=dict)
    # the same names -> the Model's creationTimestamp (GET /v1/models' `created`)
    created: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def build(
        cls, objects: list[Obj], namespace: str, gateway: GatewayName | None = None
    ) -> ModelPools:
        """From API dicts of every kind (others are ignored); objects outside `namespace`
        are left out, invalid ones are logged and left out, and with `gateway` the routes
        and Models not served on it."""
        mine = [o for o in objects if _namespace(o) == namespace]
        by_kind: dict[str, list[Obj]] = {}
        for obj in mine:
            by_kind.setdefault(obj.get("kind", ""), []).append(obj)
        pools = {}
        for pool in _typed_all(InferencePool, by_kind.get("InferencePool", [])):
            pools[pool.metadata.name or ""] = dict(pool.spec.selector.match_labels)
        route_objs = by_kind.get("ModelRoute", [])
        if gateway is not None:
            route_objs = [o for o in route_objs if _route_served_on(o, gateway)]
        routes = RouteTable.build(route_objs, by_kind.get("ModelServer", []), "")
        models: dict[str, tuple[str, str]] = {}
        created: dict[str, str | None] = {}
        oldest_first = sorted(
            _typed_all(Model, by_kind.get("Model", [])),
            key=lambda m: (m.metadata.creation_timestamp or "", m.metadata.name or ""),
        )
        for model in oldest_first:
            if gateway is not None and model_gateway(model) != gateway:
                continue
            name = model.metadata.name or ""
            served = [model.spec.served_model_name or name]
            served += [a.name for a in model.spec.lora_adapters or []]
            for each in served:
                models.setdefault(each, (name, name))
                created.setdefault(each, model.metadata.creation_timestamp)
        return cls(routes, pools, models, created)

    def __len__(self) -> int:
        return len(self.pools)

    def choose(
        self, model: str, headers: dict[str, str], path: str, rng: random.Random
    ) -> Choice | None:
        """The pool for `model`; None when nothing here serves it. PickerError 404 when its
        ModelRoute has no rule for this request, 503 when no target of the rule has a pool."""
        route = self.routes.route_for(model)
        if route is not None:
            name = route.metadata.name or ""
            rule = next((r for r in route.spec.rules if rule_matches(r, headers, path)), None)
            if rule is None:
                raise PickerError(404, f"no rule of ModelRoute {name} matches this request")
            options = []
            for target in rule.target_models:
                weight = 1 if target.weight is None else target.weight
                pool = self._target_pool(target)
                if weight > 0 and pool is not None:
                    options.append((weight, pool))
            if not options:
                raise PickerError(
                    503, f"no InferencePool serves the targets of ModelRoute {name} for {model!r}"
                )
            [pool] = rng.choices([p for _, p in options], weights=[w for w, _ in options])
            return Choice(pool, f"ModelRoute {name}")
        found = self.models.get(model)
        if found is not None and found[0] in self.pools:
            return Choice(found[0], f"Model {found[1]}")
        return None

    def cards(self, owner: str) -> list[dict]:
        """GET /v1/models' list for the Gateway: the routes' names, then the Models' served
        names and adapters whose pool exists (epp/model_catalog.py)."""
        served = {
            name: epoch_seconds(self.created.get(name))
            for name, (pool, _) in self.models.items()
            if pool in self.pools
        }
        return listed(route_cards(self.routes, owner), served, owner)

    def _target_pool(self, target) -> str | None:
        if target.inference_pool_name is not None:
            return target.inference_pool_name if target.inference_pool_name in self.pools else None
        server = self.routes.servers.get(target.model_server_name or "")
        return None if server is None else self.pool_of(server)

    def pool_of(self, server: ModelServer) -> str | None:
        """The pool whose members include every pod the server selects: its selector is a
        subset of the server's labels. Several: the most specific (most labels), then by name."""
        return pool_of_server(server.spec.workload_selector.match_labels or {}, self.pools)


def _namespace(obj: Obj) -> str:
    return (obj.get("metadata") or {}).get("namespace") or "default"


def _route_served_on(obj: Obj, gateway: GatewayName) -> bool:
    """Whether the ModelRoute dict is served on `gateway`; one that cannot be read is kept
    for RouteTable.build, which logs it and leaves it out."""
    try:
        route = from_dict_as(ModelRoute, obj)
    except ApiError:
        return True
    if route_served_on(route, gateway):
        return True
    log.debug(
        "ModelRoute %s: its parentRefs do not name Gateway %s, not served here",
        route.metadata.name, gateway,
    )  # fmt: skip
    return False


def _typed_all(cls: type[T], objects: list[Obj]) -> list[T]:
    out = []
    for obj in objects:
        where = f"{obj.get('kind')} {(obj.get('metadata') or {}).get('name')}"
        try:
            typed = from_dict_as(cls, obj)
        except ApiError as exc:  # names the object
            log.error("ignoring %s", exc)
            continue
        problems = validate(typed)
        if problems:
            log.error("ignoring %s: %s", where, "; ".join(problems))
            continue
        out.append(typed)
    return out
