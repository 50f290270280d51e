"""A status as the controllers write it for the kinds nothing else reconciles
(networking_status.py, policy_status.py): whether an object's spec is one its CRD accepts,
and its status written only when it changed, with an Event for each condition whose reason
moved."""

from __future__ import annotations

from infergw import api
from infergw.api import ApiError
from infergw.cluster.store import NotFound, Obj, Store
from infergw.controllers.events import Recorder, condition_events

MAX_PROBLEMS = 3  # of api.validate's, quoted in a condition


def spec_problem(obj: Obj) -> str | None:
    """Why obj is not what its CRD accepts (api/ reads and validates it), or None. A cluster's
    API server refuses most of it on write; standalone manifests and older objects may not
    have been checked."""
    try:
        typed = api.from_dict(api.prune_nulls(obj))
    except ApiError as exc:
        return str(exc)
    problems = api.validate(typed)
    return "; ".join(problems[:MAX_PROBLEMS]) if problems else None


async def write_status(
    store: Store,
    events: Recorder,
    obj: Obj,
    conditions: list[dict],
    warnings: frozenset[str],
    **fields: object,
) -> None:
    """obj's status with these conditions (and `fields`: other status fields), written only
    when it changed."""
    status = {"observedGeneration": obj["metadata"].get("generation", 1), **fields}
    status["conditions"] = conditions
    if obj.get("status") == status:
        return
    await condition_events(events, obj, conditions, warnings)
    obj["status"] = status
    try:
        await store.update_status(obj)
    except NotFound:
        pass  # deleted meanwhile
