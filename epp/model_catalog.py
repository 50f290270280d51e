"""`GET /v1/models` and `GET /v1/models/{id}`, answered by the picker itself: every name the
gateway serves, in OpenAI's shape, rather than one random pod's own list (which would show
the engine's names, not the ModelRoutes clients are meant to use).

The list is the ModelRoutes' names (`modelName` and `loraAdapters`), then the models the
pool's pods serve (base models and LoRA adapters, from each pod's `/v1/models`), each name
once. It is derived only from what every picker replica reads alike — the routes of the pool
file or the API server, and the pods' own model lists — so replicas answer the same:
`created` is the ModelRoute's creationTimestamp (for a pod's model, the earliest of the
creationTimestamps of the pods serving it; 0 where none is known), `owned_by` the
namespace of the route or pool. The body-based router answers the same way for every pool
behind its Gateway (bbr/model_pools.py: the routes and the Models' served names).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from infergw.epp.errors import ModelNotFound
from infergw.epp.routing.table import RouteTable

if TYPE_CHECKING:  # the body-based router imports this module without the picker's datastore
    from infergw.epp.datastore import Datastore

MODELS_PATH = "/v1/models"
_ONE_MODEL = MODELS_PATH + "/"
DEFAULT_OWNER = "infergate"  # a route or pool without a namespace (a bare pool file)


def model_card(name: str, created: int, owned_by: str) -> dict:
    """One entry of the list, as OpenAI's Model object."""
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by}


def epoch_seconds(timestamp: str | None) -> int:
    """An RFC 3339 timestamp (a creationTimestamp) as Unix seconds; 0 if absent or unreadable."""
    if not timestamp:
        return 0
    try:
        return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def route_cards(routes: RouteTable, owner: str) -> dict[str, dict]:
    """The names the ModelRoutes answer (each by the route that answers it: the oldest),
    owned by the route's namespace, else `owner`."""
    cards: dict[str, dict] = {}
    for route in routes.routes:
        created = epoch_seconds(route.metadata.creation_timestamp)
        for name in routes.names_of(route):
            if routes.route_for(name) is route:
                cards[name] = model_card(name, created, route.metadata.namespace or owner)
    return cards


def listed(cards: dict[str, dict], served: dict[str, int], owner: str) -> list[dict]:
    """The list: the routes' names, then the other `served` names (name → created), each in
    name order; a name both a route and a model is listed once, as the route (requests naming
    it take the route)."""
    rest = [model_card(n, served[n], owner) for n in sorted(served) if n not in cards]
    return [cards[n] for n in sorted(cards)] + rest


def model_cards(datastore: Datastore) -> list[dict]:
    """Every model name the gateway serves through this pool: its routes, then the models
    its pods list (created: the earliest of its pods' creations)."""
    pool = datastore.pool
    owner = (pool.namespace if pool else "") or DEFAULT_OWNER
    served: dict[str, int] = {}
    for endpoint in datastore.endpoints():
        created = epoch_seconds(datastore.pod_created(endpoint.pod))
        for name in endpoint.models or ():
            earliest = served.get(name)
            served[name] = created if earliest is None else min(earliest, created)
    return listed(route_cards(datastore.routes, owner), served, owner)


def answer(datastore: Datastore, method: str, path: str) -> dict | None:
    """The picker's own answer to a models request, or None when `method path` is not one.
    An id no route or pod serves raises ModelNotFound (404 `model_not_found`)."""
    return answer_from(lambda: model_cards(datastore), method, path)


def answer_from(cards: Callable[[], list[dict]], method: str, path: str) -> dict | None:
    """`GET /v1/models` or `GET /v1/models/{id}` answered from `cards()`; None for any
    other request. An unknown id raises ModelNotFound."""
    if method != "GET":
        return None
    route = path.split("?", 1)[0]
    if route == MODELS_PATH:
        return {"object": "list", "data": cards()}
    if not route.startswith(_ONE_MODEL) or route == _ONE_MODEL:
        return None
    wanted = route[len(_ONE_MODEL) :]  # an id may hold a slash: meta-llama/Llama-3.1-8B
    for card in cards():
        if card["id"] == wanted:
            return card
    raise ModelNotFound(wanted)
