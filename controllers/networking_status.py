"""The status of ModelRoutes and ModelServers, which nothing else writes:

- ModelRoute `Accepted` (its spec reads and validates through api/: Invalid and the field
  when it does not) and `ResolvedRefs` (every ModelServer and InferencePool its rules target
  exists in its namespace: RefNotFound naming the missing ones);
- ModelServer `Ready` (how many of the pods its workloadSelector matches are ready:
  PodsReady when one is, else NoReadyPods or NoPods).

Each reconcile reads the object and what it refers to; a status equal to the last one is not
written again, and `lastTransitionTime` moves only when a condition's status does.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from infergw import api
from infergw.api import ModelRoute, ModelServer
from infergw.cluster.informer import Informer
from infergw.cluster.store import (
    INFERENCE_POOL,
    MODEL_ROUTE,
    MODEL_SERVER,
    POD,
    NotFound,
    Obj,
    Store,
    labels_match,
)
from infergw.controllers.conditions import condition, listed
from infergw.controllers.events import NO_EVENTS, Recorder
from infergw.controllers.modelinfer_pods import pod_ready
from infergw.controllers.object_status import spec_problem, write_status

# Reasons that need a person: their Events are Warnings.
ROUTE_WARNINGS = frozenset(("Invalid", "RefNotFound"))
SERVER_WARNINGS = frozenset(("NoReadyPods", "Invalid"))


class ModelRouteStatus:
    kind = MODEL_ROUTE

    def __init__(self, store: Store, events: Recorder = NO_EVENTS) -> None:
        self.store, self.events = store, events

    async def reconcile(self, namespace: str, name: str) -> float | None:
        obj = await self.store.get(MODEL_ROUTE, namespace, name)
        if obj is None:
            return None
        problem = spec_problem(obj)
        if problem is not None:
            accepted = condition(obj, "Accepted", False, "Invalid", problem)
            refs = condition(obj, "ResolvedRefs", None, "Invalid", "the spec is not valid")
        else:
            route = api.from_dict_as(ModelRoute, api.prune_nulls(obj))
            accepted = condition(obj, "Accepted", True, "Accepted", "the spec is valid")
            refs = condition(obj, "ResolvedRefs", *await self._refs(namespace, route))
        await write_status(self.store, self.events, obj, [accepted, refs], ROUTE_WARNINGS)
        return None

    async def _refs(self, namespace: str, route: ModelRoute) -> tuple[bool, str, str]:
        wanted: list[tuple[object, str]] = []
        for rule in route.spec.rules:
            for t in rule.target_models:
                if t.model_server_name:
                    wanted.append((MODEL_SERVER, t.model_server_name))
                if t.inference_pool_name:
                    wanted.append((INFERENCE_POOL, t.inference_pool_name))
        missing = []
        for kind, ref in dict.fromkeys(wanted):
            if await self._get(kind, namespace, ref) is None:
                missing.append(f"{kind.kind} {ref}")
        if missing:
            return False, "RefNotFound", f"not found in {namespace}: {listed(missing)}"
        return True, "ResolvedRefs", f"{len(dict.fromkeys(wanted))} target(s) found"

    async def _get(self, kind, namespace: str, name: str) -> Obj | None:
        try:
            return await self.store.get(kind, namespace, name)
        except NotFound:  # the API server serves no such kind (its CRD is missing)
            return None


class ModelServerStatus:
    kind = MODEL_SERVER

    def __init__(self, store: Store, events: Recorder = NO_EVENTS) -> None:
        self.store, self.events = store, events

    async def reconcile(self, namespace: str, name: str) -> float | None:
        obj = await self.store.get(MODEL_SERVER, namespace, name)
        if obj is None:
            return None
        problem = spec_problem(obj)
        if problem is not None:
            ready = condition(obj, "Ready", False, "Invalid", problem)
        else:
            server = api.from_dict_as(ModelServer, api.prune_nulls(obj))
            labels = server.spec.workload_selector.match_labels
            pods, _ = await self.store.list(POD, namespace, labels)
            ready = condition(obj, "Ready", *pods_ready(pods))
        await write_status(self.store, self.events, obj, [ready], SERVER_WARNINGS)
        return None


def pods_ready(pods: list[Obj]) -> tuple[bool, str, str]:
    """Ready: at least one of the selected pods is (the message counts them)."""
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    n = sum(1 for p in live if pod_ready(p))
    if not live:
        return False, "NoPods", "no pod matches the workloadSelector"
    return n > 0, "PodsReady" if n else "NoReadyPods", f"{n}/{len(live)} pods ready"


def servers_selecting(servers: Informer) -> Callable[[Obj], list[Hashable]]:
    """The ModelServers whose workloadSelector matches a pod: reconciled when it changes."""

    def keys(pod: Obj) -> list[Hashable]:
        ns = pod["metadata"].get("namespace", "")
        out: list[Hashable] = []
        for s in servers.items(ns):
            selector = ((s.get("spec") or {}).get("workloadSelector") or {}).get("matchLabels")
            if isinstance(selector, dict) and selector and labels_match(pod, selector):
                out.append((ns, s["metadata"]["name"]))
        return out

    return keys
